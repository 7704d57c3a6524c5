"""The engine's per-trajectory state and the typed events that move it.

A job (a generation, a turn's tools, an environment step) posts exactly one event when it ends;
the loop takes events from the Inbox and hands each to the handler of its type. One payload
type per event:

    Generated(live, out, t0, t1)        a backend answered (possibly finish_reason "abort")
    GenTimedOut(live, t0, t1)           the trajectory's deadline cancelled its generation
    ServerFailed(live, error)           the server refused or did not answer in request_timeout_s
    RequestFailed(live, error)          the request could not be built (a bad policy or prompt)
    ToolsDone(live, results, t0, t1)    a turn's tool results (None: the deadline cancelled them)
    EnvStepped(live, step, answer, t0, t1)  a custom environment's step (None: cancelled)
    Ended(live, status, reason)         ends a trajectory that has no job (a prompt over max_context)
    WAKE                                no payload: run the next slice (new work, a timer, resume)

The four generation events derive from GenerationEnd (their handler first frees the slot).
"""
from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from ..backends.base import GenerateOutput
from ..trajectory import EnvStep, Status, ToolResult, Trajectory


@dataclass(slots=True, eq=False, weakref_slot=True)
class Live:
    """A live trajectory as the engine tracks it (the Trajectory is the record it fills in)."""

    traj: Trajectory
    server: int
    deadline: float  # perf_counter time the trajectory's wall clock (timeout_s) runs out
    image_tokens: int = 0  # image tokens in the context so far
    ntok: int = 0  # context length so far (= traj.num_tokens, kept without a walk over segments)
    n_images: int = 0  # images in the context so far (= len(traj.images()))
    ready_since: float = 0.0
    request_id: str = ""
    moves: int = 0  # servers this trajectory moved away from (failover)
    job: asyncio.Future | None = None  # the generation or tools task in flight
    expired: bool = False
    reported: bool = True  # the job in flight has posted (or will post) its own event
    done: bool = False


class Event:
    """Base of the engine's events."""

    __slots__ = ()


class _Wake(Event):
    __slots__ = ()

    def __repr__(self) -> str:
        return "WAKE"


WAKE = _Wake()  # run the next slice; carries nothing


@dataclass(slots=True, eq=False)
class GenerationEnd(Event):
    """A generation request ended (its slot on the server is free again)."""

    live: Live


@dataclass(slots=True, eq=False)
class Generated(GenerationEnd):
    out: GenerateOutput
    t0: float
    t1: float


@dataclass(slots=True, eq=False)
class GenTimedOut(GenerationEnd):
    t0: float
    t1: float


@dataclass(slots=True, eq=False)
class ServerFailed(GenerationEnd):
    error: Exception


@dataclass(slots=True, eq=False)
class RequestFailed(GenerationEnd):
    error: Exception


@dataclass(slots=True, eq=False)
class ToolsDone(Event):
    live: Live
    results: list[ToolResult] | None  # None: the deadline cancelled the tools
    t0: float
    t1: float


@dataclass(slots=True, eq=False)
class EnvStepped(Event):
    live: Live
    step: EnvStep | None  # None: the deadline cancelled the step
    answer: str | None  # the turn's own parsed answer
    t0: float
    t1: float


@dataclass(slots=True, eq=False)
class Ended(Event):
    live: Live
    status: Status
    reason: str


class Inbox:
    """The engine's event queue: a deque and at most one waiter (the loop). asyncio.Queue does
    the same with bookkeeping (putters, unfinished-task counts, an Event) the loop never uses."""

    __slots__ = ("items", "_waiter")

    def __init__(self) -> None:
        self.items: collections.deque[Event] = collections.deque()
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, event: Event) -> None:
        self.items.append(event)
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def wake(self) -> None:
        self.put_nowait(WAKE)

    async def wait(self) -> None:
        """Return once an event is queued."""
        while not self.items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
