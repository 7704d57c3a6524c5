"""The training proof's smoke run, end to end (every stage, tiny sizes; ~25 s):
.venv/bin/python -m pytest -q tests/test_proof_smoke.py"""
from __future__ import annotations

import json

import pytest

from benchmod import load_bench

from spyglass.engine.trajectory import Status, Trajectory, write_jsonl


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
    assert set(res["grpo_vs_sft"]) == {"fatal_mask_clamp"} and {"gained", "lost", "p"} <= set(res["sft_vs_no_tool"])
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


def test_proof_smoke_recites_the_question_and_anchors_grpo(tmp_path, capsys):
    """--recite-question reaches the teacher's data, GRPO's rollouts and the evals (every
    observation ends with the question); --grpo-sft-coef adds the SFT data's NLL to GRPO's steps."""
    from spyglass.engine.trajectory import SegmentKind, iter_jsonl

    out = tmp_path / "p"
    argv = ["--out", str(out), "--n-questions", "30", "--world-scale", "1", "--warmup-steps", "2",
            "--sft-steps", "2", "--sft-batch", "2", "--grpo-steps", "1", "--grpo-groups", "1", "--grpo-samples", "2",
            "--arms", "vanilla", "--max-turns", "4", "--max-tokens-per-turn", "16", "--threads", "2",
            "--recite-question", "--grpo-sft-coef", "0.5", "--grpo-sft-batch", "2"]
    assert _proof().main(argv) == 0
    capsys.readouterr()
    for f in (out / "synth" / "train_trajectories.jsonl", out / "grpo-vanilla" / "rollouts.jsonl",
              out / "eval" / "sft" / "agentic.jsonl"):
        obs = [(t, s) for t in iter_jsonl(f) for s in t.segments if s.kind is SegmentKind.OBS]
        assert obs, f
        assert all(s.text.endswith(f"\nQuestion: {t.prompt_messages[0]['content']}") for t, s in obs), f
    step = json.loads((out / "grpo-vanilla" / "metrics.jsonl").read_text().splitlines()[0])
    assert step["skipped_update"] == 0.0 and 0 < step["sft_nll"] < 20  # no filter: every step updates


def test_paired_counts_discordant_questions_and_sign_test(tmp_path):
    proof = _proof()

    def ev(name, accs):
        f = tmp_path / f"{name}.jsonl"
        write_jsonl(f, [Trajectory(id=f"q{i}#0", group_id=f"q{i}", sample_index=0, prompt_ids=[1],
                                   status=Status.ANSWERED, reward={"acc": float(a)}, meta={"item_id": f"q{i}"})
                        for i, a in enumerate(accs)])
        return f
    base, other = ev("sft", [1, 1, 0, 0, 0, 0]), ev("grpo", [1, 0, 1, 1, 1, 0])
    # discordant: 3 gained, 1 lost -> p = 2 * (C(4,0) + C(4,1)) / 2^4 = 0.625
    assert proof.paired(base, other) == {"gained": 3, "lost": 1, "p": 0.625}
    assert proof.paired(base, base) == {"gained": 0, "lost": 0, "p": 1.0}
    wide = ev("wide", [0] * 9 + [1] * 9)  # against 18 wrong: 9 gained, 0 lost -> p = 2 / 2^9
    assert proof.paired(ev("zeros", [0] * 18), wide)["p"] == round(2 / 2 ** 9, 4)
    with pytest.raises(ValueError, match="only in the second: .*'q10'"):
        proof.paired(base, wide)
