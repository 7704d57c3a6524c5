"""Masked policy loss: fused Triton fwd/bwd (interpreter on CPU, compiled on CUDA) vs the reference.

Run: .venv/bin/python -m pytest -q tests/test_kernels_policy_loss.py
"""
import math
import os

import pytest
import torch

from spyglass.kernels.policy_loss import AGGREGATIONS, PolicyLossConfig, masked_policy_loss, policy_loss_reference

# Triton reads TRITON_INTERPRET when a kernel module is imported: set there, CUDA tensors would run
# interpreted too. So only a machine without CUDA sets it at import (tests/conftest.py does so
# first); CPU-tensor cases get it at call time (_dispatch wraps the kernel for them).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _interpret_cpu_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
METRICS = ("clip_fraction", "dual_clip_fraction", "approx_kl", "ref_kl", "ratio_min", "ratio_max", "num_tokens")


def _packed(lens: list[int], seed: int, device: str, spread: float = 0.4):
    gen = torch.Generator().manual_seed(seed)
    t = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)
    old = -torch.rand(t, generator=gen) * 4
    logp = old + torch.randn(t, generator=gen) * spread
    ref = old + torch.randn(t, generator=gen) * 0.3
    mask = torch.rand(t, generator=gen) < 0.8
    adv_tok = torch.randn(t, generator=gen)
    adv_seq = torch.randn(len(lens), generator=gen)
    return [x.to(device) for x in (logp, old, ref, mask, cu, adv_tok, adv_seq)]


def _run(impl: str, logp0: torch.Tensor, *args: object, block: int = 2048, **kw: object):
    lp = logp0.detach().clone().requires_grad_()
    res = masked_policy_loss(lp, *args, impl=impl, block=block, **kw)  # type: ignore[arg-type]
    (res.loss * 1.5).backward()  # non-unit upstream gradient
    return res, lp.grad


def _compare(a, ga, b, gb, tol: float, gtol: float) -> None:
    torch.testing.assert_close(a.loss.detach().float().cpu(), b.loss.detach().float().cpu(), rtol=tol, atol=tol)
    torch.testing.assert_close(ga.float().cpu(), gb.float().cpu(), rtol=gtol, atol=1e-6)
    for k in METRICS:
        torch.testing.assert_close(getattr(a, k).float().cpu(), getattr(b, k).float().cpu(), rtol=tol, atol=tol,
                                   msg=lambda m, k=k: f"{k}: {m}")


LENS = [5, 0, 301, 1, 1000, 77, 2, 640]  # T = 2026, not a multiple of the block; an empty sequence


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("per_seq", [False, True])
def test_matches_reference_all_aggregations(device: str, agg: str, per_seq: bool) -> None:
    logp, old, ref, mask, cu, adv_tok, adv_seq = _packed(LENS, seed=0, device=device, spread=0.6)
    mask[cu[5]:cu[6]] = False  # an all-masked sequence
    adv = adv_seq if per_seq else adv_tok
    for dual, kl in ((None, 0.0), (3.0, 0.05)):
        cfg = PolicyLossConfig(agg=agg, dual_clip=dual, kl_coef=kl, norm_length=1024)
        a, ga = _run("triton", logp, old, adv, mask, cu, ref, cfg)
        b, gb = _run("torch", logp, old, adv, mask, cu, ref, cfg)
        _compare(a, ga, b, gb, tol=1e-5, gtol=1e-6)
        assert 0.0 < float(a.clip_fraction) < 1.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol,gtol", [(torch.float32, 1e-5, 1e-6), (torch.bfloat16, 1e-4, 8e-3)])  # bf16 grads: one rounding
