"""The limits that end a trajectory without crashing the run.

    Limits      per turn: the repetition detector (a long turn whose tail repeats a block), the
                K-consecutive-errors cascade, max_turns; per observation: the cascade, the wall
                clock, max_context. Each check returns (Status, stop_reason) or None.
    Deadlines   every live trajectory's wall-clock deadline (timeout_s) in a heap; one timer,
                armed for the earliest, wakes the loop, which expires what is due.
"""
from __future__ import annotations

import asyncio
import heapq
import weakref
from typing import Any, Callable, Iterator, Sequence

from ..trajectory import Status, Trajectory
from .events import Live

Stop = tuple[Status, str]  # how a trajectory ends: its status and stop_reason


def is_repetitive(ids: Sequence[int], max_period: int, min_repeats: int) -> bool:
    """True when the tail is one block of <= max_period tokens repeated >= min_repeats times."""
    n = len(ids)
    for p in range(1, max_period + 1):
        span = p * min_repeats
        if span > n:
            break
        tail = ids[n - span:]
        if all(tail[i] == tail[i - p] for i in range(p, span)):
            return True
    return False


class Limits:
    """The per-trajectory limits of an EngineConfig (see the module docstring)."""

    def __init__(self, cfg: Any, stop_ids: Sequence[int]) -> None:
        self.cfg = cfg
        self.stops = frozenset(stop_ids)

    def repetitive(self, ids: Sequence[int]) -> bool:
        """A long turn whose tail (without the stop token) repeats a block (the detector's rule)."""
        cfg = self.cfg
        n_body = len(ids) - 1 if ids and ids[-1] in self.stops else len(ids)
        return n_body >= cfg.repetition_min_tokens and is_repetitive(
            ids[:n_body], cfg.repetition_max_period, cfg.repetition_min_repeats)

    def cascade(self, t: Trajectory) -> bool:
        """K consecutive error steps (EngineConfig.fatal_errors says which; a step that is neither
        is skipped), the last not an answer; walked from the last turn back: cheap."""
        turns, k, errors = t.turns, self.cfg.fatal_k, self.cfg.fatal_errors
        if not turns or turns[-1].answered or turns[-1].cascade_flag(errors) is not False:
            return False
        run = 0
        for x in reversed(turns):
            flag = x.cascade_flag(errors)
            if flag:
                return False
            run += flag is False
            if run == k:
                return True
        return False

    def after_turn(self, t: Trajectory) -> Stop | None:
        """After a turn that did not answer: the cascade, then max_turns."""
        if self.cascade(t):
            return Status.FATAL, "fatal_cascade"
        if len(t.turns) >= self.cfg.max_turns:
            return Status.TRUNCATED, "max_turns"
        return None

    def after_observation(self, lv: Live, now: float) -> Stop | None:
        """After an observation: the cascade, the wall clock, then max_context."""
        if self.cascade(lv.traj):
            return Status.FATAL, "fatal_cascade"
        if lv.expired or now >= lv.deadline:
            return Status.TRUNCATED, "timeout"
        if lv.ntok >= self.cfg.max_context:
            return Status.TRUNCATED, "max_context"
        return None


def _gone(ref: Any) -> bool:
    lv = ref()
    return lv is None or lv.done


class Deadlines:
    """Wall-clock deadlines in a heap of (deadline, id, weakref to Live); `wake` is called by
    the one timer, armed for the earliest deadline (a finished trajectory's entry is dropped
    when it reaches the top)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self.wake = wake
        self.heap: list[tuple[float, int, Any]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # perf_counter time the timer fires

    def add(self, lv: Live) -> None:
        heapq.heappush(self.heap, (lv.deadline, id(lv), weakref.ref(lv)))

    def due(self, now: float) -> Iterator[Live]:
        """Pop the live trajectories whose deadline is at or before `now` (not yet expired)."""
        heap = self.heap
        while heap and (heap[0][0] <= now or _gone(heap[0][2])):
            _, _, ref = heapq.heappop(heap)
            lv = ref()
            if lv is None or lv.done or lv.expired:
                continue
            yield lv

    def arm(self, now: float) -> None:
        """Arm the timer for the earliest deadline (unless one fires about then already)."""
        heap = self.heap
        if heap and (self._timer is None or self._timer_at > heap[0][0] + 1e-3 or self._timer_at <= now):
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = heap[0][0]
            self._timer = asyncio.get_running_loop().call_later(max(heap[0][0] - now, 0.0), self.wake)

    def cancel(self) -> None:
        """The run ended: no timer fires."""
        if self._timer is not None:
            self._timer.cancel()
