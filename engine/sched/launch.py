"""Launch policies: when ready trajectories may generate and when a turn's tools may start.

The engine asks its policy three things each slice: may admission go on (`admitting`, a gate
on the one admission rule), how many generations may start now (`budget`), and, when a turn
has parsed its calls, whether its tools start now or are held (`hold`; held ones come back
from `release`).

    Continuous()   the engine: a bounded number of launches per slice, tools at once
    LockStep()     the baseline the benchmarks compare to (TRL's GRPO rollout): a batch of
                   max_live trajectories is admitted only when the last one is done; generation
                   starts only when no generation or tool job is in flight (every member's turn
                   together), and tools start only when the whole batch has generated
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

from .events import Live

UNLIMITED = 1 << 62


class LaunchPolicy(Protocol):
    def reset(self) -> None:
        """A run starts."""

    def open_slice(self, live: int) -> None:
        """A slice starts, with `live` trajectories live (before admission)."""

    def admitting(self) -> bool:
        """May admission go on (the policy's part of the admission rule)."""

    def admission_stopped(self) -> None:
        """Admission stopped for this slice (the rule said no, or no prompt is left)."""

    def release(self, generating: int) -> Sequence[tuple[Live, list[dict[str, Any]]]]:
        """Held turns whose tools start now, given the generations in flight."""

    def budget(self, generating: int, tool_jobs: int) -> int:
        """How many generations may start now."""

    def hold(self, lv: Live, calls: list[dict[str, Any]]) -> bool:
        """True: the policy keeps this turn's tools for `release`; False: they start now."""


class Continuous:
    """Launch whatever is ready, `per_slice` at most per slice (bounds event-loop lag); tools at once."""

    def __init__(self, per_slice: int) -> None:
        self.per_slice = per_slice

    def reset(self) -> None: ...

    def open_slice(self, live: int) -> None: ...

    def admitting(self) -> bool:
        return True

    def admission_stopped(self) -> None: ...

    def release(self, generating: int) -> Sequence[tuple[Live, list[dict[str, Any]]]]:
        return ()

    def budget(self, generating: int, tool_jobs: int) -> int:
        return self.per_slice

    def hold(self, lv: Live, calls: list[dict[str, Any]]) -> bool:
        return False


class LockStep:
    """Batches: admit a whole batch while none is live, then all generate, then all run tools."""

    def __init__(self) -> None:
        self.batch_open = False  # a batch is being admitted
        self.held: list[tuple[Live, list[dict[str, Any]]]] = []  # turns whose tools wait for the batch

    def reset(self) -> None:
        self.batch_open = False

    def open_slice(self, live: int) -> None:
        if live == 0:
            self.batch_open = True

    def admitting(self) -> bool:
        return self.batch_open

    def admission_stopped(self) -> None:
        self.batch_open = False

    def release(self, generating: int) -> Sequence[tuple[Live, list[dict[str, Any]]]]:
        if not self.held or generating:
            return ()
        out, self.held = self.held, []
        return out

    def budget(self, generating: int, tool_jobs: int) -> int:
        if generating or tool_jobs or self.held or self.batch_open:
            return 0
        return UNLIMITED  # the whole batch's turn at once

    def hold(self, lv: Live, calls: list[dict[str, Any]]) -> bool:
        self.held.append((lv, calls))
        return True
