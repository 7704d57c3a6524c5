"""Placement: which server a trajectory generates on, and failover when a server fails.

A group is placed on the least-loaded server that is up (load: live trajectories placed there)
and keeps it (affinity: a server's prefix cache holds the shared prompt). Each server has a
ready queue and at most max_inflight requests in flight. A server that refuses a request or
does not answer is marked down (it is back up when it answers again) and the turn moves to the
least-loaded other server; a trajectory moves at most max_moves times, then it ends as ERROR.

    pl = Placement(n_servers=2, max_inflight=256, max_moves=3)
    s = pl.pick(); pl.load[s] += n                   # a new group
    for lv in pl.pop_ready(budget): pl.start(lv)     # launch: a slot each
    pl.failover(lv)                                  # False: out of moves
"""
from __future__ import annotations

import collections
from typing import Iterator

from .events import Live


class Placement:
    """Ready queues, slots in flight and load per server; placement and failover."""

    def __init__(self, n_servers: int, max_inflight: int, max_moves: int) -> None:
        self.max_inflight, self.max_moves = max_inflight, max_moves
        self.ready: list[collections.deque[Live]] = [collections.deque() for _ in range(n_servers)]
        self.inflight = [0] * n_servers  # generation requests in flight per server
        self.load = [0] * n_servers  # live trajectories per server (affinity)
        self.up = [True] * n_servers

    def configure(self, max_inflight: int, max_moves: int) -> None:
        self.max_inflight, self.max_moves = max_inflight, max_moves

    def pick(self, exclude: int | None = None) -> int:
        """The least-loaded server that is up (any other when none is), never `exclude`."""
        n = len(self.up)
        up = [i for i in range(n) if self.up[i] and i != exclude]
        if not up:
            up = [i for i in range(n) if i != exclude] or [0]
        return min(up, key=lambda i: self.load[i])

    def ready_up(self, lv: Live) -> None:
        """`lv` waits for a generation slot on its server."""
        self.ready[lv.server].append(lv)

    def pop_ready(self, budget: int) -> Iterator[Live]:
        """Ready trajectories in server order while their server has a free slot, `budget` at
        most; the caller calls start(lv) for each it launches (before taking the next)."""
        cap, inflight = self.max_inflight, self.inflight
        for s, q in enumerate(self.ready):
            while q and inflight[s] < cap and budget > 0:
                budget -= 1
                yield q.popleft()

    def start(self, lv: Live) -> None:
        """A generation of `lv` takes a slot on its server."""
        self.inflight[lv.server] += 1

    def ended(self, lv: Live) -> None:
        """`lv`'s generation ended: its slot is free."""
        self.inflight[lv.server] -= 1

    def answered(self, server: int) -> None:
        """`server` answered: back in the placement rotation."""
        self.up[server] = True

    def failover(self, lv: Live) -> bool:
        """`lv`'s server failed: mark it down and move `lv` (ready) to another server; False
        when `lv` has used its max_moves (it stays where it is)."""
        self.up[lv.server] = False
        lv.moves += 1
        if lv.moves > self.max_moves:
            return False
        new = self.pick(exclude=lv.server)
        self.load[lv.server] -= 1
        self.load[new] += 1
        lv.server = new
        self.ready[new].append(lv)
        return True

    def release(self, lv: Live) -> None:
        """`lv` finished: its server carries one trajectory less."""
        self.load[lv.server] -= 1
