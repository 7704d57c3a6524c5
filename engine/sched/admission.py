"""The one admission rule: whether the next group (n samples of one prompt) may start now.

A group is admitted while the run is not paused, the launch policy's gate is open, `live + n`
stays within max(max_live, n_samples), and the staleness bound allows it: with
max_version_lag >= 0, at most (version - base + lag + 1) * groups_per_step groups are admitted
(base: the policy version when the engine was built). Prompts are taken lazily, one group at a
time, so a long dataset iterator costs nothing up front.

    adm = Admission(cfg, version=lambda: engine.version)
    adm.start(prompts)
    p = adm.next(live, open=not paused)     # a Prompt, or None: not now (or none left)
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

from ..trajectory import Prompt


class Admission:
    """Admits groups by the rule above; counts what it admitted (the staleness bound's input)."""

    def __init__(self, cfg: Any, version: Callable[[], int]) -> None:
        self.configure(cfg)
        self.version = version
        self.base_version = version()
        self.admitted = 0  # groups admitted over the engine's life (all runs)
        self.exhausted = True
        self._pending: Iterator[Prompt] = iter(())

    def configure(self, cfg: Any) -> None:
        """Take the rule's numbers from an EngineConfig (the engine's, whenever it is set)."""
        self.n = cfg.n_samples
        self.cap = max(cfg.max_live, cfg.n_samples)
        self.max_version_lag = cfg.max_version_lag
        self.groups_per_step = cfg.groups_per_step

    def start(self, prompts: Iterable[Prompt]) -> None:
        """A run starts: take prompts from `prompts`."""
        self._pending = iter(prompts)
        self.exhausted = False

    def fresh_enough(self) -> bool:
        """The staleness bound allows one more group."""
        if self.max_version_lag < 0:
            return True
        steps = self.version() - self.base_version + self.max_version_lag + 1
        return self.admitted < steps * self.groups_per_step

    def next(self, live: int, open: bool = True) -> Prompt | None:  # noqa: A002 - the gate's name
        """The next prompt to admit with `live` trajectories live, or None: the rule says not now
        (`open` is False: paused, or the launch policy's gate is shut), or no prompt is left."""
        if self.exhausted or not open or live + self.n > self.cap or not self.fresh_enough():
            return None
        p = next(self._pending, None)
        if p is None:
            self.exhausted = True
            return None
        self.admitted += 1
        return p
