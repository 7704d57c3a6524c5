"""Benchmark: the text/web/Python tool environment and the ToolExecutor's own overhead.

Rows (medians over --repeats runs, each after a warm-up):
  executor direct      µs per call of a no-op tool through ToolExecutor (no cache, no coalescer)
  executor coalescer   the same through the C++ Coalescer (batches reach dispatch)
  executor cache hit   µs per call answered from the sqlite ToolCache
  floor                µs per call of awaiting the no-op tool's coroutine directly
  search single        ms per TextSearch query, one query per call (hybrid BM25 + MiniLM)
  search batched       ms per query when --batch queries go through batch_fn at once
  visit corpus         ms per Visit of a corpus:// page with BM25 evidence extraction
  python sandbox       ms per Python call of `print(1)` (bubblewrap: namespaces, seccomp, rlimits, cgroup)
The corpus is the offline world (engine/offline/world.py), generated into a temp dir. Prints a table,
then one JSON line with the device and git commit.

    .venv/bin/python benchmarks/bench_tools.py [--calls 5000] [--queries 64] [--batch 16]
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from spyglass.engine.coalescer import Coalescer
from spyglass.engine.tools.base import Tool, ToolContext, ToolResult
from spyglass.engine.tools.cache import ToolCache
from spyglass.engine.tools.executor import ToolExecutor
from spyglass.engine.tools.python_tool import PythonConfig, python_tool
from spyglass.engine.tools.search import TextSearchConfig, build_index, text_search_tool
from spyglass.engine.tools.web import VisitConfig, visit_tool
from spyglass.engine.offline.world import generate_world
from spyglass.engine.metrics import device_name as device, git_commit as commit  # noqa: E402






def timed(fn: Callable[[], Awaitable[Any]], repeats: int) -> float:
    """Median seconds of `repeats` runs of fn, after one warm-up run."""
    async def once() -> float:
        t0 = time.perf_counter()
        await fn()
        return time.perf_counter() - t0

    async def all_runs() -> list[float]:
        await fn()
        return [await once() for _ in range(repeats)]
    return statistics.median(asyncio.run(all_runs()))


async def _noop(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
    return ToolResult(text="ok")


def executor_rows(calls: int, repeats: int, tmp: Path) -> dict[str, float]:
    tool = Tool(name="Noop", description="", parameters={"type": "object"}, fn=_noop)
    ctx = ToolContext()
    args = [json.dumps({"i": i}) for i in range(calls)]
    out: dict[str, float] = {}

    async def floor() -> None:
        for _ in range(calls):
            await _noop({}, ctx)
    out["floor_us"] = timed(floor, repeats) / calls * 1e6

    direct = ToolExecutor({"Noop": tool})

    async def run_direct() -> None:
        for a in args:
            await direct.execute("Noop", a, ctx)
    out["executor_direct_us"] = timed(run_direct, repeats) / calls * 1e6

    async def run_coalesced() -> None:
        ex = ToolExecutor({"Noop": tool}, coalescer_factory=functools.partial(
            Coalescer, max_batch=64, max_wait_s=0.0005))
        await asyncio.gather(*(ex.execute("Noop", a, ctx) for a in args))
    out["executor_coalescer_us"] = timed(run_coalesced, repeats) / calls * 1e6

    cached = ToolExecutor({"Noop": tool}, cache=ToolCache(tmp / "bench.sqlite"))
    n_hits = min(calls, 1000)

    async def run_hits() -> None:
        for a in args[:n_hits]:
            await cached.execute("Noop", a, ctx)
    timed(run_hits, 1)  # fills the cache
    out["executor_cache_hit_us"] = timed(run_hits, repeats) / n_hits * 1e6
    return out


def tool_rows(queries: int, batch: int, repeats: int, tmp: Path) -> dict[str, float]:
    world = generate_world(tmp / "world")
    index = build_index(tmp / "world" / "docs.jsonl", tmp / "index")
    names = [d["title"] for d in world.docs][:queries]
    search = text_search_tool(TextSearchConfig(index_dir=str(index)))
    ctx = ToolContext()
    out: dict[str, float] = {}

    async def single() -> None:
        for q in names:
            await search.fn({"query": q}, ctx)
    out["search_single_ms"] = timed(single, repeats) / len(names) * 1e3

    async def batched() -> None:
        for i in range(0, len(names), batch):
            await search.batch_fn([({"query": q}, ctx) for q in names[i:i + batch]])
    out["search_batched_ms"] = timed(batched, repeats) / len(names) * 1e3

    visit = visit_tool(VisitConfig(corpus=str(index)))
    ids = [d["id"] for d in world.docs][:queries]

    async def visits() -> None:
        for i in ids:
            await visit.fn({"url": f"corpus://{i}", "goal": "founded headquarters"}, ctx)
    out["visit_corpus_ms"] = timed(visits, repeats) / len(ids) * 1e3

    py = python_tool(PythonConfig())

    async def pythons() -> None:
        for _ in range(10):
            await py.fn({"code": "print(1)"}, ctx)
    out["python_sandbox_ms"] = timed(pythons, repeats) / 10 * 1e3
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=5000)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        res = executor_rows(a.calls, a.repeats, Path(d))
        res.update(tool_rows(a.queries, a.batch, a.repeats, Path(d)))
    rows = [("floor (await the tool directly)", "floor_us", "µs/call"),
            ("executor direct", "executor_direct_us", "µs/call"),
            ("executor + C++ coalescer", "executor_coalescer_us", "µs/call"),
            ("executor cache hit (sqlite)", "executor_cache_hit_us", "µs/call"),
            ("TextSearch, 1 query per call", "search_single_ms", "ms/query"),
            (f"TextSearch, batches of {a.batch}", "search_batched_ms", "ms/query"),
            ("Visit corpus:// + BM25 evidence", "visit_corpus_ms", "ms/call"),
            ("Python sandbox print(1)", "python_sandbox_ms", "ms/call")]
    print(f"{'measure':<34} {'value':>10}  unit")
    print("-" * 54)
    for name, key, unit in rows:
        print(f"{name:<34} {res[key]:>10.2f}  {unit}")
    print(json.dumps({"benchmark": "tools", "device": device(), "commit": commit(),
                      "calls": a.calls, "queries": a.queries, "batch": a.batch,
                      "repeats": a.repeats, **{k: round(v, 3) for k, v in res.items()}}))


if __name__ == "__main__":
    main()
