"""Rewards: plain async functions, chosen by name, that score a whole group of trajectories.

``opensearch_vl`` (OpenSearch-VL Sec. 4.2):  r = r_fmt * (alpha * r_acc + (1 - alpha) * r_query)

* r_fmt   = mean over the trajectory's steps of Turn.ok (1 when the step was well-formed and
            every tool it called ran; 0 for no steps at all);
* r_acc   in {0, 1} from the accuracy judge (0 without a final answer);
* r_query in [0, 1] from the query judge over the search calls before traj.fatal_step
            (skipped, and recorded as None, when alpha == 1).

``accuracy`` is r_acc alone; ``format_accuracy`` is r_fmt * r_acc. Every function writes its
components into traj.reward: fmt, acc, query, total, judge ({"accuracy": {name, model, ...},
"query": {...}}: who scored it, and any fallback) and details (per-judge details, e.g. the F1).
All trajectories of a call are judged concurrently; the endpoint's concurrency limit lives in
the JudgeSession (pass one to share it across groups, or let score_group open its own).

    cfg = RewardConfig(name="opensearch_vl", alpha=0.8, judge=JudgeConfig())
    totals = await score_group(group, cfg)          # list[float], one per trajectory

Register more with ``@register_reward(name)`` on ``async fn(trajs, cfg, session) -> list[float]``,
or name a plain function by dotted path, ``RewardConfig(name="my_pkg.rewards:exact")`` (slime's
and verl's way, engine/plugins.py): a sync or async ``fn(traj) -> float`` (or a dict of
components with a numeric "total", e.g. {"total": 1.0, "acc": 1.0}), called once per trajectory,
concurrently; its value is written to traj.reward["total"]. It is imported when the config is
built, so a wrong path fails there with one line naming it.
Tests: ``.venv/bin/python -m pytest -q tests/test_reward.py``.
"""
from __future__ import annotations

import asyncio
import inspect
import math
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from spyglass.engine.plugins import PluginError, is_plugin_path, load_object
from spyglass.engine.trajectory import Status, Trajectory
from spyglass.trainer.judges import JudgeConfig, Judgement, JudgeSession, run_judge

