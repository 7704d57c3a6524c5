"""Per-token log-probs straight from hidden states, never materialising the [T, V] logits.

    logp_t = z_{t, y_t} / tau - logsumexp_v(z_{t, v} / tau),   z = hidden @ weight^T

for hidden [T, H], lm_head weight [V, H], targets y [T] and temperature tau. Targets equal to
``ignore_index`` (-100) give logp 0 and no gradient. Output is fp32 [T]; the logsumexp is
accumulated in fp32 whatever the input dtype.

* Triton forward (CUDA, or the interpreter): one launch over blocks of tokens; each program walks
  the vocabulary in BLOCK_V columns, computes the logit tile with ``tl.dot`` (K loop over H) and
  keeps an online max / sum-of-exp and the target logit, so no logits leave registers.
* Backward (both paths): the vocabulary is walked in chunks of ``chunk_size`` columns; each
  chunk's logits are recomputed with one matmul, turned in place into
  dz = g_t * (onehot(y_t) - softmax) / tau (a Triton kernel on the Triton path), then
  grad_hidden += dz @ W_chunk and grad_weight[chunk] = dz^T @ hidden. Peak extra memory is one
  [T, chunk_size] block instead of [T, V].
* Torch path (``impl="torch"``, and "auto" off CUDA): the same chunked online-logsumexp forward
  and chunked backward written in torch, so CPU memory stays bounded too.
* :func:`logprob_reference`: plain logits -> log_softmax -> gather, for tests and benchmarks.

Run the tests: ``.venv/bin/python -m pytest -q tests/test_kernels_fused_logprob.py``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from spyglass.kernels._dispatch import HAS_TRITON, cdiv, interpreting, launch, resolve_impl

if HAS_TRITON:
    import triton
    import triton.language as tl

IGNORE_INDEX = -100


if HAS_TRITON:

    @triton.jit
    def _logprob_fwd_kernel(
        h_ptr, w_ptr, tgt_ptr, logp_ptr, lse_ptr,  # [T, H], [V, H], [T], out [T] fp32, out [T] fp32
        T, V, H, stride_h, stride_w, inv_temp, ignore_index,
        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
        UPCAST: tl.constexpr, PREC: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        rm = rows < T
        tgt = tl.load(tgt_ptr + rows, mask=rm, other=ignore_index).to(tl.int64)
        m_i = tl.full((BLOCK_T,), float("-inf"), tl.float32)
        s_i = tl.zeros((BLOCK_T,), tl.float32)
        z_t = tl.zeros((BLOCK_T,), tl.float32)
        rows64 = rows.to(tl.int64)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            cm = cols < V
            acc = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
            for k0 in range(0, H, BLOCK_H):
                ks = k0 + tl.arange(0, BLOCK_H)
                km = ks < H
                a = tl.load(h_ptr + rows64[:, None] * stride_h + ks[None, :], mask=rm[:, None] & km[None, :], other=0.0)
                bt = tl.load(w_ptr + cols.to(tl.int64)[None, :] * stride_w + ks[:, None],
                             mask=km[:, None] & cm[None, :], other=0.0)  # [BLOCK_H, BLOCK_V]
                if UPCAST:  # the interpreter gets bf16 arithmetic wrong
                    a = a.to(tl.float32)
                    bt = bt.to(tl.float32)
                acc = tl.dot(a, bt, acc, input_precision=PREC)
            z = tl.where(cm[None, :], acc * inv_temp, float("-inf"))  # [BLOCK_T, BLOCK_V]
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m_i = m_new
            z_t += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        lse = m_i + tl.log(s_i)
        valid = rm & (tgt != ignore_index)
        tl.store(logp_ptr + rows, tl.where(valid, z_t - lse, 0.0), mask=rm)
        tl.store(lse_ptr + rows, lse, mask=rm)

    @triton.jit
    def _softmax_grad_kernel(
        z_ptr, tgt_ptr, lse_ptr, g_ptr,  # chunk logits [T, C] (overwritten by dz), [T], [T], [T]
        T, C, v0, inv_temp, ignore_index,
        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        rm = rows < T
        msk = rm[:, None] & (cols < C)[None, :]
        tgt = tl.load(tgt_ptr + rows, mask=rm, other=ignore_index).to(tl.int64)
        lse = tl.load(lse_ptr + rows, mask=rm, other=0.0)
        g = tl.load(g_ptr + rows, mask=rm, other=0.0).to(tl.float32)
        g = tl.where(tgt != ignore_index, g, 0.0) * inv_temp
        ptrs = z_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :]
        z = tl.load(ptrs, mask=msk, other=0.0).to(tl.float32) * inv_temp
        p = tl.exp(z - lse[:, None])
        onehot = ((cols + v0).to(tl.int64)[None, :] == tgt[:, None]).to(tl.float32)
        dz = g[:, None] * (onehot - p)
        tl.store(ptrs, dz.to(z_ptr.dtype.element_ty), mask=msk)


def logprob_reference(
    hidden: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [V, H]
    targets: torch.Tensor,  # [T]
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:  # [T] fp32
    """Materialise fp32 logits, log_softmax, gather (memory O(T*V)); for tests and benchmarks."""
    logits = (hidden.float() @ weight.float().T) / temperature  # [T, V]
    lsm = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    picked = lsm.gather(1, torch.where(valid, targets, 0).long()[:, None])[:, 0]  # [T]
    return torch.where(valid, picked, torch.zeros_like(picked))


def _chunk_logits(hidden: torch.Tensor, w_c: torch.Tensor) -> torch.Tensor:
    """fp32 logits [T, C] of one vocabulary chunk (fp32 accumulation and output for bf16/fp16)."""
    if hidden.dtype == torch.float32:
        return hidden @ w_c.T
    if hidden.is_cuda:
        try:
            return torch.mm(hidden, w_c.T, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return hidden.float() @ w_c.float().T


def _torch_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_temp: float,
                   ignore_index: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    t, v = hidden.shape[0], weight.shape[0]
    m = torch.full((t,), float("-inf"), device=hidden.device)  # [T] running max
    s = torch.zeros(t, device=hidden.device)  # [T] running sum of exp
    zt = torch.zeros(t, device=hidden.device)  # [T] target logit
    valid = targets != ignore_index
    for v0 in range(0, v, chunk):
        z = _chunk_logits(hidden, weight[v0:v0 + chunk]).mul_(inv_temp)  # [T, C] fp32, the one temporary
        local = targets.long() - v0
        hit = valid & (local >= 0) & (local < z.shape[1])
        zt += torch.where(hit, z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None])[:, 0], torch.zeros_like(zt))
        m_new = torch.maximum(m, z.max(dim=1).values)
        s = s * torch.exp(m - m_new) + z.sub_(m_new[:, None]).exp_().sum(dim=1)
        m = m_new
    lse = m + torch.log(s)
    return torch.where(valid, zt - lse, torch.zeros_like(zt)), lse


def _chunked_backward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                      g: torch.Tensor, inv_temp: float, ignore_index: int, chunk: int, use_triton: bool,
                      need_h: bool, need_w: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    t, v = hidden.shape[0], weight.shape[0]
    grad_h = torch.zeros(t, hidden.shape[1], dtype=torch.float32, device=hidden.device) if need_h else None  # [T, H]
    grad_w = torch.empty_like(weight) if need_w else None  # [V, H]
    g_eff = torch.where(targets != ignore_index, g.float(), torch.zeros_like(g, dtype=torch.float32)) * inv_temp
    for v0 in range(0, v, chunk):
        w_c = weight[v0:v0 + chunk]  # [C, H]
        z = _chunk_logits(hidden, w_c)  # [T, C] recomputed chunk logits, fp32
        c = z.shape[1]
        if use_triton:
            bt, bc = (32, min(4096, triton.next_power_of_2(c))) if interpreting(z) else (32, 128)
            launch(_softmax_grad_kernel, (cdiv(t, bt), cdiv(c, bc)), z, targets, lse, g,
                   t, c, v0, inv_temp, ignore_index, BLOCK_T=bt, BLOCK_C=bc)
            dz = z
        else:
            p = z.mul_(inv_temp).sub_(lse[:, None]).exp_()  # [T, C] softmax, in place
            local = targets.long() - v0
            hit = (local >= 0) & (local < c)
            p[hit, local[hit]] -= 1.0
            dz = p.mul_(-g_eff[:, None])
        # fp32 products on CPU (and for fp32 inputs); on GPU half inputs use tensor cores
        lo = hidden.is_cuda and hidden.dtype != torch.float32
        dz_m, w_m = (dz.to(hidden.dtype), w_c) if lo else (dz, w_c.float())
        if grad_h is not None:
            grad_h += (dz_m @ w_m).float()
        if grad_w is not None:
            grad_w[v0:v0 + chunk] = (dz_m.T @ (hidden if lo else hidden.float())).to(weight.dtype)
    return (grad_h.to(hidden.dtype) if grad_h is not None else None), grad_w


class _FusedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                ignore_index: int, chunk: int, use_triton: bool, blocks: tuple[int, int, int]) -> torch.Tensor:
        inv_temp = 1.0 / temperature
        t = hidden.shape[0]
        if use_triton and t > 0:
            logp = torch.empty(t, dtype=torch.float32, device=hidden.device)  # [T]
            lse = torch.empty(t, dtype=torch.float32, device=hidden.device)  # [T]
            bt, bv, bh = blocks
            launch(_logprob_fwd_kernel, (cdiv(t, bt),), hidden, weight, targets, logp, lse,
                   t, weight.shape[0], hidden.shape[1], hidden.stride(0), weight.stride(0), inv_temp, ignore_index,
                   BLOCK_T=bt, BLOCK_V=bv, BLOCK_H=bh, UPCAST=interpreting(hidden),
                   PREC="ieee" if hidden.dtype == torch.float32 else "tf32")
        else:
            logp, lse = _torch_forward(hidden, weight, targets, inv_temp, ignore_index, chunk)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.cfg = (inv_temp, ignore_index, chunk, use_triton)
        return logp

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        hidden, weight, targets, lse = ctx.saved_tensors
        inv_temp, ignore_index, chunk, use_triton = ctx.cfg
        gh, gw = _chunked_backward(hidden, weight, targets, lse, g.contiguous(), inv_temp, ignore_index, chunk,
                                   use_triton, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return gh, gw, None, None, None, None, None, None


def fused_logprob(
    hidden: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [V, H] lm_head weight
    targets: torch.Tensor,  # [T] int token ids, ignore_index allowed
    temperature: float = 1.0,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: Optional[int] = None,
    blocks: tuple[int, int, int] = (64, 128, 64),
    validate: bool = True,
    impl: str = "auto",
) -> torch.Tensor:  # [T] fp32
    """Per-token log-probs with gradients to hidden and weight, without [T, V] logits.

    ``chunk_size``: vocabulary columns per backward (and torch-forward) chunk; default keeps a
    chunk at about 2**24 elements (64 MiB of fp32). ``blocks``: Triton forward (BLOCK_T, BLOCK_V, BLOCK_H), powers
    of two >= 16. ``validate`` checks target ids (a host sync on GPU).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [T, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != (hidden.shape[0],) or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be int32/int64 of shape [T]=({hidden.shape[0]},), got {targets.dtype} {tuple(targets.shape)}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must share a floating dtype, got {hidden.dtype} and {weight.dtype}")
    if not (temperature > 0.0) or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if any(b < 16 or b & (b - 1) for b in blocks) or len(blocks) != 3:
        raise ValueError(f"blocks must be three powers of two >= 16, got {blocks}")
    t, v = hidden.shape[0], weight.shape[0]
    if validate and t > 0:
        bad = targets[(targets != ignore_index) & ((targets < 0) | (targets >= v))]
        if bad.numel():
            raise ValueError(f"target id {int(bad[0])} is outside 0..{v - 1} (and is not ignore_index={ignore_index})")
    chunk = chunk_size if chunk_size is not None else max(256, min(v, (1 << 24) // max(t, 1)))
    if chunk <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    use_triton = resolve_impl(impl, hidden, weight, targets) == "triton"
    return _FusedLogprob.apply(hidden.contiguous(), weight.contiguous(), targets.contiguous(), float(temperature),
                               ignore_index, chunk, use_triton, tuple(blocks))
