"""The garbage-collector policy around a run: a context manager.

A full collection walks every tracked object, and ten thousand live trajectories make that a
stall of 100+ ms on the loop. During a run, objects alive at start (models, datasets) are frozen
as vLLM does after start-up, and the ones made since that survive a young (generation-0)
collection are frozen every `interval_s` (`tick()`, called once per slice); generation-1 and
full collections are held off, since what they would scan is what the next freeze takes out of
scanning anyway (each survivor is scanned once, not twice, and no 5-15 ms generation-1 pass
stalls the loop). Young collections go on, so short-lived cycles are still collected.
Trajectories are freed by reference counting as usual; on exit the thresholds are restored and
everything is unfrozen, so any reference cycle that outlived a young collection is collected
then. The start collects only the young generations (a full pass over a process with torch
loaded is ~100 ms on the loop): old garbage would wait for a full collection anyway.

    with FrozenGC(enabled=cfg.gc_freeze, interval_s=cfg.gc_freeze_interval_s) as gcp:
        while running:
            ...; gcp.tick()
"""
from __future__ import annotations

import gc
import time
from typing import Any


class FrozenGC:
    """The policy above; with enabled=False it does nothing (the interpreter's own GC runs)."""

    HELD_OFF = 1_000_000  # generation-1 and -2 thresholds during a run

    def __init__(self, enabled: bool = True, interval_s: float = 0.1) -> None:
        self.enabled, self.interval_s = enabled, interval_s
        self.thresholds = gc.get_threshold()
        self._next = 0.0

    def __enter__(self) -> "FrozenGC":
        self.thresholds = gc.get_threshold()
        if self.enabled:
            gc.collect(1)
            gc.freeze()
            gc.set_threshold(self.thresholds[0], self.HELD_OFF, self.HELD_OFF)
        self._next = time.perf_counter() + self.interval_s
        return self

    def tick(self) -> None:
        """Freeze the survivors of young collections, at most once per interval_s."""
        if self.enabled and time.perf_counter() >= self._next:
            gc.freeze()
            self._next = time.perf_counter() + self.interval_s

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            gc.unfreeze()
            gc.set_threshold(*self.thresholds)