RewardFn = Callable[[list[Trajectory], "RewardConfig", JudgeSession], Awaitable[list[float]]]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make an async reward ``fn(trajs, cfg, session) -> totals`` available by name."""
    if not name:
        raise ValueError(f"reward name must be non-empty, got {name!r}")

    def deco(fn: RewardFn) -> RewardFn:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"reward {name!r} must be an async function, got {fn!r}")
        REWARDS[name] = fn
        return fn
    return deco


@dataclass(frozen=True)
class RewardConfig:
    """Which reward function, its mixing weight, and the judges it uses."""

    name: str = "opensearch_vl"  # reward function: opensearch_vl | accuracy | format_accuracy | a registered
    #                              one | 'pkg.module:fn', a plain fn(traj) -> float (sync or async)
    alpha: float = 0.8  # weight of accuracy against query quality
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def __post_init__(self) -> None:
        if is_plugin_path(self.name):
            try:
                reward_fn(self.name)  # imports and checks it now: a bad path fails here, named
            except PluginError as e:
                raise PluginError(f"RewardConfig.name: {e}") from None
        elif self.name not in REWARDS:
            raise ValueError(f"RewardConfig.name: unknown reward {self.name!r}; known: {sorted(REWARDS)} "
                             f"or a plugin 'pkg.module:fn'")
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"RewardConfig.alpha must be in [0, 1], got {self.alpha!r}")
        if not isinstance(self.judge, JudgeConfig):
            raise TypeError(f"RewardConfig.judge must be a JudgeConfig, got {type(self.judge).__name__}")


def reward_fn(name: str) -> RewardFn:
    """The group reward `name`: a registered one, or the plugin `pkg.module:fn` (a function of one
    Trajectory) wrapped to score a group. PluginError (a ValueError) naming the path when it does
    not load or is not a function of one trajectory."""
    if not is_plugin_path(name):
        return REWARDS[name]
    fn = load_object(name, "reward function")
    if inspect.isclass(fn) or not callable(fn):
        raise PluginError(f"reward function {name!r}: expected a function fn(traj) -> float, got {type(fn).__name__}")
    try:
        inspect.signature(fn).bind(None)
    except TypeError as e:
        raise PluginError(f"reward function {name!r}: must take one trajectory, fn(traj) -> float; its "
                          f"signature {inspect.signature(fn)} does not ({e})") from None
    except ValueError:  # a builtin without a signature: let the call decide
        pass

    async def per_trajectory(trajs: list[Trajectory], cfg: RewardConfig, session: JudgeSession) -> list[float]:
        return list(await asyncio.gather(*(_plugin_score(name, fn, t) for t in trajs)))
    return per_trajectory


async def _plugin_score(name: str, fn: Callable, traj: Trajectory) -> float:
    out = fn(traj)
    if inspect.isawaitable(out):
        out = await out
    parts = dict(out) if isinstance(out, dict) else {"total": out}
    total = parts.get("total")
    if isinstance(total, bool) or not isinstance(total, (int, float)) or not math.isfinite(total):
        raise TypeError(f"reward function {name!r} returned {out!r:.120} for trajectory {traj.id!r}: expected a "
                        f"finite number, or a dict with a finite numeric 'total'")
    traj.reward.update(parts, total=float(total), plugin=name)
    return float(total)


def format_score(traj: Trajectory) -> float:
    """r_fmt: the fraction of steps that were well-formed and whose tools all ran (0 if none)."""
    if not traj.turns:
        return 0.0
    return sum(t.ok for t in traj.turns) / len(traj.turns)


def _write(traj: Trajectory, fmt: float, acc: Judgement, query: Judgement | None,
           total: float) -> float:
    judge = {"accuracy": acc.record()}
    details = {"accuracy": acc.details}
    if query is not None:
        judge["query"] = query.record()
        details["query"] = query.details
    traj.reward.update(fmt=fmt, acc=acc.score, query=None if query is None else query.score,
                       total=total, judge=judge, details=details)
    return total


async def _judged(traj: Trajectory, cfg: RewardConfig, session: JudgeSession,
                  with_query: bool) -> tuple[Judgement, Judgement | None]:
    if with_query:
        acc, query = await asyncio.gather(run_judge(cfg.judge.accuracy, traj, session),
                                          run_judge(cfg.judge.query, traj, session))
        return acc, query
    return await run_judge(cfg.judge.accuracy, traj, session), None


@register_reward("opensearch_vl")
async def opensearch_vl(trajs: list[Trajectory], cfg: RewardConfig, session: JudgeSession) -> list[float]:
    """r = r_fmt * (alpha * r_acc + (1 - alpha) * r_query)."""
    a = float(cfg.alpha)
    judged = await asyncio.gather(*(_judged(t, cfg, session, a < 1.0) for t in trajs))
    out = []
    for t, (acc, query) in zip(trajs, judged):
        fmt = format_score(t)
        q = query.score if query is not None else 0.0
        out.append(_write(t, fmt, acc, query, fmt * (a * acc.score + (1.0 - a) * q)))
    return out


@register_reward("accuracy")
async def accuracy(trajs: list[Trajectory], cfg: RewardConfig, session: JudgeSession) -> list[float]:
    """r = r_acc (format recorded, not used)."""
    judged = await asyncio.gather(*(_judged(t, cfg, session, False) for t in trajs))
    return [_write(t, format_score(t), acc, None, acc.score) for t, (acc, _) in zip(trajs, judged)]


@register_reward("format_accuracy")
async def format_accuracy(trajs: list[Trajectory], cfg: RewardConfig, session: JudgeSession) -> list[float]:
    """r = r_fmt * r_acc."""
    judged = await asyncio.gather(*(_judged(t, cfg, session, False) for t in trajs))
    out = []
    for t, (acc, _) in zip(trajs, judged):
        fmt = format_score(t)
        out.append(_write(t, fmt, acc, None, fmt * acc.score))
    return out


async def score_group(trajs: list[Trajectory], cfg: RewardConfig,
                      session: JudgeSession | None = None) -> list[float]:
    """Score finished trajectories (a group, or several) concurrently with reward `cfg.name`;
    writes traj.reward and returns the totals in input order."""
    for t in trajs:
        if t.status is Status.RUNNING:
            raise ValueError(f"trajectory {t.id!r} is still running: only finished ones are scored")
    if not trajs:
        return []
    fn = reward_fn(cfg.name)
    if session is not None:
        if session.cfg != cfg.judge:
            raise ValueError("the JudgeSession was opened with a different JudgeConfig than "
                             "RewardConfig.judge")
        return await fn(trajs, cfg, session)
    async with JudgeSession(cfg.judge) as s:
        return await fn(trajs, cfg, s)
