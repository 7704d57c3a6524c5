"""Does GRPO move the reward at all on the proof's student? A few-question bandit.

Takes the questions of a GRPO rollouts file whose groups were mixed (some samples right, some
wrong: the questions the student sometimes solves), and runs GRPO on only those, so every
question comes back every step. If the training reward rises here but not in the proof's broad
runs, the update works and the broad runs see too little RL per question; if it falls, suspect
the update. Needs a finished proof run (its SFT model, its training questions). Prints the reward
per step and one JSON line.

    .venv/bin/python benchmarks/grpo_bandit.py --proof runs/proof --rollouts runs/proof/grpo-vanilla/rollouts.jsonl
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proof_learning as P  # noqa: E402


def mixed_questions(rollouts: Path, n: int) -> list[str]:
    """Ids of the first `n` groups in `rollouts` with some samples right and some wrong."""
    groups: dict[str, list[float]] = collections.defaultdict(list)
    for line in rollouts.read_text().splitlines():
        r = json.loads(line)
        groups[r["group_id"]].append(float((r.get("reward") or {}).get("total") or 0.0))
    mixed = [g for g, v in groups.items() if 0 < sum(x > 0.5 for x in v) < len(v)]
    if not mixed:
        raise SystemExit(f"no mixed groups in {rollouts}: nothing for the bandit to learn")
    return mixed[:n]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--proof", required=True, help="a finished proof_learning --out directory")
    ap.add_argument("--rollouts", required=True, help="a GRPO rollouts.jsonl of that run")
    ap.add_argument("--out", default="", help="default: <proof>/bandit-<arm>-<lr>")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--arm", default="fatal_mask_clamp", choices=P.MODES)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    proof = Path(a.proof)
    out = Path(a.out or proof / f"bandit-{a.arm}-{a.lr:g}")
    out.mkdir(parents=True, exist_ok=True)
    ids = set(mixed_questions(Path(a.rollouts), a.questions))
    train = proof / "synth" / "train_questions.jsonl"
    rows = [x for x in train.read_text().splitlines() if x.strip() and json.loads(x)["id"] in ids]
    qfile = proof / "synth" / f"bandit_{len(rows)}.jsonl"  # beside the images the questions name
    qfile.write_text("".join(x + "\n" for x in rows))
    p = P.Proof(P.parse_args(["--out", str(proof)]))
    rollout = P.RolloutConfig(engine=P.dataclasses.replace(p.engine(a.samples, a.temperature), groups_per_step=len(rows)),
                              env=p.env(qfile),
                              model=str(proof / "sft" / "final"), policy="sample",
                              out=str(out / "rollouts.jsonl"), progress=False)
    cfg = P.GRPOConfig(rollout=rollout, algo=P.AlgoConfig(mode=a.arm),
                       update=P.UpdateConfig(lr=a.lr, temperature=a.temperature), steps=a.steps,
                       ckpt_dir=str(out / "ckpt"), log_dir=str(out),
                       export_dir=str(out / "final"), seed=0)
    P.run_grpo(cfg)
    rewards = [round(json.loads(x)["reward/mean"], 3) for x in (out / "metrics.jsonl").read_text().splitlines()]
    print(json.dumps({"bench": "grpo_bandit", "device": P.device_name(), "commit": P.git_commit(),
                      "args": vars(a), "questions": sorted(ids), "reward_per_step": rewards}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
