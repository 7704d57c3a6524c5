"""Grouped fatal-aware advantage: Triton kernel (interpreter on CPU, compiled on CUDA) vs reference.

Run: .venv/bin/python -m pytest -q tests/test_kernels_advantage.py
"""
import os

import pytest
import torch

from spyglass.kernels.advantage import AdvantageConfig, grouped_advantage, grouped_advantage_reference

# Triton reads TRITON_INTERPRET when a kernel module is imported: set there, CUDA tensors would run
# interpreted too. So only a machine without CUDA sets it at import (tests/conftest.py does so
# first); CPU-tensor cases get it at call time (_dispatch wraps the kernel for them).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _interpret_cpu_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BLOCK = 8192  # big blocks, small grids: the interpreter costs ~0.6 ms per program


def _ragged(sizes: list[int], seed: int, device: str, dtype: torch.dtype = torch.float32):
    """Groups of the given sizes, members shuffled over the batch; returns rewards, ids, fatal, G."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((s,), g, dtype=torch.long) for g, s in enumerate(sizes)])
    perm = torch.randperm(ids.numel(), generator=gen)
    ids = ids[perm]
    # rewards with ties (0/1 accuracy) and continuous parts, like format x (accuracy + query)
    r = torch.where(torch.rand(ids.numel(), generator=gen) < 0.3, torch.zeros(ids.numel()),
                    torch.rand(ids.numel(), generator=gen))
    fatal = torch.rand(ids.numel(), generator=gen) < 0.3
    return r.to(dtype).to(device), ids.to(device), fatal.to(device), len(sizes)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("estimator", ["grpo", "rloo", "drgrpo"])
@pytest.mark.parametrize("std", ["population", "unbiased"])
def test_matches_reference_ragged(device: str, estimator: str, std: str) -> None:
    sizes = [1, 3, 7, 16] * 40 + [16] * 900 + [2, 5]  # N ~ 16K, ragged, singletons included
    r, ids, fatal, g = _ragged(sizes, seed=1, device=device)
    for clamp in (True, False):
        cfg = AdvantageConfig(estimator=estimator, std=std, fatal_clamp=clamp)
        got = grouped_advantage(r, ids, fatal, cfg, num_groups=g, block=BLOCK, impl="triton")
        ref = grouped_advantage_reference(r, ids, fatal, g, cfg)
        _close(got.advantages, ref.advantages)
        _close(got.group_mean, ref.group_mean)
        _close(got.group_std, ref.group_std)
        assert torch.equal(got.group_count.cpu(), ref.group_count.cpu())
        _close(got.clamped_fraction, ref.clamped_fraction)
        assert (float(got.clamped_fraction) > 0) == clamp


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float16, 1e-5)])
def test_dtypes_and_small_blocks(device: str, dtype: torch.dtype, tol: float) -> None:
    r, ids, fatal, g = _ragged([3, 7, 1, 16, 16, 5] * 30, seed=2, device=device, dtype=dtype)
    for block in (64, 1024):  # several programs: the last one finalises
        got = grouped_advantage(r, ids, fatal, num_groups=g, block=block, impl="triton")
        ref = grouped_advantage_reference(r, ids, fatal, g, AdvantageConfig())
        _close(got.advantages, ref.advantages, tol)
        _close(got.group_std, ref.group_std, tol)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_hand_computed_one_sided_clamp(impl: str) -> None:
    # group of 4: r = [0.8, 0.2, 0.0, 0.6], members 2 and 3 fatal. mean 0.4,
    # population std sqrt(0.1) = 0.316228, unbiased std sqrt(0.4/3) = 0.365148.
    r = torch.tensor([0.8, 0.2, 0.0, 0.6])
    ids = torch.tensor([7, 7, 7, 7])
    fatal = torch.tensor([False, False, True, True])

    def adv(**kw: object) -> list[float]:
        res = grouped_advantage(r, ids, fatal, AdvantageConfig(eps=0.0, **kw), impl=impl)
        return res.advantages.tolist()

    s = 0.1 ** 0.5
    # fatal member 2 (r~ = -1.2649) is clamped to 0; fatal member 3 (r~ > 0) keeps its advantage
    assert adv() == pytest.approx([0.4 / s, -0.2 / s, 0.0, 0.2 / s], abs=1e-5)
    assert adv(fatal_clamp=False) == pytest.approx([0.4 / s, -0.2 / s, -0.4 / s, 0.2 / s], abs=1e-5)
    su = (0.4 / 3) ** 0.5
    assert adv(std="unbiased") == pytest.approx([0.4 / su, -0.2 / su, 0.0, 0.2 / su], abs=1e-5)
    # RLOO: r_i - mean(others) = [0.8 - 0.8/3, 0.2 - 1.4/3, 0 - 1.6/3 -> clamped, 0.6 - 1.0/3]
    assert adv(estimator="rloo") == pytest.approx([0.8 - 0.8 / 3, 0.2 - 1.4 / 3, 0.0, 0.6 - 1.0 / 3], abs=1e-5)
    assert adv(estimator="drgrpo") == pytest.approx([0.4, -0.2, 0.0, 0.2], abs=1e-6)
    res = grouped_advantage(r, ids, fatal, impl=impl)
    assert float(res.clamped_fraction) == pytest.approx(0.25)
    assert res.group_ids.tolist() == [7]
    assert res.group_mean.tolist() == pytest.approx([0.4])
    assert res.group_std.tolist() == pytest.approx([s])
    # the paper's default delta: (r - mean) / (std + 1e-6)
    assert res.advantages[0].item() == pytest.approx(0.4 / (s + 1e-6), rel=1e-6)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_all_fatal_group_and_failed_members(impl: str) -> None:
    # every member fatal: only those above the group mean keep a (positive) advantage
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    fatal = torch.ones(4, dtype=torch.bool)
    res = grouped_advantage(r, torch.zeros(4, dtype=torch.long), fatal, AdvantageConfig(eps=0.0), impl=impl)
    assert res.advantages.tolist() == pytest.approx([1.0, 0.0, 0.0, 1.0])
    assert float(res.clamped_fraction) == pytest.approx(0.5)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("estimator", ["grpo", "rloo", "drgrpo"])
def test_singleton_zero_variance_and_empty_groups(impl: str, estimator: str) -> None:
    r = torch.tensor([0.7, 0.3, 0.3, 0.3, 0.5, 0.9])
    ids = torch.tensor([0, 2, 2, 2, 4, 4])  # group 0 singleton, 2 zero-variance, 1 and 3 empty
    fatal = torch.tensor([True, True, False, False, False, True])
    for std, eps in (("population", 1e-6), ("unbiased", 1e-6), ("population", 0.0)):
        cfg = AdvantageConfig(estimator=estimator, std=std, eps=eps)
        res = grouped_advantage(r, ids, fatal, cfg, num_groups=5, block=16, impl=impl)
        assert res.advantages[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
        assert res.group_count.tolist() == [1, 0, 3, 0, 2]
        assert res.group_mean[[1, 3]].tolist() == [0.0, 0.0]
        assert res.group_std[[0, 1, 2, 3]].tolist() == [0.0, 0.0, 0.0, 0.0]
        assert torch.isfinite(res.advantages).all()
        assert res.advantages[4] < 0 and res.advantages[5] > 0


@pytest.mark.parametrize("device", DEVICES)
def test_arbitrary_ids_match_dense(device: str) -> None:
    r, ids, fatal, g = _ragged([16] * 50 + [3, 1, 7], seed=3, device=device)
    raw = torch.tensor([-(10 ** 12), -5, 0, 3, 10 ** 15] + list(range(100, 100 + g - 5)), device=device)
    sparse = raw[ids]  # arbitrary int64 ids, negative and huge included
    a = grouped_advantage(r, sparse, fatal, impl="triton", block=BLOCK)
    b = grouped_advantage(r, ids, fatal, num_groups=g, impl="torch")
    _close(a.advantages, b.advantages)
    order = torch.argsort(raw)
    assert torch.equal(a.group_ids.cpu(), raw[order].cpu())
    _close(a.group_mean, b.group_mean[order])


def test_repeated_calls_restore_workspace() -> None:
    r, ids, fatal, g = _ragged([16] * 20 + [3], seed=4, device="cpu")
    first = grouped_advantage(r, ids, fatal, num_groups=g, block=64, impl="triton")
    small = grouped_advantage(r[:10], torch.zeros(10, dtype=torch.long), fatal[:10], num_groups=1, impl="triton")
    again = grouped_advantage(r, ids, fatal, num_groups=g, block=64, impl="triton")
    assert torch.equal(first.advantages, again.advantages)
    ref = grouped_advantage_reference(r[:10], torch.zeros(10, dtype=torch.long), fatal[:10], 1, AdvantageConfig())
    _close(small.advantages, ref.advantages)


def test_no_fatal_and_empty_batch() -> None:
    r, ids, _, g = _ragged([4, 4, 3], seed=5, device="cpu")
    got = grouped_advantage(r, ids, None, num_groups=g, impl="triton")
    ref = grouped_advantage_reference(r, ids, None, g, AdvantageConfig())
    _close(got.advantages, ref.advantages)
    assert float(got.clamped_fraction) == 0.0
    empty = grouped_advantage(torch.zeros(0), torch.zeros(0, dtype=torch.long), impl="triton")
    assert empty.advantages.shape == (0,) and empty.group_mean.shape == (0,)


def test_auto_uses_torch_on_cpu_and_triton_needs_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    r = torch.tensor([1.0, 0.0])
    ids = torch.tensor([0, 0])
    assert grouped_advantage(r, ids, impl="auto").advantages.tolist() == pytest.approx([1.0, -1.0], abs=1e-5)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        grouped_advantage(r, ids, impl="triton")


def test_bad_inputs_name_the_value() -> None:
    r = torch.rand(4)
    ids = torch.tensor([0, 1, 2, 5])
    with pytest.raises(ValueError, match="group id 5"):
        grouped_advantage(r, ids, num_groups=3)
    with pytest.raises(ValueError, match="group id -1"):
        grouped_advantage(r, torch.tensor([0, -1, 0, 0]), num_groups=3)
    with pytest.raises(ValueError, match=r"group_ids shape \(3,\)"):
        grouped_advantage(r, ids[:3])
    with pytest.raises(TypeError, match="float32"):
        grouped_advantage(r, ids.float())
    with pytest.raises(ValueError, match="'ppo'"):
        AdvantageConfig(estimator="ppo")
    with pytest.raises(ValueError, match="'sample'"):
        AdvantageConfig(std="sample")
    with pytest.raises(ValueError, match="-1.0"):
        AdvantageConfig(eps=-1.0)
    with pytest.raises(ValueError, match="'cuda-only'"):
        grouped_advantage(r, ids, impl="cuda-only")
    with pytest.raises(ValueError, match="block must be a power of two >= 16, got 100"):
        grouped_advantage(r, ids, block=100)
