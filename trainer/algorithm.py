"""Advantages and token loss masks for a batch of scored trajectories: the RL ablation switch.

Input: finished trajectories with ``traj.reward["total"]`` (any number of groups, ragged; a
group is the trajectories sharing ``group_id``). Output (`AlgoOutput`): one advantage per
trajectory (from `spyglass.kernels.advantage.grouped_advantage`, impl "auto": the one-launch
Triton kernel on CUDA, the torch reference otherwise) and one token loss mask per trajectory,
aligned with ``traj.token_array()``, ready for ``engine.packer.pack(token_ids, masks, ...)``.

One switch, ``AlgoConfig.mode``, selects the row of OpenSearch-VL's RL ablation:

* ``vanilla``          M = M_gen (tokens the policy sampled); A = r~ for everyone.
* ``hard_mask``        Vision-DeepResearch: unanswered trajectories (status fatal, interrupted,
                       truncated or error) get M = 0 everywhere; they still count in the group
                       statistics; A = r~. (The metrics' ``anomalous_frac`` counts the unanswered
                       without a cascade, ``fatal_frac`` the cascades; ``masked_traj_frac`` what
                       a mode masked.)
* ``fatal_mask``       M = M_gen * 1[step < f] (f: the fatal step); A = r~.
* ``fatal_mask_clamp`` the fatal mask, plus A = max(r~, 0) for fatal members (the default).

r~ is the grouped estimator over ALL members: ``grpo`` (r - mean) / (std + eps) with the
population (paper) or unbiased std, ``rloo`` n/(n-1) (r - mean), ``drgrpo`` r - mean; singleton
groups get 0. The fatal step is recomputed from the turns with ``fatal_k`` (the first step of
the first run of k consecutive error steps), so trajectories read back from disk follow this
config; a member is *fatal* when it has one. Only cascades are fatal: the clamp protects
reasoning from penalties for tool failures, not the model's own loops. ``fatal_errors`` (the
engine's EngineConfig.fatal_errors, beside fatal_k) says which steps make a cascade: ``any`` step
that is not ok (a failed tool, a malformed or unterminated call, a step that neither called nor
answered: the paper's count) or only ``tool`` steps, where a called tool failed (a malformed or
runaway turn neither counts nor resets: such loops end at max turns, an anomaly, not fatal).

``anomalies``: a member that ended unanswered without a cascade (max turns, context, timeout,
repetition, an engine error) is ``penalize``d (the default: its mask and advantage as the mode
gives any member, so running out of turns costs reward) or ``mask``ed (Vision-DeepResearch's
choice: M = 0 everywhere; it still counts in the group statistics).

``filter_groups`` (DAPO's dynamic-sampling criterion, without the resampling): "acc" drops every
group whose members all have the same ``reward["acc"]`` (all right or all wrong), "reward" every
group whose totals are all equal; a dropped group's members get advantage 0 and an all-False mask
and ``out.keep`` is False for them, so the update skips them. Why: with rare successes most groups
differ only in format / query-quality crumbs, and the std-normalised advantage blows those up to
the same size as a real right-vs-wrong contrast (measured in benchmarks/README.md "Training works?").

``neg_scale`` multiplies the negative advantages (after the estimator and the clamp): 1 is GRPO;
0 reinforces only the trajectories above their group's mean (online rejection-sampling
fine-tuning, with the group mean as the bar); between, asymmetric. Measured on the proof's
tiny student (benchmarks/README.md "Training works?"): at lr 5e-4, neg_scale 0 breaks its
tool-call format as fast as GRPO does, so the negative half is not what breaks it there.

    out = compute_advantages(trajs, AlgoConfig(mode="fatal_mask_clamp"))
    out.advantages  # [N] fp32;  out.masks[i]  # [T_i] bool;  out.metrics  # floats for logging

Tests: ``.venv/bin/python -m pytest -q tests/test_algorithm.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from spyglass.engine.trajectory import FATAL_ERRORS, SegmentKind, Status, Trajectory
from spyglass.kernels.advantage import ESTIMATORS, STD_KINDS, AdvantageConfig, grouped_advantage

MODES = ("vanilla", "hard_mask", "fatal_mask", "fatal_mask_clamp")
FILTERS = ("none", "acc", "reward")
ANOMALIES = ("penalize", "mask")
IMPLS = ("auto", "triton", "torch")
ANOMALOUS = frozenset({Status.FATAL, Status.INTERRUPTED, Status.TRUNCATED, Status.ERROR})


@dataclass(frozen=True)
class AlgoConfig:
    """The ablation switch and the advantage estimator."""

    mode: str = field(default="fatal_mask_clamp", metadata={"choices": MODES})  # the ablation row
    #   (loss masks and clamp: see the trainer/algorithm.py docstring)
    estimator: str = field(default="grpo", metadata={"choices": ESTIMATORS})  # grouped advantage estimator
    std: str = field(default="population", metadata={"choices": STD_KINDS})  # group std (grpo divides
    #   by it): population (paper) | unbiased
    eps: float = 1e-6  # delta in (r - mean) / (std + delta)
    impl: str = field(default="auto", metadata={"choices": IMPLS})  # advantage kernel; auto: Triton
    #   on CUDA, else torch
    filter_groups: str = field(default="none", metadata={"choices": FILTERS})  # drop groups flat in that
    #   score: acc (reward["acc"]) | reward (the total); none keeps all
    neg_scale: float = 1.0  # weight of negative advantages: 1 = GRPO; 0 = reinforce only the above-average
    anomalies: str = field(default="penalize", metadata={"choices": ANOMALIES})  # unanswered without
    #   a cascade (max turns, timeout, repetition, error): penalize (trained on) | mask (M = 0)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"AlgoConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.filter_groups not in FILTERS:
            raise ValueError(f"AlgoConfig.filter_groups must be one of {FILTERS}, got {self.filter_groups!r}")
        if isinstance(self.neg_scale, bool) or not isinstance(self.neg_scale, (int, float)) \
                or not 0.0 <= self.neg_scale <= 1.0:
            raise ValueError(f"AlgoConfig.neg_scale must be a number in [0, 1], got {self.neg_scale!r}")
        if self.anomalies not in ANOMALIES:
            raise ValueError(f"AlgoConfig.anomalies must be one of {ANOMALIES}, got {self.anomalies!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"AlgoConfig.impl must be one of {IMPLS}, got {self.impl!r}")
        self.advantage_config()  # validates estimator, std and eps with their own messages

    def advantage_config(self) -> AdvantageConfig:
        return AdvantageConfig(estimator=self.estimator, std=self.std, eps=self.eps,
                               fatal_clamp=self.mode == "fatal_mask_clamp")


@dataclass
class AlgoOutput:
    """Per-trajectory advantages and loss masks (input order), per-group stats, metrics."""

    advantages: torch.Tensor  # [N] fp32
    masks: list[torch.Tensor]  # N x [T_i] bool, aligned with traj.token_array()
    rewards: torch.Tensor  # [N] fp32, traj.reward["total"]
    fatal: torch.Tensor  # [N] bool: has a fatal step under fatal_k
    fatal_steps: list[int | None]  # [N]
    group_index: torch.Tensor  # [N] int64: row of the group statistics
    group_ids: list[str]  # [G] in order of first appearance
    group_mean: torch.Tensor  # [G] fp32
    group_std: torch.Tensor  # [G] fp32 (population or unbiased, per the config)
    group_count: torch.Tensor  # [G] int32
    keep: torch.Tensor  # [N] bool: False for members of groups dropped by filter_groups
    metrics: dict[str, float] = field(default_factory=dict)


def token_mask(traj: Trajectory, cut: int | None = None, keep: bool = True) -> torch.Tensor:
    """[T] bool: tokens the policy sampled, in steps < cut (all steps when cut is None);
    all False when keep is False."""
    n = [len(traj.prompt_ids)] + [len(s.token_ids) for s in traj.segments]
    on = [False] + [keep and s.kind is SegmentKind.GEN and (cut is None or s.turn < cut)
                    for s in traj.segments]
    return torch.tensor(on, dtype=torch.bool).repeat_interleave(torch.tensor(n, dtype=torch.long))


def _reward_of(t: Trajectory, key: str = "total") -> float:
    r = t.reward.get(key)
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
        raise ValueError(f"trajectory {t.id!r} has no finite reward[{key!r}] (got {r!r}); "
                         f"score it first (trainer.reward.score_group)")
    return float(r)


def _kept_groups(trajs: list[Trajectory], gidx: list[int], n_groups: int, how: str) -> list[bool]:
    """[G]: the groups filter_groups keeps (all of them for "none"; else those whose members'
    score differs; a singleton group is flat)."""
    if how == "none":
        return [True] * n_groups
    scores: list[set[float]] = [set() for _ in range(n_groups)]
    for t, g in zip(trajs, gidx):
        scores[g].add(_reward_of(t, "acc" if how == "acc" else "total"))
    return [len(s) > 1 for s in scores]


def anomalous(t: Trajectory, fatal_step: int | None) -> bool:
    """Ended unanswered without a cascade: max turns, context, timeout, repetition, an error."""
    return t.status is not Status.ANSWERED and fatal_step is None


def _masks(trajs: list[Trajectory], cfg: AlgoConfig, fatal_steps: list[int | None]) -> list[torch.Tensor]:
    keep = [cfg.anomalies == "penalize" or not anomalous(t, f) for t, f in zip(trajs, fatal_steps)]
    if cfg.mode == "vanilla":
        return [token_mask(t, keep=k) for t, k in zip(trajs, keep)]
    if cfg.mode == "hard_mask":
        return [token_mask(t, keep=t.status not in ANOMALOUS) for t in trajs]
    return [token_mask(t, cut=f, keep=k) for t, f, k in zip(trajs, fatal_steps, keep)]


def compute_advantages(trajs: list[Trajectory], cfg: AlgoConfig = AlgoConfig(),
                       device: str | torch.device = "cpu", fatal_k: int = 3, fatal_errors: str = "any") -> AlgoOutput:
    """Advantages [N] (computed on `device`, returned there) and CPU loss masks for `trajs`;
    `fatal_k` and `fatal_errors`: the cascade's length and error steps (the engine's
    EngineConfig.fatal_k and .fatal_errors, so one knob decides both when a rollout is
    interrupted and where its fatal step is)."""
    if isinstance(fatal_k, bool) or not isinstance(fatal_k, int) or fatal_k < 1:
        raise ValueError(f"fatal_k must be an int >= 1, got {fatal_k!r}")
    if fatal_errors not in FATAL_ERRORS:
        raise ValueError(f"fatal_errors must be one of {FATAL_ERRORS}, got {fatal_errors!r}")
    if not trajs:
        raise ValueError("compute_advantages needs at least one trajectory, got an empty list")
    for t in trajs:
        if t.status is Status.RUNNING:
            raise ValueError(f"trajectory {t.id!r} is still running")
    gid_of: dict[str, int] = {}
    gidx = [gid_of.setdefault(t.group_id, len(gid_of)) for t in trajs]
    rewards = torch.tensor([_reward_of(t) for t in trajs], dtype=torch.float32, device=device)  # [N]
    fatal_steps = [t.compute_fatal_step(fatal_k, fatal_errors) for t in trajs]
    fatal = torch.tensor([f is not None for f in fatal_steps], dtype=torch.bool, device=device)  # [N]
    group_index = torch.tensor(gidx, dtype=torch.long, device=device)  # [N]
    res = grouped_advantage(rewards, group_index, fatal, cfg.advantage_config(),
                            num_groups=len(gid_of), impl=cfg.impl)
    masks = _masks(trajs, cfg, fatal_steps)
    kept_groups = _kept_groups(trajs, gidx, len(gid_of), cfg.filter_groups)
    keep = torch.tensor([kept_groups[g] for g in gidx], dtype=torch.bool)  # [N]
    advantages = res.advantages
    if cfg.neg_scale != 1.0:
        advantages = torch.where(advantages < 0, advantages * cfg.neg_scale, advantages)
    if not bool(keep.all()):
        advantages = torch.where(keep.to(advantages.device), advantages, torch.zeros_like(advantages))
        masks = [m if k else torch.zeros_like(m) for m, k in zip(masks, keep.tolist())]
    out = AlgoOutput(advantages=advantages, masks=masks, rewards=rewards, fatal=fatal,
                     fatal_steps=fatal_steps, group_index=group_index, group_ids=list(gid_of),
                     group_mean=res.group_mean, group_std=res.group_std,
                     group_count=res.group_count, keep=keep)
    out.metrics = _metrics(trajs, out, float(res.clamped_fraction))
    return out


def _metrics(trajs: list[Trajectory], out: AlgoOutput, clamped: float) -> dict[str, Any]:
    """Scalars for logging: rewards, advantages, group stats, fatal/anomalous, masking."""
    gen = sum(len(s.token_ids) for t in trajs for s in t.segments if s.kind is SegmentKind.GEN)
    kept = sum(int(m.sum()) for m in out.masks)
    n, g = len(trajs), len(out.group_ids)
    r = out.rewards.double().cpu()
    gi = out.group_index.cpu()
    rmax = torch.full((g,), -math.inf, dtype=torch.float64).scatter_reduce(0, gi, r, "amax")
    rmin = torch.full((g,), math.inf, dtype=torch.float64).scatter_reduce(0, gi, r, "amin")
    adv = out.advantages.double().cpu()
    return {
        "num_trajs": float(n), "num_groups": float(g),
        "reward_mean": float(r.mean()), "reward_std": float(r.std(unbiased=False)),
        "adv_mean": float(adv.mean()), "adv_abs_mean": float(adv.abs().mean()),
        "group_mean_avg": float(out.group_mean.double().mean()),
        "group_std_avg": float(out.group_std.double().mean()),
        "flat_group_frac": float((rmax == rmin).double().mean()),  # singleton or all-equal
        "kept_traj_frac": float(out.keep.double().mean()),  # not dropped by filter_groups
        "fatal_frac": float(out.fatal.double().mean()),
        "anomalous_frac": sum(anomalous(t, f) for t, f in zip(trajs, out.fatal_steps)) / n,  # no cascade
        "clamped_frac": clamped,
        "gen_tokens": float(gen), "loss_tokens": float(kept),
        "masked_token_frac": (gen - kept) / gen if gen else 0.0,
        "masked_traj_frac": sum(not bool(m.any()) for m in out.masks) / n,
    }
