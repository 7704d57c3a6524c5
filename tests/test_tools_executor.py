"""ToolExecutor and ToolCache: lookup, arg parsing, keys, cache, coalescing, limits, retries, stats.

    .venv/bin/python -m pytest -q tests/test_tools_executor.py
"""
from __future__ import annotations

import asyncio
import functools
import gc
import json
import multiprocessing as mp
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from waiting import until

from spyglass.engine.coalescer import Coalescer
from spyglass.engine.tools.base import ErrorKind, Tool, ToolContext, ToolError, ToolResult
from spyglass.engine.tools.cache import ToolCache, pack_images, unpack_images
from spyglass.engine.tools.executor import ExecutorConfig, ToolExecutor

OBJ = {"type": "object", "properties": {}}
FAST = ExecutorConfig(backoff_base_s=0.001, backoff_max_s=0.004, seed=0)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def make_tool(name: str, fn: Any, **kw: Any) -> Tool:
    return Tool(name=name, description=name, parameters=OBJ, fn=fn, **kw)


class Recorder:
    """A tool body that records its calls, optionally sleeps, and echoes its args."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[dict] = []
        self.delay = delay
        self.live = 0
        self.max_live = 0

    async def __call__(self, args: dict, ctx: ToolContext) -> ToolResult:
        self.calls.append(args)
        self.live += 1
        self.max_live = max(self.max_live, self.live)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.live -= 1
        return ToolResult(text=json.dumps(args, sort_keys=True), meta={"n": len(self.calls)})


def test_unknown_tool_and_bad_args_are_bad_args() -> None:
    ex = ToolExecutor({"Echo": make_tool("Echo", Recorder())})
    ctx = ToolContext()
    r = run(ex.execute("Nope", "{}", ctx))
    assert r.error.kind is ErrorKind.BAD_ARGS and "'Nope'" in r.error.message and "Echo" in r.error.message
    r = run(ex.execute("Echo", '{"a": ', ctx))
    assert r.error.kind is ErrorKind.BAD_ARGS and "not valid JSON" in r.error.message
    r = run(ex.execute("Echo", "[1, 2]", ctx))
    assert r.error.kind is ErrorKind.BAD_ARGS and "JSON object" in r.error.message
    assert ex.stats()["errors"]["bad_args"] == 3


def test_uncaught_exception_is_fatal_with_type_and_message() -> None:
    async def boom(args: dict, ctx: ToolContext) -> ToolResult:
        raise ZeroDivisionError("division by zero in the tool")
    ex = ToolExecutor({"Boom": make_tool("Boom", boom)}, config=FAST)
    r = run(ex.execute("Boom", "{}", ToolContext()))
    assert r.error.kind is ErrorKind.FATAL
    assert r.error.message == "ZeroDivisionError: division by zero in the tool"
    assert r.error.tool == "Boom" and ex.stats()["retries"] == 0


def test_non_result_return_is_fatal() -> None:
    async def bad(args: dict, ctx: ToolContext) -> Any:
        return "just a string"
    ex = ToolExecutor({"Bad": make_tool("Bad", bad)})
    r = run(ex.execute("Bad", "{}", ToolContext()))
    assert r.error.kind is ErrorKind.FATAL and "returned str" in r.error.message


def test_bad_args_error_is_not_retried() -> None:
    calls = []

    async def picky(args: dict, ctx: ToolContext) -> ToolResult:
        calls.append(1)
        raise ToolError(ErrorKind.BAD_ARGS, "x must be positive")
    ex = ToolExecutor({"P": make_tool("P", picky, retries=3)}, config=FAST)
    r = run(ex.execute("P", '{"x": -1}', ToolContext()))
    assert r.error.kind is ErrorKind.BAD_ARGS and len(calls) == 1


def test_transient_errors_are_retried_then_succeed() -> None:
    calls = []

    async def flaky(args: dict, ctx: ToolContext) -> ToolResult:
        calls.append(1)
        if len(calls) < 3:
            return ToolResult.fail(ErrorKind.TRANSIENT, "HTTP 503")
        return ToolResult(text="ok")
    ex = ToolExecutor({"F": make_tool("F", flaky, retries=2)}, config=FAST)
    r = run(ex.execute("F", "{}", ToolContext()))
    assert r.ok and r.text == "ok" and len(calls) == 3
    assert ex.stats()["retries"] == 2


def test_persistent_transient_error_becomes_fatal() -> None:
    async def down(args: dict, ctx: ToolContext) -> ToolResult:
        raise ToolError(ErrorKind.TRANSIENT, "HTTP 429 rate limited")
    ex = ToolExecutor({"D": make_tool("D", down, retries=2)}, config=FAST)
    r = run(ex.execute("D", "{}", ToolContext()))
    assert r.error.kind is ErrorKind.FATAL
    assert "HTTP 429" in r.error.message and "3 attempts" in r.error.message
    assert r.meta["transient_exhausted"] is True
    st = ex.stats()
    assert st["retries"] == 2 and st["errors"]["fatal"] == 1


def test_timeout_is_transient_and_retried() -> None:
    attempts = []

    async def slow(args: dict, ctx: ToolContext) -> ToolResult:
        attempts.append(1)
        await asyncio.sleep(10)
        return ToolResult(text="never")
    ex = ToolExecutor({"S": make_tool("S", slow, timeout_s=0.05, retries=1)}, config=FAST)
    r = run(ex.execute("S", "{}", ToolContext()))
    assert r.error.kind is ErrorKind.FATAL and "timed out after 0.05s" in r.error.message
    assert len(attempts) == 2


def test_backoff_grows_and_is_capped() -> None:
    ex = ToolExecutor({}, config=ExecutorConfig(backoff_base_s=0.1, backoff_max_s=0.5, jitter=0.0))
    assert [ex._backoff(i) for i in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    with pytest.raises(ValueError, match="jitter"):
        ExecutorConfig(jitter=1.5)


def test_concurrency_limit_per_tool() -> None:
    rec = Recorder(delay=0.02)
    ex = ToolExecutor({"R": make_tool("R", rec, max_concurrency=2)})

    async def main() -> list[ToolResult]:
        return await asyncio.gather(*(ex.execute("R", json.dumps({"i": i}), ToolContext())
                                      for i in range(6)))
    out = run(main())
    assert all(r.ok for r in out) and len(rec.calls) == 6 and rec.max_live == 2


def test_cancelled_waiter_leaves_the_run_alone() -> None:
    rec = Recorder(delay=0.05)
    ex = ToolExecutor({"R": make_tool("R", rec)})

    async def main() -> ToolResult:
        t1 = asyncio.create_task(ex.execute("R", "{}", ToolContext()))
        t2 = asyncio.create_task(ex.execute("R", "{}", ToolContext()))
        await asyncio.sleep(0.01)
        t2.cancel()
        return await t1
    assert run(main()).ok and len(rec.calls) == 1 and not ex._inflight


def test_identical_inflight_calls_run_once() -> None:
    rec = Recorder(delay=0.02)
    ex = ToolExecutor({"R": make_tool("R", rec)})

    async def main() -> list[ToolResult]:
        # the same args written differently are the same call after canonicalisation
        a, b = '{"x":1,"y":"q"}', '{"y": "q", "x": 1}'
        return await asyncio.gather(*(ex.execute("R", a if i % 2 else b, ToolContext())
                                      for i in range(5)))
    out = run(main())
    assert len(rec.calls) == 1 and all(r.text == out[0].text for r in out)
    assert sum(bool(r.meta.get("coalesced")) for r in out) == 4
    assert ex.stats()["coalesced"] == 4
    out[0].images.append(Image.new("RGB", (1, 1)))  # fan-out copies are independent
    assert out[1].images == []


def test_cancelled_first_caller_hands_the_call_to_a_waiter() -> None:
    rec = Recorder(delay=0.05)
    ex = ToolExecutor({"R": make_tool("R", rec)})

    async def main() -> ToolResult:
        t1 = asyncio.create_task(ex.execute("R", "{}", ToolContext()))
        t2 = asyncio.create_task(ex.execute("R", "{}", ToolContext()))
        await asyncio.sleep(0.01)
        t1.cancel()
        return await t2
    # the cancelled first caller was running the call: its waiter runs it again
    res = run(main())
    assert res.ok and len(rec.calls) == 2 and not ex._inflight


def _img(color: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_image_args_are_keyed_by_content() -> None:
    tool = make_tool("Look", Recorder(), image_args=("image",))
    red, blue = _img((255, 0, 0)), _img((0, 0, 255))
    ctx_a = ToolContext(images=[red])               # red is img_1 here
    ctx_b = ToolContext(images=[blue, _img((255, 0, 0))])  # and img_2 here (equal pixels)
    ka = ToolExecutor.make_key(tool, {"image": "img_1", "scale": 2}, ctx_a)
    kb = ToolExecutor.make_key(tool, {"scale": 2, "image": "img_2"}, ctx_b)
    kc = ToolExecutor.make_key(tool, {"image": "img_1", "scale": 2}, ctx_b)
    assert ka == kb and ka != kc and "img_" not in ka
    ex = ToolExecutor({"Look": tool})
    r = run(ex.execute("Look", '{"image": "img_3"}', ctx_a))
    assert r.error.kind is ErrorKind.BAD_ARGS and "img_3" in r.error.message


def test_cache_roundtrip_ttl_and_no_errors(tmp_path: Path) -> None:
    cache = ToolCache(tmp_path / "c.sqlite")
    res = ToolResult(text="hello", images=[_img((1, 2, 3)), _img((9, 9, 9), (3, 4))],
                     meta={"backend": "bm25", "obj": object()})
    cache.put("T", "k", res, ttl_s=10, now=100.0)
    got = cache.get("T", "k", now=105.0)
    assert got.text == "hello" and got.meta["backend"] == "bm25"
    assert [i.size for i in got.images] == [(8, 6), (3, 4)]
    assert got.images[0].getpixel((0, 0)) == (1, 2, 3)
    assert cache.get("T", "k", now=111.0) is None and cache.get("U", "k", now=105.0) is None
    assert cache.purge_expired(now=111.0) == 1 and len(cache) == 0
    with pytest.raises(ValueError, match="refusing to cache an error"):
        cache.put("T", "k", ToolResult.fail("fatal", "x"), ttl_s=10)
    with pytest.raises(ValueError, match="truncated"):
        unpack_images(pack_images([_img((0, 0, 0))])[:-5])


def test_executor_uses_cache_across_instances(tmp_path: Path) -> None:
    rec = Recorder()
    tool = make_tool("R", rec)
    path = tmp_path / "c.sqlite"
    r1 = run(ToolExecutor({"R": tool}, cache=ToolCache(path)).execute("R", '{"q":1}', ToolContext()))
    ex2 = ToolExecutor({"R": tool}, cache=ToolCache(path))
    r2 = run(ex2.execute("R", '{"q": 1}', ToolContext()))
    assert len(rec.calls) == 1 and r2.text == r1.text and r2.meta["cache_hit"] is True
    assert ex2.stats()["cache_hits"] == 1
    nocache = make_tool("N", rec, cacheable=False)
    ex3 = ToolExecutor({"N": nocache}, cache=ToolCache(path))
    run(ex3.execute("N", "{}", ToolContext()))
    run(ex3.execute("N", "{}", ToolContext()))
    assert len(rec.calls) == 3


def test_failures_are_not_cached(tmp_path: Path) -> None:
    n = []

    async def once_bad(args: dict, ctx: ToolContext) -> ToolResult:
        n.append(1)
        return ToolResult.fail(ErrorKind.BAD_ARGS, "no") if len(n) == 1 else ToolResult(text="yes")
    ex = ToolExecutor({"O": make_tool("O", once_bad)}, cache=ToolCache(tmp_path / "c.sqlite"))
    assert not run(ex.execute("O", "{}", ToolContext())).ok
    assert run(ex.execute("O", "{}", ToolContext())).text == "yes"


def _writer(path: str, worker: int, n: int, inherited: ToolCache) -> None:
    # worker 0 keeps using the cache object it inherited through fork; worker 1 opens its own
    # and closes the inherited one half-way (as garbage collection in a child would)
    cache = inherited if worker == 0 else ToolCache(path)
    for i in range(n):
        cache.put("T", f"{worker}-{i}", ToolResult(text=str(i)), ttl_s=60)
        cache.get("T", f"{1 - worker}-{i}")
        if worker == 1 and i == n // 2:
            inherited.close()
            gc.collect()


def test_cache_is_safe_across_processes_and_forks(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.sqlite")
    parent = ToolCache(path)  # open across the fork
    parent.put("T", "parent", ToolResult(text="p"), ttl_s=60)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, w, 150, parent)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(ToolCache(path)) == 301 and len(parent) == 301


def _own_writer(path: str, worker: int, n: int) -> None:
    cache = ToolCache(path)
    for i in range(n):
        cache.put("T", f"{worker}-{i}", ToolResult(text=str(i)), ttl_s=60)
        cache.get("T", f"{1 - worker}-{i}")


def test_cache_dropped_before_a_fork_does_not_clobber_the_children(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.sqlite")
    ToolCache(path)  # dropped at once: its connection must close now, not in a child's GC
    procs = [mp.get_context("fork").Process(target=_own_writer, args=(path, w, 150))
             for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(ToolCache(path)) == 300


@pytest.fixture(params=["cpp", "python"])
def coalescer(request: pytest.FixtureRequest) -> Any:
    """The real Coalescer (C++ core and its Python reference) as the executor's factory."""
    return functools.partial(Coalescer, max_wait_s=0.005, backend=request.param)


