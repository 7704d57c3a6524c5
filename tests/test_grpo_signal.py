"""benchmarks/grpo_signal.py on a hand-made run directory: a tiny model as the "SFT model" and
rollouts whose groups are copies of one right/wrong pair, so the two halves' gradients are the
same and their cosine must be 1. Run: .venv/bin/python -m pytest -q tests/test_grpo_signal.py"""
from __future__ import annotations

import copy
import json

import pytest
from benchmod import load_bench
from test_update import fresh, make_traj

from spyglass.engine.offline import tiny
from spyglass.engine.trajectory import Status, Turn, write_jsonl


def _signal():
    return load_bench("grpo_signal")


def test_identical_halves_have_cosine_one(tmp_path, capsys):
    v = fresh()
    run = tmp_path / "run"
    v.save(run / "sft" / "final")
    pair = [make_traj(v, 0), make_traj(v, 1, images=False)]
    for t, acc in zip(pair, (1.0, 0.0)):
        t.status = Status.ANSWERED
        t.turns = [Turn(0, calls=[{"name": "Crop", "arguments": "{}"}]), Turn(1, answered=True)]
        t.answer = "x"
        t.reward = {"acc": acc, "total": acc}
    trajs = []
    for g in range(4):
        for j, t in enumerate(pair):
            c = copy.deepcopy(t)
            c.id, c.group_id, c.sample_index = f"g{g}-{j}", f"q{g}", j
            trajs.append(c)
    (run / "grpo-vanilla").mkdir()
    write_jsonl(run / "grpo-vanilla" / "rollouts.jsonl", trajs)
    args = ["--run", str(run), "--arms", "vanilla", "--steps", "1", "--groups-per-step", "4", "--samples", "2",
            "--mode", "vanilla", "--temperature", "1.0", "--splits", "2", "--threads", "1"]
    assert _signal().main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["groups"] == 4 and out["trajectories"] == 8
    assert out["cosine"]["advantages"] == pytest.approx([1.0, 1.0], abs=1e-4)
    # no group differs in accuracy once every reward is the same: a clear error, not a cosine of nothing
    for t in trajs:
        t.reward = {"acc": 0.0, "total": 0.0}
    write_jsonl(run / "grpo-vanilla" / "rollouts.jsonl", trajs, append=False)
    with pytest.raises(SystemExit, match="only 0 group"):
        _signal().main(args)
