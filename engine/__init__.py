"""spyglass.engine: the asynchronous rollout engine, embeddable in your own RL loop.

The names below load lazily (importing spyglass.engine costs a few ms; torch and transformers
come in with the first name that needs them). Embedding it, e.g. under a TRL / slime / verl
trainer: a checkpoint, a backend, your tools as plain functions, finished groups out.

    import asyncio
    from spyglass.engine import (EngineConfig, ExecutorRunner, HFBackend, Prompt, ToolExecutor,
                                 load_model, make_engine, tool)

    @tool
    def add(a: int, b: int) -> str:
        '''Add two integers.

        Args:
            a: the first addend.
            b: the second addend.
        '''
        return str(a + b)

    m = load_model("tiny:qwen2_vl")        # a checkpoint dir, a cached hub id, or a tiny fixture
    codec, backend = m.codec(), HFBackend.from_model(m)
    runner = ExecutorRunner(ToolExecutor({add.name: add}))   # retries, timeouts, coalescing
    engine = make_engine(EngineConfig(n_samples=2, max_turns=3, max_tokens_per_turn=16),
                         [backend], codec, runner, [add.schema()])   # or Engine(...) directly

    async def main() -> None:
        async for group in engine.run([Prompt("q1", "What is 2 + 3?")]):  # as each group ends
            for t in group:
                ids, logprobs, mask = t.token_ids(), t.logprobs(), t.loss_mask()  # aligned
                print(t.id, t.status.value, len(ids), sum(mask), t.answer)
        await backend.close()

    asyncio.run(main())

`loss_mask(fatal=True)` is OpenSearch-VL's mask (also 0 from the fatal step on). Other
backends: `make_backend(backend_config("vllm-http", base_url=..., model=...))`; the bundled
environment and the CLI's assembly: `build_env(EnvConfig(...))`, `build_engine`.
Tools and rewards from your own modules by dotted path: engine/plugins.py. Your own environment
(`AgentEnv`: `async step(traj, parsed_turn) -> EnvStep(observation, images, done, reward)`)
steps every turn instead of the tools: `Engine(..., env=MyEnv())`, or `--agent_env pkg.mod:Class`.
Tests: `.venv/bin/python -m pytest -q tests/test_public_api.py`.
"""
from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (5 ms): mypy/pyright read it

# public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("Engine", "EngineConfig", "AgentEnv"), "scheduler"),
    **dict.fromkeys(("Trajectory", "Segment", "SegmentKind", "Status", "Prompt", "EnvStep", "ParsedTurn",
                     "ToolResult", "ToolError", "ErrorKind"), "trajectory"),
    **dict.fromkeys(("Tool", "tool", "ToolContext"), "tools.base"),
    "ToolExecutor": "tools.executor",
    **dict.fromkeys(("make_turn_parser", "ToolCallParser"), "toolcall"),
    **dict.fromkeys(("load_model", "LoadConfig", "LoadedModel"), "loader"),
    "HFCodec": "chat",
    **dict.fromkeys(("DataConfig", "load_dataset"), "data"),
    **dict.fromkeys(("EnvConfig", "build_env", "ExecutorRunner"), "env"),
    **dict.fromkeys(("RolloutConfig", "build_engine", "make_engine", "make_backends"), "rollout"),
    **dict.fromkeys(("backend_config", "make_backend"), "backends"),
    "HFBackend": "backends.hf",
    **dict.fromkeys(("load_object", "load_tools", "PluginError"), "plugins"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value  # the next lookup is a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from .backends import backend_config, make_backend
    from .backends.hf import HFBackend
    from .chat import HFCodec
    from .data import DataConfig, load_dataset
    from .env import EnvConfig, ExecutorRunner, build_env
    from .loader import LoadConfig, LoadedModel, load_model
    from .plugins import PluginError, load_object, load_tools
    from .rollout import RolloutConfig, build_engine, make_backends, make_engine
    from .scheduler import AgentEnv, Engine, EngineConfig
    from .toolcall import ToolCallParser, make_turn_parser
    from .tools.base import Tool, ToolContext, tool
    from .tools.executor import ToolExecutor
    from .trajectory import (EnvStep, ErrorKind, ParsedTurn, Prompt, Segment, SegmentKind, Status, ToolError,
                             ToolResult, Trajectory)
