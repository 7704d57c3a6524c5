"""The proof's copy warm-up (benchmarks/proof_warmup.py): .venv/bin/python -m pytest -q tests/test_warmup.py"""
from __future__ import annotations

import json

import pytest
import torch

from spyglass.engine.config import ConfigError
from spyglass.engine.loader import load_model
from spyglass.engine.offline.tiny import build_tokenizer
from benchmod import load_bench

_w = load_bench("proof_warmup")
CopyTask, MixedTask, RecallTask, WarmupConfig, copy_step, run_warmup = (
    _w.CopyTask, _w.MixedTask, _w.RecallTask, _w.WarmupConfig, _w.copy_step, _w.run_warmup)


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


def test_recall_task_labels_are_the_queried_values():
    tok = build_tokenizer()
    task = RecallTask(tok, (2, 4), seed=3)
    for _ in range(20):
        ids, m = task.sample()
        text = tok.decode(ids)
        block, _, asked = text.partition("\n? ")
        lines = dict(ln[2:].rsplit(sep, 1) for ln in block.splitlines()
                     for sep in [next(s for s in (": ", " = ", " — ", "  ") if s in ln[2:])])
        queries = [q.split(" => ") for q in ("? " + asked).strip().split("\n")]
        assert queries and all(q[0].startswith("? ") for q in queries)
        assert all(lines[k[2:]] == v for k, v in queries)  # each answer is the value of its key
        copied = tok.decode([i for i, k in zip(ids, m) if k])
        assert copied == "".join(f" {v}\n" for _, v in queries)


def test_copy_step_exact_is_all_tokens_right():
    tok = build_tokenizer()

    class Oracle(torch.nn.Module):  # logits that put all mass on the true next token
        def forward(self, input_ids):
            out = torch.zeros(*input_ids.shape, len(tok))
            out[:, :-1].scatter_(-1, input_ids[:, 1:, None], 1.0)
            return type("O", (), {"logits": out})()

    loss, acc, exact = copy_step(Oracle(), MixedTask(tok, (2, 3), 0, ("copy", "recall")), 8)
    assert acc == 1.0 and exact == 1.0 and loss.item() < 7.0


def test_warmup_trains_saves_and_reports(tmp_path):
    cfg = WarmupConfig(model="tiny:qwen2_vl:64x1:16", out=str(tmp_path / "w"), steps=3, batch_size=4, log_every=1)
    res = run_warmup(cfg)
    assert set(res["held_out"]) == {"copy", "recall"}
    assert all(0.0 <= v["exact"] <= v["acc"] <= 1.0 for v in res["held_out"].values())
    log = [json.loads(x) for x in (tmp_path / "w" / "warmup.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log[:-1]] == [0, 1, 2] and log[-1]["config"]["steps"] == 3
    warmed, init = load_model(str(tmp_path / "w")), load_model("tiny:qwen2_vl:64x1:16")
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
    with pytest.raises(ConfigError, match="tasks must be a non-empty subset of .*got \\('copy', 'paste'\\)"):
        WarmupConfig(tasks=("copy", "paste"))
