"""The policy-update step of fatal-aware GRPO: trajectories + advantages -> one new policy version.

    updater = PolicyUpdater(model, UpdateConfig(lr=1e-6), image_processor=vlm.image_processor)
    metrics = updater.step(trajs, advantages, masks)   # advantages [N]; masks: N tensors [L_i]

What one `step` does:

1. Masks. `masks[i]` is the caller's loss mask of trajectory i ([L_i] 0/1, e.g.
   `traj.loss_mask(fatal=True)` times an anomaly flag); it must lie inside the tokens the policy
   sampled (GEN segments). Staleness bound: a GEN segment whose policy version lags the current
   version (`updater.version`) by more than `max_lag` (the constructor's; GRPO passes the engine's
   EngineConfig.max_version_lag: one staleness bound) is masked out (counted in `stale_tokens`).
2. Old log-probs are the engine's sampled ones (`Trajectory.logprobs()`), so the ratio is an
   importance ratio against the behaviour policy (off-policy / asynchronous rollouts are fine).
3. For each of `ppo_epochs` epochs the trajectories are shuffled (seeded by seed, step, epoch:
   reproducible and identical on every rank) and split into `mini_batches`; each mini-batch is
   packed by `spyglass.engine.packer.pack` into micro-batches of at most `micro_batch_tokens`
   tokens (count a multiple of the data-parallel world size; rank r takes micro-batches r, r+W..).
4. Per micro-batch, the current policy's log-probs are recomputed. Attention (`attention`):
   "packed" runs the micro-batch as ONE row [1, T] with positions restarting at each sequence
   (M-RoPE positions per sequence for Qwen-VL, the text positions as the first of four rows):
   transformers turns restarting positions into varlen attention under flash_attention_2 and
   into a block-diagonal causal mask under SDPA/eager; "auto" packs when the model runs
   flash_attention_2 (a GPU with flash-attn) and otherwise runs the sequences unpacked as a
   right-padded batch [b, L] (causal attention with no padding mask: no real token attends to
   the pads after it, so SDPA keeps its causal path; M-RoPE positions from `get_rope_index` with the
   sequences' images as pixel_values / image_grid_thw, exactly as the HF backend prefills);
   only the hidden states of loss tokens are gathered back into the packed layout and turned
   into log-probs by `kernels.fused_logprob` (last hidden state x lm_head, no [T, V] logits).
5. `kernels.policy_loss.masked_policy_loss` on the packed buffers (per-token advantages,
   cu_seqlens). Micro-batch losses are weighted by their share of the mini-batch's normaliser
   (tokens for token-mean, non-empty sequences for the seq-mean modes, sequences for the
   Dr.GRPO mode), so accumulating over micro-batches and ranks gives exactly the gradient of the
   mini-batch loss. Backward, then one optimizer step (AdamW, grad-norm clipping) per mini-batch,
   at this update's lr (`warmup_steps`: linear warm-up over the first updates); with
   `freeze_vision` the vision tower has no gradient and no optimizer state.
6. No silent NaN: a non-finite log-prob, policy loss, KL or gradient raises `NonFiniteError`
   naming the step, the micro-batch (trajectory ids) and the term; the optimizer step is not
   applied (ZeRO skips an overflowing step, the plain path checks before stepping).

`updater.version` goes up by one per `step` (sync the new weights with that version). The
DeepSpeed / single-process plumbing lives in `spyglass.trainer.distributed`.
Tests: `.venv/bin/python -m pytest -q tests/test_update.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from spyglass.engine.packer import MicroBatch, pack
from spyglass.engine.trajectory import SegmentKind, Trajectory
from spyglass.kernels.fused_logprob import IGNORE_INDEX, fused_logprob, logprob_reference
from spyglass.kernels.policy_loss import PolicyLossConfig, PolicyLossResult, masked_policy_loss


class NonFiniteError(RuntimeError):
    """A non-finite loss term or gradient; the run must stop (the step was not applied)."""


@dataclass
class UpdateConfig:
    """Policy-update settings (optimizer, batching, loss, log-prob recompute)."""

    lr: float = 1e-6  # AdamW learning rate (peak, after warm-up)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping (the norm is still reported)
    warmup_steps: int = 0  # lr rises linearly over the first N updates (lr * k / N at update k)
    micro_batch_tokens: int = 16384  # packed tokens per micro-batch (one forward/backward)
    allow_oversize: bool = True  # a longer sequence gets a micro-batch of its own instead of an error
    ppo_epochs: int = 1  # passes over each batch of trajectories
    mini_batches: int = 1  # optimizer steps per epoch (the batch split into this many parts)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    temperature: float = 1.0  # the sampling temperature: log-probs are of softmax(logits / T)
    use_fused_logprob: bool = True  # False: materialise logits (reference path, for comparison)
    seed: int = 0  # mini-batch shuffling
    gradient_checkpointing: bool = False  # recompute activations in the backward (less memory, ~30% more compute)
    # auto: packed when the model runs flash_attention_2 (varlen kernels), else padded | packed |
    # padded (see the module docstring, step 4)
    attention: str = field(default="auto", metadata={"choices": ("auto", "packed", "padded")})
    freeze_vision: bool = False  # the vision tower (and its merger) takes no updates
    check_grads_per_micro_batch: bool = True  # plain path: find the micro-batch a NaN grad came from
    impl: str = field(default="auto", metadata={"choices": ("auto", "triton", "torch")})  # kernels: "auto" | "triton" | "torch"
    # weight of the token-mean NLL of demonstration trajectories (`step(..., sft=...)`, at
    # temperature 1) added to every optimizer step: InstructGPT's PPO-ptx term, an anchor on the
    # demonstrations' format while the policy gradient moves the rest; 0 = plain GRPO
    sft_coef: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            self.loss = PolicyLossConfig(**self.loss)
        if not isinstance(self.loss, PolicyLossConfig):
            raise TypeError(f"loss must be a PolicyLossConfig, got {type(self.loss).__name__}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not (self.eps > 0):
            raise ValueError(f"eps must be > 0, got {self.eps!r}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            raise ValueError(f"grad_clip must be a finite number >= 0 (0 = off), got {self.grad_clip!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        for name in ("micro_batch_tokens", "ppo_epochs", "mini_batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if self.attention not in ("auto", "packed", "padded"):
            raise ValueError(f"attention must be 'auto', 'packed' or 'padded', got {self.attention!r}")
        if self.impl not in ("auto", "triton", "torch"):
            raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {self.impl!r}")
        if not (self.sft_coef >= 0 and math.isfinite(self.sft_coef)):
            raise ValueError(f"sft_coef must be a finite number >= 0, got {self.sft_coef!r}")


# ------------------------------------------------------------------------------ the model
def vision_tower(model: nn.Module) -> Optional[nn.Module]:
    """The Qwen-VL vision tower (`visual`, with its patch merger), or None for a text model."""
    inner = getattr(model, "model", model)
    tower = getattr(inner, "visual", None) or getattr(model, "visual", None)
    return tower if isinstance(tower, nn.Module) else None


class PolicyLogprobModel(nn.Module):
    """Wraps a HF causal LM / Qwen-VL model: padded batch in, per-token log-probs out.

    The wrapper is what DeepSpeed sees; under ZeRO-3 the lm_head weight, used outside its own
    module's forward by the fused log-prob, is registered as an external parameter."""

    def __init__(self, model: nn.Module, temperature: float, use_fused: bool, impl: str = "auto") -> None:
        super().__init__()
        self.model = model
        self.temperature, self.use_fused, self.impl = temperature, use_fused, impl
        cfg = model.config
        self.is_vl = hasattr(cfg, "vision_config")
        self.image_token_id = getattr(cfg, "image_token_id", None)
        if getattr(model, "model", None) is None or model.get_output_embeddings() is None:
            raise TypeError(f"{type(model).__name__} has no .model body or output embeddings (lm_head)")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
                targets: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                image_grid_thw: Optional[torch.Tensor] = None, temperature: Optional[float] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids / attention_mask [b, L] (packed: b = 1 and position_ids [1, T], or [4, 1, T] for
        Qwen-VL: text positions, then M-RoPE); rows [T'] flat indices into [b*L] of the hidden
        states predicting targets [T']. Returns log-probs [T'] fp32 of softmax(logits / T), T =
        `temperature` (None: the sampler's, set at construction; the NLL of demonstrations uses 1)."""
        body = self.model.model
        kw: dict[str, Any] = {}
        if self.is_vl:
            kw["mm_token_type_ids"] = (input_ids == self.image_token_id).int() * attention_mask  # [b, L]
            if pixel_values is not None:
                kw.update(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
        # The batch is right-padded: under causal attention no real token sees a pad, and the
        # positions of real tokens do not depend on the pads after them, so the body runs with no
        # padding mask (exact for every real token; SDPA takes its causal path instead of
        # materialising a [b, 1, L, L] mask). Pads' outputs are never read (rows index real tokens).
        if position_ids is not None:  # packed: positions restart at every sequence
            kw["position_ids"] = position_ids
        hidden = body(input_ids=input_ids, attention_mask=None, use_cache=False, **kw)[0]  # [b, L, H]
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)  # [T', H]
        w = self.model.get_output_embeddings().weight  # [V, H]
        t = self.temperature if temperature is None else temperature
        if self.use_fused:
            return fused_logprob(h, w, targets, t, impl=self.impl)  # [T']
        return logprob_reference(h, w, targets, t)


# ------------------------------------------------------------------------------ batch preparation
@dataclass
class _Seq:
    """One trajectory ready for training (numpy views, built once per step)."""

    traj_id: str
    ids: np.ndarray  # [L] int64
    mask: np.ndarray  # [L] bool, after the staleness bound
    old_logp: np.ndarray  # [L] float32
    pixels: Optional[dict[str, torch.Tensor]]  # pixel_values [P, D], image_grid_thw [n, 3]


def _check_inputs(trajs: Sequence[Trajectory], advantages: torch.Tensor, masks: Sequence[Any]) -> torch.Tensor:
    if not trajs:
        raise ValueError("step() needs at least one trajectory, got none")
    n = len(trajs)
    adv = torch.as_tensor(advantages, dtype=torch.float32).detach().cpu()
    if adv.shape != (n,):
        raise ValueError(f"advantages must have shape [N]=({n},), got {tuple(adv.shape)}")
    bad = (~torch.isfinite(adv)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"advantage of trajectory {trajs[i].id!r} (index {i}) is {adv[i].item()}")
    if len(masks) != n:
        raise ValueError(f"got {n} trajectories but {len(masks)} masks")
    return adv


def _prepare(traj: Trajectory, mask: Any, version: int, max_lag: Optional[int]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """ids [L], final mask [L], stale count, masked-out generated count (by the caller's mask)."""
    parts = [np.asarray(traj.prompt_ids, dtype=np.int64)] + [np.asarray(s.token_ids, dtype=np.int64)
                                                             for s in traj.segments]
    ids = np.concatenate(parts)  # [L] == traj.token_ids()
    m = torch.as_tensor(mask).detach().cpu().numpy() if not isinstance(mask, np.ndarray) else mask
    if m.shape != ids.shape:
        raise ValueError(f"mask of trajectory {traj.id!r} has shape {m.shape}, its tokens {ids.shape}")
    if m.size and not np.isin(m, (0, 1)).all():
        raise ValueError(f"mask of trajectory {traj.id!r} must hold 0/1, got value {m[~np.isin(m, (0, 1))][0]!r}")
    m = m.astype(bool)
    gen = np.zeros(ids.shape, bool)
    fresh = np.zeros(ids.shape, bool)
    pos = len(traj.prompt_ids)
    for s in traj.segments:
        end = pos + len(s.token_ids)
        if s.kind is SegmentKind.GEN:
            gen[pos:end] = True
            fresh[pos:end] = max_lag is None or version - int(s.version) <= max_lag
        pos = end
    outside = np.flatnonzero(m & ~gen)
    if outside.size:
        raise ValueError(f"mask of trajectory {traj.id!r} covers token {int(outside[0])}, which the "
                         "policy did not sample (prompt or observation)")
    if m.size and m[0]:
        raise ValueError(f"trajectory {traj.id!r}: token 0 is in the loss but has no context before it")
    stale = int((m & ~fresh).sum())
    masked_out = int((gen & ~m).sum())
    return ids, m & fresh, stale, masked_out


def _pixels(traj: Trajectory, ids: np.ndarray, image_processor: Any, image_token_id: Optional[int],
            merge: int) -> Optional[dict[str, torch.Tensor]]:
    images = traj.images()
    n_pad = int((ids == image_token_id).sum()) if image_token_id is not None else 0
    if not images:
        if n_pad:
            raise ValueError(f"trajectory {traj.id!r} has {n_pad} image tokens but no images")
        return None
    if image_processor is None:
        raise ValueError(f"trajectory {traj.id!r} has {len(images)} images: PolicyUpdater needs an "
                         "image_processor")
    from spyglass.engine.chat import pixel_inputs
    px = pixel_inputs(image_processor, images)
    want = int(px["image_grid_thw"].prod(-1).sum()) // merge ** 2
    if want != n_pad:
        raise ValueError(f"trajectory {traj.id!r}: {n_pad} image tokens but its {len(images)} images "
                         f"need {want}")
    return px


def _loss_count(agg: str, n_tok: np.ndarray) -> float:
    """The aggregation's normaliser contribution of sequences with n_tok loss tokens each."""
    if agg == "token-mean":
        return float(n_tok.sum())
    if agg == "seq-mean-token-sum-norm":
        return float(n_tok.size)
    return float((n_tok > 0).sum())


@dataclass
class _Stats:
    """Per-rank sums for the metrics; all-reduced at the end of a step."""

    loss: float = 0.0
    loss_tokens: float = 0.0
    clip: float = 0.0
    dual: float = 0.0
    akl: float = 0.0
    rkl: float = 0.0
    ratio_min: float = math.inf
    ratio_max: float = -math.inf

    def add(self, res: PolicyLossResult, weight: float) -> None:
        vals = torch.stack([res.loss.detach(), res.num_tokens, res.clip_fraction, res.dual_clip_fraction,
                            res.approx_kl, res.ref_kl, res.ratio_min, res.ratio_max]).float().tolist()  # one sync
        loss, n, clip, dual, akl, rkl, rmin, rmax = vals
        self.loss += weight * loss
        self.loss_tokens += n
        self.clip += n * clip
        self.dual += n * dual
        self.akl += n * akl
        self.rkl += n * rkl
        if n > 0:
            self.ratio_min = min(self.ratio_min, rmin)
            self.ratio_max = max(self.ratio_max, rmax)


# ------------------------------------------------------------------------------ the updater
class PolicyUpdater:
    """Owns the trainable policy (wrapped for log-probs), its optimizer runtime and the version.

    `dist`: a `spyglass.trainer.distributed.DistConfig` (None: the plain single-process path).
    `ref_model`: the frozen reference policy, needed when `cfg.loss.kl_coef > 0`.
    Every rank must call `step` with the same global batch (each rank trains its share)."""

    def __init__(self, model: nn.Module, cfg: UpdateConfig, *, image_processor: Any = None,
                 ref_model: Optional[nn.Module] = None, dist: Any = None, version: int = 0,
                 max_lag: Optional[int] = None) -> None:
        from spyglass.trainer.distributed import make_runtime

        if not isinstance(cfg, UpdateConfig):
            raise TypeError(f"cfg must be an UpdateConfig, got {type(cfg).__name__}")
        if cfg.loss.kl_coef > 0 and ref_model is None:
            raise ValueError(f"loss.kl_coef={cfg.loss.kl_coef} needs a ref_model")
        if max_lag is not None and (isinstance(max_lag, bool) or not isinstance(max_lag, int) or max_lag < 0):
            raise ValueError(f"max_lag must be None or an int >= 0, got {max_lag!r}")
        self.cfg, self.image_processor, self.max_lag = cfg, image_processor, max_lag
        self.version, self.steps = int(version), 0
        if cfg.freeze_vision:
            tower = vision_tower(model)
            if tower is None:
                raise ValueError(f"freeze_vision=True but {type(model).__name__} has no vision tower")
            tower.requires_grad_(False)
        if cfg.gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        model.train()
        self.policy = PolicyLogprobModel(model, cfg.temperature, cfg.use_fused_logprob, cfg.impl)
        attn = getattr(model.config, "_attn_implementation", None)
        self.packed = cfg.attention == "packed" or (cfg.attention == "auto" and attn == "flash_attention_2")
        self.runtime = make_runtime(self.policy, cfg, dist)
        self.ref = None
        if ref_model is not None:
            ref_model.to(self.runtime.device).eval().requires_grad_(False)  # whole on every rank
            self.ref = PolicyLogprobModel(ref_model, cfg.temperature, cfg.use_fused_logprob, cfg.impl)
        vc = getattr(model.config, "vision_config", None)
        self._merge = int(getattr(vc, "spatial_merge_size", 2) or 2) if vc is not None else 1
        self._dummy: Optional[dict[str, torch.Tensor]] = None

    @property
    def model(self) -> nn.Module:
        """The HF model being trained (under ZeRO-3 its parameters are partitioned)."""
        return self.policy.model

    # -- public step ----------------------------------------------------------------------
    def step(self, trajs: Sequence[Trajectory], advantages: torch.Tensor, masks: Sequence[Any],
             sft: Sequence[Trajectory] = ()) -> dict[str, float]:
        """One policy update (ppo_epochs x mini_batches optimizer steps); returns metrics.
        `sft`: demonstration trajectories whose NLL (weight cfg.sft_coef, loss mask = their
        assistant turns) is added to every optimizer step; needs sft_coef > 0, and the reverse."""
        cfg = self.cfg
        adv = _check_inputs(trajs, advantages, masks)
        if cfg.mini_batches > len(trajs):
            raise ValueError(f"mini_batches={cfg.mini_batches} exceeds the {len(trajs)} trajectories")
        if bool(sft) != (cfg.sft_coef > 0):
            raise ValueError(f"sft_coef={cfg.sft_coef} with {len(sft)} demonstration trajectories: "
                             "the NLL term needs both or neither")
        seqs, stale, masked_out = self._build(trajs, masks)
        demo = self._build(sft, [np.asarray(t.loss_mask(), dtype=np.int64) for t in sft], lag=False)[0] if sft else []
        self.runtime.set_lr(self.lr())
        stats, norms, n_micro, nll = _Stats(), [], 0, []
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.steps)
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(len(seqs), generator=g).tolist()
            for part in np.array_split(np.asarray(order, dtype=np.int64), cfg.mini_batches):
                norm, n, demo_nll = self._mini_batch([seqs[i] for i in part], adv[torch.from_numpy(part)], stats,
                                                     epoch, demo)
                norms.append(norm)
                nll.append(demo_nll)
                n_micro += n
        metrics = self._finish(stats, norms, n_micro, seqs, stale, masked_out)
        if demo:
            metrics["sft_nll"] = sum(nll) / len(nll)  # the demonstrations' token-mean NLL, before each step
        return metrics

    def lr(self) -> float:
        """This update's learning rate: cfg.lr after the linear warm-up (updates counted from 1).
        Adam's first steps move every weight by ~lr whatever the gradient's size, so on noisy
        RL gradients a tiny model's format breaks in one or two full-lr updates (measured in
        benchmarks/README.md "Training works?"); the warm-up lets the moments average first."""
        w = self.cfg.warmup_steps
        return self.cfg.lr * min(1.0, (self.steps + 1) / w) if w else self.cfg.lr

    def _build(self, trajs: Sequence[Trajectory], masks: Sequence[Any], lag: bool = True) -> tuple[list[_Seq], int, int]:
        """The trajectories ready for training; lag=False: no staleness bound (demonstrations)."""
        seqs, stale, masked_out = [], 0, 0
        tok_id = self.policy.image_token_id if self.policy.is_vl else None
        for t, m in zip(trajs, masks):
            ids, mask, s, mo = _prepare(t, m, self.version, self.max_lag if lag else None)
            stale, masked_out = stale + s, masked_out + mo
            old = np.where(mask, np.asarray(t.logprobs(), dtype=np.float32), 0.0).astype(np.float32)  # [L]
            px = _pixels(t, ids, self.image_processor, tok_id, self._merge) if self.policy.is_vl else None
            if not self.policy.is_vl and t.images():
                raise ValueError(f"trajectory {t.id!r} has images but the model has no vision tower")
            seqs.append(_Seq(t.id, ids, mask, old, px))
        return seqs, stale, masked_out

    # -- one mini-batch = one optimizer step ------------------------------------------------
    def _mini_batch(self, seqs: list[_Seq], adv: torch.Tensor, stats: _Stats, epoch: int,
                    demo: Sequence[_Seq] = ()) -> tuple[float, int, float]:
        """Pack, forward/backward this rank's micro-batches (and, with `demo`, sft_coef x the
        demonstrations' NLL), step; (grad norm, micro-batches, the demonstrations' NLL)."""
        rt, agg = self.runtime, self.cfg.loss.agg
        mbs = pack([s.ids for s in seqs], [s.mask for s in seqs], self.cfg.micro_batch_tokens,
                   min_micro_batches=rt.world_size, multiple_of=rt.world_size,
                   allow_oversize=self.cfg.allow_oversize)
        n_tok = np.array([int(s.mask.sum()) for s in seqs])
        total = _loss_count(agg, n_tok)
        mine = mbs[rt.rank::rt.world_size]
        rt.zero_grad()
        for mb in mine:
            share = _loss_count(agg, n_tok[mb.indices]) / total if total > 0 else 0.0
            ids = [seqs[i].traj_id for i in mb.indices.tolist()]
            res = self._micro_loss(mb, seqs, adv, ids, epoch)
            stats.add(res, share)
            rt.backward(res.loss * (share * rt.world_size))
            if self.cfg.check_grads_per_micro_batch and not rt.grads_finite():
                self._raise(f"non-finite gradient after the backward of micro-batch {ids}", "grad")
        nll = self._nll_backward(demo, self.cfg.sft_coef, temperature=1.0)[0] if demo else 0.0
        norm = rt.step()
        if not math.isfinite(norm):
            self._raise(f"non-finite grad norm {norm} in epoch {epoch}, mini-batch "
                        f"{[s.traj_id for s in seqs]} (the optimizer step was skipped)", "grad norm")
        return norm, len(mbs), nll

    def _nll_backward(self, seqs: Sequence[_Seq], scale: float,
                      temperature: Optional[float] = None) -> tuple[float, int]:
        """Backward of scale x the token-mean NLL of `seqs`' loss tokens (this rank's share of
        the packed micro-batches; gradients accumulate, no optimizer step); returns (the
        token-mean NLL over all ranks, micro-batches)."""

        rt, cfg = self.runtime, self.cfg
        total = float(sum(int(s.mask.sum()) for s in seqs))
        if total == 0:
            raise ValueError(f"no loss tokens in batch {[s.traj_id for s in seqs]}")
        mbs = pack([s.ids for s in seqs], [s.mask for s in seqs], cfg.micro_batch_tokens,
                   min_micro_batches=rt.world_size, multiple_of=rt.world_size, allow_oversize=cfg.allow_oversize)
        nll = 0.0
        for mb in mbs[rt.rank::rt.world_size]:
            ids = [seqs[i].traj_id for i in mb.indices.tolist()]
            inputs = self._inputs(mb, [seqs[i] for i in mb.indices.tolist()])
            inputs = {k: v.to(rt.device) for k, v in inputs.items()}
            inputs.pop("sel")
            logp = rt.forward(**inputs, temperature=temperature)  # [T'] fp32, this micro-batch's loss tokens
            self._check([("log-prob", logp)], ids, 0)
            rt.backward(-logp.sum() / total * (scale * rt.world_size))
            nll += float(-logp.detach().sum())
            if cfg.check_grads_per_micro_batch and not rt.grads_finite():
                self._raise(f"non-finite gradient after the backward of micro-batch {ids}", "grad")
        return float(rt.all_reduce(torch.tensor([nll], dtype=torch.float64), "sum")[0]) / total, len(mbs)

    def _micro_loss(self, mb: MicroBatch, seqs: list[_Seq], adv: torch.Tensor, ids: list[str],
                    epoch: int) -> PolicyLossResult:
        t = mb.to_torch()
        rows_in, dev = mb.indices.tolist(), self.runtime.device
        inputs = self._inputs(mb, [seqs[i] for i in rows_in])
        inputs = {k: v.to(dev) for k, v in inputs.items()}
        sel = inputs.pop("sel")  # [T'] packed positions of loss tokens
        logp_sel = self.runtime.forward(**inputs)  # [T'] fp32
        n = mb.num_tokens
        logp = torch.zeros(n, dtype=torch.float32, device=dev).index_copy(0, sel, logp_sel)  # [T]
        old = torch.from_numpy(np.concatenate([seqs[i].old_logp for i in rows_in])).to(dev)  # [T]
        seq_adv = adv[t["indices"]]  # [B]
        tok_adv = torch.repeat_interleave(seq_adv, torch.from_numpy(np.diff(mb.cu_seqlens)).long()).to(dev)  # [T]
        ref = None
        if self.ref is not None:
            with torch.no_grad():
                ref_sel = self.ref(**inputs)
            ref = torch.zeros(n, dtype=torch.float32, device=dev).index_copy(0, sel, ref_sel.float())
        res = masked_policy_loss(logp, old, tok_adv, t["loss_mask"].to(dev), t["cu_seqlens"].to(dev),
                                 ref, self.cfg.loss, impl=self.cfg.impl)
        terms = [("log-prob", logp_sel)] + ([("kl", res.ref_kl)] if ref is not None else [])
        self._check(terms + [("policy loss", res.loss)], ids, epoch)
        return res

    def _inputs(self, mb: MicroBatch, rows: list[_Seq]) -> dict[str, torch.Tensor]:
        return self._packed_inputs(mb, rows) if self.packed else self._padded_inputs(mb, rows)

    def _packed_inputs(self, mb: MicroBatch, rows: list[_Seq]) -> dict[str, torch.Tensor]:
        """The micro-batch as one row [1, T] with per-sequence positions (see module doc, step 4)."""
        lens = np.diff(mb.cu_seqlens).astype(np.int64)
        ids = torch.from_numpy(mb.input_ids.astype(np.int64)).view(1, -1)  # [1, T]
        text_pos = torch.from_numpy(np.concatenate([np.arange(n) for n in lens])).view(1, -1)  # [1, T]
        px = [s.pixels for s in rows if s.pixels is not None]
        if not px and self.policy.is_vl and self.runtime.world_size > 1:  # every rank runs the vision tower
            d = self._dummy_image()  # appended as a last sequence with no loss tokens (see _padded_inputs)
            rows = [*rows, _Seq("dummy", d["ids"].numpy(), np.zeros(d["ids"].numel(), bool), np.zeros(0, np.float32),
                                {k: d[k] for k in ("pixel_values", "image_grid_thw")})]
            lens = np.append(lens, d["ids"].numel())
            ids = torch.cat([ids, d["ids"].view(1, -1)], 1)  # [1, T + n]
            text_pos = torch.cat([text_pos, torch.arange(d["ids"].numel()).view(1, -1)], 1)
            px = [rows[-1].pixels]
        sel = np.flatnonzero(mb.loss_mask)  # packed positions with a loss token (never a sequence's first)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": text_pos,
               "rows": torch.from_numpy(sel - 1),  # the hidden state before the token, in the same sequence
               "targets": torch.from_numpy(mb.input_ids[sel]), "sel": torch.from_numpy(sel)}
        if self.policy.is_vl:
            out["position_ids"] = torch.cat([text_pos.view(1, 1, -1), self._mrope(rows, lens)], 0)  # [4, 1, T]
        if px:
            out["pixel_values"] = torch.cat([p["pixel_values"] for p in px])
            out["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in px])
        return out

    def _mrope(self, rows: list[_Seq], lens: np.ndarray) -> torch.Tensor:
        """M-RoPE positions [3, 1, T] of the packed sequences, each computed on its own."""
        base, parts = self.policy.model.model, []
        for s, n in zip(rows, lens):
            ids = torch.from_numpy(s.ids.astype(np.int64)).view(1, -1)  # [1, L]
            mm = (ids == self.policy.image_token_id).int()
            grid = s.pixels["image_grid_thw"] if s.pixels is not None else None
            pos, _ = base.get_rope_index(ids, mm_token_type_ids=mm, attention_mask=torch.ones_like(ids),
                                         image_grid_thw=grid)
            parts.append(pos.view(3, 1, int(n)))
        return torch.cat(parts, -1)

    def _padded_inputs(self, mb: MicroBatch, rows: list[_Seq]) -> dict[str, torch.Tensor]:
        """The micro-batch unpacked into a right-padded batch plus the gather rows (see module doc).

        Distributed VLM training: a micro-batch without images gets one extra row holding only a
        dummy image (no loss tokens), so every rank runs the vision tower in the same graph
        shape; ZeRO's collectives (ZeRO-3 gathers, bucketed gradient reduction in the order
        gradients become ready) need the same modules in the same order on every rank."""
        lens = np.diff(mb.cu_seqlens).astype(np.int64)
        px = [s.pixels for s in rows if s.pixels is not None]
        dummy = None
        if not px and self.policy.is_vl and self.runtime.world_size > 1:
            dummy = self._dummy_image()
            px = [dummy]
        width = int(max(lens.max(), dummy["ids"].numel() if dummy else 0))
        b = len(rows) + (dummy is not None)
        ids = torch.zeros(b, width, dtype=torch.long)  # [b, L] pad id 0 (masked out)
        attn = torch.zeros(b, width, dtype=torch.long)  # [b, L]
        for r, s in enumerate(rows):
            ids[r, : lens[r]] = torch.from_numpy(s.ids)
            attn[r, : lens[r]] = 1
        if dummy is not None:
            ids[-1, : dummy["ids"].numel()] = dummy["ids"]
            attn[-1, : dummy["ids"].numel()] = 1
        sel = np.flatnonzero(mb.loss_mask)  # packed positions with a loss token
        seq_of = np.searchsorted(mb.cu_seqlens[1:], sel, side="right")  # local row of each
        offset = sel - mb.cu_seqlens[seq_of]
        out = {"input_ids": ids, "attention_mask": attn,
               "rows": torch.from_numpy(seq_of * width + offset - 1),  # hidden state before the token
               "targets": torch.from_numpy(mb.input_ids[sel]), "sel": torch.from_numpy(sel)}
        if px:
            out["pixel_values"] = torch.cat([p["pixel_values"] for p in px])
            out["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in px])
        return out

    def _dummy_image(self) -> dict[str, torch.Tensor]:
        """A 56x56 black image's pixels and its token row <|vision_start|> pads <|vision_end|>."""
        if self._dummy is None:
            if self.image_processor is None:
                raise ValueError("distributed training of a VLM needs an image_processor")
            from PIL import Image

            from spyglass.engine.chat import pixel_inputs
            px = pixel_inputs(self.image_processor, [Image.new("RGB", (56, 56))])
            n = int(px["image_grid_thw"].prod(-1).sum()) // self._merge ** 2
            c = self.model.config
            row = [c.vision_start_token_id] + [c.image_token_id] * n + [c.vision_end_token_id]
            self._dummy = {**px, "ids": torch.tensor(row, dtype=torch.long)}
        return self._dummy

    # -- errors and metrics ------------------------------------------------------------------
    def _check(self, terms: list[tuple[str, torch.Tensor]], ids: list[str], epoch: int) -> None:
        """Raise on the first non-finite term; one host sync, and one collective across ranks so
        that every rank stops together (the others name their own micro-batch)."""
        ok = torch.stack([torch.isfinite(x.detach()).all() for _, x in terms]).tolist()
        bad = next((name for name, good in zip((n for n, _ in terms), ok) if not good), None)
        if self.runtime.any_flag(bad is not None):
            if bad is not None:
                self._raise(f"non-finite {bad} in epoch {epoch}, micro-batch {ids}", bad)
            self._raise(f"non-finite loss term in epoch {epoch} in a micro-batch on another rank "
                        f"(this rank: {ids})", "other rank")

    def _raise(self, what: str, term: str) -> None:
        raise NonFiniteError(f"step {self.steps} (version {self.version}): {what} [term: {term}]")

    def _finish(self, st: _Stats, norms: list[float], n_micro: int, seqs: list[_Seq], stale: int,
                masked_out: int) -> dict[str, float]:
        sums = torch.tensor([st.loss, st.loss_tokens, st.clip, st.dual, st.akl, st.rkl], dtype=torch.float64)
        sums = self.runtime.all_reduce(sums, "sum")
        ext = self.runtime.all_reduce(torch.tensor([-st.ratio_min, st.ratio_max], dtype=torch.float64), "max")
        steps = len(norms)
        ntok = max(float(sums[1]), 1.0)
        metrics = {
            "loss": float(sums[0]) / steps, "clip_fraction": float(sums[2]) / ntok,
            "dual_clip_fraction": float(sums[3]) / ntok, "approx_kl": float(sums[4]) / ntok,
            "ref_kl": float(sums[5]) / ntok,
            "ratio_min": -float(ext[0]) if sums[1] > 0 else 1.0, "ratio_max": float(ext[1]) if sums[1] > 0 else 1.0,
            "grad_norm": sum(norms) / steps, "grad_norm_max": max(norms),
            "tokens": float(sum(s.ids.size for s in seqs)),
            "loss_tokens": float(sum(int(s.mask.sum()) for s in seqs)),
            "masked_tokens": float(masked_out), "stale_tokens": float(stale),
            "trajectories": float(len(seqs)), "micro_batches": float(n_micro), "optimizer_steps": float(steps),
            "lr": self.lr(),
        }
        self.steps += 1
        self.version += 1
        metrics["version"] = float(self.version)
        return metrics

    # -- checkpoint state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """The updater's own counters (model/optimizer state is the runtime's)."""
        return {"steps": self.steps, "version": self.version}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.steps, self.version = int(state["steps"]), int(state["version"])
