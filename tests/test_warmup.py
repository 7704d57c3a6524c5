"""Copy warm-up: .venv/bin/python -m pytest -q tests/test_warmup.py"""
from __future__ import annotations

import json

import pytest
import torch

from spyglass.engine.config import ConfigError
from spyglass.engine.tiny import build_tokenizer, load_model, load_tiny
from spyglass.trainer.warmup import CopyTask, WarmupConfig, run_warmup


def test_copy_task_labels_are_exactly_the_repeat():
    tok = build_tokenizer()
    task = CopyTask(tok, (2, 3), seed=0)
    ids, mask, labels = task.batch(6)
    arrow = tok(" => ", add_special_tokens=False)["input_ids"]
    for i in range(6):
        row = ids[i, : int(mask[i].sum())].tolist()
        k = (len(row) - len(arrow)) // 2
        assert row[:k] == row[k + len(arrow):] and row[k:k + len(arrow)] == arrow
        assert labels[i, k + len(arrow): len(row)].tolist() == row[k + len(arrow):]
        assert (labels[i, : k + len(arrow)] == -100).all() and (labels[i, len(row):] == -100).all()
    again = CopyTask(tok, (2, 3), seed=0).batch(6)[0]
    assert torch.equal(again, ids)


def test_warmup_trains_saves_and_reports(tmp_path):
    cfg = WarmupConfig(model="tiny:qwen2_vl:64x1:16", out=str(tmp_path / "w"), steps=3, batch_size=4, log_every=1)
    res = run_warmup(cfg)
    assert 0.0 <= res["held_out_copy_acc"] <= 1.0
    log = [json.loads(x) for x in (tmp_path / "w" / "warmup.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log[:-1]] == [0, 1, 2] and log[-1]["config"]["steps"] == 3
    warmed, init = load_tiny(tmp_path / "w"), load_model("tiny:qwen2_vl:64x1:16")
    changed = [k for k, v in init.model.state_dict().items() if not torch.equal(v, warmed.model.state_dict()[k])]
    assert any("embed_tokens" in k for k in changed)
    assert not any("visual" in k for k in changed)  # text-only sequences leave the vision tower alone


def test_warmup_config_names_bad_values():
    with pytest.raises(ConfigError, match="steps must be an int >= 1, got 0"):
        WarmupConfig(steps=0)
    with pytest.raises(ConfigError, match="model must be"):
        WarmupConfig(model="tiny:llava")
    with pytest.raises(ConfigError, match="names must be"):
        WarmupConfig(names=(3, 2))
