"""Distributed training plumbing: DeepSpeed ZeRO-2/3 or a plain single process; weight sync.

Strategies (`DistConfig.strategy`):

* ``plain``  -- one process, torch.optim.AdamW + clip_grad_norm_, no DeepSpeed; the default
  ("auto") when the launcher says WORLD_SIZE is 1 (or nothing).
* ``zero2`` / ``zero3`` -- `deepspeed.initialize` with a config built from `UpdateConfig`
  (`build_ds_config`): torch AdamW (or DeepSpeedCPUAdam with optimizer offload), gradient
  clipping, caller-owned gradient accumulation (`managed_gradient_accumulation: false`: the
  updater calls backward once per micro-batch and `step()` once per mini-batch). "auto" picks
  zero2 when WORLD_SIZE > 1. The process group comes from `init_distributed` (DeepSpeed's,
  gloo on CPU, nccl on GPU) reading the standard env vars (RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT), so torchrun, the deepspeed launcher and multi-node runs all work.

Run two ranks on CPU:  `torchrun --nproc_per_node=2 your_script.py` (see tests/test_distributed.py).

Weight sync: servers that can join a weight-update group take bucketed broadcasts from rank 0
(trainer/weight_sync.py, which streams ZeRO-3 parameters gathered bucket by bucket). The
fallback here, `sync_weights`: rank 0 gathers full weights (`full_state_dict`: under ZeRO-3 each
module's parameters are gathered with `GatheredParameters`, a collective every rank joins; also
what exports and checkpoints use), then passes the state dict in-process to backends that take
one (HFBackend, in-process vLLM/SGLang) and a saved HF checkpoint dir to HTTP backends
(vLLM/SGLang servers reload from disk). `broadcast_state_dict` sends a state dict from one rank
to the others of the default process group (bucketed per dtype; NCCL on GPU, gloo on CPU).
Colocated mode: `sleep_backends` / `wake_backends` call a backend's `sleep()` / `wake_up()`
when it has them (the in-process VLLMBackend does, through vLLM's sleep mode; for HF, which
has none, this is a no-op).
"""
from __future__ import annotations

import atexit
import inspect
import math
import os
import shutil
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

import torch
import torch.distributed as tdist
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from spyglass.trainer.update import UpdateConfig

STRATEGIES = ("auto", "plain", "zero2", "zero3")


@dataclass
class DistConfig:
    """How to train across processes (see the module docstring)."""

    strategy: str = field(default="auto", metadata={"choices": STRATEGIES})  # plain (one process) | zero2 | zero3;
    #   auto: zero2 when WORLD_SIZE > 1, else plain
    backend: str = field(default="auto", metadata={"choices": ("auto", "gloo", "nccl")})  # torch.distributed
    #   backend; auto: nccl with CUDA, else gloo
    offload_optimizer: bool = False  # ZeRO: optimizer states on CPU (DeepSpeedCPUAdam, compiled on first use)
    offload_params: bool = False  # ZeRO-3: parameters on CPU
    bf16: bool = False  # ZeRO: bf16 compute with fp32 master weights (on anyway for a model loaded in bf16)
    timeout_s: int = 1800  # process-group timeout for collectives, seconds (ZeRO strategies)
    ds_overrides: dict[str, Any] = field(default_factory=dict)  # merged into zero_optimization

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"backend must be 'auto', 'gloo' or 'nccl', got {self.backend!r}")
        if self.offload_params and self.strategy not in ("zero3", "auto"):
            raise ValueError(f"offload_params needs strategy 'zero3', got {self.strategy!r}")
        if self.strategy == "plain" and (self.offload_optimizer or self.bf16):
            raise ValueError("offload_optimizer / bf16 need a ZeRO strategy, got strategy 'plain'")
        if not isinstance(self.timeout_s, int) or self.timeout_s < 1:
            raise ValueError(f"timeout_s must be an int >= 1, got {self.timeout_s!r}")

    def resolved(self) -> str:
        """The strategy after "auto": zero2 when WORLD_SIZE > 1, else plain."""
        if self.strategy != "auto":
            return self.strategy
        return "zero2" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "plain"


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def free_port(host: str = "") -> int:
    """A TCP port free on `host` ("": every interface, what a TCPStore listens on)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _destroy_group() -> None:
    """Destroy the default process group at exit (its communicator threads stop before the
    interpreter's teardown; a group left alive can end a finished rank in std::terminate)."""
    if tdist.is_initialized():
        tdist.destroy_process_group()


def init_distributed(cfg: Optional[DistConfig] = None) -> DistInfo:
    """Join (or create) the default process group for ZeRO; a no-op for the plain strategy.

    A single process with no launcher env vars gets a 1-rank group on loopback."""
    cfg = cfg or DistConfig()
    use_cuda = torch.cuda.is_available()
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise ValueError("backend 'nccl' needs CUDA; use 'gloo' on CPU")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    if use_cuda and backend == "nccl":
        torch.cuda.set_device(device)
    if cfg.resolved() == "plain":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(f"strategy 'plain' is single-process, but WORLD_SIZE={os.environ['WORLD_SIZE']}")
        return DistInfo(0, 1, 0, device)
    if not tdist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port()))
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=timedelta(seconds=cfg.timeout_s))
        atexit.register(_destroy_group)  # torch's advice: a group left to interpreter teardown can abort
    return DistInfo(tdist.get_rank(), tdist.get_world_size(), local, device)


