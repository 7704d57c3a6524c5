"""Engine metrics: per-run counters, timings, spans for the timeline, latency histograms.

    engine.stats.summary()   # wall, turns, tokens/s, trajectories/s, busy fraction, tool latency
"""
from __future__ import annotations

import collections
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class EngineStats:
    turns: int = 0
    gen_tokens: int = 0
    obs_tokens: int = 0
    gen_requests: int = 0
    aborted_turns: int = 0
    server_moves: int = 0
    finished: int = 0
    by_status: collections.Counter = field(default_factory=collections.Counter)
    token_check: collections.Counter = field(default_factory=collections.Counter)  # ok/mismatch/unsupported
    gen_s: float = 0.0
    tool_s: float = 0.0
    queue_s: float = 0.0
    tool_latencies: list[float] = field(default_factory=list)
    busy_s: float = 0.0  # wall time with at least one generation in flight (any server)
    spans: list[tuple[str, str, float, float]] = field(default_factory=list)  # traj, kind, t0, t1
    started: float = 0.0
    ended: float = 0.0

    def summary(self) -> dict[str, Any]:
        wall = max(self.ended - self.started, 1e-9)
        return {"wall_s": wall, "turns": self.turns, "trajectories": self.finished,
                "gen_tokens": self.gen_tokens, "tokens_per_s": self.gen_tokens / wall,
                "trajectories_per_s": self.finished / wall, "aborted_turns": self.aborted_turns,
                "server_moves": self.server_moves, "status": dict(self.by_status),
                "mean_gen_s": self.gen_s / max(self.turns, 1),
                "mean_tool_s": self.tool_s / max(self.turns, 1),
                "mean_queue_s": self.queue_s / max(self.turns, 1),
                "generator_busy_fraction": self.busy_s / wall,
                "tool_latency_s": latency_histogram(self.tool_latencies)}


def latency_histogram(xs: list[float]) -> dict[str, Any]:
    """Percentiles and log-spaced bucket counts (upper edges in seconds) of latencies."""
    if not xs:
        return {"count": 0}
    s = sorted(xs)

    def q(p: float) -> float:
        return s[min(len(s) - 1, int(p * len(s)))]
    edges = [0.001, 0.01, 0.1, 1.0, 10.0, 100.0, float("inf")]
    counts, i = [], 0
    for e in edges:
        j = i
        while j < len(s) and s[j] <= e:
            j += 1
        counts.append(j - i)
        i = j
    return {"count": len(s), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": s[-1],
            "buckets": dict(zip(["<=1ms", "<=10ms", "<=100ms", "<=1s", "<=10s", "<=100s", ">100s"], counts))}


def device_name() -> str:
    """What a benchmark ran on: the CUDA device, else the CPU model and core count."""
    try:
        import torch  # noqa: PLC0415
        if torch.cuda.is_available():
            return f"cuda: {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu} x{os.cpu_count()}"


def git_commit() -> str:
    """The short commit of the checkout this package runs from ("unknown" outside git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
        return out or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
