"""Tool-call coalescer/batcher for asyncio: identical calls in flight run once, calls batch per tool.

The bookkeeping (in-flight map, waiter lists, per-tool queues, batch decisions, stats) lives in
the C++ core `spyglass.engine._core.CoalescerCore` (or its pure-Python twin
`spyglass.engine.coalescer_ref.CoalescerCoreRef` with ``backend="python"``); this module is the
thin asyncio adapter: one future per caller keyed by the ticket the core returns, one timer
(`loop.call_at`) for the earliest max-wait deadline, one task per dispatched batch. It owns the
limit validator `check_limits`, which the reference imports from here; the reference itself is
imported only when ``backend="python"`` asks for it.

    async def dispatch(tool: str, args: list[str]) -> list[object]: ...
    co = Coalescer(dispatch, max_batch={"ocr": 8}, max_wait_s=0.002)
    result = await co.submit("ocr", '{"image":"a.png"}')
    await co.aclose()

Tests: `.venv/bin/python -m pytest -q tests/test_coalescer.py`.
"""
from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any

Dispatch = Callable[[str, list[str]], Awaitable[list[object]]]


def check_limits(max_batch: int, max_wait: float, what: str = "") -> None:
    """Raise ValueError naming the bad value when max_batch < 1 or max_wait is not >= 0."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"{what}max_batch must be an int >= 1, got {max_batch!r}")
    if not isinstance(max_wait, (int, float)) or not (max_wait >= 0.0) or not math.isfinite(max_wait):
        raise ValueError(f"{what}max_wait_s must be a finite number >= 0, got {max_wait!r}")


def make_core(max_batch: int | dict[str, int] = 16, max_wait_s: float | dict[str, float] = 0.002,
              backend: str = "cpp") -> Any:
    """A coalescer core (C++ or reference) with defaults and per-tool limits applied.

    A dict limit maps tool names to values; its key ``"*"`` (if present) sets the default.
    """
    default_batch, tool_batch = _split_limit(max_batch, 16, "max_batch")
    default_wait, tool_wait = _split_limit(max_wait_s, 0.002, "max_wait_s")
    check_limits(default_batch, default_wait)
    if backend == "cpp":
        from spyglass.engine import _core
        core: Any = _core.CoalescerCore(default_batch, float(default_wait))
    elif backend == "python":
        from spyglass.engine.coalescer_ref import CoalescerCoreRef  # noqa: PLC0415
        core = CoalescerCoreRef(default_batch, float(default_wait))
    else:
        raise ValueError(f"backend must be 'cpp' or 'python', got {backend!r}")
    for tool in sorted(set(tool_batch) | set(tool_wait)):
        b, w = tool_batch.get(tool, default_batch), tool_wait.get(tool, default_wait)
        check_limits(b, w, f"tool {tool!r}: ")
        core.set_tool_limits(tool, b, float(w))
    return core


def _split_limit(value: Any, fallback: Any, name: str) -> tuple[Any, dict[str, Any]]:
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str) or not key:
                raise ValueError(f"{name} keys must be non-empty tool names, got {key!r}")
        per_tool = {k: v for k, v in value.items() if k != "*"}
        return value.get("*", fallback), per_tool
    return value, {}


class Coalescer:
    """Awaitable, coalescing, batching front of a batched tool `dispatch`.

    `submit(tool, canonical_args)` resolves to the item `dispatch(tool, [args...])` returned at
    that call's position; an item that is an exception instance is raised to its callers, and an
    exception raised by `dispatch` reaches every caller of that batch. Cancelling one caller
    withdraws only that caller; the shared execution goes on for the others (a call that is
    still queued and loses all its callers is dropped). Bound to the event loop of first use.
    `max_batch` / `max_wait_s` are one value for every tool or a dict per tool name, whose
    key "*" (optional) sets the default for the others.
    """

    def __init__(self, dispatch: Dispatch, max_batch: int | dict[str, int] = 16,
                 max_wait_s: float | dict[str, float] = 0.002, backend: str = "cpp") -> None:
        if not callable(dispatch):
            raise ValueError(f"dispatch must be an async callable, got {dispatch!r}")
        self._dispatch = dispatch
        self._core = make_core(max_batch, max_wait_s, backend)
        self.backend = backend
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._closed = False

    @property
    def stats(self) -> dict[str, float]:
        """Counters from the core plus mean_batch_size and coalescing_ratio (submitted/executed)."""
        s: dict[str, float] = dict(self._core.stats())
        s["mean_batch_size"] = s["executed"] / s["batches"] if s["batches"] else 0.0
        s["coalescing_ratio"] = s["submitted"] / s["executed"] if s["executed"] else 0.0
        return s

    async def submit(self, tool: str, canonical_args: str) -> Any:
        """Run (or join) the call `tool(canonical_args)` and return its result."""
        if self._closed:
            raise RuntimeError("Coalescer is closed")
        if not isinstance(tool, str) or not tool:
            raise ValueError(f"tool must be a non-empty string, got {tool!r}")
        if not isinstance(canonical_args, str):
            raise ValueError(f"canonical_args must be a str, got {type(canonical_args).__name__}")
        loop = self._bind_loop()
        now = loop.time()
        ticket, is_new = self._core.submit(tool, canonical_args, now)
        fut: asyncio.Future[Any] = loop.create_future()
        self._futures[ticket] = fut
        if is_new:
            self._launch(self._core.poll(now))
            self._arm_timer(loop)
        try:
            return await fut
        except asyncio.CancelledError:
            if self._futures.pop(ticket, None) is not None:
                self._core.cancel(ticket)
                self._arm_timer(loop)
            raise

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("Coalescer is bound to another event loop")
        return loop

    def _arm_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        deadline = self._core.next_deadline()
        if deadline is None:
            return
        if self._timer is not None:
            if self._timer_at <= deadline:
                return
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = loop.call_at(deadline, self._on_timer, deadline)

    def _on_timer(self, deadline: float) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None
        # asyncio may run a timer up to its clock resolution early: it stands for `deadline`.
        self._launch(self._core.poll(max(loop.time(), deadline)))
        self._arm_timer(loop)

    def _launch(self, batches: list[tuple[int, str, list[str]]]) -> None:
        for batch_id, tool, args in batches:
            task = asyncio.ensure_future(self._run_batch(batch_id, tool, args))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run_batch(self, batch_id: int, tool: str, args: list[str]) -> None:
        try:
            results = await self._dispatch(tool, args)
            if not isinstance(results, (list, tuple)) or len(results) != len(args):
                got = len(results) if isinstance(results, (list, tuple)) else type(results).__name__
                raise ValueError(f"dispatch({tool!r}, {len(args)} args) returned {got} results")
        except asyncio.CancelledError:
            for tickets in self._core.complete(batch_id):
                for ticket in tickets:
                    fut = self._futures.pop(ticket, None)
                    if fut is not None and not fut.done():
                        fut.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - forwarded to every caller of the batch
            self._resolve(batch_id, [exc] * len(args))
        else:
            self._resolve(batch_id, results)

    def _resolve(self, batch_id: int, results: list[object] | tuple[object, ...]) -> None:
        for item, tickets in zip(results, self._core.complete(batch_id)):
            for ticket in tickets:
                fut = self._futures.pop(ticket, None)
                if fut is None or fut.done():
                    continue
                if isinstance(item, BaseException):
                    fut.set_exception(item)
                else:
                    fut.set_result(item)

    async def aclose(self) -> None:
        """Stop accepting calls, dispatch everything queued now and wait for all batches."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._loop is not None:
            self._launch(self._core.flush())
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