def test_coalescer_mode_batches_through_batch_fn(coalescer: Any) -> None:
    batches: list[list[dict]] = []

    async def one(args: dict, ctx: ToolContext) -> ToolResult:
        return ToolResult(text=f"single {args['q']}")

    async def many(items: list[tuple[dict, ToolContext]]) -> list[ToolResult]:
        batches.append([a for a, _ in items])
        return [ToolResult(text=f"batched {a['q']}") for a, _ in items]
    tool = make_tool("B", one, batch_fn=many)
    ex = ToolExecutor({"B": tool}, coalescer_factory=coalescer)

    async def main() -> list[ToolResult]:
        qs = [1, 2, 3, 2, 1]
        return await asyncio.gather(*(ex.execute("B", json.dumps({"q": q}), ToolContext())
                                      for q in qs))
    out = run(main())
    assert [r.text for r in out] == ["batched 1", "batched 2", "batched 3", "batched 2", "batched 1"]
    assert len(batches) == 1 and sorted(a["q"] for a in batches[0]) == [1, 2, 3]
    st = ex.stats()
    assert st["coalesced"] == 2 and st["coalescer"]["batches"] == 1 and not ex._pending


def test_coalescer_mode_retries_only_transient_items_of_a_batch(coalescer: Any) -> None:
    seen: list[list[int]] = []

    async def one(args: dict, ctx: ToolContext) -> ToolResult:
        raise AssertionError("batch_fn should be used")

    async def many(items: list[tuple[dict, ToolContext]]) -> list[ToolResult]:
        qs = [a["q"] for a, _ in items]
        seen.append(qs)
        return [ToolResult.fail("transient", "503") if q == 2 and len(seen) == 1
                else ToolResult.fail("bad_args", f"bad {q}") if q == 3
                else ToolResult(text=str(q)) for q in qs]
    ex = ToolExecutor({"B": make_tool("B", one, batch_fn=many)}, config=FAST,
                      coalescer_factory=coalescer)

    async def main() -> list[ToolResult]:
        return await asyncio.gather(*(ex.execute("B", json.dumps({"q": q}), ToolContext())
                                      for q in (1, 2, 3)))
    out = run(main())
    assert [r.text for r in out[:2]] == ["1", "2"] and out[2].error.kind is ErrorKind.BAD_ARGS
    assert seen[1] == [2] and ex.stats()["retries"] == 1


