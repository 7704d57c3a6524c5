"""Generation backends, chosen by name: `make_backend(config)` or `backend_config(kind, **fields)`.

    kind           config class                         backend
    hf             hf.HFConfig                          hf.HFBackend (transformers, CPU, batched)
    simulated      simulated.SimulatedConfig            simulated.SimulatedBackend
    vllm           vllm.VLLMConfig                      vllm.VLLMBackend (in-process AsyncLLM)
    vllm-http      vllm.VLLMHTTPConfig                  vllm.VLLMHTTPBackend
    sglang         sglang.SGLangConfig                  sglang.SGLangBackend (HTTP /generate)
    sglang-engine  sglang.SGLangEngineConfig            sglang.SGLangEngineBackend
    openai         openai.OpenAIConfig                  openai.OpenAIBackend

Modules are imported only when their kind is used (vllm/sglang are optional).
"""
from __future__ import annotations

import importlib
from typing import Any

from spyglass.engine.backends.base import (Backend, BackendError, GenerateOutput, GenerateRequest,
                                           SamplingParams)

KINDS: dict[str, tuple[str, str, str]] = {
    "hf": ("hf", "HFConfig", "HFBackend"),
    "simulated": ("simulated", "SimulatedConfig", "SimulatedBackend"),
    "vllm": ("vllm", "VLLMConfig", "VLLMBackend"),
    "vllm-http": ("vllm", "VLLMHTTPConfig", "VLLMHTTPBackend"),
    "sglang": ("sglang", "SGLangConfig", "SGLangBackend"),
    "sglang-engine": ("sglang", "SGLangEngineConfig", "SGLangEngineBackend"),
    "openai": ("openai", "OpenAIConfig", "OpenAIBackend"),
}


def _lookup(kind: str) -> tuple[type, type]:
    if kind not in KINDS:
        from spyglass.engine.config import ConfigError  # noqa: PLC0415
        raise ConfigError(f"unknown backend kind {kind!r}; choose one of {sorted(KINDS)}")
    mod, cfg_name, backend_name = KINDS[kind]
    module = importlib.import_module(f"spyglass.engine.backends.{mod}")
    return getattr(module, cfg_name), getattr(module, backend_name)


def backend_config(kind: str, **fields: Any) -> Any:
    """The validated config dataclass of backend `kind`; an unknown field is a ConfigError
    naming it and the known ones."""
    import dataclasses  # noqa: PLC0415

    from spyglass.engine.config import ConfigError  # noqa: PLC0415
    cfg_cls, _ = _lookup(kind)
    known = {f.name for f in dataclasses.fields(cfg_cls) if f.init}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"backend_options: {unknown} are not options of backend {kind!r}; its options: {sorted(known)}")
    return cfg_cls(**fields)


def make_backend(cfg: Any) -> Backend:
    """Build the backend a config dataclass describes (its class attribute `kind` picks it)."""
    kind = getattr(cfg, "kind", None)
    if not isinstance(kind, str):
        raise TypeError(f"make_backend needs a backend config dataclass, got {type(cfg).__name__}")
    cfg_cls, backend_cls = _lookup(kind)
    if type(cfg) is not cfg_cls:
        raise TypeError(f"config for kind {kind!r} must be {cfg_cls.__name__}, got {type(cfg).__name__}")
    return backend_cls.from_config(cfg)


__all__ = ["Backend", "BackendError", "GenerateOutput", "GenerateRequest", "SamplingParams",
           "KINDS", "backend_config", "make_backend"]
