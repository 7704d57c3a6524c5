"""The learning proof's smoke run, end to end (every stage, tiny sizes), and its statistics:
.venv/bin/python -m pytest -q tests/test_proof_smoke.py"""
from __future__ import annotations

import json

import pytest

from benchmod import load_bench

from spyglass.engine.trajectory import Status, Trajectory, Turn, iter_jsonl, write_jsonl


def _proof():
    return load_bench("proof_learning")


# the smoke runs' common size: a tiny world, a few steps of everything, both cores
SMOKE = ["--n-questions", "40", "--world-scale", "1", "--warmup-steps", "2", "--sft-steps", "2", "--sft-batch", "2",
         "--curve-every", "1", "--grpo-groups", "1", "--grpo-samples", "2", "--passk", "2", "--passk-questions", "2",
         "--ignore-gate", "--threads", "2"]


def test_proof_smoke_runs_every_stage_and_resumes(tmp_path, capsys):
    proof = _proof()
    out = tmp_path / "p"
    argv = ["--out", str(out), *SMOKE, "--grpo-steps", "2", "--arms", "fatal_mask_clamp", "--max-turns", "4",
            "--max-tokens-per-turn", "16", "--gate-questions", "4", "--curve-questions", "3", "--seeds", "0"]
    assert proof.main(argv) in (0, 1)  # 1: the gate failed (a random model has no fork), --ignore-gate went on
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["bench"] == "proof_learning"
    split = res["split"]
    assert all(k.startswith(("synth-1hop-page", "synth-1hop-emblem")) for k in split["kinds"])
    sides = {s: [json.loads(x) for x in (out / "synth" / f"proof_{s}_questions.jsonl").open()] for s in ("sft", "rl", "held")}
    images = {s: {q["image"] for q in rows} for s, rows in sides.items()}
    assert all(images[s] for s in images) and not (images["sft"] & images["rl"] or images["sft"] & images["held"]
                                                   or images["rl"] & images["held"])
    # the mixture: every tool trajectory of the control, and a recall demonstration (answering at
    # once) beside some of them; both files in id order (not rollout completion order)
    mix, tools = list(iter_jsonl(out / "data" / "sft_mix.jsonl")), list(iter_jsonl(out / "data" / "sft_tools.jsonl"))
    recall = [t for t in mix if not t.turns[0].calls]
    assert recall and all(t.turns[0].answered and len(t.turns) == 1 and t.id.endswith("#recall") for t in recall)
    assert all(t.turns[0].calls for t in tools) and [t.id for t in tools] == sorted(t.id for t in tools)
    assert sorted(t.id for t in mix if t.turns[0].calls) == [t.id for t in tools]
    assert {t.group_id for t in recall} < {t.group_id for t in tools}  # recall-frac 0.5 of them
    assert [t.id for t in mix] == sorted(t.id for t in mix)
    assert {t.group_id for t in mix} <= {q["id"] for q in sides["sft"]}
    # the default chain (image_search): ImageSearch first; synth ran no teacher of its own
    assert all(t.turns[0].calls[0]["name"] == "ImageSearch" for t in tools)
    assert not (out / "synth" / "trajectories.jsonl").exists()
    # the GRPO rollouts ran on RL questions with outages injected
    rl = {q["id"] for q in sides["rl"]}
    rollouts = list(iter_jsonl(out / "seed-0" / "grpo-fatal_mask_clamp" / "rollouts.jsonl"))
    assert rollouts and all(t.group_id in rl for t in rollouts) and all("faults" in t.meta for t in rollouts
                                                                         if any(tr.calls for tr in t.turns))
    r = res["seeds"]["0"]
    assert set(r["held"]) == {"SFT (mixture)", "control SFT (tools only)", "GRPO fatal_mask_clamp"}
    assert all(0.0 <= b[k] <= 1.0 for b in r["held"].values() for k in ("accuracy", "first_tool", "retry", "fatal"))
    assert [p["step"] for p in r["curves"]["fatal_mask_clamp"]] == [0, 1, 2]
    assert r["passk"]["SFT (mixture)"]["k"] == 2 and set(r["grpo_vs_sft"]) == {"fatal_mask_clamp"}
    assert (out / "curve.png").stat().st_size > 0
    assert set(r["copies"]) == {f"{m} on {q}" for m in ("sft", "sft-tools") for q in ("gate", "seen")}
    assert all(set(c) == {"query", "url", "field", "value", "replays", "grounded"} for c in r["copies"].values())
    assert all(0 <= c["grounded"] <= c["replays"] for c in r["copies"].values())
    assert {"synth", "tools", "mixture", "warmup", "seed 0 sft", "seed 0 grpo-fatal_mask_clamp to step 2"} <= set(res["stages_s"])
    # a rerun finds every stage cached and reports the same figures
    proof.main(argv)
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["seeds"] == res["seeds"] and again["stages_s"] == {}


