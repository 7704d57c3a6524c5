"""HF transformers backend (CPU, or the GPU its model was loaded on): the embedded default,
with continuous batching.

Design (what is batched, honestly): one worker thread owns the model and ONE running batch.
Its KV cache is left-padded: per layer K/V [B, H_kv, T, D] plus a 2-D mask [B, T] marking
real positions; every row carries its own next rope position (M-RoPE for Qwen-VL rows, whose
image tokens shift later positions). A step is:
  1. drop aborted rows;
  2. decode: ONE forward of the last token of every running row ([B, 1] with the cache);
  3. prefill: requests that arrived while the previous step ran are prefilled together as a
     left-padded micro-batch (images through the vision tower), sample their first token, and
     join the running batch (both caches left-padded to a common length and concatenated);
  4. rows that finished (stop token, max_tokens) leave the batch (index_select on the batch
     dim; columns that became padding for every row are trimmed).
Prefix cache (engine/backends/prefix_cache.py): when a row finishes, the KV of every token it
fed (prompt + output but the last token) is kept, up to `prefix_cache_tokens` tokens in all
(default: what fits in 1 GiB of this model's KV); a later request reuses the longest prefix it
shares with any kept entry (its own last turn, a sibling sample's, or the system prompt of
another question), never across a split or different image, and prefills only the rest (and
only the images in the rest) on top of that KV, with the positions a cold prefill would give.
Exact up to float rounding; cleared on update_weights, and a row that saw a weight update
mid-flight is not kept. `prefix_hits` / `prefix_tokens_reused` count it.
Replay requests (forced_ids) never join the running batch: their prompt and forced tokens go
through ONE forward together (teacher forcing), the logprobs of every forced token read off its
logits, so a replayed turn costs one prefill instead of one decode step per token.
So requests join at the next step boundary and decode together; the padding costs at most
the length difference between rows. The asyncio side never touches torch: it queues requests,
and runs one `_step` at a time in a single-thread executor, so the event loop never blocks.
Sampling is vectorised (`sample_next`): temperature, top-k, top-p; each request draws its
uniforms from its own torch.Generator (seeded by SamplingParams.seed, else from the backend's
seeded RNG), so a seeded request gives the same tokens whatever else shares its batch (up to
float rounding of the batched forward). Logprobs follow base.py: log_softmax(logits / T).
update_weights runs in the same executor between steps; rows in flight keep their KV cache
(computed with the old weights) and continue with the new ones (GenerateOutput.version_start).

    backend = HFBackend.from_model(load_model("tiny:qwen2_vl"))   # or a checkpoint dir
    out = await backend.generate(GenerateRequest("r1", ids, images=[img]))
"""
from __future__ import annotations

import asyncio
import inspect
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from spyglass.engine.loader import LoadConfig
from spyglass.engine.backends.base import (Backend, BackendError, GenerateOutput, GenerateRequest,
                                           Weights, check_version)
from spyglass.engine.backends.prefix_cache import (PREFIX_CACHE_BYTES, Prefix, PrefixCache, image_key,
                                                   kv_bytes_per_token)


@dataclass
class HFConfig:
    """HF backend config: `model` is anything the loader takes (a checkpoint directory, a hub id
    in the local cache, tiny:<family>), loaded on `load`'s device and dtype."""

    kind: ClassVar[str] = "hf"
    name: str = "hf-0"
    model: str = "tiny:qwen2_vl"       # checkpoint dir | cached hub id | tiny:<family> (engine/loader.py)
    load: LoadConfig = field(default_factory=LoadConfig)  # device, dtype, attention, image-token cap
    seed: int = 0                      # sampling RNG (and a tiny model's init)
    max_batch: int = 32                # rows decoding together
    max_prefill_tokens: int = 16384    # prompt tokens admitted per step (>= 1 request always)
    max_model_len: int = 65536
    prefix_cache_tokens: int | None = None  # KV kept for prompts that extend a finished request
    #                                          (None: what fits in 1 GiB of the model's KV; 0: off)
    num_threads: int = 0               # torch intra-op threads; 0 = leave torch's setting

    def __post_init__(self) -> None:
        from spyglass.engine.loader import check_model_spec
        check_model_spec(self.model, "hf.model")
        for k in ("max_batch", "max_prefill_tokens", "max_model_len"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise ValueError(f"{k} must be an int >= 1, got {getattr(self, k)!r}")
        if self.prefix_cache_tokens is not None and (not isinstance(self.prefix_cache_tokens, int)
                                                     or self.prefix_cache_tokens < 0):
            raise ValueError(f"prefix_cache_tokens must be None or an int >= 0, got {self.prefix_cache_tokens!r}")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads!r}")


