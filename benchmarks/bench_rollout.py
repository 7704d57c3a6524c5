"""Rollout throughput: the async engine vs a lock-step batch loop vs the zero-overhead bound.

One multi-turn workload (engine/simfleet.py: turns 1 + geometric, ~300 generated tokens
per turn, lognormal tool latency, a server whose decode step takes a + b * n_active) is run
  (a) by spyglass's Engine over a latency-modelled server (engine/backends/simulated.py) and
      sleeping tools, with the same limit on live trajectories;
  (b) by the same engine in lock-step mode (EngineConfig.lockstep: generate for all, then run
      all tools, repeat: TRL's GRPO rollout) over the same server and tools;
  (c) by the zero-overhead discrete-event simulation of continuous batching (the bound).
All durations are scaled by --time-scale so a long workload runs in seconds; the table reports
model seconds (wall / time_scale). Target: the engine within 5% of the bound.

    python benchmarks/bench_rollout.py                     # 1024 prompts, time scale 0.03
    python benchmarks/bench_rollout.py --prompts 4096 --time-scale 0.02 --skip-lockstep
"""
from __future__ import annotations

import argparse
import asyncio
import json

from spyglass.engine.metrics import device_name, git_commit
from spyglass.engine.simfleet import Workload, des_bound, lockstep_makespan, run_engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Workload()
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--live", type=int, default=d.live)
    ap.add_argument("--mean-extra-turns", type=float, default=d.mean_extra_turns)
    ap.add_argument("--max-turns", type=int, default=d.max_turns)
    ap.add_argument("--tokens", type=int, default=d.tokens_mean)
    ap.add_argument("--tool-median-s", type=float, default=d.tool_median_s)
    ap.add_argument("--tool-sigma", type=float, default=d.tool_sigma)
    ap.add_argument("--step-a-s", type=float, default=d.step_a_s)
    ap.add_argument("--step-b-s", type=float, default=d.step_b_s)
    ap.add_argument("--time-scale", type=float, default=0.03)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-lockstep", action="store_true", help="only the model of it (no run)")
    a = ap.parse_args()
    w = Workload(prompts=a.prompts, mean_extra_turns=a.mean_extra_turns, max_turns=a.max_turns,
                 tokens_mean=a.tokens, tool_median_s=a.tool_median_s, tool_sigma=a.tool_sigma,
                 step_a_s=a.step_a_s, step_b_s=a.step_b_s, live=a.live, seed=a.seed)
    work = w.sample()
    bound = des_bound(work, w.live, w.step_a_s, w.step_b_s)
    lock_model = lockstep_makespan(work, w.live, w.step_a_s, w.step_b_s)
    run = dict(live=w.live, step_a_s=w.step_a_s, step_b_s=w.step_b_s, time_scale=a.time_scale)
    eng_wall, engine = asyncio.run(run_engine(work, **run))
    eng = eng_wall / a.time_scale
    lock = None if a.skip_lockstep else asyncio.run(run_engine(work, **run, lockstep=True))[0] / a.time_scale
    n = len(work)
    rows = [("zero-overhead bound (DES)", bound), ("spyglass engine", eng),
            ("lock-step loop (run)", lock), ("lock-step loop (model)", lock_model)]
    print(f"workload: {n} trajectories, {sum(map(len, work))} turns, live {w.live}, "
          f"time scale {a.time_scale}")
    print(f"{'schedule':<28}{'makespan s':>12}{'traj/s':>10}{'vs bound':>10}")
    for name, ms in rows:
        if ms is not None:
            print(f"{name:<28}{ms:>12.1f}{n / ms:>10.2f}{ms / bound:>10.3f}")
    ratio = (lock or lock_model) / eng
    print(f"engine speed-up over lock-step: {ratio:.2f}x; engine overhead over the bound: "
          f"{(eng / bound - 1) * 100:.1f}% (target <= 5%)")
    commit = git_commit()
    print(json.dumps({"bench": "rollout", "device": device_name(),
                      "commit": commit, "trajectories": n, "live": w.live, "time_scale": a.time_scale,
                      "bound_s": bound, "engine_s": eng, "lockstep_s": lock, "lockstep_model_s": lock_model,
                      "engine_over_bound": eng / bound, "speedup_vs_lockstep": ratio,
                      "engine_turns": engine.stats.turns}))


if __name__ == "__main__":
    main()
