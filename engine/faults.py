"""Tool-failure injection: a ToolRunner wrapper that makes chosen calls fail as the world would.

Real tools time out and services go down; an agent (and a teacher) should meet that in training.
FaultyRunner wraps the engine's ToolRunner (`async (calls, traj) -> list[ToolResult]`, e.g.
engine/env.ExecutorRunner). A call chosen to fail does not run; its result is a transient error
whose observation reads as ExecutorRunner's errors do:

    Error (transient): <tool> is unavailable (the service did not answer); try the call again.

Two kinds of fault, indistinguishable to the model: each call fails with probability
`transient_p`; and a trajectory gets, with probability `outage_p`, a sticky outage from call
ordinal k (uniform in [0, outage_window)) on: every call of it from the k-th fails. Decisions are
a hash of (seed, trajectory id, epoch, call ordinal), never of asyncio timing: the ordinal counts
the trajectory's calls through this runner (earlier turns' plus the position in this turn); the
epoch counts the trajectories of that id this runner has seen before (the scheduler names a
trajectory "<question>#<sample>", the same in every GRPO step, so without it a question would
meet the same outage every step). What was injected is recorded on the trajectory:
`traj.meta["faults"] = {"outage_from": k or None, "injected": n, "calls": n, "epoch": e}`.

    env.runner = wrap_runner(env.runner, FaultConfig(transient_p=0.1, outage_p=0.05))
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from .config import check
from .trajectory import ErrorKind, ToolResult, Trajectory

ToolRunner = Callable[[list[dict[str, Any]], Trajectory], Awaitable[list[ToolResult]]]


@dataclass
class FaultConfig:
    """How often tool calls fail on purpose (0 and 0: never, the runner is not wrapped)."""

    transient_p: float = 0.0  # probability that any one tool call fails transiently
    outage_p: float = 0.0  # probability that a trajectory gets a sticky outage: from a random call on, every call fails
    outage_window: int = 4  # the outage starts at call ordinal uniform in [0, outage_window)
    seed: int = 0  # the fault draws' seed (same seed, same faults)

    def __post_init__(self) -> None:
        check(0.0 <= self.transient_p <= 1.0, f"faults.transient_p must be in [0, 1], got {self.transient_p!r}")
        check(0.0 <= self.outage_p <= 1.0, f"faults.outage_p must be in [0, 1], got {self.outage_p!r}")
        check(self.outage_window >= 1, f"faults.outage_window must be >= 1, got {self.outage_window!r}")

    @property
    def active(self) -> bool:
        return self.transient_p > 0 or self.outage_p > 0


def unavailable(tool: str) -> ToolResult:
    """The result of a call that was made to fail: a transient error, as ExecutorRunner words them."""
    return ToolResult(f"Error (transient): {tool} is unavailable (the service did not answer); try the call again.",
                      error=ErrorKind.TRANSIENT)


def _uniform(seed: int, traj_id: str, epoch: int, what: str) -> float:
    """A number in [0, 1) fixed by its key."""
    h = hashlib.blake2b(f"{seed}\x00{traj_id}\x00{epoch}\x00{what}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64


class FaultyRunner:
    """A ToolRunner that fails chosen calls (see the module docstring) and runs the others
    through `inner`, in order, returning one result per call in the calls' order."""

    def __init__(self, inner: ToolRunner, cfg: FaultConfig) -> None:
        self.inner, self.cfg = inner, cfg
        self._epochs: dict[str, int] = {}  # trajectory id -> trajectories of that id seen

    def _state(self, traj: Trajectory) -> dict[str, Any]:
        st = traj.meta.get("faults")
        if st is None:  # first calls of this trajectory: draw its outage
            cfg, epoch = self.cfg, self._epochs.get(traj.id, 0)
            self._epochs[traj.id] = epoch + 1
            out = None
            if _uniform(cfg.seed, traj.id, epoch, "outage") < cfg.outage_p:
                out = int(_uniform(cfg.seed, traj.id, epoch, "outage_from") * cfg.outage_window)
            st = traj.meta["faults"] = {"outage_from": out, "injected": 0, "calls": 0, "epoch": epoch}
        return st

    def fails(self, st: dict[str, Any], traj_id: str, ordinal: int) -> bool:
        """Whether call `ordinal` of the trajectory (its state `st`) is made to fail."""
        if st["outage_from"] is not None and ordinal >= st["outage_from"]:
            return True
        return _uniform(self.cfg.seed, traj_id, st["epoch"], f"call{ordinal}") < self.cfg.transient_p

    async def __call__(self, calls: list[dict[str, Any]], traj: Trajectory) -> list[ToolResult]:
        st = self._state(traj)
        base, allowed = st["calls"], traj.meta.get("tools")
        st["calls"] = base + len(calls)
        # a call to a tool not offered is the model's mistake, refused by the inner runner as bad_args
        failed = [(allowed is None or c["name"] in allowed) and self.fails(st, traj.id, base + i)
                  for i, c in enumerate(calls)]
        st["injected"] += sum(failed)
        run = [c for c, f in zip(calls, failed) if not f]
        ran = iter(await self.inner(run, traj) if run else [])
        return [unavailable(c["name"]) if f else next(ran) for c, f in zip(calls, failed)]


def wrap_runner(runner: ToolRunner, cfg: FaultConfig) -> ToolRunner:
    """`runner` behind a FaultyRunner, or `runner` itself when cfg injects nothing."""
    return FaultyRunner(runner, cfg) if cfg.active else runner
