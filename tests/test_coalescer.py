"""Call coalescer/batcher: the asyncio adapter on both cores, the explicit-clock core API,
threads hammering the C++ core, and a property test that C++ and Python make the same batches."""
from __future__ import annotations

import asyncio
import random
import threading
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spyglass.engine import _core
from spyglass.engine.coalescer import Coalescer
from spyglass.engine.coalescer_ref import CoalescerCoreRef

BACKENDS = ["cpp", "python"]
CORES = {"cpp": _core.CoalescerCore, "python": CoalescerCoreRef}


class Recorder:
    """A batched dispatch that records its batches and upper-cases its arguments."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.batches: list[tuple[str, list[str]]] = []
        self.gate = gate

    async def __call__(self, tool: str, args: list[str]) -> list[object]:
        self.batches.append((tool, list(args)))
        if self.gate is not None:
            await self.gate.wait()
        return [ValueError(f"bad {a}") if a.startswith("bad") else f"{tool}:{a.upper()}"
                for a in args]


# ---------------------------------------------------------------- asyncio adapter


@pytest.mark.parametrize("backend", BACKENDS)
def test_fan_out_identical_calls_run_once(backend: str) -> None:
    async def main() -> None:
        rec = Recorder()
        co = Coalescer(rec, backend=backend)
        results = await asyncio.gather(*[co.submit("search", '{"q":"eiffel"}') for _ in range(16)])
        assert results == ['search:{"Q":"EIFFEL"}'] * 16
        assert rec.batches == [("search", ['{"q":"eiffel"}'])]
        s = co.stats
        assert (s["submitted"], s["executed"], s["coalesced"], s["batches"]) == (16, 1, 15, 1)
        assert s["coalescing_ratio"] == 16.0 and s["in_flight"] == 0 and s["waiters"] == 0
        # no caching: once finished, the same call runs again
        assert await co.submit("search", '{"q":"eiffel"}') == 'search:{"Q":"EIFFEL"}'
        assert len(rec.batches) == 2
        await co.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_by_size_then_flush_on_close(backend: str) -> None:
    async def main() -> None:
        rec = Recorder()
        co = Coalescer(rec, max_batch=4, max_wait_s=30.0, backend=backend)
        out = await asyncio.gather(*[co.submit("ocr", f"a{i}") for i in range(8)])
        assert out == [f"ocr:A{i}" for i in range(8)]
        assert rec.batches == [("ocr", ["a0", "a1", "a2", "a3"]), ("ocr", ["a4", "a5", "a6", "a7"])]
        tasks = [asyncio.ensure_future(co.submit("ocr", f"b{i}")) for i in range(3)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(rec.batches) == 2  # 3 < max_batch and the wait is long: still queued
        await co.aclose()
        assert [t.result() for t in tasks] == ["ocr:B0", "ocr:B1", "ocr:B2"]
        assert rec.batches[-1] == ("ocr", ["b0", "b1", "b2"])
        s = co.stats
        assert (s["batches_by_size"], s["batches_by_flush"], s["mean_batch_size"]) == (2, 1, 11 / 3)
        with pytest.raises(RuntimeError, match="closed"):
            await co.submit("ocr", "c")

    asyncio.run(main())


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_by_wait(backend: str) -> None:
    async def main() -> None:
        rec = Recorder()
        co = Coalescer(rec, max_batch=100, max_wait_s=0.02, backend=backend)
        t0 = time.monotonic()
        out = await asyncio.gather(*[co.submit("visit", f"u{i}") for i in range(5)])
        assert time.monotonic() - t0 >= 0.015
        assert out == [f"visit:U{i}" for i in range(5)]
        assert rec.batches == [("visit", [f"u{i}" for i in range(5)])]
        assert co.stats["batches_by_wait"] == 1
        await co.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_tool_limits(backend: str) -> None:
    async def main() -> None:
        rec = Recorder()
        co = Coalescer(rec, max_batch={"crop": 2, "*": 100}, max_wait_s={"crop": 30.0, "ocr": 0.0},
                       backend=backend)
        await asyncio.gather(*[co.submit("crop", f"c{i}") for i in range(4)],
                             *[co.submit("ocr", f"o{i}") for i in range(3)])
        assert sorted(rec.batches) == [("crop", ["c0", "c1"]), ("crop", ["c2", "c3"]),
                                       ("ocr", ["o0"]), ("ocr", ["o1"]), ("ocr", ["o2"])]
        await co.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("backend", BACKENDS)
def test_exceptions_per_item_and_per_batch(backend: str) -> None:
    async def main() -> None:
        co = Coalescer(Recorder(), max_batch=3, backend=backend)
        res = await asyncio.gather(co.submit("t", "bad1"), co.submit("t", "ok"),
                                   co.submit("t", "bad1"), return_exceptions=True)
        assert isinstance(res[0], ValueError) and str(res[0]) == "bad bad1" and res[2] is res[0]
        assert res[1] == "t:OK"
        await co.aclose()

        async def boom(tool: str, args: list[str]) -> list[object]:
            raise RuntimeError(f"{tool} down")

        co = Coalescer(boom, max_batch=2, backend=backend)
        res = await asyncio.gather(co.submit("t", "a"), co.submit("t", "b"), co.submit("t", "a"),
                                   return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and str(r) == "t down" for r in res)

        async def short(tool: str, args: list[str]) -> list[object]:
            return ["only one"]

        co = Coalescer(short, max_batch=2, backend=backend)
        res = await asyncio.gather(co.submit("t", "a"), co.submit("t", "b"), return_exceptions=True)
        assert all(isinstance(r, ValueError) and "returned 1 results" in str(r) for r in res)
        assert co.stats["in_flight"] == 0

    asyncio.run(main())


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancelling_one_caller_keeps_shared_execution(backend: str) -> None:
    async def main() -> None:
        gate = asyncio.Event()
        rec = Recorder(gate)
        co = Coalescer(rec, max_wait_s=0.0, backend=backend)
        tasks = [asyncio.ensure_future(co.submit("search", "x")) for _ in range(3)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert rec.batches == [("search", ["x"])]  # dispatched, blocked on the gate
        tasks[0].cancel()
        await asyncio.sleep(0)
        late = asyncio.ensure_future(co.submit("search", "x"))  # joins the running call
        await asyncio.sleep(0)
        gate.set()
        assert await asyncio.gather(*tasks[1:], late) == ["search:X"] * 3
        assert tasks[0].cancelled()
        s = co.stats
        assert (s["executed"], s["coalesced"], s["cancelled"], s["dropped"]) == (1, 3, 1, 0)
        await co.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("backend", BACKENDS)
def test_call_queued_with_no_callers_left_is_dropped(backend: str) -> None:
    async def main() -> None:
        rec = Recorder()
        co = Coalescer(rec, max_batch=100, max_wait_s=30.0, backend=backend)
        t = asyncio.ensure_future(co.submit("ocr", "x"))
        await asyncio.sleep(0)
        t.cancel()
        await asyncio.sleep(0)
        keep = asyncio.ensure_future(co.submit("ocr", "y"))
        await asyncio.sleep(0)
        await co.aclose()
        assert keep.result() == "ocr:Y" and rec.batches == [("ocr", ["y"])]
        assert co.stats["dropped"] == 1 and co.stats["executed"] == 1

    asyncio.run(main())


def test_bad_configuration_is_named() -> None:
    async def d(tool: str, args: list[str]) -> list[object]:
        return list(args)

    with pytest.raises(ValueError, match="max_batch must be an int >= 1, got 0"):
        Coalescer(d, max_batch=0)
    with pytest.raises(ValueError, match="max_wait_s must be a finite number >= 0, got -1"):
        Coalescer(d, max_wait_s=-1)
    with pytest.raises(ValueError, match="tool 'ocr': max_batch must be an int >= 1, got -2"):
        Coalescer(d, max_batch={"ocr": -2})
    with pytest.raises(ValueError, match="backend must be 'cpp' or 'python', got 'rust'"):
        Coalescer(d, backend="rust")
    with pytest.raises(ValueError, match="max_batch must be >= 1, got 0"):
        _core.CoalescerCore(0, 0.1)
    with pytest.raises(ValueError, match="max_wait_s must be a finite number >= 0"):
        _core.CoalescerCore(4, float("nan"))
    with pytest.raises(ValueError, match="tool name must be a non-empty string"):
        _core.CoalescerCore(4, 0.1).submit("", "{}", 0.0)


# ---------------------------------------------------------------- explicit-clock core


@pytest.mark.parametrize("backend", BACKENDS)
def test_core_explicit_clock(backend: str) -> None:
    core = CORES[backend](3, 0.010)
    core.set_tool_limits("ocr", 2, 0.005)
    assert core.tool_limits("ocr") == (2, 0.005) and core.tool_limits("crop") == (3, 0.010)
    assert core.submit("crop", "a", 0.0) == (1, True)
    assert core.submit("crop", "a", 0.001) == (2, False)
    assert core.submit("ocr", "p", 0.002) == (3, True)
    assert core.next_deadline() == pytest.approx(0.007)
    assert core.poll(0.006) == []
    assert core.poll(0.007) == [(1, "ocr", ["p"])]
    assert core.submit("crop", "b", 0.008) == (4, True)
    assert core.submit("crop", "c", 0.009) == (5, True)  # reaches 3: formed by size
    assert core.submit("crop", "a", 0.009) == (6, False)  # still in flight (batch 2)
    assert core.poll(0.009) == [(2, "crop", ["a", "b", "c"])]
    assert core.next_deadline() is None
    assert core.complete(2) == [[1, 2, 6], [4], [5]]
    assert core.cancel(3) is True and core.cancel(3) is False
    assert core.complete(1) == [[]]  # its only caller withdrew; it ran for nobody
    with pytest.raises(ValueError, match="unknown or already completed batch id 1"):
        core.complete(1)
    s = core.stats()
    assert (s["submitted"], s["coalesced"], s["executed"], s["batches"]) == (6, 2, 4, 2)
    assert (s["batches_by_size"], s["batches_by_wait"], s["in_flight"], s["waiters"]) == (1, 1, 0, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_core_drop_moves_deadline_to_oldest_live_call(backend: str) -> None:
    core = CORES[backend](8, 1.0)
    t1, _ = core.submit("s", "x", 0.0)
    core.submit("s", "y", 0.5)
    assert core.cancel(t1) and core.stats()["dropped"] == 1
    assert core.next_deadline() == 1.5 and core.poll(1.2) == []
    assert core.poll(1.5) == [(1, "s", ["y"])]


@pytest.mark.parametrize("backend", BACKENDS)
def test_core_poll_orders_by_size_then_deadline_then_tool(backend: str) -> None:
    core = CORES[backend](2, 1.0)
    core.set_tool_limits("a", 2, 2.0)
    core.submit("c", "x", 0.0)  # deadline 1.0
    core.submit("a", "x", 0.0)  # deadline 2.0
    core.submit("b", "x", 1.0)  # deadline 2.0
    core.submit("d", "x", 3.0)
    core.submit("d", "y", 3.0)  # formed by size at submit
    assert core.poll(5.0) == [(1, "d", ["x", "y"]), (2, "c", ["x"]), (3, "a", ["x"]),
                              (4, "b", ["x"])]


@pytest.mark.parametrize("threads", [2, 6])
def test_core_shared_by_threads(threads: int) -> None:
    core = _core.CoalescerCore(8, 0.0002)
    per_thread = 1500
    tickets: list[list[int]] = [[] for _ in range(threads)]
    done = threading.Event()
    outstanding: set[tuple[str, str]] = set()
    lock = threading.Lock()
    completed: list[int] = []
    errors: list[str] = []

    def submitter(k: int) -> None:
        rng = random.Random(k)
        for _ in range(per_thread):
            t, _ = core.submit(rng.choice("ab"), f"q{rng.randrange(40)}", time.monotonic())
            tickets[k].append(t)

    def worker() -> None:
        while True:
            batches = core.poll(time.monotonic())
            if not batches and done.is_set():
                batches = core.flush()
                if not batches:
                    return
            for batch_id, tool, args in batches:
                keys = {(tool, a) for a in args}
                with lock:
                    if len(keys) != len(args) or keys & outstanding:
                        errors.append(f"duplicate call in flight: {tool} {args}")
                    outstanding.update(keys)
                with lock:  # forget the keys before the core releases them
                    outstanding.difference_update(keys)
                for waiters in core.complete(batch_id):
                    with lock:
                        completed.extend(waiters)

    subs = [threading.Thread(target=submitter, args=(k,)) for k in range(threads)]
    workers = [threading.Thread(target=worker) for _ in range(2)]
    for th in subs + workers:
        th.start()
    for th in subs:
        th.join()
    done.set()
    for th in workers:
        th.join()
    assert errors == []
    all_tickets = [t for ts in tickets for t in ts]
    assert sorted(all_tickets) == list(range(1, threads * per_thread + 1))
    assert sorted(completed) == sorted(all_tickets)  # every caller answered exactly once
    s = core.stats()
    assert s["submitted"] == threads * per_thread == s["executed"] + s["coalesced"]
    assert s["in_flight"] == s["pending"] == s["waiters"] == 0 and s["completed"] == s["batches"]


# ---------------------------------------------------------------- C++ == reference

op_st = st.one_of(
    st.tuples(st.just("submit"), st.integers(0, 2), st.integers(0, 5), st.integers(0, 3)),
    st.tuples(st.just("submit"), st.integers(0, 2), st.integers(0, 5), st.integers(0, 3)),
    st.tuples(st.just("poll"), st.integers(0, 4)),
    st.tuples(st.just("complete"), st.integers(0, 10)),
    st.tuples(st.just("cancel"), st.integers(0, 40)),
    st.tuples(st.just("limits"), st.integers(0, 2), st.integers(1, 4), st.integers(0, 3)),
    st.tuples(st.just("flush")),
    st.tuples(st.just("deadline")),
)


def _apply(core: Any, ops: list[tuple]) -> list[Any]:
    now, out, open_batches = 0.0, [], []
    for op in ops:
        kind = op[0]
        if kind == "submit":
            now += op[3] * 0.001
            out.append(core.submit("tool%d" % op[1], '{"q":%d}' % op[2], now))
        elif kind in ("poll", "flush"):
            if kind == "poll":
                now += op[1] * 0.001
            batches = core.poll(now) if kind == "poll" else core.flush()
            open_batches.extend(b[0] for b in batches)
            out.append(batches)
        elif kind == "complete" and open_batches:
            out.append(core.complete(open_batches.pop(op[1] % len(open_batches))))
        elif kind == "cancel":
            out.append(core.cancel(op[1]))
        elif kind == "limits":
            core.set_tool_limits("tool%d" % op[1], op[2], op[3] * 0.001)
        elif kind == "deadline":
            out.append(core.next_deadline())
    out.append(core.flush())
    out.append(core.stats())
    return out


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op_st, max_size=80), max_batch=st.integers(1, 5), wait=st.integers(0, 4))
def test_property_cpp_and_python_make_the_same_batches(ops: list[tuple], max_batch: int,
                                                       wait: int) -> None:
    cpp = _apply(_core.CoalescerCore(max_batch, wait * 0.001), ops)
    ref = _apply(CoalescerCoreRef(max_batch, wait * 0.001), ops)
    assert cpp == ref
