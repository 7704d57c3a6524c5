"""Grouped, fatal-aware advantage (OpenSearch-VL Sec. 4.2): a Triton kernel beside its torch reference.

Given one scalar reward per rollout, the id of the group (prompt) it was sampled for, and whether
it ended in a fatal cascade, compute per-rollout advantages:

* ``grpo``   r~ = (r - mean_G) / (std_G + eps); std is the population std (the paper's choice,
  ``std="population"``) or the unbiased one (``std="unbiased"``, n-1 in the denominator);
* ``rloo``   r~ = r - mean of the *other* members = n/(n-1) * (r - mean_G) (no std);
* ``drgrpo`` r~ = r - mean_G (Dr.GRPO: no std).

Group statistics are always over **all** members, fatal ones included. With ``fatal_clamp`` the
one-sided clamp applies: A = max(r~, 0) for fatal members, A = r~ otherwise; a member is counted
as *clamped* when it is fatal and r~ < 0.

Edge cases (documented behaviour): a singleton group gets advantage 0 under every estimator (for
``rloo`` the leave-one-out baseline is undefined; the unbiased std of one sample is taken as 0);
a zero-variance group gets 0 under ``grpo`` (0 / (0 + eps), also when eps = 0); an empty group (an id in
``0..num_groups-1`` with no members) reports count 0, mean 0 and std 0.

Group ids: either arbitrary integers (``num_groups=None``: they are remapped with
``torch.unique``, which costs extra launches and a host sync; the result's ``group_ids`` holds
the sorted distinct ids, one per row of the per-group statistics), or dense ids ``0..G-1`` with
``num_groups=G`` (members of a group may sit anywhere, groups may be ragged or empty). With dense
ids the Triton path is exactly ONE kernel launch: every program adds its block's count, sum and
sum of squares per group into a cached fp64 workspace with atomics, then takes an atomic ticket;
the last program to finish computes all advantages and per-group statistics and restores the
workspace to zero. Statistics are accumulated in fp64 (sum and sum of squares; for fp32 rewards
identical values give exactly zero variance).

Run the tests: ``TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests/test_kernels_advantage.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from spyglass.kernels._dispatch import HAS_TRITON, cdiv, launch_with_workspaces, resolve_impl, ticket, workspace

if HAS_TRITON:
    import triton
    import triton.language as tl

ESTIMATORS = ("grpo", "rloo", "drgrpo")
STD_KINDS = ("population", "unbiased")


@dataclass(frozen=True)
class AdvantageConfig:
    """How advantages are estimated from grouped rewards."""

    estimator: str = "grpo"  # "grpo" | "rloo" | "drgrpo"
    std: str = "population"  # "population" (paper) | "unbiased"; used by grpo, reported always
    eps: float = 1e-6  # delta in (r - mean) / (std + delta)
    fatal_clamp: bool = True  # one-sided clamp max(r~, 0) for fatal members

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.std not in STD_KINDS:
            raise ValueError(f"std must be one of {STD_KINDS}, got {self.std!r}")
        if not (self.eps >= 0.0) or self.eps != self.eps:
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps!r}")


@dataclass
class AdvantageResult:
    """Advantages plus per-group statistics for logging."""

    advantages: torch.Tensor  # [N] fp32
    group_mean: torch.Tensor  # [G] fp32
    group_std: torch.Tensor  # [G] fp32 (population or unbiased, per the config)
    group_count: torch.Tensor  # [G] int32
    clamped_fraction: torch.Tensor  # [] fp32: (# fatal members with r~ < 0 that were clamped) / N
    group_ids: torch.Tensor  # [G] int64: the group id of each row of the statistics


if HAS_TRITON:

    @triton.jit
    def _grouped_advantage_kernel(
        r_ptr, gid_ptr, fatal_ptr,  # [N] rewards, [N] dense group ids, [N] uint8 fatal flags
        adv_ptr, mean_ptr, std_ptr, count_ptr, clamped_ptr,  # outputs [N], [G], [G], [G], [1]
        ws_ptr, ticket_ptr,  # fp64 workspace [3*G] (zero on entry and exit), int32 [1]
        N, G, eps,
        ESTIMATOR: tl.constexpr,  # 0 grpo, 1 rloo, 2 drgrpo
        UNBIASED: tl.constexpr, CLAMP: tl.constexpr, HAS_FATAL: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # phase 1 (every program): per-group count / sum / sum of squares of this block
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        r = tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float64)
        g = tl.load(gid_ptr + offs, mask=m, other=0).to(tl.int64)
        tl.atomic_add(ws_ptr + g, tl.full((BLOCK,), 1.0, tl.float64), mask=m)
        tl.atomic_add(ws_ptr + G + g, r, mask=m)
        tl.atomic_add(ws_ptr + 2 * G + g, r * r, mask=m)
        tl.debug_barrier()
        done = tl.atomic_add(ticket_ptr, 1)  # acq_rel: this block's sums are visible before
        if done == tl.num_programs(0) - 1:
            # phase 2 (last program only): every block's sums are in; compute all advantages
            n_clamped = tl.zeros((BLOCK,), tl.int32)
            for start in range(0, N, BLOCK):
                o = start + tl.arange(0, BLOCK)
                mo = o < N
                ro = tl.load(r_ptr + o, mask=mo, other=0.0).to(tl.float64)
                go = tl.load(gid_ptr + o, mask=mo, other=0).to(tl.int64)
                cnt = tl.load(ws_ptr + go, mask=mo, other=1.0, cache_modifier=".cg")
                s = tl.load(ws_ptr + G + go, mask=mo, other=0.0, cache_modifier=".cg")
                ss = tl.load(ws_ptr + 2 * G + go, mask=mo, other=0.0, cache_modifier=".cg")
                mean = s / cnt
                var = tl.maximum(ss / cnt - mean * mean, 0.0)
                if UNBIASED:
                    var = tl.where(cnt > 1.5, var * cnt / tl.maximum(cnt - 1.0, 1.0), 0.0)
                centered = ro - mean
                if ESTIMATOR == 0:
                    den = tl.sqrt(var) + eps
                    rt = tl.where(den > 0.0, centered / tl.where(den > 0.0, den, 1.0), 0.0)
                elif ESTIMATOR == 1:
                    rt = tl.where(cnt > 1.5, centered * cnt / tl.maximum(cnt - 1.0, 1.0), 0.0)
                else:
                    rt = centered
                if HAS_FATAL and CLAMP:
                    fat = tl.load(fatal_ptr + o, mask=mo, other=0) != 0
                    hit = fat & (rt < 0.0) & mo
                    n_clamped += hit.to(tl.int32)
                    rt = tl.where(hit, 0.0, rt)
                tl.store(adv_ptr + o, rt.to(tl.float32), mask=mo)
            tl.store(clamped_ptr, tl.sum(n_clamped, axis=0).to(tl.float32) / tl.maximum(N, 1).to(tl.float32))
            tl.debug_barrier()
            # per-group statistics for logging; restore the workspace to zero for the next call
            for start in range(0, G, BLOCK):
                o = start + tl.arange(0, BLOCK)
                mo = o < G
                cnt = tl.load(ws_ptr + o, mask=mo, other=0.0, cache_modifier=".cg")
                s = tl.load(ws_ptr + G + o, mask=mo, other=0.0, cache_modifier=".cg")
                ss = tl.load(ws_ptr + 2 * G + o, mask=mo, other=0.0, cache_modifier=".cg")
                c1 = tl.maximum(cnt, 1.0)
                mean = s / c1
                var = tl.maximum(ss / c1 - mean * mean, 0.0)
                if UNBIASED:
                    var = tl.where(cnt > 1.5, var * cnt / tl.maximum(cnt - 1.0, 1.0), 0.0)
                tl.store(mean_ptr + o, mean.to(tl.float32), mask=mo)
                tl.store(std_ptr + o, tl.sqrt(var).to(tl.float32), mask=mo)
                tl.store(count_ptr + o, cnt.to(tl.int32), mask=mo)
                zero = tl.zeros((BLOCK,), tl.float64)
                tl.store(ws_ptr + o, zero, mask=mo)
                tl.store(ws_ptr + G + o, zero, mask=mo)
                tl.store(ws_ptr + 2 * G + o, zero, mask=mo)
            tl.atomic_xchg(ticket_ptr, 0)


def _check_inputs(rewards: torch.Tensor, group_ids: torch.Tensor, fatal: Optional[torch.Tensor]) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be floating point, got {rewards.dtype}")
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids shape {tuple(group_ids.shape)} != rewards shape {tuple(rewards.shape)}")
    if group_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"group_ids must be int32 or int64, got {group_ids.dtype}")
    if fatal is not None:
        if fatal.shape != rewards.shape:
            raise ValueError(f"fatal shape {tuple(fatal.shape)} != rewards shape {tuple(rewards.shape)}")
        if fatal.dtype not in (torch.bool, torch.uint8):
            raise TypeError(f"fatal must be bool or uint8, got {fatal.dtype}")
    devices = {t.device for t in (rewards, group_ids, fatal) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"rewards, group_ids and fatal must share a device, got {sorted(map(str, devices))}")


def grouped_advantage_reference(
    rewards: torch.Tensor,  # [N] float
    group_ids: torch.Tensor,  # [N] int, dense 0..G-1
    fatal: Optional[torch.Tensor],  # [N] bool or None
    num_groups: int,
    config: AdvantageConfig = AdvantageConfig(),
) -> AdvantageResult:
    """Vectorised pure-torch reference (fp64 statistics, two-pass variance) for dense group ids."""
    dev = rewards.device
    r = rewards.to(torch.float64)  # [N]
    g = group_ids.long()  # [N]
    cnt = torch.zeros(num_groups, dtype=torch.float64, device=dev).index_add_(0, g, torch.ones_like(r))  # [G]
    c1 = cnt.clamp_min(1.0)
    mean = torch.zeros_like(cnt).index_add_(0, g, r) / c1  # [G]
    centered = r - mean[g]  # [N]
    var = torch.zeros_like(cnt).index_add_(0, g, centered * centered) / c1  # [G] population
    if config.std == "unbiased":
        var = torch.where(cnt > 1, var * cnt / (cnt - 1).clamp_min(1.0), torch.zeros_like(var))
    std = var.sqrt()  # [G]
    n = cnt[g]  # [N]
    if config.estimator == "grpo":
        den = std[g] + config.eps
        rt = torch.where(den > 0, centered / torch.where(den > 0, den, 1.0), torch.zeros_like(centered))
    elif config.estimator == "rloo":
        rt = torch.where(n > 1, centered * n / (n - 1).clamp_min(1.0), torch.zeros_like(centered))
    else:
        rt = centered
    n_clamped = torch.zeros((), dtype=torch.float64, device=dev)
    if fatal is not None and config.fatal_clamp:
        hit = fatal.bool() & (rt < 0)
        n_clamped = hit.sum().to(torch.float64)
        rt = torch.where(hit, torch.zeros_like(rt), rt)
    return AdvantageResult(
        advantages=rt.float(),
        group_mean=mean.float(),
        group_std=std.float(),
        group_count=cnt.to(torch.int32),
        clamped_fraction=(n_clamped / max(r.numel(), 1)).float(),
        group_ids=torch.arange(num_groups, device=dev),
    )


def _advantage_triton(
    rewards: torch.Tensor, group_ids: torch.Tensor, fatal: Optional[torch.Tensor], num_groups: int,
    config: AdvantageConfig, block: int,
) -> AdvantageResult:
    dev, n = rewards.device, rewards.numel()
    adv = torch.empty(n, dtype=torch.float32, device=dev)  # [N]
    mean = torch.empty(num_groups, dtype=torch.float32, device=dev)  # [G]
    std = torch.empty(num_groups, dtype=torch.float32, device=dev)  # [G]
    count = torch.empty(num_groups, dtype=torch.int32, device=dev)  # [G]
    clamped = torch.empty(1, dtype=torch.float32, device=dev)  # [1]
    ws = workspace("advantage", dev, 3 * num_groups, lambda k, d: torch.zeros(k, dtype=torch.float64, device=d))
    fat = fatal.view(torch.uint8) if fatal is not None else rewards  # dummy pointer when absent
    grid = (max(cdiv(n, block), 1),)
    launch_with_workspaces(
        ("advantage",), dev, _grouped_advantage_kernel, grid,
        rewards, group_ids, fat.contiguous(), adv, mean, std, count, clamped, ws, ticket(dev), n, num_groups, float(config.eps),
        ESTIMATOR=ESTIMATORS.index(config.estimator), UNBIASED=config.std == "unbiased",
        CLAMP=config.fatal_clamp, HAS_FATAL=fatal is not None, BLOCK=block,
    )
    return AdvantageResult(adv, mean, std, count, clamped[0], torch.arange(num_groups, device=dev))


def grouped_advantage(
    rewards: torch.Tensor,  # [N] float
    group_ids: torch.Tensor,  # [N] int32/int64
    fatal: Optional[torch.Tensor] = None,  # [N] bool/uint8, None = nobody fatal
    config: AdvantageConfig = AdvantageConfig(),
    *,
    num_groups: Optional[int] = None,
    block: int = 1024,
    validate: bool = True,
    impl: str = "auto",
) -> AdvantageResult:
    """Fatal-aware grouped advantages; see the module docstring for the definitions.

    ``num_groups=None``: arbitrary integer ids (remapped with torch.unique). ``num_groups=G``:
    dense ids in 0..G-1; ``validate`` checks that range (a host sync on GPU). ``block`` is the
    Triton block size (a power of two). ``impl``: "auto" | "triton" | "torch".
    """
    _check_inputs(rewards, group_ids, fatal)
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    uniq: Optional[torch.Tensor] = None
    if num_groups is None:
        uniq, group_ids = torch.unique(group_ids, sorted=True, return_inverse=True)
        num_groups = uniq.numel()
    else:
        if num_groups < 0:
            raise ValueError(f"num_groups must be >= 0, got {num_groups}")
        if validate and group_ids.numel() > 0:
            lo, hi = int(group_ids.min()), int(group_ids.max())
            if lo < 0 or hi >= num_groups:
                bad = lo if lo < 0 else hi
                raise ValueError(f"group id {bad} is outside 0..{num_groups - 1} (num_groups={num_groups})")
    which = resolve_impl(impl, rewards, group_ids)
    if which == "triton" and rewards.numel() > 0 and num_groups > 0:
        res = _advantage_triton(rewards.contiguous(), group_ids.contiguous(), fatal, num_groups, config, block)
    else:
        res = grouped_advantage_reference(rewards, group_ids, fatal, num_groups, config)
    if uniq is not None:
        res.group_ids = uniq.long()
    return res
