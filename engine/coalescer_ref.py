"""Pure-Python reference of the call coalescer/batcher core (csrc/coalescer.cpp).

`CoalescerCoreRef` has the same API and the same decisions as `spyglass.engine._core.
CoalescerCore`: identical (tool, args) calls in flight share one execution; a tool's pending
calls become a batch at max_batch (on submit) or when max_wait has passed since its oldest live
pending call (on poll); batches are `(batch_id, tool, [args...])`. Time is an explicit argument.
It is the oracle of the property tests in tests/test_coalescer.py and the `backend="python"`
of `spyglass.engine.coalescer.Coalescer`, whose `check_limits` it imports. Thread-safe through
one lock, like the C++ core. Tests: `.venv/bin/python -m pytest -q tests/test_coalescer.py`.
"""
from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass, field

from spyglass.engine.coalescer import check_limits

Batch = tuple[int, str, list[str]]


@dataclass
class _Call:
    tool: str
    args: str
    t_submit: float
    batch_id: int = 0  # 0 while pending
    waiters: list[int] = field(default_factory=list)


@dataclass
class _ToolQueue:
    max_batch: int
    max_wait: float
    pending: deque[int] = field(default_factory=deque)  # call ids in submit order


class CoalescerCoreRef:
    """Reference core; see the module docstring and csrc/coalescer.h for the contract."""

    def __init__(self, max_batch: int = 16, max_wait: float = 0.002) -> None:
        check_limits(max_batch, max_wait)
        self._default = (max_batch, float(max_wait))
        self._lock = threading.Lock()
        self._next_ticket = self._next_call = self._next_batch = 1
        self._tools: dict[str, _ToolQueue] = {}
        self._inflight: dict[tuple[str, str], int] = {}
        self._calls: dict[int, _Call] = {}
        self._ticket_call: dict[int, int] = {}
        self._batches: dict[int, list[int]] = {}
        self._ready: list[Batch] = []
        self._stats = dict.fromkeys(
            ("submitted", "coalesced", "executed", "batches", "batches_by_size",
             "batches_by_wait", "batches_by_flush", "completed", "cancelled", "dropped",
             "max_batch_size"), 0)

    def _queue(self, tool: str) -> _ToolQueue:
        q = self._tools.get(tool)
        if q is None:
            q = self._tools[tool] = _ToolQueue(*self._default)
        return q

    def set_tool_limits(self, tool: str, max_batch: int, max_wait: float) -> None:
        _check_tool(tool)
        check_limits(max_batch, max_wait, f"tool {tool}: ")
        with self._lock:
            q = self._queue(tool)
            q.max_batch, q.max_wait = max_batch, float(max_wait)

    def tool_limits(self, tool: str) -> tuple[int, float]:
        with self._lock:
            q = self._tools.get(tool)
            return self._default if q is None else (q.max_batch, q.max_wait)

    def _form(self, tool: str, q: _ToolQueue, n: int, reason: str) -> None:
        batch_id = self._next_batch
        self._next_batch += 1
        ids = [q.pending.popleft() for _ in range(n)]
        for call_id in ids:
            self._calls[call_id].batch_id = batch_id
        self._batches[batch_id] = ids
        s = self._stats
        s["executed"] += n
        s["batches"] += 1
        s["batches_by_" + reason] += 1
        s["max_batch_size"] = max(s["max_batch_size"], n)
        self._ready.append((batch_id, tool, [self._calls[c].args for c in ids]))

    def _take_ready(self) -> list[Batch]:
        out, self._ready = self._ready, []
        return out

    def submit(self, tool: str, args: str, now: float) -> tuple[int, bool]:
        _check_tool(tool)
        _check_now(now)
        with self._lock:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._stats["submitted"] += 1
            call_id = self._inflight.get((tool, args))
            if call_id is not None:
                self._calls[call_id].waiters.append(ticket)
                self._ticket_call[ticket] = call_id
                self._stats["coalesced"] += 1
                return ticket, False
            call_id = self._next_call
            self._next_call += 1
            self._calls[call_id] = _Call(tool, args, float(now), waiters=[ticket])
            self._inflight[(tool, args)] = call_id
            self._ticket_call[ticket] = call_id
            q = self._queue(tool)
            q.pending.append(call_id)
            if len(q.pending) >= q.max_batch:
                self._form(tool, q, q.max_batch, "size")
            return ticket, True

    def poll(self, now: float) -> list[Batch]:
        _check_now(now)
        with self._lock:
            due: list[tuple[float, str]] = []
            for tool in sorted(self._tools):
                q = self._tools[tool]
                while len(q.pending) >= q.max_batch:
                    self._form(tool, q, q.max_batch, "size")
                if q.pending:
                    deadline = self._calls[q.pending[0]].t_submit + q.max_wait
                    if now >= deadline:
                        due.append((deadline, tool))
            for _, tool in sorted(due):
                q = self._tools[tool]
                self._form(tool, q, len(q.pending), "wait")
            return self._take_ready()

    def flush(self) -> list[Batch]:
        with self._lock:
            for tool in sorted(self._tools):
                q = self._tools[tool]
                while q.pending:
                    self._form(tool, q, min(len(q.pending), q.max_batch), "flush")
            return self._take_ready()

    def next_deadline(self) -> float | None:
        with self._lock:
            deadlines = [self._calls[q.pending[0]].t_submit + q.max_wait
                         for q in self._tools.values() if q.pending]
            return min(deadlines) if deadlines else None

    def complete(self, batch_id: int) -> list[list[int]]:
        with self._lock:
            ids = self._batches.pop(batch_id, None)
            if ids is None:
                raise ValueError(f"unknown or already completed batch id {batch_id}")
            out = []
            for call_id in ids:
                call = self._calls.pop(call_id)
                for ticket in call.waiters:
                    del self._ticket_call[ticket]
                del self._inflight[(call.tool, call.args)]
                out.append(call.waiters)
            self._stats["completed"] += 1
            return out

    def cancel(self, ticket: int) -> bool:
        with self._lock:
            call_id = self._ticket_call.pop(ticket, None)
            if call_id is None:
                return False
            call = self._calls[call_id]
            call.waiters.remove(ticket)
            self._stats["cancelled"] += 1
            if call.batch_id == 0 and not call.waiters:
                self._tools[call.tool].pending.remove(call_id)
                del self._inflight[(call.tool, call.args)]
                del self._calls[call_id]
                self._stats["dropped"] += 1
            return True

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._stats)
            out["pending"] = sum(len(q.pending) for q in self._tools.values())
            out["in_flight"] = len(self._calls)
            out["waiters"] = len(self._ticket_call)
            return out


def _check_tool(tool: str) -> None:
    if not isinstance(tool, str) or not tool or "\0" in tool:
        raise ValueError(f"tool name must be a non-empty string without NUL, got {tool!r}")


def _check_now(now: float) -> None:
    if not isinstance(now, (int, float)) or not math.isfinite(now):
        raise ValueError(f"now must be a finite time in seconds, got {now!r}")
