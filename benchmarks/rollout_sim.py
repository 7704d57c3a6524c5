"""The rollout workload model and its two reference schedules, without any engine.

A workload is a list of trajectories, each a list of turns (generated tokens, then the latency
of the tools that turn calls; the last turn answers and calls none). Two schedules of it:

- `des_bound`: a zero-overhead discrete-event simulation of continuous batching on one server
  with at most `live` trajectories in the system: every decode step takes a + b * n_active
  seconds and gives each active sequence one token; a sequence whose turn ends leaves for its
  tools and rejoins at the next step boundary after them; a finished trajectory is replaced at
  once. Its makespan is the bound an engine can reach on this workload.
- `lockstep_makespan`: TRL-style lock-step batches of `live` trajectories: generate the turn for
  every active member (the batch decodes until its longest member ends), then run all their
  tools concurrently and wait for the slowest, repeat until all members are done.

    python benchmarks/rollout_sim.py   # prints both and the ratio on the default workload
"""
from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass


@dataclass
class Workload:
    """Vision-DeepResearch-shaped defaults (see the engine issue)."""

    prompts: int = 4096
    mean_extra_turns: float = 7.0  # turns = 1 + Geometric(mean 7), capped
    max_turns: int = 50
    tokens_mean: int = 300  # generated tokens per turn, uniform in [tokens_mean/2, 3*tokens_mean/2]
    tool_median_s: float = 1.5  # lognormal tool latency
    tool_sigma: float = 1.0
    step_a_s: float = 0.020  # decode step = a + b * active sequences
    step_b_s: float = 0.00005
    live: int = 256
    seed: int = 0

    def sample(self) -> list[list[tuple[int, float]]]:
        """[trajectory][turn] = (generated tokens, tool latency after it; 0 on the last turn)."""
        rng = random.Random(self.seed)
        p = 1.0 / (1.0 + self.mean_extra_turns)  # P(stop) for a geometric on {0,1,..}
        out = []
        for _ in range(self.prompts):
            extra = 0
            while rng.random() > p and extra + 1 < self.max_turns:
                extra += 1
            turns = []
            for k in range(extra + 1):
                tok = rng.randint(self.tokens_mean // 2, 3 * self.tokens_mean // 2)
                lat = 0.0 if k == extra else self.tool_median_s * math.exp(rng.gauss(0.0, self.tool_sigma))
                turns.append((tok, lat))
            out.append(turns)
        return out


def des_bound(work: list[list[tuple[int, float]]], live: int, a: float, b: float) -> float:
    """Makespan of zero-overhead continuous batching (see module docstring)."""
    now = 0.0
    nxt = 0
    active: dict[int, int] = {}  # traj -> tokens left in its current turn
    turn_of: dict[int, int] = {}
    waiting: list[tuple[float, int]] = []  # (tool done time, traj)
    in_system = 0

    def admit() -> None:
        nonlocal nxt, in_system
        while in_system < live and nxt < len(work):
            active[nxt], turn_of[nxt] = work[nxt][0][0], 0
            nxt += 1
            in_system += 1

    admit()
    while active or waiting:
        if not active:
            now = max(now, waiting[0][0])
        while waiting and waiting[0][0] <= now:
            _, j = heapq.heappop(waiting)
            active[j] = work[j][turn_of[j]][0]
        if not active:
            continue
        n = len(active)
        # advance whole steps until the next turn ends or the next tool returns
        k = min(active.values())
        step = a + b * n
        if waiting:
            k = max(1, min(k, math.ceil((waiting[0][0] - now) / step)))
        now += k * step
        for j in list(active):
            active[j] -= k
            if active[j] <= 0:
                del active[j]
                lat = work[j][turn_of[j]][1]
                turn_of[j] += 1
                if turn_of[j] < len(work[j]):
                    heapq.heappush(waiting, (now + lat, j))
                else:
                    in_system -= 1
        admit()
    return now


def lockstep_makespan(work: list[list[tuple[int, float]]], live: int, a: float, b: float) -> float:
    """Makespan of lock-step batches (see module docstring)."""
    total = 0.0
    for s in range(0, len(work), live):
        batch = work[s:s + live]
        for k in range(max(len(t) for t in batch)):
            members = [t[k] for t in batch if k < len(t)]
            toks = sorted(m[0] for m in members)
            # decode until the longest ends; the batch shrinks as members finish
            prev, n = 0, len(toks)
            for i, tk in enumerate(toks):
                total += (tk - prev) * (a + b * (n - i))
                prev = tk
            total += max(m[1] for m in members)
    return total


if __name__ == "__main__":
    w = Workload()
    work = w.sample()
    bound = des_bound(work, w.live, w.step_a_s, w.step_b_s)
    lock = lockstep_makespan(work, w.live, w.step_a_s, w.step_b_s)
    print(f"bound {bound:.1f} s  lock-step {lock:.1f} s  ratio {lock / bound:.2f}x")
