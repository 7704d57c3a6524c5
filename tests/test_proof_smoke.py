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
    assert {t.group_id for t in recall} == {t.group_id for t in tools}  # --recall-frac 1: beside every one
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
    # the curve's ends are the held-out evals read on the curve questions; only step 1 had its own eval
    evals = {d.name for d in (out / "seed-0" / "eval").iterdir()}
    assert "curve-fatal_mask_clamp-1" in evals and not {"curve-sft", "curve-fatal_mask_clamp-2"} & evals
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
    args = lambda *x: proof.parse_args(["--out", str(tmp_path / "p"), "--recall-frac", "0.5", *x])  # noqa: E731
    p = proof.Proof(args())
    proof.Proof(args("--seeds", "3", "--max-turns", "4"))  # per-seed arguments: not the shared stages' business
    with pytest.raises(SystemExit, match=r"made with --recall-frac 0.5; this run asks 1.0"):
        proof.Proof(proof.parse_args(["--out", str(tmp_path / "p"), "--recall-frac", "1.0"]))
    with pytest.raises(SystemExit, match=r"made with --tool-chain image_search; this run asks ocr"):
        proof.Proof(args("--tool-chain", "ocr"))
    # each seed's stages: their own arguments, in seed-N/args.json
    p.check_args(p.out / "seed-0", proof.SEED_ARGS)
    proof.Proof(args("--grpo-lr", "1e-3")).check_args(p.out / "seed-1", proof.SEED_ARGS)  # another seed: fine
    with pytest.raises(SystemExit, match=r"seed-0 was made with --grpo-lr 0.0002; this run asks 0.001"):
        proof.Proof(args("--grpo-lr", "1e-3")).check_args(p.out / "seed-0", proof.SEED_ARGS)
    # an argument newer than a seed's args.json: that folder was made with its default
    f = p.out / "seed-0" / "args.json"
    f.write_text(json.dumps({k: v for k, v in json.loads(f.read_text()).items() if k != "fatal_errors"}))
    with pytest.raises(SystemExit, match=r"seed-0 was made with --fatal-errors any; this run asks tool"):
        proof.Proof(args("--fatal-errors", "tool")).check_args(p.out / "seed-0", proof.SEED_ARGS)
    p.check_args(p.out / "seed-0", proof.SEED_ARGS)  # the default: fine, and now recorded
    assert json.loads(f.read_text())["fatal_errors"] == "any"
    # a folder of an older proof (data/, no args.json, or an older data format) is refused, not misread
    (tmp_path / "old" / "data").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"holds data of an older proof \(data format None"):
        proof.Proof(proof.parse_args(["--out", str(tmp_path / "old")]))


def _judged(path, rows):
    """rows: (question, sample, right, calls a tool first) -> an eval's agentic.jsonl."""
    trajs = [Trajectory(id=f"{q}#{i}", group_id=q, sample_index=i, prompt_ids=[1],
                        turns=[Turn(0, calls=[{"name": "Visit", "arguments": "{}"}] if tool else [])],
                        status=Status.ANSWERED, reward={"acc": float(ok)}, meta={"item_id": q})
             for q, i, ok, tool in rows]
    write_jsonl(path, trajs, append=False)
    return path


def test_paired_sampled_pairs_a_question_by_its_share_of_right_samples(tmp_path):
    """Several samples a question (the pass@k evals): gained / lost by the share of right samples, ties dropped."""
    proof = _proof()
    shares = {"q0": (1, 3), "q1": (2, 2), "q2": (4, 0), "q3": (0, 1)}  # higher, a tie, lower, higher
    sa = _judged(tmp_path / "sa.jsonl", [(q, i, i < a, False) for q, (a, _) in shares.items() for i in range(4)])
    sb = _judged(tmp_path / "sb.jsonl", [(q, i, i < b, True) for q, (_, b) in shares.items() for i in range(4)])
    assert proof.paired(sa, sb) == {"gained": 2, "lost": 1, "p": 1.0}
    assert proof.paired(sb, sa) == {"gained": 1, "lost": 2, "p": 1.0}


def _traj(i: int, acc: float, turns: list[Turn], status: Status = Status.ANSWERED, fatal: int | None = None):
    return Trajectory(id=f"q{i}#0", group_id=f"q{i}", sample_index=0, prompt_ids=[1], status=status, turns=turns,
                      fatal_step=fatal, reward={"acc": acc}, meta={"item_id": f"q{i}"})


def test_behaviour_counts_the_fork_retries_and_cascades():
    b = _proof().behaviour
    call = lambda name: {"name": name, "arguments": "{}"}  # noqa: E731
    fail = lambda name, kind="transient": {"name": name, "kind": kind, "message": "x"}  # noqa: E731
    trajs = [
        _traj(0, 1.0, [Turn(0, calls=[call("OCR")], tool_errors=[fail("OCR")]), Turn(1, calls=[call("OCR")]),
                       Turn(2, answered=True)]),                                   # tool branch, a retry, right
        _traj(1, 0.0, [Turn(0, answered=True)]),                                   # recall, wrong
        _traj(2, 0.0, [Turn(0, calls=[call("OCR")], tool_errors=[fail("OCR")]), Turn(1, calls=[call("Visit")])]),
        _traj(3, 0.0, [Turn(0, calls=[call("OCR")], tool_errors=[fail("OCR", "bad_args")]), Turn(1, answered=True)],
              Status.FATAL, fatal=0),                                              # a bad_args error is no retry case
    ]
    got = b(trajs)
    assert got["accuracy"] == 0.25 and got["first_tool"] == 0.75 and got["tool_success"] == pytest.approx(1 / 3)
    assert got["failed_turns"] == 2 and got["retry"] == 0.5 and got["fatal"] == 0.25 and got["answered"] == 0.75