def test_proof_runs_its_seeds_in_parallel_processes(tmp_path, capfd):
    """Several seeds: one child process per seed (--threads split), then the report from the cache."""
    proof = _proof()
    out = tmp_path / "p"
    argv = ["--out", str(out), *SMOKE, "--grpo-steps", "1", "--arms", "vanilla", "--max-turns", "2",
            "--max-tokens-per-turn", "8", "--gate-questions", "2", "--curve-questions", "2", "--seeds", "0", "1"]
    proof.main(argv)
    lines = capfd.readouterr().out.strip().splitlines()  # capfd: the children's output too
    res = json.loads(lines[-1])
    assert set(res["seeds"]) == {"0", "1"} and all("held" in r for r in res["seeds"].values())
    # the children ran every per-seed stage and reported their timings; only the parent printed a report
    assert {"seed 0 sft", "seed 1 sft", "seed 0 grpo-vanilla to step 1", "seed 1 grpo-vanilla to step 1",
            "synth", "warmup"} <= set(res["stages_s"])
    assert sum(x.startswith('{"bench"') for x in lines) == 1 and sum(x.startswith("seed 0, held-out") for x in lines) == 1


def test_parallel_seeds_stop_the_others_when_one_crashes(tmp_path, monkeypatch):
    """A child that crashes (any status but 0 and the gate's) ends the run at once: the error names
    its seed and status, and the other seed's process is terminated, not waited for."""
    import subprocess
    import sys
    import time
    proof = _proof()
    a = proof.parse_args(["--out", str(tmp_path / "p"), "--seeds", "0", "1"])
    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def popen(cmd, **kw):
        seed = int(cmd[cmd.index("--seeds") + 1])
        code = "import time; time.sleep(60)" if seed == 0 else "import sys; sys.exit(2)"
        started.append(real_popen([sys.executable, "-c", code], **kw))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", popen)
    p = proof.Proof(a)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"seed 1 exited with 2.*stopped seeds \[0\]"):
        proof.run_seeds_in_parallel(p, [], poll_s=0.05)
    assert time.monotonic() - t0 < 30 and all(proc.poll() is not None for proc in started)
    # the gate's stop (GATE_STOP) is not a crash
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, **kw: real_popen(
        [sys.executable, "-c", f"import sys; sys.exit({proof.GATE_STOP})"], **kw))
    assert proof.run_seeds_in_parallel(p, [], poll_s=0.05) == {}


def test_a_rerun_with_other_data_arguments_is_refused(tmp_path):
    proof = _proof()
    proof.Proof(proof.parse_args(["--out", str(tmp_path), "--recall-frac", "0.5"]))
    proof.Proof(proof.parse_args(["--out", str(tmp_path), "--recall-frac", "0.5", "--seeds", "3"]))  # per-seed: fine
    with pytest.raises(SystemExit, match=r"made with --recall-frac 0.5; this run asks 1.0"):
        proof.Proof(proof.parse_args(["--out", str(tmp_path), "--recall-frac", "1.0"]))
    with pytest.raises(SystemExit, match=r"made with --tool-chain image_search; this run asks ocr"):
        proof.Proof(proof.parse_args(["--out", str(tmp_path), "--recall-frac", "0.5", "--tool-chain", "ocr"]))


def _judged(path, rows):
    """rows: (question, sample, right, calls a tool first) -> an eval's agentic.jsonl."""
    trajs = [Trajectory(id=f"{q}#{i}", group_id=q, sample_index=i, prompt_ids=[1],
                        turns=[Turn(0, calls=[{"name": "Visit", "arguments": "{}"}] if tool else [])],
                        status=Status.ANSWERED, reward={"acc": float(ok)}, meta={"item_id": q})
             for q, i, ok, tool in rows]
    write_jsonl(path, trajs, append=False)
    return path


def test_paired_sign_test_greedy_and_sampled(tmp_path):
    """Greedy (one sample a question): McNemar's exact test on the discordant questions. Sampled:
    a question counts as gained or lost by its share of right samples, ties dropped."""
    proof = _proof()
    base = _judged(tmp_path / "a.jsonl", [(f"q{i}", 0, i < 2, False) for i in range(10)])  # q0, q1 right
    other = _judged(tmp_path / "b.jsonl", [(f"q{i}", 0, 1 <= i < 9, True) for i in range(10)])  # q1..q8 right
    # gained q2..q8 (7), lost q0 (1): p = 2 * (1 + 8) / 2**8
    assert proof.paired(base, other) == {"gained": 7, "lost": 1, "p": float(f"{2 * 9 / 256:.3g}")}
    assert proof.paired(other, base) == {"gained": 1, "lost": 7, "p": float(f"{2 * 9 / 256:.3g}")}
    assert proof.paired(base, base) == {"gained": 0, "lost": 0, "p": 1.0}
    # four samples: q0 1/4 -> 3/4 (higher), q1 2/4 -> 2/4 (a tie), q2 4/4 -> 0/4 (lower)
    shares = {"q0": (1, 3), "q1": (2, 2), "q2": (4, 0)}
    sa = _judged(tmp_path / "sa.jsonl", [(q, i, i < a, False) for q, (a, _) in shares.items() for i in range(4)])
    sb = _judged(tmp_path / "sb.jsonl", [(q, i, i < b, True) for q, (_, b) in shares.items() for i in range(4)])
    assert proof.paired(sa, sb) == {"gained": 1, "lost": 1, "p": 1.0}
    assert proof.pass_at(list(iter_jsonl(sa))) == {"questions": 3, "k": 4, "pass@1": (0.25 + 0.5 + 1) / 3,
                                                   "pass@k": 1.0}
    b = proof.behaviour(list(iter_jsonl(other)))
    assert b["accuracy"] == 0.8 and b["first_tool"] == 1.0 and b["tool_success"] == 0.8
    with pytest.raises(ValueError, match="judged different questions"):
        proof.paired(base, _judged(tmp_path / "c.jsonl", [("q0", 0, True, False)]))
