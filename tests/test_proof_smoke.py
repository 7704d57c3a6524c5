"""The training proof's smoke run, end to end (every stage, tiny sizes; ~25 s):
.venv/bin/python -m pytest -q tests/test_proof_smoke.py"""
from __future__ import annotations

import json

from benchmod import load_bench


def _proof():
    return load_bench("proof_learning")


def test_proof_smoke_runs_every_stage_and_resumes(tmp_path, capsys):
    proof = _proof()
    argv = ["--out", str(tmp_path / "p"), "--n-questions", "30", "--world-scale", "1", "--warmup-steps", "2",
            "--copy-curriculum", "4", "--sft-steps", "2", "--sft-batch", "2", "--grpo-steps", "1",
            "--grpo-groups", "1", "--grpo-samples", "2", "--arms", "fatal_mask_clamp", "--max-turns", "4",
            "--max-tokens-per-turn", "16", "--threads", "2"]
    assert proof.main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["bench"] == "proof_learning"
    assert set(res["accuracy"]) == {"no-tool SFT (direct)", "SFT (direct, tools off)", "SFT (with tools)",
                                    "SFT + GRPO fatal_mask_clamp"}
    assert all(0.0 <= v <= 1.0 for v in res["accuracy"].values())
    for side in ("train", "held"):
        f = res["sft_teacher_forced"][side]
        assert f["copies"] > 0 and f["copy_tokens"] >= f["copies"]
        assert all(0.0 <= f[k] <= 1.0 for k in ("gen_token_acc", "copy_token_acc", "copy_exact"))
    assert {"warmup", "sft", "sft-direct", "grpo-fatal_mask_clamp"} <= set(res["stages_s"])
    ids = [json.loads(x)["id"] for x in (tmp_path / "p" / "synth" / "train_trajectories.jsonl").open()]
    assert ids and ids == sorted(ids)  # SFT data order independent of rollout completion order
    # a rerun finds every stage cached and reports the same accuracies
    assert proof.main(argv) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["accuracy"] == res["accuracy"] and "sft" not in again["stages_s"]