def test_copy_exact_scores_each_copy_through_its_closing_token():
    import math
    from spyglass.engine.trajectory import Segment, SegmentKind

    class Tok:  # one string per token id
        vocab = ['<think>Step 3.</think>\n<tool_call>{"name": "TextSearch", "arguments": {"query": "', "Bran", "dos",
                 '"', "}}</tool_call>", "<think>The page says ", "founded", ": ", "16", "26", ".</think>",
                 "\n<answer>1626</answer>"]

        def decode(self, ids):
            return "".join(self.vocab[i] for i in ids)

    def gen(ids, probs):
        return Segment(SegmentKind.GEN, ids, turn=0, logprobs=[math.log(p) for p in probs], version=0)
    t = _traj(0, 1.0, [])
    t.segments = [gen([0, 1, 2, 3, 4], [1, 0.9, 0.9, 0.6, 1]),            # query "Brandos": Bran, dos and the quote
                  gen([5, 6, 7, 8, 9, 10, 11], [1, 0.9, 0.9, 0.9, 0.2, 0.9, 1])]  # field: founded + ": "; value: 16 26 .
    got = _proof().copy_exact(Tok(), [t])
    assert got["query"] == {"copies": 1, "tokens": 1.0, "exact": 1.0}
    assert got["field"] == {"copies": 1, "tokens": 1.0, "exact": 1.0}
    assert got["value"] == {"copies": 1, "tokens": round(2 / 3, 3), "exact": 0.0}
    assert got["url"] == {"copies": 0, "tokens": 0.0, "exact": 0.0}
    t.segments = [gen([0, 1, 2], [1, 0.9, 0.9])]  # cut before the closing quote: no copy measured
    assert _proof().copy_exact(Tok(), [t])["query"]["copies"] == 0


def test_tool_chain_image_search_scripts(tmp_path):
    """--tool-chain image_search: the teacher searches by the image and visits the page found
    (no fix, no OCR, no typed name); ocr keeps the world's own hops."""
    proof = _proof()
    q = {"id": "q", "answer": "1908", "hops": [{"action": "sharpen"}, {"action": "ocr", "value": "Sourk Dynamics"},
                                                {"action": "visit", "doc": "org-119", "field": "founded", "value": "1908"}]}
    (turns,) = proof.Proof(proof.parse_args(["--out", str(tmp_path / "is"), "--tool-chain", "image_search"])).scripts([q]).values()
    assert len(turns) == 3 and '"name": "ImageSearch"' in turns[0] and '"image": "img_1"' in turns[0]
    assert '"url": "corpus://org-119"' in turns[1] and '"goal": "founded"' in turns[1]
    assert turns[2] == "<think>The page says founded: 1908.</think>\n<answer>1908</answer>"
    (ocr,) = proof.Proof(proof.parse_args(["--out", str(tmp_path / "ocr"), "--tool-chain", "ocr"])).scripts([q]).values()
    assert [t.split('"name": "')[1].split('"')[0] for t in ocr[:-1]] == ["Sharpen", "OCR", "TextSearch", "Visit"]


def test_pass_at_k_over_samples():
    trajs = [_traj(0, a, []) for a in (1.0, 0.0, 0.0, 0.0)] + [_traj(1, 0.0, []) for _ in range(4)]
    assert _proof().pass_at(trajs) == {"questions": 2, "k": 4, "pass@1": 0.125, "pass@k": 0.5}


def test_paired_counts_discordant_questions_and_sign_test(tmp_path):
    proof = _proof()

    def ev(name, accs):
        f = tmp_path / f"{name}.jsonl"
        write_jsonl(f, [_traj(i, float(a), []) for i, a in enumerate(accs)])
        return f
    base, other = ev("sft", [1, 1, 0, 0, 0, 0]), ev("grpo", [1, 0, 1, 1, 1, 0])
    # discordant: 3 gained, 1 lost -> p = 2 * (C(4,0) + C(4,1)) / 2^4 = 0.625
    assert proof.paired(base, other) == {"gained": 3, "lost": 1, "p": 0.625}
    assert proof.paired(base, base) == {"gained": 0, "lost": 0, "p": 1.0}
    wide = ev("wide", [0] * 9 + [1] * 9)  # against 18 wrong: 9 gained, 0 lost -> p = 2 / 2^9
    assert proof.paired(ev("zeros", [0] * 18), wide)["p"] == pytest.approx(2 / 2 ** 9, rel=1e-3)  # kept to 3 significant digits, not rounded to 0
    with pytest.raises(ValueError, match="only in the second: .*'q10'"):
        proof.paired(base, wide)
