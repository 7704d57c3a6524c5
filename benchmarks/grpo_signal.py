"""Is there a learning signal in GRPO's gradient? Split-half agreement on a proof run's rollouts.

Takes the first `--steps` steps of rollouts of one or more GRPO arms of a proof run
(benchmarks/proof_learning.py: they were sampled by the SFT model or within a few updates of
it), computes their advantages (trainer.algorithm, --mode / --filter), splits the groups that
carry a non-zero advantage into two random halves, and reports the cosine between the two
halves' policy gradients (the real loss of trainer.update, at the SFT model's weights).
Control: the same with the advantages permuted within each group (same values, same zero sum,
no link to what each trajectory did). A real signal shows as a cosine well above the control's;
noise as both near zero.

    .venv/bin/python benchmarks/grpo_signal.py --run runs/proof/seed-0 --arms vanilla fatal_mask fatal_mask_clamp

Prints a table and one JSON line. Figures: benchmarks/README.md "Training works?".
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from spyglass.engine.metrics import device_name, git_commit
from spyglass.engine.loader import load_model
from spyglass.engine.trajectory import iter_jsonl
from spyglass.trainer.algorithm import FILTERS, MODES, AlgoConfig, compute_advantages
from spyglass.trainer.update import PolicyUpdater, UpdateConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/proof/seed-0",
                    help="one seed of a proof_learning run (its sft/final and grpo-<arm>/rollouts.jsonl)")
    ap.add_argument("--arms", nargs="+", default=["vanilla", "fatal_mask", "fatal_mask_clamp"])
    ap.add_argument("--steps", type=int, default=4, help="first GRPO steps of each arm's rollouts")
    ap.add_argument("--groups-per-step", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4, help="group size")
    ap.add_argument("--mode", default="fatal_mask_clamp", choices=MODES)
    ap.add_argument("--filter", default="acc", choices=FILTERS)
    ap.add_argument("--temperature", type=float, default=0.7, help="the rollouts' sampling temperature")
    ap.add_argument("--splits", type=int, default=5, help="random half splits")
    ap.add_argument("--threads", type=int, default=0)
    return ap.parse_args(argv)


class Gradients:
    """Policy gradients of trainer.update's loss at fixed weights (the optimizer step is replaced
    by a read of the gradient, so the weights never move)."""

    def __init__(self, model_dir: Path, temperature: float) -> None:
        vlm = load_model(str(model_dir))
        self.up = PolicyUpdater(vlm.model, UpdateConfig(lr=1e-6, temperature=temperature),
                                image_processor=vlm.image_processor)
        rt, self.grad = self.up.runtime, None

        def read() -> float:
            self.grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                   for p in rt.params])
            rt.zero_grad()
            return 0.0
        rt.step = read

    def __call__(self, trajs: list, adv: torch.Tensor, masks: list) -> torch.Tensor:
        self.up.step(trajs, adv, masks)
        return self.grad


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    run = Path(a.run)
    n = a.steps * a.groups_per_step * a.samples
    trajs = []
    for arm in a.arms:
        for t in list(iter_jsonl(run / f"grpo-{arm}" / "rollouts.jsonl"))[:n]:
            t.group_id = f"{arm}/{t.group_id}"  # the arms share prompts: keep their groups apart
            trajs.append(t)
    algo = compute_advantages(trajs, AlgoConfig(mode=a.mode, filter_groups=a.filter))
    live = [i for i in range(len(trajs)) if algo.keep[i] and bool(algo.masks[i].any())]
    groups = sorted({trajs[i].group_id for i in live if algo.advantages[i] != 0})
    if len(groups) < 2:
        raise SystemExit(f"only {len(groups)} group(s) with a non-zero advantage in {len(trajs)} "
                         f"trajectories of {a.arms} under {run}: nothing to split")
    shuffled = algo.advantages.clone()
    rng = random.Random(0)
    by_group: dict[str, list[int]] = {}
    for i, t in enumerate(trajs):
        by_group.setdefault(t.group_id, []).append(i)
    for ix in by_group.values():
        perm = ix[:]
        rng.shuffle(perm)
        shuffled[ix] = algo.advantages[perm]
    grads = Gradients(run / "sft" / "final", a.temperature)
    cos: dict[str, list[float]] = {"advantages": [], "shuffled (control)": []}
    for s in range(a.splits):
        order = groups[:]
        random.Random(s + 1).shuffle(order)
        halves = [set(order[: len(order) // 2]), set(order[len(order) // 2: 2 * (len(order) // 2)])]
        for name, adv in (("advantages", algo.advantages), ("shuffled (control)", shuffled)):
            g = []
            for h in halves:
                ix = [i for i in live if trajs[i].group_id in h]
                g.append(grads([trajs[i] for i in ix], adv[ix], [algo.masks[i] for i in ix]))
            cos[name].append(float(torch.nn.functional.cosine_similarity(g[0], g[1], dim=0)))
    print(f"{len(trajs)} trajectories ({a.arms}, first {a.steps} steps each), {len(groups)} groups with a "
          f"signal under mode={a.mode} filter={a.filter}; halves of {len(groups) // 2} groups, {a.splits} splits")
    print("| advantages | split-half gradient cosine (mean) | min | max |\n|---|---:|---:|---:|")
    for name, c in cos.items():
        print(f"| {name} | {sum(c) / len(c):.3f} | {min(c):.3f} | {max(c):.3f} |")
    print(json.dumps({"bench": "grpo_signal", "device": device_name(), "commit": git_commit(),
                      "args": vars(a), "trajectories": len(trajs), "groups": len(groups),
                      "cosine": {k: [round(x, 4) for x in v] for k, v in cos.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