def build_ds_config(ucfg: "UpdateConfig", cfg: DistConfig, param_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The DeepSpeed config for `ucfg` under ZeRO stage 2 or 3; a model whose parameters are bf16
    (a checkpoint loaded in bf16 on a GPU) trains with DeepSpeed's bf16 mixed precision (fp32
    master weights and optimizer states), as `bf16` asks for any model."""
    stage = {"zero2": 2, "zero3": 3}.get(cfg.resolved())
    if stage is None:
        raise ValueError(f"build_ds_config needs a ZeRO strategy, got {cfg.resolved()!r}")
    opt = {"lr": ucfg.lr, "betas": list(ucfg.betas), "eps": ucfg.eps, "weight_decay": ucfg.weight_decay}
    if not cfg.offload_optimizer:
        opt["torch_adam"] = True  # torch.optim.AdamW: no compiled ops needed
    zero: dict[str, Any] = {"stage": stage, "contiguous_gradients": True, "overlap_comm": False}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    zero.update(cfg.ds_overrides)
    return {
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False, "gradient_clipping": float(ucfg.grad_clip),
        "optimizer": {"type": "AdamW", "params": opt}, "zero_optimization": zero,
        "bf16": {"enabled": cfg.bf16 or param_dtype == torch.bfloat16}, "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False,
    }


# ------------------------------------------------------------------------------ runtimes
class PlainRuntime:
    """Single process: AdamW, clip_grad_norm_, the step skipped on a non-finite norm. A model
    loaded in bf16/fp16 trains in mixed precision: fp32 master weights (the module is upcast),
    forwards under autocast to the loaded dtype."""

    stage = 0

    def __init__(self, module: nn.Module, ucfg: "UpdateConfig", device: torch.device) -> None:
        low = next(module.parameters()).dtype
        self.autocast = low if low in (torch.bfloat16, torch.float16) else None
        if self.autocast is not None:
            module.float()  # fp32 master weights; the optimizer steps them
        self.module, self.device, self.rank, self.world_size = module.to(device), device, 0, 1
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=ucfg.lr, betas=ucfg.betas, eps=ucfg.eps,
                                           weight_decay=ucfg.weight_decay)
        self.max_norm = ucfg.grad_clip if ucfg.grad_clip > 0 else math.inf

    def forward(self, **kw: Any) -> Any:
        if self.autocast is None:
            return self.module(**kw)
        with torch.autocast(self.device.type, dtype=self.autocast):
            return self.module(**kw)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def grads_finite(self) -> bool:
        grads = [p.grad for p in self.params if p.grad is not None]
        return not grads or bool(torch.stack(torch._foreach_norm(grads)).isfinite().all())

    def step(self) -> float:
        for p in self.params:  # as ZeRO does: a parameter the batch did not reach steps with grad 0
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_norm))
        if math.isfinite(norm):
            self.optimizer.step()
        self.zero_grad()
        return norm

    def all_reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        return t

    def any_flag(self, flag: bool) -> bool:
        return flag

    def barrier(self) -> None:
        pass


class DeepSpeedRuntime:
    """A DeepSpeed engine (ZeRO-2/3) over the process group from `init_distributed`."""

    def __init__(self, module: nn.Module, ucfg: "UpdateConfig", cfg: DistConfig, info: DistInfo) -> None:
        import deepspeed

        self.info, self.rank, self.world_size, self.device = info, info.rank, info.world_size, info.device
        self.ds_config = build_ds_config(ucfg, cfg, next(module.parameters()).dtype)
        self.stage = self.ds_config["zero_optimization"]["stage"]
        module = module.to(info.device)
        if self.stage == 3:  # the fused log-prob reads lm_head.weight outside lm_head.forward
            deepspeed.zero.register_external_parameter(module, module.model.get_output_embeddings().weight)
        params = [p for p in module.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, model_parameters=params,
                                                                 config=self.ds_config)
        self.module = self.engine.module

    def forward(self, **kw: Any) -> Any:
        return self.engine(**kw)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def zero_grad(self) -> None:
        pass  # the engine clears gradients after each step

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:  # no DeepSpeed scheduler is configured: this is the lr
            g["lr"] = lr

    def grads_finite(self) -> bool:
        return True  # partitioned: checked through the global norm at step() (overflow -> skipped)

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            raise RuntimeError("DeepSpeed computed no gradient norm (zero_optimization.compute_grad_norm "
                               "is off); spyglass needs it to detect non-finite gradients")
        return float(norm)

    def all_reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        x = t.to(self.device)
        tdist.all_reduce(x, op=tdist.ReduceOp.SUM if op == "sum" else tdist.ReduceOp.MAX)
        return x.cpu()

    def any_flag(self, flag: bool) -> bool:
        return bool(self.all_reduce(torch.tensor([float(flag)]), "max")[0] > 0)

    def barrier(self) -> None:
        tdist.barrier()


def make_runtime(module: nn.Module, ucfg: "UpdateConfig", cfg: Optional[DistConfig]) -> Any:
    """PlainRuntime or DeepSpeedRuntime for `module` per `cfg` (None: plain on CPU/cuda:0)."""
    cfg = cfg or DistConfig(strategy="plain")
    info = init_distributed(cfg)
    if cfg.resolved() == "plain":
        return PlainRuntime(module, ucfg, info.device)
    return DeepSpeedRuntime(module, ucfg, cfg, info)


# ------------------------------------------------------------------------------ weights out
def _runtime_of(obj: Any) -> Any:
    return getattr(obj, "runtime", obj)


def full_state_dict(updater: Any, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """The trained HF model's full state dict on CPU (keys as `model.state_dict()`).

    Under ZeRO-3 every rank must call this (parameters are gathered module by module); with
    `rank0_only` the other ranks get {}. `updater`: a PolicyUpdater or a runtime."""
    rt = _runtime_of(updater)
    model = rt.module.model
    keep = not rank0_only or rt.rank == 0
    if rt.stage != 3:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if keep else {}
    import deepspeed

    out: dict[str, torch.Tensor] = {}
    for prefix, mod in model.named_modules():
        params = list(mod.parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if keep:
                for name, p in mod.named_parameters(recurse=False):
                    out[f"{prefix}.{name}" if prefix else name] = p.detach().cpu().clone()
    if keep:
        persistent = set(model.state_dict().keys())
        for name, b in model.named_buffers():
            if name in persistent:
                out[name] = b.detach().cpu().clone()
    return out


def broadcast_state_dict(state_dict: Optional[dict[str, torch.Tensor]], src: int = 0, group: Any = None,
                         device: Optional[torch.device] = None,
                         bucket_bytes: int = 256 << 20) -> dict[str, torch.Tensor]:
    """Send `state_dict` from rank `src` to every rank of `group`; returns it on every rank (CPU).

    Names/shapes/dtypes go first (one object broadcast), then tensors flattened into buckets of
    at most `bucket_bytes` per dtype. `device`: where the buckets travel (NCCL needs CUDA;
    default: cuda when the group's backend is nccl, else cpu)."""
    if not tdist.is_initialized():
        raise RuntimeError("broadcast_state_dict needs an initialised process group (init_distributed)")
    rank = tdist.get_rank()
    if rank == src and not isinstance(state_dict, dict):
        raise TypeError(f"rank {src} must pass a state dict, got {type(state_dict).__name__}")
    if device is None:
        nccl = tdist.get_backend(group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    meta = [[(k, tuple(v.shape), v.dtype) for k, v in state_dict.items()] if rank == src else None]
    tdist.broadcast_object_list(meta, src=src, group=group)
    out: dict[str, torch.Tensor] = {}
    for dtype in sorted({d for _, _, d in meta[0]}, key=str):
        items = [(k, shape) for k, shape, d in meta[0] if d == dtype]
        bucket: list[tuple[str, tuple[int, ...]]] = []
        size = 0
        for k, shape in items + [("", ())]:  # sentinel flushes the last bucket
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if bucket and (not k or size + n > bucket_bytes):
                _broadcast_bucket(bucket, dtype, state_dict, out, src, group, device)
                bucket, size = [], 0
            if k:
                bucket.append((k, shape))
                size += n
    return out


def _broadcast_bucket(bucket: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                      sd: Optional[dict[str, torch.Tensor]], out: dict[str, torch.Tensor], src: int,
                      group: Any, device: torch.device) -> None:
    numels = [math.prod(s) for _, s in bucket]
    if tdist.get_rank() == src:
        flat = torch.cat([sd[k].detach().reshape(-1).to(device, dtype) for k, _ in bucket])  # [sum numel]
    else:
        flat = torch.empty(sum(numels), dtype=dtype, device=device)
    tdist.broadcast(flat, src=src, group=group)
    for (k, shape), part in zip(bucket, flat.split(numels)):
        out[k] = part.view(shape).cpu().clone()


def export_hf(model: nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write `state_dict` as a HF checkpoint dir (config + safetensors) atomically; returns it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def _takes_path(backend: Any) -> bool:
    """Servers (vLLM / SGLang / OpenAI over HTTP) and in-process engines that say so
    (`takes_path`, the SGLang engine) reload a checkpoint dir; the others take the state dict."""
    from spyglass.engine.backends.openai import HTTPBackend

    return isinstance(backend, HTTPBackend) or bool(getattr(backend, "takes_path", False))


async def sync_weights(backends: Iterable[Any], state_dict: dict[str, torch.Tensor], version: int, *,
                       model: Optional[nn.Module] = None, export_dir: str | Path | None = None) -> Optional[Path]:
    """Push new weights to every backend and set their version (call on rank 0 only).

    In-process backends (HFBackend, the in-process vLLM engine) get the state dict; HTTP
    servers and the in-process SGLang engine get a HF checkpoint dir written once under
    `export_dir` (needs `model` for its config). Returns that dir, or None when no backend needed one."""
    path: Optional[Path] = None
    for be in backends:
        if _takes_path(be):
            if path is None:
                if model is None or export_dir is None:
                    raise ValueError(f"backend {be.name!r} reloads from a checkpoint dir: "
                                     "sync_weights needs model= and export_dir=")
                path = export_hf(model, state_dict, Path(export_dir) / f"v{version:08d}")
            await be.update_weights(str(path), version)
        else:
            await be.update_weights(state_dict, version)
    return path


async def _call_if_present(backends: Iterable[Any], names: tuple[str, ...]) -> list[str]:
    called = []
    for be in backends:
        fn = next((getattr(be, n) for n in names if callable(getattr(be, n, None))), None)
        if fn is None:
            continue
        res = fn()
        if inspect.isawaitable(res):
            await res
        called.append(getattr(be, "name", type(be).__name__))
    return called


async def sleep_backends(backends: Iterable[Any]) -> list[str]:
    """Colocated mode, before training: free the generation engines' memory through their
    `sleep()` when they have one; returns the names of the backends that slept (HF: none)."""
    return await _call_if_present(backends, ("sleep",))


async def wake_backends(backends: Iterable[Any]) -> list[str]:
    """Colocated mode, after training (before `sync_weights`): `wake_up()` / `wake()` if present."""
    return await _call_if_present(backends, ("wake_up", "wake"))

