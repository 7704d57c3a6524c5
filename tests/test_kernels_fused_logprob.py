"""Fused log-prob from hidden states: Triton forward + chunked backward, chunked torch path, vs reference.

Run: .venv/bin/python -m pytest -q tests/test_kernels_fused_logprob.py
"""
import os

import pytest
import torch

from spyglass.kernels.fused_logprob import IGNORE_INDEX, fused_logprob, logprob_reference

# Triton reads TRITON_INTERPRET when a kernel module is imported: set there, CUDA tensors would run
# interpreted too. So only a machine without CUDA sets it at import (tests/conftest.py does so
# first); CPU-tensor cases get it at call time (_dispatch wraps the kernel for them).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _interpret_cpu_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# per dtype: (logp tol, grad rtol, grad atol). bf16 grads are rounded once to bf16.
TOLS = {torch.float32: (1e-5, 1e-4, 1e-5), torch.bfloat16: (1e-4, 1.6e-2, 1e-3)}


def _inputs(t: int, h: int, v: int, dtype: torch.dtype, device: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=gen).to(dtype).to(device)
    weight = (torch.randn(v, h, generator=gen) / h ** 0.5 * 3).to(dtype).to(device)
    targets = torch.randint(0, v, (t,), generator=gen)
    targets[::5] = IGNORE_INDEX
    g = torch.randn(t, generator=gen).to(device)
    return hidden, weight, targets.to(device), g


def _grads(fn, hidden: torch.Tensor, weight: torch.Tensor, g: torch.Tensor):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    lp = fn(h, w)
    (lp * g).sum().backward()
    return lp.detach(), h.grad, w.grad


def _check(got, ref, dtype: torch.dtype) -> None:
    tol, grtol, gatol = TOLS[dtype]
    torch.testing.assert_close(got[0].cpu(), ref[0].cpu(), rtol=tol, atol=tol)
    for a, b in zip(got[1:], ref[1:]):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float().cpu(), b.float().cpu(), rtol=grtol, atol=gatol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,h,v,chunk", [(37, 24, 1000, 300), (1, 16, 17, None), (70, 40, 513, 128)])
def test_matches_reference(device: str, impl: str, dtype: torch.dtype, t: int, h: int, v: int, chunk) -> None:
    hidden, weight, targets, g = _inputs(t, h, v, dtype, device, seed=t + v)
    targets[0] = v - 1  # the last vocabulary column
    blocks = (64, 256, 32) if device == "cpu" else (32, 64, 32)
    got = _grads(lambda x, w: fused_logprob(x, w, targets, 0.7, chunk_size=chunk, blocks=blocks, impl=impl),
                 hidden, weight, g)
    ref = _grads(lambda x, w: logprob_reference(x, w, targets, 0.7), hidden, weight, g)
    _check(got, ref, dtype)
    assert torch.all(got[0][targets == IGNORE_INDEX] == 0)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen_vocabulary(impl: str, dtype: torch.dtype) -> None:
    # V = 151,936 (Qwen2/2.5/3); T and H tiny so the interpreter stays fast
    hidden, weight, targets, g = _inputs(5, 16, 151_936, dtype, "cpu", seed=0)
    targets[1] = 151_935
    got = _grads(lambda x, w: fused_logprob(x, w, targets, 1.0, blocks=(16, 16384, 16), impl=impl), hidden, weight, g)
    ref = _grads(lambda x, w: logprob_reference(x, w, targets, 1.0), hidden, weight, g)
    _check(got, ref, dtype)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_all_ignored_rows_give_zero(impl: str) -> None:
    hidden, weight, _, g = _inputs(9, 16, 100, torch.float32, "cpu", seed=1)
    targets = torch.full((9,), IGNORE_INDEX)
    lp, gh, gw = _grads(lambda x, w: fused_logprob(x, w, targets, impl=impl, blocks=(16, 128, 16)), hidden, weight, g)
    assert torch.count_nonzero(lp) == 0 and torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


def test_large_logits_are_stable_and_grads_only_where_asked() -> None:
    hidden, weight, targets, g = _inputs(8, 16, 300, torch.float32, "cpu", seed=2)
    hidden = hidden * 200  # logits in the thousands: the online logsumexp must not overflow
    lp = fused_logprob(hidden, weight, targets, 0.5, impl="triton", blocks=(16, 128, 16))
    torch.testing.assert_close(lp, logprob_reference(hidden, weight, targets, 0.5), rtol=1e-5, atol=1e-3)
    assert torch.isfinite(lp).all()
    h = hidden.clone().requires_grad_()
    fused_logprob(h, weight, targets, impl="triton", blocks=(16, 128, 16)).sum().backward()  # weight frozen
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_chunked_torch_path_never_builds_full_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    hidden, weight, targets, g = _inputs(16, 8, 1000, torch.float32, "cpu", seed=3)
    seen: list[int] = []
    orig = torch.Tensor.__matmul__

    def spy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = orig(a, b)
        seen.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    _grads(lambda x, w: fused_logprob(x, w, targets, chunk_size=128, impl="torch"), hidden, weight, g)
    assert seen and max(seen) <= max(16 * 128, 128 * 8)  # never [T, V] = 16,000 elements


def test_bad_inputs_name_the_value() -> None:
    hidden, weight, targets, _ = _inputs(4, 16, 50, torch.float32, "cpu", seed=4)
    with pytest.raises(ValueError, match="target id 50 is outside 0..49"):
        fused_logprob(hidden, weight, torch.tensor([0, 1, 50, -100]))
    with pytest.raises(ValueError, match=r"\(4, 16\) and \(50, 8\)"):
        fused_logprob(hidden, weight[:, :8], targets)
    with pytest.raises(TypeError, match="torch.float32 and torch.bfloat16"):
        fused_logprob(hidden, weight.bfloat16(), targets)
    with pytest.raises(ValueError, match="temperature .* got 0.0"):
        fused_logprob(hidden, weight, targets, 0.0)
    with pytest.raises(ValueError, match=r"\(64, 100, 16\)"):
        fused_logprob(hidden, weight, targets, blocks=(64, 100, 16))
    with pytest.raises(ValueError, match="chunk_size must be > 0, got 0"):
        fused_logprob(hidden, weight, targets, chunk_size=0)
