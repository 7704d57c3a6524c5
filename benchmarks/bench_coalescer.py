"""Benchmark: call coalescer/batcher, C++ core vs the pure-Python reference, on GRPO-style groups.

Workload: G groups of size g (8 and 16) each run `turns` tool turns; on the first turn half of a
group's trajectories issue the same query (the prompt's obvious first search) and the other half
distinct ones; later turns are all distinct. Two measurements per backend:
  core    the explicit-clock core alone (submit every call of a turn, poll, complete): µs/call
  asyncio the full `Coalescer` adapter: one coroutine per trajectory awaiting `submit` per turn,
          with a zero-cost batched dispatch, so the time is all coalescer + event-loop overhead;
          "floor" is the same coroutines awaiting a future the loop resolves at once (no
          coalescer), and "adapter" = asyncio - floor is what the coalescer adds per call
Also reports the coalescing ratio (calls submitted / calls executed). Prints a table, then one
JSON line with the device and git commit.

    .venv/bin/python benchmarks/bench_coalescer.py [--groups 256] [--turns 3] [--repeats 5]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from spyglass.engine import _core
from spyglass.engine.coalescer import Coalescer
from spyglass.engine.coalescer_ref import CoalescerCoreRef
from spyglass.engine.metrics import device_name as device, git_commit as commit  # noqa: E402

TOOLS = ("text_search", "image_search", "visit")


def workload(groups: int, group_size: int, turns: int) -> list[list[tuple[str, str]]]:
    """Per turn, the (tool, canonical args) of every trajectory, trajectories in order."""
    out = []
    for turn in range(turns):
        calls = []
        for g in range(groups):
            for k in range(group_size):
                shared = turn == 0 and k < group_size // 2
                q = f"group {g} first query" if shared else f"group {g} traj {k} turn {turn}"
                tool = TOOLS[(g + turn) % len(TOOLS)] if shared else TOOLS[(g + k + turn) % 3]
                calls.append((tool, json.dumps({"query": q}, separators=(",", ":"))))
        out.append(calls)
    return out


def run_core(core: Any, turns: list[list[tuple[str, str]]]) -> tuple[float, dict[str, int]]:
    """Seconds for all turns through an explicit-clock core (each turn arrives at once)."""
    now = 0.0
    t0 = time.perf_counter()
    for calls in turns:
        for tool, args in calls:
            core.submit(tool, args, now)
        now += 1.0
        for batch_id, _, _ in core.poll(now):
            core.complete(batch_id)
    return time.perf_counter() - t0, core.stats()


async def _asyncio_run(backend: str, turns: list[list[tuple[str, str]]]) -> tuple[float, dict]:
    async def dispatch(tool: str, args: list[str]) -> list[object]:
        return args

    co = Coalescer(dispatch, max_batch=64, max_wait_s=0.0005, backend=backend)
    n = len(turns[0])

    async def trajectory(i: int) -> None:
        for calls in turns:
            await co.submit(*calls[i])

    t0 = time.perf_counter()
    await asyncio.gather(*[trajectory(i) for i in range(n)])
    elapsed = time.perf_counter() - t0
    await co.aclose()
    return elapsed, co.stats


async def _asyncio_floor(turns: list[list[tuple[str, str]]]) -> tuple[float, dict]:
    """The same coroutines awaiting a future the loop resolves at once: no coalescer at all."""
    loop = asyncio.get_running_loop()

    def submit(tool: str, args: str) -> asyncio.Future:
        fut = loop.create_future()
        loop.call_soon(fut.set_result, args)
        return fut

    async def trajectory(i: int) -> None:
        for calls in turns:
            await submit(*calls[i])

    t0 = time.perf_counter()
    await asyncio.gather(*[trajectory(i) for i in range(len(turns[0]))])
    return time.perf_counter() - t0, {}


def best_of(repeats: int, fn: Any) -> tuple[float, Any]:
    runs = [fn() for _ in range(repeats)]
    return min(r[0] for r in runs), runs[0][1]






def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=256)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    rows, results = [], {}
    for g in (8, 16):
        turns = workload(a.groups, g, a.turns)
        calls = sum(len(t) for t in turns)
        first = workload(a.groups, g, 1)
        _, s1 = run_core(_core.CoalescerCore(64, 0.0005), first)
        first_ratio = s1["submitted"] / s1["executed"]
        t_floor, _ = best_of(a.repeats, lambda: asyncio.run(_asyncio_floor(turns)))
        floor_us = t_floor / calls * 1e6
        for backend in ("cpp", "python"):
            make = (lambda: _core.CoalescerCore(64, 0.0005)) if backend == "cpp" else \
                (lambda: CoalescerCoreRef(64, 0.0005))
            t_core, s = best_of(a.repeats, lambda: run_core(make(), turns))
            t_aio, sa = best_of(a.repeats, lambda: asyncio.run(_asyncio_run(backend, turns)))
            key = f"g{g}_{backend}"
            results[key] = {
                "calls": calls, "executed": s["executed"], "batches": s["batches"],
                "coalescing_ratio": round(s["submitted"] / s["executed"], 4),
                "first_turn_ratio": round(first_ratio, 4),
                "core_us_per_call": round(t_core / calls * 1e6, 3),
                "asyncio_us_per_call": round(t_aio / calls * 1e6, 3),
                "asyncio_floor_us_per_call": round(floor_us, 3),
                "adapter_us_per_call": round(t_aio / calls * 1e6 - floor_us, 3),
                "asyncio_mean_batch": round(sa["mean_batch_size"], 2),
            }
            rows.append((g, backend, results[key]))
    head = f"{'group':>5} {'backend':>7} {'calls':>7} {'executed':>8} {'ratio':>6} {'turn1':>6}" \
           f" {'core µs/call':>13} {'asyncio µs/call':>16} {'floor':>6} {'adapter':>8}" \
           f" {'mean batch':>10}"
    print(head)
    print("-" * len(head))
    for g, backend, r in rows:
        print(f"{g:>5} {backend:>7} {r['calls']:>7} {r['executed']:>8} {r['coalescing_ratio']:>6.3f}"
              f" {r['first_turn_ratio']:>6.3f} {r['core_us_per_call']:>13.3f}"
              f" {r['asyncio_us_per_call']:>16.3f} {r['asyncio_floor_us_per_call']:>6.2f}"
              f" {r['adapter_us_per_call']:>8.3f} {r['asyncio_mean_batch']:>10.2f}")
    speed = {f"g{g}_core_speedup": round(results[f"g{g}_python"]["core_us_per_call"]
                                         / results[f"g{g}_cpp"]["core_us_per_call"], 2)
             for g in (8, 16)}
    speed.update({f"g{g}_adapter_speedup": round(results[f"g{g}_python"]["adapter_us_per_call"]
                                                 / results[f"g{g}_cpp"]["adapter_us_per_call"], 2)
                  for g in (8, 16)})
    print("speedups (python / cpp):", ", ".join(f"{k}={v}" for k, v in speed.items()))
    print(json.dumps({"benchmark": "coalescer", "device": device(), "commit": commit(),
                      "groups": a.groups, "turns": a.turns, "repeats": a.repeats,
                      "results": results, **speed}))


if __name__ == "__main__":
    main()