def test_dtypes_split_programs_and_extreme_ratios(device: str, dtype: torch.dtype, tol: float, gtol: float) -> None:
    # one long sequence split over several programs; log-ratios up to +-30 hit the clamp (C = 20)
    logp, old, ref, mask, cu, adv_tok, _ = _packed([3001, 17], seed=1, device=device, spread=4.0)
    logp[:5] = old[:5] + torch.tensor([30.0, -30.0, 25.0, 1.5, -2.0], device=device)
    logp, old, ref = logp.to(dtype), old.to(dtype), ref.to(dtype)
    cfg = PolicyLossConfig(dual_clip=3.0, kl_coef=0.1, agg="seq-mean-token-mean")
    a, ga = _run("triton", logp, old, adv_tok, mask, cu, ref, cfg, block=512)
    b, gb = _run("torch", logp, old, adv_tok, mask, cu, ref, cfg)
    assert ga.dtype == dtype
    _compare(a, ga, b, gb, tol=tol, gtol=gtol)
    assert float(a.dual_clip_fraction) > 0
    assert float(a.ratio_max) == pytest.approx(math.exp(20.0), rel=1e-5)
    assert torch.isfinite(ga.float()).all()


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_everything_masked_gives_zero(impl: str, agg: str) -> None:
    logp, old, ref, mask, cu, adv_tok, _ = _packed([7, 9], seed=2, device="cpu")
    res, g = _run(impl, logp, old, adv_tok, torch.zeros_like(mask), cu, ref,
                  PolicyLossConfig(agg=agg, norm_length=16, kl_coef=0.1))
    assert res.loss.item() == 0.0 and torch.count_nonzero(g) == 0
    assert float(res.num_tokens) == 0.0 and float(res.clip_fraction) == 0.0
    assert float(res.ratio_min) == 1.0 and float(res.ratio_max) == 1.0


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_hand_computed_tokens(impl: str) -> None:
    # two sequences [2 tokens | 1 token]; ratios e^0.5, e^-0.5, e^0.1; advantages per sequence +1, -1
    old = torch.zeros(3)
    logp = torch.tensor([0.5, -0.5, 0.1])
    cu = torch.tensor([0, 2, 3])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(3, dtype=torch.bool)
    r = [math.exp(0.5), math.exp(-0.5), math.exp(0.1)]
    # A=+1: token0 clipped at 1.28 -> -1.28 (no grad); token1 ratio 0.607 < 0.8: max(-0.607, -0.8) = -0.607
    # A=-1: token2 ratio 1.105 in range -> +1.105
    pg = [-1.28, -r[1], r[2]]
    res, g = _run(impl, logp, old, adv, mask, cu, None, PolicyLossConfig())
    assert res.loss.item() == pytest.approx(sum(pg) / 3, rel=1e-6)
    assert g.tolist() == pytest.approx([0.0, -r[1] / 3 * 1.5, r[2] / 3 * 1.5], rel=1e-6)
    assert float(res.clip_fraction) == pytest.approx(1 / 3)
    res, _ = _run(impl, logp, old, adv, mask, cu, None, PolicyLossConfig(agg="seq-mean-token-mean"))
    assert res.loss.item() == pytest.approx(((pg[0] + pg[1]) / 2 + pg[2]) / 2, rel=1e-6)
    res, _ = _run(impl, logp, old, adv, mask, cu, None, PolicyLossConfig(agg="seq-mean-token-sum"))
    assert res.loss.item() == pytest.approx((pg[0] + pg[1] + pg[2]) / 2, rel=1e-6)
    res, _ = _run(impl, logp, old, adv, mask, cu, None, PolicyLossConfig(agg="seq-mean-token-sum-norm", norm_length=10))
    assert res.loss.item() == pytest.approx(sum(pg) / (2 * 10), rel=1e-6)
    # dual clip: A = -1 and ratio e^2 = 7.39 > c = 3 -> loss capped at 3, no gradient
    res, g = _run(impl, torch.tensor([2.0]), torch.zeros(1), torch.tensor([-1.0]), torch.ones(1), torch.tensor([0, 1]),
                  None, PolicyLossConfig(dual_clip=3.0))
    assert res.loss.item() == pytest.approx(3.0) and g.tolist() == [0.0]
    assert float(res.dual_clip_fraction) == 1.0
    # k3 KL to the reference: x = ref - logp = -0.5 -> e^-0.5 + 0.5 - 1
    res, g = _run(impl, torch.tensor([0.0]), torch.zeros(1), torch.tensor([0.0]), torch.ones(1), torch.tensor([0, 1]),
                  torch.tensor([-0.5]), PolicyLossConfig(kl_coef=0.5))
    k3 = math.exp(-0.5) + 0.5 - 1
    assert res.loss.item() == pytest.approx(0.5 * k3, rel=1e-6)
    assert float(res.ref_kl) == pytest.approx(k3, rel=1e-6)
    assert g.tolist() == pytest.approx([1.5 * 0.5 * (1 - math.exp(-0.5))], rel=1e-6)


