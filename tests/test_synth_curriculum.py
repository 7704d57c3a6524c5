"""The copy curriculum: .venv/bin/python -m pytest -q tests/test_synth_curriculum.py"""
from __future__ import annotations

import json

import pytest

from spyglass.engine.chat import HFCodec
from spyglass.engine.offline.tiny import build_tiny_vlm
from spyglass.engine.trajectory import SegmentKind
from spyglass.trainer.sft import load_sharegpt
from spyglass.trainer.synth.curriculum import write_copy_curriculum


def test_copy_records_make_every_copy_from_what_was_seen(tmp_path):
    path = write_copy_curriculum(tmp_path / "copy.jsonl", n=40, seed=3)
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(recs) == 40 and recs == [json.loads(x) for x in write_copy_curriculum(tmp_path / "b.jsonl", 40, 3)
                                        .read_text().splitlines()]
    with_ocr = 0
    for r in recs:
        conv = r["conversations"]
        calls = [json.loads(c["value"].split("</think>", 1)[1]) for c in conv if c["from"] == "function_call"]
        obs = [c["value"] for c in conv if c["from"] == "observation"]
        search, visit = calls[-2], calls[-1]
        if calls[0]["name"] == "OCR":  # the query is one of the lines OCR read
            with_ocr += 1
            assert search["arguments"]["query"] in obs[0].split("Text:\n", 1)[1].splitlines()
        else:
            assert search["arguments"]["query"] in conv[0]["value"]
        assert f"URL: {visit['arguments']['url']}" in obs[-2]  # the URL the search returned
        answer = r["meta"]["answer"]
        assert f"- {visit['arguments']['goal']}: {answer}" in obs[-1]
        assert conv[-1]["value"].endswith(f"<answer>{answer}</answer>")
    assert 5 < with_ocr < 35
    with pytest.raises(ValueError, match="n must be"):
        write_copy_curriculum(tmp_path / "c.jsonl", n=0)


def test_copy_records_load_as_sft_trajectories(tmp_path):
    path = write_copy_curriculum(tmp_path / "copy.jsonl", n=5, seed=0)
    trajs = load_sharegpt(path, HFCodec.from_model(build_tiny_vlm("qwen2_vl")))
    assert len(trajs) == 5
    for t in trajs:
        assert not t.images() and sum(s.kind is SegmentKind.GEN for s in t.segments) >= 3
        assert "<answer>" in [s for s in t.segments if s.kind is SegmentKind.GEN][-1].text