def test_coalescer_mode_without_batch_fn_runs_items_concurrently(coalescer: Any) -> None:
    rec = Recorder(delay=0.02)
    ex = ToolExecutor({"R": make_tool("R", rec)}, coalescer_factory=coalescer)

    async def main() -> list[ToolResult]:
        return await asyncio.gather(*(ex.execute("R", json.dumps({"i": i}), ToolContext())
                                      for i in range(4)))
    out = run(main())
    assert all(r.ok for r in out) and rec.max_live == 4


def test_stats_have_latency_per_tool() -> None:
    ex = ToolExecutor({"R": make_tool("R", Recorder(delay=0.01))})
    for i in range(3):
        run(ex.execute("R", json.dumps({"i": i}), ToolContext()))
    st = ex.stats()
    lat = st["per_tool"]["R"]["latency_ms"]
    assert st["calls"] == 3 and st["per_tool"]["R"]["calls"] == 3
    assert 5.0 < lat["p50"] <= lat["max"] < 5000.0


def test_tools_dict_must_match_names() -> None:
    with pytest.raises(ValueError, match="must be a Tool named 'X'"):
        ToolExecutor({"X": make_tool("Y", Recorder())})


def test_dispatch_of_withdrawn_keys_answers_only_those_with_an_error(coalescer: Any) -> None:
    rec = Recorder()
    ex = ToolExecutor({"R": make_tool("R", rec)}, coalescer_factory=coalescer)
    ex._pending[("R", '{"a":1}')] = [{"a": 1}, ToolContext(), 1]
    out = run(ex.dispatch("R", ['{"gone":1}', '{"a":1}']))
    assert isinstance(out[0], ToolError) and "withdrawn" in out[0].message
    assert isinstance(out[1], ToolResult) and out[1].ok and rec.calls == [{"a": 1}]
    with pytest.raises(KeyError, match="unknown tool 'Nope'"):
        run(ex.dispatch("Nope", ["{}"]))