def test_float_mask_and_no_grad_inputs() -> None:
    logp, old, ref, mask, cu, adv_tok, _ = _packed([40, 3, 21], seed=3, device="cpu")
    fmask = mask.float() * 0.5
    cfg = PolicyLossConfig(agg="seq-mean-token-mean")
    a, ga = _run("triton", logp, old, adv_tok, fmask, cu, ref, cfg)
    b, gb = _run("torch", logp, old, adv_tok, fmask, cu, ref, cfg)
    _compare(a, ga, b, gb, tol=1e-5, gtol=1e-6)
    with torch.no_grad():  # metrics-only evaluation: no gradient buffer is written
        c = masked_policy_loss(logp, old, adv_tok, mask, cu, impl="triton", block=2048)
        d = masked_policy_loss(logp, old, adv_tok, mask, cu, impl="torch")
    assert float(c.loss) == pytest.approx(float(d.loss), rel=1e-5)


def test_bad_inputs_name_the_value() -> None:
    logp, old, ref, mask, cu, adv_tok, _ = _packed([4, 4], seed=4, device="cpu")
    with pytest.raises(ValueError, match="end at T=8, got 0..7"):
        masked_policy_loss(logp, old, adv_tok, mask, torch.tensor([0, 4, 7]))
    with pytest.raises(ValueError, match=r"cu_seqlens\[2\]=5 < 6"):
        masked_policy_loss(logp, old, adv_tok, mask, torch.tensor([0, 6, 5, 8]))
    with pytest.raises(ValueError, match=r"advantages must be \[T\]=\(8,\) or \[B\]=\(2,\), got \(3,\)"):
        masked_policy_loss(logp, old, adv_tok[:3], mask, cu)
    with pytest.raises(ValueError, match=r"old_logp must have shape"):
        masked_policy_loss(logp, old[:7], adv_tok, mask, cu)
    with pytest.raises(ValueError, match="kl_coef=0.1 needs ref_logp"):
        masked_policy_loss(logp, old, adv_tok, mask, cu, config=PolicyLossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="1.5"):
        PolicyLossConfig(clip_low=1.5)
    with pytest.raises(ValueError, match="0.5"):
        PolicyLossConfig(dual_clip=0.5)
    with pytest.raises(ValueError, match="'sum'"):
        PolicyLossConfig(agg="sum")
    with pytest.raises(ValueError, match="norm_length > 0, got None"):
        PolicyLossConfig(agg="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="100.0"):
        PolicyLossConfig(log_ratio_clamp=100.0)
    with pytest.raises(ValueError, match="-0.1"):
        PolicyLossConfig(kl_coef=-0.1)


def test_reference_gradient_is_autograd() -> None:
    # the reference is what the kernel is checked against: check it by finite differences (fp64)
    logp, old, ref, mask, cu, adv_tok, _ = _packed([6, 5], seed=5, device="cpu")
    cfg = PolicyLossConfig(agg="seq-mean-token-mean", kl_coef=0.2, dual_clip=3.0)
    lp = logp.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: policy_loss_reference(x, old.double(), adv_tok, mask, cu, ref.double(), cfg).loss.double(), (lp,))