def sample_next(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor, uniform: torch.Tensor,
                forced: torch.Tensor, banned: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row and its logprob.

    logits [B, V] float; temperature [B] (0 = greedy); top_k [B] (-1 = off); top_p [B];
    uniform [B] in [0, 1); forced [B] (-1 = sample, else emit this id); banned [K] ids never
    sampled (vision/image pad tokens: only the processor may place them).
    Returns tokens [B] int64 and logprobs [B] = log_softmax(logits / T)[token] (T=1 if greedy),
    over the full vocabulary (what the trainer recomputes), bans notwithstanding."""
    b, v = logits.shape
    dev = logits.device
    temperature, top_k, top_p, uniform, forced = (x.to(dev) for x in (temperature, top_k, top_p, uniform, forced))
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    logp = torch.log_softmax(logits.float() / t[:, None], dim=-1)                 # [B, V]
    pick = logp
    if banned is not None and banned.numel():
        pick = logp.index_fill(1, banned.to(dev), float("-inf"))                           # [B, V]
    sorted_lp, order = pick.sort(dim=-1, descending=True)                          # [B, V]
    probs = sorted_lp.exp()
    k = torch.where(top_k < 1, torch.full_like(top_k, v), top_k)
    keep = torch.arange(v, device=dev)[None, :] < k[:, None]                                   # [B, V]
    keep &= (probs.cumsum(-1) - probs) < top_p[:, None]   # the top token is always kept
    cdf = torch.where(keep, probs, 0.0).cumsum(-1)                                 # [B, V]
    u = (uniform * cdf[:, -1])[:, None]                                            # [B, 1]
    choice = torch.searchsorted(cdf, u, right=True).clamp_(max=v - 1)               # [B, 1]
    sampled = order.gather(1, choice).squeeze(1)
    tokens = torch.where(greedy, pick.argmax(-1), sampled)
    tokens = torch.where(forced >= 0, forced, tokens)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


@dataclass(eq=False)
class _Seq:
    req: GenerateRequest
    future: asyncio.Future
    gen: torch.Generator
    t_submit: float
    t_start: float = 0.0
    version_start: int = 0
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    pos: int = 0                       # rope position of the next fed token
    finish: str = ""
    aborted: bool = False
    image_keys: tuple[bytes, ...] | None = None  # content keys of req.images (computed on demand)

    def keys(self) -> tuple[bytes, ...]:
        if self.image_keys is None:
            self.image_keys = tuple(image_key(im) for im in self.req.images)
        return self.image_keys


GROW = 128  # spare KV columns allocated at a time: decode writes in place, no per-step copy


def _grow_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class GrowLayer(DynamicLayer):
        """A DynamicLayer whose K/V live in buffers with spare columns: an update writes the new
        states in place (a plain DynamicLayer concatenates, copying the whole cache every decode
        step) and reallocates GROW more columns when full. keys / values are views."""

        def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
            super().__init__()
            self.dtype, self.device, self.is_initialized = k.dtype, k.device, True
            self.kb, self.vb, self.n = k, v, k.shape[-2]  # adopted as is; grown (copied) on update
            self.keys, self.values = k, v

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            q = key_states.shape[-2]
            if self.n + q > self.kb.shape[-2]:
                shape = list(self.kb.shape)
                shape[-2] = self.n + q + GROW
                kb, vb = self.kb.new_empty(shape), self.vb.new_empty(shape)
                kb[:, :, :self.n], vb[:, :, :self.n] = self.kb[:, :, :self.n], self.vb[:, :, :self.n]
                self.kb, self.vb = kb, vb
            self.kb[:, :, self.n:self.n + q], self.vb[:, :, self.n:self.n + q] = key_states, value_states
            self.n += q
            self.keys, self.values = self.kb[:, :, :self.n], self.vb[:, :, :self.n]
            return self.keys, self.values

    return GrowLayer


_GrowLayer: type | None = None


def _cache_from(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A DynamicCache over `layers` (per layer K, V [B, H, T, D], adopted without a copy; they
    are never written: the first update reallocates), growing in place from there."""
    global _GrowLayer
    from transformers import DynamicCache
    if _GrowLayer is None:
        _GrowLayer = _grow_layer_class()
    cache = DynamicCache()
    cache.layers = [_GrowLayer(k, v) for k, v in layers] + cache.layers[len(layers):]
    return cache


def _cache_of(out: Any) -> Any:
    """The cache a forward returned (`cache` in transformers 5.x, `past_key_values` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _layers_of(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _left_pad(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    extra = length - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class HFBackend(Backend):
    """Continuous-batching transformers backend (see the module docstring)."""

    def __init__(self, model: Any, image_processor: Any = None, *, name: str = "hf-0",
                 max_batch: int = 32, max_prefill_tokens: int = 16384,
                 max_model_len: int = 65536, seed: int = 0, prefix_cache_tokens: int | None = None) -> None:
        self.name, self.model, self.image_processor = name, model.eval(), image_processor
        self.version = 0
        cfg = model.config
        self.is_vl = hasattr(cfg, "vision_config")
        self.supports_images = self.is_vl and image_processor is not None
        self.supports_forced = True
        self.image_token_id = getattr(cfg, "image_token_id", None)
        vision_ids = [getattr(cfg, k, None) for k in ("image_token_id", "video_token_id",
                                                      "vision_start_token_id", "vision_end_token_id")]
        self.banned_ids = torch.tensor(sorted({i for i in vision_ids if isinstance(i, int)}), dtype=torch.long)
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.vocab_size = int(text_cfg.vocab_size)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else text_cfg.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        self.pad_id = int(getattr(text_cfg, "pad_token_id", None) or 0)
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens
        self.max_model_len = max_model_len
        self._rng = torch.Generator().manual_seed(seed)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"spyglass-{name}")
        self._pending: list[_Seq] = []
        self._by_id: dict[str, _Seq] = {}
        self._rows: list[_Seq] = []                  # worker-owned running batch
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer K, V [B, H, T, D]
        self._cache: Any = None                       # the decode cache over _layers (None: rebuild)
        self.device = next(model.parameters()).device
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # [B, T]
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self.steps = 0
        self.decode_rows = 0                          # sum over steps of rows decoded
        self.prefix_cache_tokens = (prefix_cache_tokens if prefix_cache_tokens is not None
                                    else PREFIX_CACHE_BYTES // kv_bytes_per_token(model))
        self._prefixes = PrefixCache(self.prefix_cache_tokens)
        self.prefix_hits = 0
        self.prefix_tokens_reused = 0
        # transformers 5.x calls the KV cache argument `cache` (`past_key_values` is deprecated there)
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @classmethod
    def from_model(cls, loaded: Any, **kwargs: Any) -> "HFBackend":
        """From a loader.LoadedModel (its model, on its device, and image processor)."""
        return cls(loaded.model, loaded.image_processor, **kwargs)

    @classmethod
    def from_config(cls, cfg: HFConfig) -> "HFBackend":
        from spyglass.engine.loader import load_model
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        return cls.from_model(load_model(cfg.model, cfg.load, seed=cfg.seed), name=cfg.name, max_batch=cfg.max_batch,
                              max_prefill_tokens=cfg.max_prefill_tokens, max_model_len=cfg.max_model_len,
                              seed=cfg.seed, prefix_cache_tokens=cfg.prefix_cache_tokens)

    # ------------------------------------------------------------------ asyncio side
    def _check_prompt(self, req: GenerateRequest) -> None:
        ids = req.prompt_ids
        if max(ids) >= self.vocab_size:
            raise ValueError(f"prompt token id {max(ids)} >= vocab size {self.vocab_size} "
                             f"(request {req.request_id!r})")
        if req.forced_ids is not None and max(req.forced_ids) >= self.vocab_size:
            raise ValueError(f"forced token id {max(req.forced_ids)} >= vocab size {self.vocab_size} "
                             f"(request {req.request_id!r})")
        if len(ids) + 1 > self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds max_model_len {self.max_model_len}")
        if self.is_vl:
            from spyglass.engine.chat import image_token_count
            want = sum(image_token_count(im, self.image_processor) for im in req.images)
            have = ids.count(self.image_token_id)
            if want != have:
                raise ValueError(f"request {req.request_id!r}: prompt has {have} image tokens but its "
                                 f"{len(req.images)} images need {want}")

    async def generate(self, req: GenerateRequest) -> GenerateOutput:
        self.check_request(req)
        self._check_prompt(req)
        if self._closed:
            raise BackendError(self.name, "backend is closed")
        if req.request_id in self._by_id:
            raise ValueError(f"request_id {req.request_id!r} is already in flight")
        loop = asyncio.get_running_loop()
        seed = req.sampling.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._rng))
        seq = _Seq(req, loop.create_future(), torch.Generator().manual_seed(seed), time.perf_counter())
        self._pending.append(seq)
        self._by_id[req.request_id] = seq
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())
        self._wake.set()
        try:
            return await seq.future
        except asyncio.CancelledError:
            seq.aborted = True
            raise
        finally:
            self._by_id.pop(req.request_id, None)

    def _admit(self) -> list[_Seq]:
        room, budget, taken = self.max_batch - len(self._rows), self.max_prefill_tokens, []
        while self._pending and len(taken) < room:
            n = len(self._pending[0].req.prompt_ids)
            if taken and n > budget:
                break
            budget -= n
            taken.append(self._pending.pop(0))
        return taken

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            if not self._pending and not self._rows:
                self._wake.clear()
                await self._wake.wait()
                continue
            newcomers = self._admit()
            try:
                finished = await loop.run_in_executor(self._pool, self._step, newcomers)
            except Exception as exc:  # a failed step fails every request it held
                involved = newcomers + self._rows
                await loop.run_in_executor(self._pool, self._reset)
                for s in involved:
                    if not s.future.done():
                        s.future.set_exception(BackendError(self.name, f"step failed: {exc!r}"))
                continue
            for s in finished:
                self._resolve(s)

    def _resolve(self, s: _Seq) -> None:
        if s.future.done():
            return
        now = time.perf_counter()
        start = s.t_start or now
        s.future.set_result(GenerateOutput(
            request_id=s.req.request_id, token_ids=list(s.tokens),
            logprobs=list(s.logprobs) if s.req.sampling.logprobs else [],
            finish_reason=s.finish or "abort", version=self.version, server=self.name,
            queue_s=start - s.t_submit, gen_s=now - start, version_start=s.version_start if s.t_start else self.version))

    async def abort(self, request_id: str) -> None:
        seq = self._by_id.get(request_id)
        if seq is None:
            return
        seq.aborted = True
        if seq in self._pending:
            self._pending.remove(seq)
            seq.finish = "abort"
            self._resolve(seq)

    async def update_weights(self, weights: Weights, version: int) -> None:
        check_version(self, version)
        if self._closed:
            raise BackendError(self.name, "backend is closed")
        await asyncio.get_running_loop().run_in_executor(self._pool, self._load, weights)
        self.version = version

    async def health(self) -> bool:
        return not self._closed and (self._task is None or not self._task.done())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in self._pending + self._rows:
            s.finish = s.finish or "abort"
            self._resolve(s)
        self._pending.clear()
        if self._task is not None:
            self._wake.set()
            try:
                await self._task
            except Exception:  # the loop's own failure was already reported to its requests
                pass
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------ worker side
    def _reset(self) -> None:
        self._rows, self._layers, self._cache = [], [], None
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)

    def _load(self, weights: Weights) -> None:
        self._prefixes.clear()  # KV of the old weights
        if isinstance(weights, (str, Path)):
            weights = _read_checkpoint(type(self.model), Path(weights))
        if not isinstance(weights, dict):
            raise TypeError(f"weights must be a state dict or a checkpoint dir, got {type(weights).__name__}")
        params = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        unknown = [k for k in weights if k not in params]
        if unknown:
            raise KeyError(f"update_weights: unknown parameter names {unknown[:5]} (of {len(unknown)})")
        with torch.no_grad():
            for k, t in weights.items():
                if params[k].shape != t.shape:
                    raise ValueError(f"update_weights: {k} has shape {tuple(t.shape)}, "
                                     f"model has {tuple(params[k].shape)}")
                params[k].copy_(t)

    @torch.inference_mode()
    def _step(self, newcomers: list[_Seq]) -> list[_Seq]:
        self.steps += 1
        done = [s for s in self._rows if s.aborted]
        if done:
            self._select([i for i, s in enumerate(self._rows) if not s.aborted])
        if self._rows:
            self.decode_rows += len(self._rows)
            self._emit(self._rows, self._decode())
        live = [s for s in newcomers if not s.aborted]
        done += [s for s in newcomers if s.aborted]
        now = time.perf_counter()
        for s in live:
            s.t_start, s.version_start = now, self.version
        replays = [s for s in live if s.req.forced_ids is not None]
        live = [s for s in live if s.req.forced_ids is None]
        if replays:
            self._replay(replays)
            done += replays
        if live:
            self._emit(live, self._prefill(live))
        for s in done:
            s.finish = s.finish or "abort"
        finished = [s for s in self._rows if s.finish]
        if finished:
            for i, s in enumerate(self._rows):
                if s.finish in ("stop", "length") and s.version_start == self.version:
                    self._keep(i, s)
            self._select([i for i, s in enumerate(self._rows) if not s.finish])
        return done + finished

    def _decode(self) -> torch.Tensor:
        rows = self._rows
        ids = torch.tensor([[s.tokens[-1]] for s in rows], device=self.device)                        # [B, 1]
        mask = torch.cat([self._mask, torch.ones(len(rows), 1, dtype=torch.long, device=self.device)], 1)  # [B, T+1]
        pos = torch.tensor([s.pos for s in rows], device=self.device).view(-1, 1)                      # [B, 1]
        if self.is_vl:
            pos = pos.view(1, -1, 1).expand(3, -1, 1)                                # [3, B, 1]
        if self._cache is None:  # the batch changed: a fresh cache over it (the next write grows it)
            self._cache = _cache_from(self._layers)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                         **{self._cache_kw: self._cache}, use_cache=True, logits_to_keep=1)
        self._layers, self._mask = _layers_of(self._cache), mask
        for s in rows:
            s.pos += 1
        return out.logits[:, -1, :]                                                   # [B, V]

    # -- prefix cache
    def _keep(self, i: int, s: _Seq) -> None:
        """Keep finished row i's KV: its prompt and every output token but the last (what it fed)."""
        n = int(self._mask[i].sum())
        tokens = s.req.prompt_ids.tolist() + s.tokens[:-1]
        if len(tokens) == n:  # always so with left padding; never keep a misaligned row
            self._store(tokens, s, [(k[i:i + 1, :, -n:], v[i:i + 1, :, -n:]) for k, v in self._layers])

    def _store(self, tokens: list[int], s: _Seq, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep the KV [1, H, n, D] of `tokens` (fed by s, so its images are s's)."""
        self._prefixes.store(tokens, s.keys() if self.is_vl else (), layers)

    def _lookup(self, s: _Seq) -> tuple[Prefix, int, int] | None:
        """The kept entry sharing the longest reusable prefix with s's prompt, that length and how
        many of s's images lie in it (engine/backends/prefix_cache.py), or None."""
        if not self._prefixes.entries:
            return None
        ids = np.asarray(s.req.prompt_ids, dtype=np.int64)
        return self._prefixes.lookup(ids, lambda m, e: self._image_cut(ids, m, s, e))

    @property
    def _prefix_size(self) -> int:
        return self._prefixes.size

    def _image_cut(self, ids: np.ndarray, m: int, s: _Seq, e: Prefix) -> tuple[int, int]:
        """Cut a shared prefix of m tokens back to before the first image that it splits or that
        is not the same image in s and in e; returns (tokens, images of s in them)."""
        if not self.is_vl or not s.req.images:
            return m, 0
        from spyglass.engine.chat import image_token_count
        at = np.flatnonzero(ids[:m] == self.image_token_id)  # positions of image tokens in the prefix
        acc, keys = 0, s.keys()
        for j, im in enumerate(s.req.images):
            if acc >= len(at):
                return m, j
            size = image_token_count(im, self.image_processor)
            if acc + size > len(at) or j >= len(e.image_keys) or e.image_keys[j] != keys[j]:
                return int(at[acc]), j  # up to this image's first token
            acc += size
        return m, len(s.req.images)

    # -- forwards
    def _pixels(self, images: list[Any]) -> dict[str, torch.Tensor]:
        """The processor's pixel_values (in the model's dtype) and image_grid_thw, on the model's device."""
        from spyglass.engine.chat import pixel_inputs
        out = pixel_inputs(self.image_processor, images)
        if "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].to(self.device, dtype=next(self.model.parameters()).dtype)
            out["image_grid_thw"] = out["image_grid_thw"].to(self.device)
        return out

    def _forward_on(self, s: _Seq, hit: tuple[Prefix, int, int], ids: list[int], keep: int
                    ) -> tuple[torch.Tensor, Any, int]:
        """Forward of ids[n:] on top of the first n tokens of the kept KV `e` of `hit` = (e, n,
        images of s in them) (only the other images go through the vision tower), with the positions
        a cold forward of `ids` gives. Returns the logits of the last `keep` positions [1, keep, V],
        the cache over all of `ids`, and the next position."""
        e, n, j = hit
        full = torch.tensor([ids], device=self.device)                                                  # [1, L]
        mask = torch.ones_like(full)                                                  # [1, L]
        kwargs: dict[str, Any] = {}
        if self.is_vl:
            from spyglass.engine.chat import image_grid
            grid = (torch.tensor([image_grid(im, self.image_processor) for im in s.req.images], device=self.device)
                    if s.req.images else None)                                        # [n_img, 3]
            mm = (full == self.image_token_id).int()
            base = getattr(self.model, "model", self.model)
            pos, deltas = base.get_rope_index(full, mm_token_type_ids=mm, attention_mask=mask, image_grid_thw=grid)
            pos, nxt = pos[:, :, n:], len(ids) + int(deltas[0])                       # [3, 1, L - n]
            kwargs = self._pixels(list(s.req.images[j:]))                              # the new images only
            kwargs["mm_token_type_ids"] = mm[:, n:]
        else:
            pos, nxt = torch.arange(n, len(ids), device=self.device).view(1, -1), len(ids)                # [1, L - n]
        out = self.model(input_ids=full[:, n:], attention_mask=mask, position_ids=pos,
                         **{self._cache_kw: _cache_from([(k[:, :, :n], v[:, :, :n]) for k, v in e.layers])},
                         use_cache=True, logits_to_keep=keep, **kwargs)
        self.prefix_hits += 1
        self.prefix_tokens_reused += n
        return out.logits, _cache_of(out), nxt

    def _forward_cold(self, seqs: list[_Seq], feed: list[list[int]], keep: int
                      ) -> tuple[torch.Tensor, Any, torch.Tensor, list[int]]:
        """Left-padded forward of `feed` (one id list per row, images from each row's request).
        Returns the logits of the last `keep` positions [b, keep, V], the cache, the mask [b, L]
        and each row's next position."""
        lens = [len(f) for f in feed]
        width = max(lens)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long, device=self.device)        # [b, L]
        mask = torch.zeros(len(seqs), width, dtype=torch.long, device=self.device)                      # [b, L]
        for i, f in enumerate(feed):
            ids[i, width - lens[i]:] = torch.tensor(f, device=self.device)
            mask[i, width - lens[i]:] = 1
        kwargs: dict[str, Any] = {}
        if self.is_vl:
            kwargs = self._pixels([im for s in seqs for im in s.req.images])
            mm = (ids == self.image_token_id).int() * mask                            # [b, L]
            base = getattr(self.model, "model", self.model)
            pos, deltas = base.get_rope_index(ids, mm_token_type_ids=mm, attention_mask=mask,
                                              image_grid_thw=kwargs.get("image_grid_thw"))
            kwargs["mm_token_type_ids"] = mm                                          # pos [3, b, L]
            nxt = [lens[i] + int(deltas[i]) for i in range(len(seqs))]
        else:
            pos = (mask.cumsum(-1) - 1).clamp_(min=0)                                 # [b, L]
            nxt = lens
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                         **{self._cache_kw: _cache_from([])}, use_cache=True, logits_to_keep=keep, **kwargs)
        return out.logits, _cache_of(out), mask, nxt

    def _on_kept(self, seqs: list[_Seq], feeds: list[list[int]], keeps: list[int]
                 ) -> tuple[dict[int, tuple[torch.Tensor, Any, int]], list[int]]:
        """Forward each row whose request extends a kept prefix (`_forward_on` of its feed, last
        `keep` logits): ({row: (logits, cache, next position)}, the rows with no kept prefix)."""
        hot, cold = {}, []
        for i, s in enumerate(seqs):
            hit = self._lookup(s)
            if hit is None:
                cold.append(i)
            else:
                hot[i] = self._forward_on(s, hit, feeds[i], keeps[i])
        return hot, cold

    def _prefill(self, seqs: list[_Seq]) -> torch.Tensor:
        """Prefill newcomers (on a kept prefix when one matches, else together, left-padded);
        they join the running batch. Returns their next-token logits [b, V] in input order."""
        rows: dict[int, torch.Tensor] = {}
        hot, cold = self._on_kept(seqs, [s.req.prompt_ids.tolist() for s in seqs], [1] * len(seqs))
        for i, (logits, cache, pos) in hot.items():
            seqs[i].pos, rows[i] = pos, logits[:, -1]
            ones = torch.ones(1, len(seqs[i].req.prompt_ids), dtype=torch.long, device=self.device)         # [1, L]
            self._merge([seqs[i]], _layers_of(cache), ones)
        if cold:
            logits, cache, mask, nxt = self._forward_cold([seqs[i] for i in cold],
                                                          [seqs[i].req.prompt_ids.tolist() for i in cold], 1)
            for r, i in enumerate(cold):
                seqs[i].pos, rows[i] = nxt[r], logits[r:r + 1, -1]
            self._merge([seqs[i] for i in cold], _layers_of(cache), mask)
        return torch.cat([rows[i] for i in range(len(seqs))])                        # [b, V]

    def _replay(self, seqs: list[_Seq]) -> None:
        """Teacher-force every row's forced ids (cut at max_tokens) in one forward over prompt +
        forced (on a kept prefix when one matches); fill tokens / logprobs / finish as decoding
        them one by one would, and keep the KV of what was fed for the next turn."""
        n = [min(len(s.req.forced_ids), s.req.sampling.max_tokens) for s in seqs]
        feed = [s.req.prompt_ids.tolist() + list(s.req.forced_ids[:k - 1]) for s, k in zip(seqs, n)]
        rows: dict[int, torch.Tensor] = {}
        hot, cold = self._on_kept(seqs, feed, n)
        for i, (logits, cache, _) in hot.items():
            rows[i] = logits[0]
            self._store(feed[i], seqs[i], _layers_of(cache))
        if cold:
            width = max(n[i] for i in cold)
            logits, cache, _, _ = self._forward_cold([seqs[i] for i in cold], [feed[i] for i in cold], width)
            layers = _layers_of(cache)
            for r, i in enumerate(cold):
                rows[i] = logits[r, width - n[i]:]
                m = len(feed[i])
                self._store(feed[i], seqs[i], [(k[r:r + 1, :, -m:], v[r:r + 1, :, -m:]) for k, v in layers])
        sp = [s.req.sampling for s, k in zip(seqs, n) for _ in range(k)]
        forced = torch.tensor([t for s, k in zip(seqs, n) for t in s.req.forced_ids[:k]])
        _, logps = sample_next(torch.cat([rows[i] for i in range(len(seqs))]),            # [sum n, V]
                               torch.tensor([p.temperature for p in sp], dtype=torch.float32),
                               torch.tensor([p.top_k for p in sp]),
                               torch.tensor([p.top_p for p in sp], dtype=torch.float32),
                               torch.zeros(len(sp)), forced, self.banned_ids)
        at = 0
        for s, k in zip(seqs, n):
            s.tokens, s.logprobs = forced[at:at + k].tolist(), logps[at:at + k].tolist()
            s.finish = "stop" if k == len(s.req.forced_ids) else "length"
            at += k

    def _merge(self, seqs: list[_Seq], layers: list[tuple[torch.Tensor, torch.Tensor]],
               mask: torch.Tensor) -> None:
        if not self._rows:
            self._rows, self._layers, self._mask, self._cache = list(seqs), layers, mask, None
            return
        width = max(self._mask.shape[1], mask.shape[1])
        self._cache = None
        self._layers = [(torch.cat([_left_pad(k0, width, 2), _left_pad(k1, width, 2)]),
                         torch.cat([_left_pad(v0, width, 2), _left_pad(v1, width, 2)]))
                        for (k0, v0), (k1, v1) in zip(self._layers, layers)]
        self._mask = torch.cat([_left_pad(self._mask, width, 1), _left_pad(mask, width, 1)])
        self._rows += seqs

    def _select(self, keep: list[int]) -> None:
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._reset()
            return
        idx = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, idx)                                        # [B', T]
        first = int(mask.any(0).nonzero()[0])           # leading columns padded in every row
        self._mask = mask[:, first:]
        self._cache = None
        self._layers = [(k.index_select(0, idx)[:, :, first:], v.index_select(0, idx)[:, :, first:])
                        for k, v in self._layers]

    def _emit(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        sp = [s.req.sampling for s in seqs]
        forced = [-1] * len(seqs)  # replay rows never decode (_replay)
        uniform = torch.stack([torch.rand((), generator=s.gen) for s in seqs])
        tokens, logps = sample_next(
            logits, torch.tensor([p.temperature for p in sp], dtype=torch.float32),
            torch.tensor([p.top_k for p in sp]), torch.tensor([p.top_p for p in sp], dtype=torch.float32),
            uniform, torch.tensor(forced), self.banned_ids)
        for s, p, t, lp in zip(seqs, sp, tokens.tolist(), logps.tolist()):
            s.tokens.append(t)
            s.logprobs.append(lp)
            n = len(s.tokens)
            if t in p.stop_token_ids or t in self.eos_ids:
                s.finish = "stop"
            elif n >= p.max_tokens or len(s.req.prompt_ids) + n >= self.max_model_len:
                s.finish = "length"


def _read_checkpoint(model_cls: type, path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a saved checkpoint dir, loaded with the model's own class so that
    on-disk key names (e.g. Qwen2-VL's legacy `model.embed_tokens`) are converted."""
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint dir not found: {path}")
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin in {path}")
    return model_cls.from_pretrained(path, dtype=torch.float32).state_dict()