def test_coalescer_mode_cancelled_caller_leaves_the_others(coalescer: Any) -> None:
    # event-driven, not sleep-driven: a long batch window makes "still queued" certain, and the
    # tool signals when it is running, so the test holds on a loaded machine too
    rec = Recorder(delay=0.5)
    slow_window = functools.partial(coalescer, max_wait_s=0.2)
    ex = ToolExecutor({"R": make_tool("R", rec)}, coalescer_factory=slow_window)

    async def main() -> ToolResult:
        t1 = asyncio.create_task(ex.execute("R", '{"a":1}', ToolContext()))
        t2 = asyncio.create_task(ex.execute("R", '{"a":1}', ToolContext()))
        t3 = asyncio.create_task(ex.execute("R", '{"a":2}', ToolContext()))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        t3.cancel()  # still queued (the window is 0.2 s): dropped
        await until(lambda: bool(rec.calls), lambda: "the shared call never started", timeout_s=2.0)  # running now
        t1.cancel()  # running: t2 still gets the result
        return await t2
    res = run(main())
    assert res.ok and res.meta["coalesced"] is True and rec.calls == [{"a": 1}]
    assert not ex._pending and ex.stats()["coalescer"]["dropped"] == 1


def test_unpublished_images_are_published_per_caller(tmp_path: Path) -> None:
    calls = []

    async def zoom(args: dict, ctx: ToolContext) -> ToolResult:
        calls.append(1)
        await asyncio.sleep(0.01)
        img = ctx.resolve_image(args["image"]).resize((4, 4))
        return ToolResult(text="zoomed", images=[img], meta={"captions": ["zoom x2"]})
    tool = make_tool("Zoom", zoom, image_args=("image",))
    cache = ToolCache(tmp_path / "c.sqlite")
    ex = ToolExecutor({"Zoom": tool}, cache=cache)
    red = _img((255, 0, 0))
    a = ToolContext(images=[red])
    b = ToolContext(images=[_img((0, 9, 0)), _img((0, 0, 9)), _img((255, 0, 0))])

    async def main() -> list[ToolResult]:
        return await asyncio.gather(ex.execute("Zoom", '{"image":"img_1"}', a),
                                    ex.execute("Zoom", '{"image":"img_3"}', b))
    ra, rb = run(main())
    assert len(calls) == 1 and rb.meta["coalesced"]
    assert ra.text == "zoomed\nimg_2: zoom x2" and len(a.images) == 2
    assert rb.text == "zoomed\nimg_4: zoom x2" and len(b.images) == 4
    assert a.images[1].size == b.images[3].size == (4, 4)
    c = ToolContext(images=[red])
    rc = run(ToolExecutor({"Zoom": tool}, cache=cache).execute("Zoom", '{"image":"img_1"}', c))
    assert rc.meta["cache_hit"] and rc.text == "zoomed\nimg_2: zoom x2" and len(c.images) == 2
