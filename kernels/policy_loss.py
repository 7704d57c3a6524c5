"""Masked PPO policy loss over packed sequences: a fused Triton kernel beside its torch reference.

Inputs are *packed* (varlen) sequences: B sequences concatenated into T tokens, ``cu_seqlens``
[B+1] with ``cu_seqlens[0] = 0`` and ``cu_seqlens[B] = T``. Per token t of sequence b, with
``lr = clamp(logp - old_logp, -C, C)`` (C = ``log_ratio_clamp``, default 20, so that exp never
overflows fp32 and a stale rollout log-prob cannot produce inf/NaN; the clamp has zero gradient
outside [-C, C]) and ``ratio = exp(lr)``:

    pg   = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))      (clip-higher)
    pg   = min(pg, -A * c)            for A < 0, when dual_clip = c is set           (dual clip)
    kl   = exp(x) - x - 1,  x = clamp(ref_logp - logp, -C, C)       (k3, low-variance KL)
    loss_t = pg + kl_coef * kl

A is the per-token advantage ([T]) or the per-sequence one ([B], broadcast over the sequence).
With mask m_t (1 = token sampled by the policy) and n_b = sum of m over sequence b, the loss is

* ``token-mean``               sum_t m_t loss_t / sum_t m_t
* ``seq-mean-token-mean``      mean over non-empty sequences of (sum_b m loss / n_b)   (paper)
* ``seq-mean-token-sum``       mean over non-empty sequences of sum_b m loss           (released code)
* ``seq-mean-token-sum-norm``  sum_t m_t loss_t / (B * norm_length)   (Dr.GRPO: a constant
  max length instead of each sequence's length; B counts every sequence)

A sequence is non-empty when n_b > 0; with no non-empty sequence (everything masked) the loss and
its gradient are 0. Metrics computed in the same pass, over masked tokens: ``clip_fraction``
(share of tokens where the clipped term was the active one), ``dual_clip_fraction``,
``approx_kl`` (k3 estimate of KL(old || new): mean of 1/ratio + lr - 1), ``ref_kl`` (mean k3 to
the reference policy, 0 without ``ref_logp``), ``ratio_min`` / ``ratio_max`` (1 when nothing
is masked in), ``num_tokens`` (sum of m).

Triton path: one forward launch over a (B, split) grid (split programs share a long sequence);
each program computes losses, metrics and d loss_t / d logp_t, accumulates with atomics into a
cached workspace, and the last program (atomic ticket) finalises loss and metrics and restores
the workspace. The backward is one elementwise launch scaling the stored per-token gradient by
the upstream gradient and the aggregation's normaliser. All arithmetic is fp32.

Run the tests: ``.venv/bin/python -m pytest -q tests/test_kernels_policy_loss.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from spyglass.kernels._dispatch import HAS_TRITON, cdiv, launch, launch_with_workspaces, resolve_impl, ticket, workspace

if HAS_TRITON:
    import triton
    import triton.language as tl

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
_N_WS = 9  # loss sum, mask sum, non-empty seqs, clip, dual, approx kl, ref kl, ratio min, ratio max
_N_STATS = 9  # loss, grad scale, clip frac, dual frac, approx kl, ref kl, ratio min, ratio max, tokens


@dataclass(frozen=True)
class PolicyLossConfig:
    """PPO-clip loss settings (defaults: clip-higher 0.2 / 0.28, no dual clip, no KL)."""

    clip_low: float = 0.2  # lower clip: the ratio is clipped at 1 - clip_low
    clip_high: float = 0.28  # upper clip (clip-higher): the ratio is clipped at 1 + clip_high
    dual_clip: Optional[float] = None  # c > 1 (e.g. 3.0) enables dual clip
    log_ratio_clamp: float = 20.0  # |log ratio| bound before exp, for numerical safety
    kl_coef: float = 0.0  # beta for the k3 KL to the reference policy (needs ref_logp)
    agg: str = field(default="token-mean", metadata={"choices": AGGREGATIONS})  # reduction of the per-token losses
    #   (formulas in the kernels/policy_loss.py docstring)
    norm_length: Optional[int] = None  # the constant length of seq-mean-token-sum-norm

    def __post_init__(self) -> None:
        if not (0.0 <= self.clip_low < 1.0):
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low!r}")
        if not (self.clip_high >= 0.0) or self.clip_high == float("inf"):
            raise ValueError(f"clip_high must be a finite number >= 0, got {self.clip_high!r}")
        if self.dual_clip is not None and not (1.0 < self.dual_clip < float("inf")):
            raise ValueError(f"dual_clip must be None or a finite number > 1, got {self.dual_clip!r}")
        if not (0.0 < self.log_ratio_clamp <= 80.0):
            raise ValueError(f"log_ratio_clamp must be in (0, 80] (exp overflows fp32 above ~88), got {self.log_ratio_clamp!r}")
        if not (self.kl_coef >= 0.0) or self.kl_coef == float("inf"):
            raise ValueError(f"kl_coef must be a finite number >= 0, got {self.kl_coef!r}")
        if self.agg not in AGGREGATIONS:
            raise ValueError(f"agg must be one of {AGGREGATIONS}, got {self.agg!r}")
        if self.agg == "seq-mean-token-sum-norm" and (self.norm_length is None or self.norm_length <= 0):
            raise ValueError(f"agg 'seq-mean-token-sum-norm' needs norm_length > 0, got {self.norm_length!r}")
        if self.norm_length is not None and self.norm_length <= 0:
            raise ValueError(f"norm_length must be > 0, got {self.norm_length!r}")


@dataclass
class PolicyLossResult:
    """The differentiable loss and detached metrics (all 0-d fp32 tensors)."""

    loss: torch.Tensor
    clip_fraction: torch.Tensor
    dual_clip_fraction: torch.Tensor
    approx_kl: torch.Tensor
    ref_kl: torch.Tensor
    ratio_min: torch.Tensor
    ratio_max: torch.Tensor
    num_tokens: torch.Tensor


def _check_inputs(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, loss_mask: torch.Tensor,
                  cu_seqlens: torch.Tensor, ref_logp: Optional[torch.Tensor], config: PolicyLossConfig,
                  validate: bool) -> None:
    if logp.dim() != 1:
        raise ValueError(f"logp must be 1-D [T], got shape {tuple(logp.shape)}")
    t = logp.shape[0]
    for name, x in (("old_logp", old_logp), ("loss_mask", loss_mask), ("ref_logp", ref_logp)):
        if x is not None and x.shape != (t,):
            raise ValueError(f"{name} must have shape [T]=({t},), got {tuple(x.shape)}")
    for name, x in (("logp", logp), ("old_logp", old_logp), ("ref_logp", ref_logp)):
        if x is not None and not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be a 1-D int32/int64 [B+1] tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    b = cu_seqlens.numel() - 1
    if advantages.dim() != 1 or advantages.shape[0] not in (t, b):
        raise ValueError(f"advantages must be [T]=({t},) or [B]=({b},), got {tuple(advantages.shape)}")
    if config.kl_coef > 0 and ref_logp is None:
        raise ValueError(f"kl_coef={config.kl_coef} needs ref_logp")
    devices = {x.device for x in (logp, old_logp, advantages, loss_mask, cu_seqlens, ref_logp) if x is not None}
    if len(devices) != 1:
        raise ValueError(f"all inputs must share a device, got {sorted(map(str, devices))}")
    if validate:
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != t:
            raise ValueError(f"cu_seqlens must start at 0 and end at T={t}, got {cu[0]}..{cu[-1]}")
        bad = next((i for i in range(b) if cu[i + 1] < cu[i]), None)
        if bad is not None:
            raise ValueError(f"cu_seqlens must be non-decreasing: cu_seqlens[{bad + 1}]={cu[bad + 1]} < {cu[bad]}")


def policy_loss_reference(
    logp: torch.Tensor,  # [T]
    old_logp: torch.Tensor,  # [T]
    advantages: torch.Tensor,  # [T] or [B]
    loss_mask: torch.Tensor,  # [T]
    cu_seqlens: torch.Tensor,  # [B+1]
    ref_logp: Optional[torch.Tensor] = None,  # [T]
    config: PolicyLossConfig = PolicyLossConfig(),
) -> PolicyLossResult:
    """Pure-torch reference (autograd gives the gradient), fp32 arithmetic (fp64 for fp64 inputs)."""
    ct = torch.promote_types(logp.dtype, torch.float32)
    t, b = logp.shape[0], cu_seqlens.numel() - 1
    lens = cu_seqlens.diff().long()  # [B]
    seq = torch.repeat_interleave(torch.arange(b, device=logp.device), lens, output_size=t)  # [T]
    a = (advantages[seq] if advantages.shape[0] == b else advantages).to(ct)  # [T]
    m = loss_mask.to(ct)  # [T]
    c = config.log_ratio_clamp
    lp = logp.to(ct)
    lr = torch.clamp(lp - old_logp.to(ct), -c, c)  # [T]
    ratio = torch.exp(lr)
    pg1 = -a * ratio
    pg2 = -a * torch.clamp(ratio, 1.0 - config.clip_low, 1.0 + config.clip_high)
    pg = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    dual = torch.zeros_like(clipped)
    if config.dual_clip is not None:
        pg3 = -a * config.dual_clip
        dual = (a < 0) & (pg3 < pg)
        pg = torch.where(a < 0, torch.minimum(pg, pg3), pg)
    loss_t = pg
    rkl = torch.zeros_like(lp)
    if ref_logp is not None:
        x = torch.clamp(ref_logp.to(ct) - lp, -c, c)
        rkl = torch.exp(x) - x - 1.0
        if config.kl_coef > 0:
            loss_t = loss_t + config.kl_coef * rkl
    n_seq = torch.zeros(b, dtype=ct, device=lp.device).index_add_(0, seq, m)  # [B]
    s_seq = torch.zeros(b, dtype=ct, device=lp.device).index_add_(0, seq, loss_t * m)  # [B]
    n_tok = m.sum()
    nonempty = (n_seq > 0).float()
    b_ne = nonempty.sum().clamp_min(1.0)
    if config.agg == "token-mean":
        loss = torch.where(n_tok > 0, (loss_t * m).sum() / torch.where(n_tok > 0, n_tok, 1.0), 0.0)
    elif config.agg == "seq-mean-token-mean":
        loss = (s_seq / n_seq.masked_fill(n_seq <= 0, 1.0) * nonempty).sum() / b_ne
    elif config.agg == "seq-mean-token-sum":
        loss = (s_seq * nonempty).sum() / b_ne
    else:
        loss = s_seq.sum() / (max(b, 1) * float(config.norm_length))
    with torch.no_grad():  # tensor ops only (no host syncs), so torch.compile sees one graph
        has = n_tok > 0
        inv = torch.where(has, 1.0 / torch.where(has, n_tok, 1.0), 0.0)
        sel = m > 0
        one = torch.ones((), dtype=ct, device=lp.device)
        return PolicyLossResult(
            loss=loss,
            clip_fraction=(clipped.to(ct) * m).sum() * inv,
            dual_clip_fraction=(dual.to(ct) * m).sum() * inv,
            approx_kl=((torch.exp(-lr) + lr - 1.0) * m).sum() * inv,
            ref_kl=(rkl.detach() * m).sum() * inv,
            ratio_min=torch.where(has, torch.where(sel, ratio, float("inf")).min(), one),
            ratio_max=torch.where(has, torch.where(sel, ratio, float("-inf")).max(), one),
            num_tokens=n_tok,
        )


if HAS_TRITON:

    @triton.jit
    def _policy_loss_fwd_kernel(
        logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, cu_ptr,  # [T], [T], [T], [T]|[B], [T], [B+1]
        grad_ptr, loss_ptr, stats_ptr,  # out: [T] fp32 d loss_t/d logp_t * m_t (/ n_b), [1], [_N_STATS]
        ws_ptr, ticket_ptr,  # fp32 [_N_WS] workspace (restored on exit), int32 [1]
        B, clip_lo, clip_hi, dual_c, lr_clamp, kl_coef, norm_len,
        AGG: tl.constexpr, PER_SEQ_ADV: tl.constexpr, HAS_REF: tl.constexpr, USE_KL: tl.constexpr,
        DUAL: tl.constexpr, STORE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
    ):
        b = tl.program_id(0)
        sp = tl.program_id(1)
        nsplit = tl.num_programs(1)
        start = tl.load(cu_ptr + b).to(tl.int64)
        end = tl.load(cu_ptr + b + 1).to(tl.int64)
        lanes = tl.arange(0, BLOCK)
        # the whole sequence's mask count, needed up front by the per-sequence aggregations
        n_b = tl.sum(tl.zeros((BLOCK,), tl.float32), axis=0)
        if AGG == 1 or AGG == 2:
            cnt = tl.zeros((BLOCK,), tl.float32)
            for cs in range(start, end, BLOCK):
                o = cs + lanes
                cnt += tl.load(mask_ptr + o, mask=o < end, other=0).to(tl.float32)
            n_b = tl.sum(cnt, axis=0)
        inv_nb = tl.where(n_b > 0, 1.0 / tl.where(n_b > 0, n_b, 1.0), 0.0)
        if PER_SEQ_ADV:
            a_seq = tl.load(adv_ptr + b).to(tl.float32)
        acc_loss = tl.zeros((BLOCK,), tl.float32)
        acc_m = tl.zeros((BLOCK,), tl.float32)
        acc_clip = tl.zeros((BLOCK,), tl.float32)
        acc_dual = tl.zeros((BLOCK,), tl.float32)
        acc_akl = tl.zeros((BLOCK,), tl.float32)
        acc_rkl = tl.zeros((BLOCK,), tl.float32)
        rmin = tl.full((BLOCK,), float("inf"), tl.float32)
        rmax = tl.full((BLOCK,), float("-inf"), tl.float32)
        for cs in range(start + sp * BLOCK, end, nsplit * BLOCK):
            o = cs + lanes
            mo = o < end
            lp = tl.load(logp_ptr + o, mask=mo, other=0.0).to(tl.float32)
            old = tl.load(old_ptr + o, mask=mo, other=0.0).to(tl.float32)
            m = tl.load(mask_ptr + o, mask=mo, other=0).to(tl.float32)
            if PER_SEQ_ADV:
                a = tl.zeros((BLOCK,), tl.float32) + a_seq
            else:
                a = tl.load(adv_ptr + o, mask=mo, other=0.0).to(tl.float32)
            raw = lp - old
            inside = (raw >= -lr_clamp) & (raw <= lr_clamp)
            lr = tl.minimum(tl.maximum(raw, -lr_clamp), lr_clamp)
            ratio = tl.exp(lr)
            pg1 = -a * ratio
            in_clip = (ratio >= 1.0 - clip_lo) & (ratio <= 1.0 + clip_hi)
            pg2 = -a * tl.minimum(tl.maximum(ratio, 1.0 - clip_lo), 1.0 + clip_hi)
            clipped = pg2 > pg1
            pg = tl.maximum(pg1, pg2)
            dpg = tl.where(clipped, tl.where(in_clip, -a * ratio, 0.0), -a * ratio)
            dpg = tl.where(inside, dpg, 0.0)
            if DUAL:
                pg3 = -a * dual_c
                dual = (a < 0) & (pg3 < pg)
                pg = tl.where(dual, pg3, pg)
                dpg = tl.where(dual, 0.0, dpg)
                acc_dual += tl.where(dual, m, 0.0)
            loss_t = pg
            if HAS_REF:
                rf = tl.load(ref_ptr + o, mask=mo, other=0.0).to(tl.float32)
                xr = rf - lp
                x_in = (xr >= -lr_clamp) & (xr <= lr_clamp)
                x = tl.minimum(tl.maximum(xr, -lr_clamp), lr_clamp)
                ex = tl.exp(x)
                k3 = ex - x - 1.0
                acc_rkl += k3 * m
                if USE_KL:
                    loss_t = loss_t + kl_coef * k3
                    dpg = dpg + tl.where(x_in, kl_coef * (1.0 - ex), 0.0)
            acc_loss += loss_t * m
            acc_m += m
            acc_clip += tl.where(clipped, m, 0.0)
            acc_akl += (tl.exp(-lr) + lr - 1.0) * m
            rmin = tl.minimum(rmin, tl.where(m > 0, ratio, float("inf")))
            rmax = tl.maximum(rmax, tl.where(m > 0, ratio, float("-inf")))
            if STORE_GRAD:
                gt = dpg * m
                if AGG == 1:
                    gt = gt * inv_nb
                tl.store(grad_ptr + o, gt, mask=mo)
        s_loss = tl.sum(acc_loss, axis=0)
        if AGG == 1:
            s_loss = s_loss * inv_nb
        tl.atomic_add(ws_ptr + 0, s_loss)
        tl.atomic_add(ws_ptr + 1, tl.sum(acc_m, axis=0))
        if AGG == 1 or AGG == 2:
            tl.atomic_add(ws_ptr + 2, tl.where((sp == 0) & (n_b > 0), 1.0, 0.0))
        tl.atomic_add(ws_ptr + 3, tl.sum(acc_clip, axis=0))
        tl.atomic_add(ws_ptr + 4, tl.sum(acc_dual, axis=0))
        tl.atomic_add(ws_ptr + 5, tl.sum(acc_akl, axis=0))
        tl.atomic_add(ws_ptr + 6, tl.sum(acc_rkl, axis=0))
        tl.atomic_min(ws_ptr + 7, tl.min(rmin, axis=0))
        tl.atomic_max(ws_ptr + 8, tl.max(rmax, axis=0))
        tl.debug_barrier()
        done = tl.atomic_add(ticket_ptr, 1)
        if done == tl.num_programs(0) * tl.num_programs(1) - 1:
            # last program: everything is accumulated; finalise and restore the workspace
            w = tl.arange(0, 16)
            v = tl.atomic_add(ws_ptr + w, tl.zeros((16,), tl.float32), mask=w < 9)  # coherent read
            s = tl.sum(tl.where(w == 0, v, 0.0), axis=0)
            n_tok = tl.sum(tl.where(w == 1, v, 0.0), axis=0)
            b_ne = tl.maximum(tl.sum(tl.where(w == 2, v, 0.0), axis=0), 1.0)
            inv_tok = tl.where(n_tok > 0, 1.0 / tl.where(n_tok > 0, n_tok, 1.0), 0.0)
            if AGG == 0:
                scale = inv_tok
            elif AGG == 3:
                scale = 1.0 / (tl.maximum(B, 1).to(tl.float32) * norm_len)
            else:
                scale = 1.0 / b_ne
            has = n_tok > 0
            tl.store(loss_ptr, s * scale)
            # stats: 0 loss, 1 scale, 2..5 clip/dual/approx-kl/ref-kl means (ws 3..6),
            # 6..7 ratio min/max (ws 7..8; 1 when nothing is masked in), 8 tokens
            out = tl.where((w >= 3) & (w <= 6), tl.where(w <= 6, v, 0.0) * inv_tok, tl.where(has, v, 1.0))
            tl.store(stats_ptr + w - 1, out, mask=(w >= 3) & (w < 9))
            tl.store(stats_ptr + 0, s * scale)
            tl.store(stats_ptr + 1, scale)
            tl.store(stats_ptr + 8, n_tok)
            init = tl.where(w == 7, float("inf"), tl.where(w == 8, float("-inf"), 0.0))
            tl.store(ws_ptr + w, init, mask=w < 9)
            tl.atomic_xchg(ticket_ptr, 0)

    @triton.jit
    def _policy_loss_bwd_kernel(gbuf_ptr, g_ptr, stats_ptr, out_ptr, T, BLOCK: tl.constexpr):
        # d loss / d logp_t = upstream * normaliser * (d loss_t / d logp_t * m_t [/ n_b])
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mo = o < T
        k = tl.load(g_ptr).to(tl.float32) * tl.load(stats_ptr + 1)
        gv = tl.load(gbuf_ptr + o, mask=mo, other=0.0)
        tl.store(out_ptr + o, (gv * k).to(out_ptr.dtype.element_ty), mask=mo)


def _ws_init(n: int, device: torch.device) -> torch.Tensor:
    ws = torch.zeros(n, dtype=torch.float32, device=device)
    ws[7], ws[8] = float("inf"), float("-inf")
    return ws


def _as_kernel_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    return loss_mask.view(torch.uint8) if loss_mask.dtype == torch.bool else loss_mask


class _FusedPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                loss_mask: torch.Tensor, cu_seqlens: torch.Tensor, ref_logp: Optional[torch.Tensor],
                config: PolicyLossConfig, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        dev, t, b = logp.device, logp.shape[0], cu_seqlens.numel() - 1
        store_grad = ctx.needs_input_grad[0]
        gbuf = torch.empty(t if store_grad else 1, dtype=torch.float32, device=dev)  # [T]
        loss = torch.empty((), dtype=torch.float32, device=dev)  # []
        stats = torch.empty(_N_STATS, dtype=torch.float32, device=dev)  # [9]
        split = max(1, min(64, cdiv(cdiv(t, block), max(b, 1))))
        ws = workspace("policy_loss", dev, _N_WS, _ws_init)
        launch_with_workspaces(
            ("policy_loss",), dev, _policy_loss_fwd_kernel, (max(b, 1), split),
            logp, old_logp, ref_logp if ref_logp is not None else logp, advantages, _as_kernel_mask(loss_mask),
            cu_seqlens, gbuf, loss, stats, ws, ticket(dev),
            b, float(config.clip_low), float(config.clip_high), float(config.dual_clip or 0.0),
            float(config.log_ratio_clamp), float(config.kl_coef), float(config.norm_length or 1),
            AGG=AGGREGATIONS.index(config.agg), PER_SEQ_ADV=advantages.shape[0] == b and b != t,
            HAS_REF=ref_logp is not None, USE_KL=ref_logp is not None and config.kl_coef > 0,
            DUAL=config.dual_clip is not None, STORE_GRAD=store_grad, BLOCK=block,
        )
        ctx.save_for_backward(gbuf, stats)
        ctx.block = block
        ctx.logp_dtype = logp.dtype
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx: Any, g_loss: torch.Tensor, g_stats: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
        gbuf, stats = ctx.saved_tensors
        t = gbuf.numel()
        grad = torch.empty(t, dtype=ctx.logp_dtype, device=gbuf.device)  # [T]
        launch(_policy_loss_bwd_kernel, (max(cdiv(t, ctx.block), 1),),
               gbuf, g_loss.contiguous(), stats, grad, t, BLOCK=ctx.block)
        return grad, None, None, None, None, None, None, None


def masked_policy_loss(
    logp: torch.Tensor,  # [T] current policy log-probs of the sampled tokens (requires grad)
    old_logp: torch.Tensor,  # [T] rollout-time log-probs
    advantages: torch.Tensor,  # [T] per token, or [B] per sequence
    loss_mask: torch.Tensor,  # [T] bool / uint8 / float (1 = in the loss)
    cu_seqlens: torch.Tensor,  # [B+1] packed-sequence offsets
    ref_logp: Optional[torch.Tensor] = None,  # [T] reference-policy log-probs (KL term / metric)
    config: PolicyLossConfig = PolicyLossConfig(),
    *,
    block: int = 1024,
    validate: bool = True,
    impl: str = "auto",
) -> PolicyLossResult:
    """Masked PPO-clip loss with metrics; see the module docstring for the definitions.

    ``validate`` checks cu_seqlens' values (a host sync on GPU). ``block`` is the Triton block
    size (power of two). ``impl``: "auto" | "triton" | "torch" (the torch reference).
    """
    _check_inputs(logp, old_logp, advantages, loss_mask, cu_seqlens, ref_logp, config, validate)
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    which = resolve_impl(impl, logp, old_logp, advantages, loss_mask, cu_seqlens)
    if which == "torch" or logp.shape[0] == 0:
        return policy_loss_reference(logp, old_logp, advantages, loss_mask, cu_seqlens, ref_logp, config)
    ref = ref_logp.contiguous() if ref_logp is not None else None
    loss, stats = _FusedPolicyLoss.apply(logp.contiguous(), old_logp.contiguous(), advantages.contiguous(),
                                         loss_mask.contiguous(), cu_seqlens.contiguous(), ref, config, block)
    return PolicyLossResult(loss, stats[2], stats[3], stats[4], stats[5], stats[6], stats[7], stats[8])
