"""A latency-modelled fleet: a rollout workload, its two reference schedules, and the engine run
over a simulated server with sleeping tools (no model, no GPU; durations scaled).

A workload is a list of trajectories, each a list of turns (generated tokens, then the latency
of the tools that turn calls; the last turn answers and calls none): `Workload.sample()` draws a
Vision-DeepResearch-shaped one, `from_trajectories` takes the turn structure of a real run and
gives its tool calls a web deployment's latencies. Three schedules of it:

- `des_bound`: a zero-overhead discrete-event simulation of continuous batching on one server
  with at most `live` trajectories in the system: every decode step takes a + b * n_active
  seconds and gives each active sequence one token; a sequence whose turn ends leaves for its
  tools and rejoins at the next step boundary after them; a finished trajectory is replaced at
  once. Its makespan is the bound an engine can reach on this workload.
- `lockstep_makespan`: TRL-style lock-step batches of `live` trajectories: generate the turn for
  every active member (the batch decodes until its longest member ends), then run all their
  tools concurrently and wait for the slowest, repeat until all members are done.
- `run_engine`: spyglass's Engine over a SimulatedBackend (engine/backends/simulated.py) and
  sleeping tools, async or in lock-step mode, in wall seconds (divide by `time_scale`).

    work = Workload(prompts=256).sample()
    bound = des_bound(work, 256, 0.02, 0.00005)
    wall, engine = asyncio.run(run_engine(work, live=256, step_a_s=0.02, step_b_s=0.00005, time_scale=0.03))
Used by `spyglass bench rollout` (the fleet rows) and benchmarks/bench_rollout.py.
"""
from __future__ import annotations

import asyncio
import heapq
import json
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Iterable

from .backends.simulated import SimulatedBackend, SimulatedConfig
from .chat import ByteCodec
from .scheduler import Engine, EngineConfig, ParsedTurn, Prompt, ToolOutcome
from .trajectory import Trajectory

Work = list[list[tuple[int, float]]]  # [trajectory][turn] = (generated tokens, tool latency after it)
CODEC = ByteCodec()
MIN_TURN_TOKENS = 80  # a simulated turn spells out its call or answer in at least this many bytes


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

    def sample(self) -> Work:
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


def des_bound(work: Work, live: int, a: float, b: float) -> float:
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


def lockstep_makespan(work: Work, live: int, a: float, b: float) -> float:
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


def from_trajectories(trajs: Iterable[Trajectory], tool_median_s: float = 1.5, tool_sigma: float = 1.0,
                      seed: int = 0) -> Work:
    """The turn structure of a real run (each turn's generated tokens, at least MIN_TURN_TOKENS)
    with lognormal tool latencies of a web deployment after every turn but the last."""
    rng = random.Random(seed)
    work = []
    for t in trajs:
        n = len(t.turns)
        work.append([(max(turn.gen_tokens, MIN_TURN_TOKENS),
                      0.0 if k == n - 1 else tool_median_s * math.exp(rng.gauss(0.0, tool_sigma)))
                     for k, turn in enumerate(t.turns)])
    return [w for w in work if w]


def turn_text(j: int, k: int, tokens: int, last: bool, rng: random.Random) -> str:
    """A turn of exactly `tokens` bytes (ByteCodec: one byte, one token; at least MIN_TURN_TOKENS)
    ending in a call or the answer, with non-repetitive filler thinking before it."""
    tail = (f"<answer>a{j}</answer>" if last else
            f'<tool_call>{{"name": "sim", "arguments": {{"j": {j}, "k": {k}}}}}</tool_call>')
    n = max(tokens - 1 - len(tail) - len("<think></think>"), 0)  # -1: the stop token
    filler = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n))
    return f"<think>{filler}</think>{tail}"


class WorkloadPolicy:
    """Replays the workload: turn k of trajectory j has the workload's token count."""

    def __init__(self, work: Work) -> None:
        self.work, self.cache = work, {}

    def forced_ids(self, traj: Trajectory, turn: int) -> list[int]:
        j = int(traj.group_id[1:])
        key = (j, turn)
        if key not in self.cache:
            turns = self.work[j]
            text = turn_text(j, turn, turns[turn][0], turn == len(turns) - 1, random.Random(j * 1000 + turn))
            self.cache[key] = CODEC.encode_text(text) + [CODEC.IM_END]
        return self.cache[key]


def parse(text: str) -> ParsedTurn:
    """The workload's fixed format (no general parser needed)."""
    if "<answer>" in text:
        return ParsedTurn([], [], text.split("<answer>", 1)[1].split("</answer>", 1)[0])
    body = text.split("<tool_call>", 1)[1].split("</tool_call>", 1)[0]
    return ParsedTurn([{"name": "sim", "arguments": json.dumps(json.loads(body)["arguments"])}], [], None)


def make_tools(work: Work, scale: float) -> Any:
    """Tools that sleep the workload's latency for their (trajectory, turn)."""
    async def tools(calls: list[dict[str, Any]], traj: Trajectory) -> list[ToolOutcome]:
        out = []
        for c in calls:
            a = json.loads(c["arguments"])
            await asyncio.sleep(work[a["j"]][a["k"]][1] * scale)
            out.append(ToolOutcome("ok"))
        return out
    return tools


async def run_engine(work: Work, live: int, step_a_s: float, step_b_s: float, time_scale: float,
                     lockstep: bool = False) -> tuple[float, Engine]:
    """The engine over the workload on one simulated server; returns (wall seconds, engine)."""
    backend = SimulatedBackend(SimulatedConfig(step_base_s=step_a_s, step_per_seq_s=step_b_s, max_seqs=live,
                                               time_scale=time_scale, vocab_size=CODEC.vocab_size))
    max_turns = max(len(t) for t in work)
    cfg = EngineConfig(n_samples=1, max_live=live, max_inflight_per_server=live, lockstep=lockstep,
                       max_turns=max_turns, timeout_s=1e9, repetition_min_tokens=10**9)
    engine = Engine(cfg, [backend], CODEC, make_tools(work, time_scale), parse, policy=WorkloadPolicy(work))
    t0 = time.perf_counter()
    n = 0
    try:
        async for g in engine.run(Prompt(f"p{j}", "q") for j in range(len(work))):
            n += len(g)
    finally:
        await backend.close()
    if n != len(work):
        raise RuntimeError(f"the simulated fleet finished {n} of {len(work)} trajectories")
    return time.perf_counter() - t0, engine
