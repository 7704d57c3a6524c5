"""Shared plumbing for the Triton kernels: choosing Triton or torch, launching, workspaces.

Every public kernel function takes ``impl: str = "auto"``:

* ``"auto"``   -- the compiled Triton kernel when the inputs live on a CUDA device, otherwise the
  pure-torch path (the reference, or a chunked torch implementation where memory matters);
* ``"triton"`` -- always the Triton kernel. On CPU tensors this runs Triton's interpreter, which
  is only allowed when the environment has ``TRITON_INTERPRET=1`` (the kernel tests set it);
* ``"torch"``  -- always the torch path.

Triton 3.9 reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a function (module import
time). So that the kernels honour it regardless of import order, :func:`launch` wraps a compiled
``JITFunction`` in Triton's ``InterpretedFunction`` whenever its tensors are on the CPU and the
variable is set at call time. Kernels therefore must not call other ``@triton.jit`` helpers
(the wrapped body would hit the compiled helper); they are written flat.

Workspaces: the single-launch kernels accumulate into a small per-device buffer with atomics,
and the last program to finish (an atomic ticket) finalises the result and restores the
buffer to its initial state, so no memset launch is needed per call. The buffer is shared by
every call on the device, so two such kernels must not run concurrently on different streams
of the same device (the trainer uses one stream).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch

try:  # triton is a hard dependency of the package, but keep torch paths usable without it
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None  # type: ignore[assignment]
    InterpretedFunction = None  # type: ignore[assignment,misc]
    HAS_TRITON = False

IMPLS = ("auto", "triton", "torch")
_INTERPRETED: dict[int, Any] = {}
_WORKSPACES: dict[tuple[str, str], torch.Tensor] = {}


def interpret_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` is set to a true value right now."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def resolve_impl(impl: str, *tensors: torch.Tensor) -> str:
    """Map ``impl`` ("auto" | "triton" | "torch") to "triton" or "torch" for these tensors."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "torch":
        return "torch"
    if impl == "auto":
        return "triton" if (on_cuda and HAS_TRITON) else "torch"
    if not HAS_TRITON:
        raise RuntimeError("impl='triton' requested but triton is not installed")
    if not on_cuda and not interpret_enabled():
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"impl='triton' on device(s) {devices} needs CUDA tensors or TRITON_INTERPRET=1 "
            "(Triton's CPU interpreter)"
        )
    return "triton"


def interpreting(t: torch.Tensor) -> bool:
    """True when a kernel launched on ``t`` will run in Triton's interpreter (CPU tensor)."""
    return not t.is_cuda


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """Launch ``kernel[grid](*args, **kwargs)``, through the interpreter for CPU tensors."""
    on_cpu = any(isinstance(a, torch.Tensor) and not a.is_cuda for a in args)
    if on_cpu and not isinstance(kernel, InterpretedFunction):
        if not interpret_enabled():
            raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1")
        key = id(kernel)
        if key not in _INTERPRETED:
            _INTERPRETED[key] = InterpretedFunction(kernel.fn)
        kernel = _INTERPRETED[key]
    kernel[grid](*args, **kwargs)


def workspace(name: str, device: torch.device, numel: int, init: Callable[[int, torch.device], torch.Tensor]) -> torch.Tensor:
    """A cached per-device buffer of at least ``numel`` elements made by ``init(numel, device)``.

    Kernels that use it must leave it exactly as ``init`` made it (the last program restores it).
    """
    key = (name, str(device))
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        buf = init(max(numel, 2 * buf.numel() if buf is not None else numel), device)
        _WORKSPACES[key] = buf
    return buf


def drop_workspace(name: str, device: torch.device) -> None:
    """Forget a workspace (after a failed launch it may not have been restored)."""
    _WORKSPACES.pop((name, str(device)), None)


def ticket(device: torch.device) -> torch.Tensor:
    """A one-element int32 counter (zero between launches) for the last-program-finalises pattern."""
    return workspace("ticket", device, 1, lambda n, d: torch.zeros(n, dtype=torch.int32, device=d))


def launch_with_workspaces(names: tuple[str, ...], device: torch.device, kernel: Any,
                           grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """Launch a kernel that restores the named workspaces; drop them if the launch fails."""
    try:
        launch(kernel, grid, *args, **kwargs)
    except BaseException:
        for name in names + ("ticket",):
            drop_workspace(name, device)
        raise


def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)
