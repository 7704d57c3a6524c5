"""Rollout throughput: the async engine vs a lock-step batch loop vs the zero-overhead bound.

One multi-turn workload (benchmarks/rollout_sim.py: turns 1 + geometric, ~300 generated tokens
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
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rollout_sim import Workload, des_bound, lockstep_makespan  # noqa: E402

from spyglass.engine.backends.simulated import SimulatedBackend, SimulatedConfig  # noqa: E402
from spyglass.engine.metrics import device_name, git_commit  # noqa: E402
from spyglass.engine.chat import ByteCodec  # noqa: E402
from spyglass.engine.scheduler import Engine, EngineConfig, ParsedTurn, Prompt, ToolOutcome  # noqa: E402
from spyglass.engine.trajectory import Trajectory  # noqa: E402

CODEC = ByteCodec()


def turn_text(j: int, k: int, tokens: int, last: bool, rng: random.Random) -> str:
    """A turn of exactly `tokens` bytes (ByteCodec: one byte, one token) ending in a call or
    the answer, with non-repetitive filler thinking before it."""
    tail = (f"<answer>a{j}</answer>" if last else
            f'<tool_call>{{"name": "sim", "arguments": {{"j": {j}, "k": {k}}}}}</tool_call>')
    n = max(tokens - 1 - len(tail) - len("<think></think>"), 0)  # -1: the stop token
    filler = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n))
    return f"<think>{filler}</think>{tail}"


class WorkloadPolicy:
    """Replays the workload: turn k of trajectory j has the workload's token count."""

    def __init__(self, work: list[list[tuple[int, float]]]) -> None:
        self.work, self.cache = work, {}

    def forced_ids(self, traj: Trajectory, turn: int) -> list[int]:
        j = int(traj.group_id[1:])
        key = (j, turn)
        if key not in self.cache:
            turns = self.work[j]
            text = turn_text(j, turn, turns[turn][0], turn == len(turns) - 1, random.Random(j * 1000 + turn))
            self.cache[key] = CODEC.encode_text(text) + [CODEC.IM_END]
        return self.cache[key]


def parse(text: str) -> ParsedTurn:
    """The production parser when the C++ core has it; the workload's format is fixed."""
    if "<answer>" in text:
        return ParsedTurn([], [], text.split("<answer>", 1)[1].split("</answer>", 1)[0])
    body = text.split("<tool_call>", 1)[1].split("</tool_call>", 1)[0]
    return ParsedTurn([{"name": "sim", "arguments": json.dumps(json.loads(body)["arguments"])}], [], None)


def make_tools(work, scale: float):
    async def tools(calls, traj):
        out = []
        for c in calls:
            a = json.loads(c["arguments"])
            await asyncio.sleep(work[a["j"]][a["k"]][1] * scale)
            out.append(ToolOutcome("ok"))
        return out
    return tools


def server(w: Workload, scale: float) -> SimulatedBackend:
    return SimulatedBackend(SimulatedConfig(step_base_s=w.step_a_s, step_per_seq_s=w.step_b_s,
                                            max_seqs=w.live, time_scale=scale, vocab_size=CODEC.vocab_size))


async def run_engine(w: Workload, work, scale: float, lockstep: bool = False) -> tuple[float, Engine]:
    """The engine over the workload; lockstep=True is the same loop as TRL-style batches."""
    backend = server(w, scale)
    cfg = EngineConfig(n_samples=1, max_live=w.live, max_inflight_per_server=w.live, lockstep=lockstep,
                       max_turns=w.max_turns, timeout_s=1e9, repetition_min_tokens=10**9)
    engine = Engine(cfg, [backend], CODEC, make_tools(work, scale), parse, policy=WorkloadPolicy(work))
    t0 = time.perf_counter()
    n = 0
    async for g in engine.run(Prompt(f"p{j}", "q") for j in range(len(work))):
        n += len(g)
    wall = time.perf_counter() - t0
    await backend.close()
    assert n == len(work), (n, len(work))
    return wall, engine


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
    eng_wall, engine = asyncio.run(run_engine(w, work, a.time_scale))
    eng = eng_wall / a.time_scale
    lock = None if a.skip_lockstep else asyncio.run(run_engine(w, work, a.time_scale, lockstep=True))[0] / a.time_scale
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
