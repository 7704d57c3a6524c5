"""Benchmark the GRPO kernels against their references; prints a table, then one JSON line.

    .venv/bin/python benchmarks/bench_kernels.py                 # GPU if present, else CPU
    .venv/bin/python benchmarks/bench_kernels.py --quick         # fewer sizes / repeats
    .venv/bin/python benchmarks/bench_kernels.py --logprob-shape 8192,4096,151936   # the GPU shape

1. Grouped advantage (groups of 16) at N = 1K..64K: a per-group Python loop (a dict of lists per
   group id, the way verl's compute_grpo_outcome_advantage works), the vectorised torch reference,
   and the single-launch Triton kernel (CUDA only; also counts its kernel launches).
2. Masked policy loss forward+backward over packed sequences (512 tokens each): the torch
   reference, torch.compile of it (reported as failed if compilation does not work here), and
   the fused Triton kernel (CUDA only).
3. Fused log-prob forward+backward: materialised logits (logits -> log_softmax -> gather) vs the
   fused path (Triton on CUDA, the vocabulary-chunked torch path on CPU). Peak memory: on CUDA
   torch.cuda.max_memory_allocated above the inputs; on CPU the rise of ru_maxrss (peak resident
   set) of a fresh subprocess per variant, measured from after its inputs are built.
On CPU the Triton kernels would run in Triton's interpreter, whose timings mean nothing, so they
are not timed; their targets are GPU targets.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from typing import Callable

import torch

from spyglass.kernels.advantage import AdvantageConfig, grouped_advantage
from spyglass.kernels.fused_logprob import fused_logprob, logprob_reference
from spyglass.kernels.policy_loss import PolicyLossConfig, masked_policy_loss, policy_loss_reference
from spyglass.engine.metrics import git_commit  # noqa: E402


def timeit(fn: Callable[[], object], repeat: int, device: torch.device) -> float:
    """Median wall time in ms (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def python_loop_grpo(scores: torch.Tensor, index: list[int], eps: float = 1e-6) -> torch.Tensor:
    """Per-group Python loop baseline: bucket scores by group id in a dict, then normalise."""
    buckets: dict[int, list[torch.Tensor]] = defaultdict(list)
    for i in range(scores.shape[0]):
        buckets[index[i]].append(scores[i])
    mean, std = {}, {}
    for gid, vals in buckets.items():
        if len(vals) == 1:
            mean[gid], std[gid] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            stacked = torch.stack(vals)
            mean[gid], std[gid] = stacked.mean(), stacked.std()
    out = scores.clone()
    for i in range(scores.shape[0]):
        out[i] = (scores[i] - mean[index[i]]) / (std[index[i]] + eps)
    return out


def count_launches(fn: Callable[[], object]) -> int:
    """CUDA kernels launched by one call (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def bench_advantage(sizes: list[int], repeat: int, device: torch.device, loop_max: int) -> list[dict]:
    rows = []
    for n in sizes:
        g = n // 16
        ids = (torch.randperm(n) % g).to(device)  # groups of 16, members scattered
        r = torch.rand(n, device=device)
        fatal = torch.rand(n, device=device) < 0.2
        cfg = AdvantageConfig()
        row = {"N": n}
        if n <= loop_max:
            r_cpu, idx = r.cpu(), ids.cpu().tolist()
            row["python_loop_ms"] = timeit(lambda: python_loop_grpo(r_cpu, idx), max(1, repeat // 4), torch.device("cpu"))
        row["torch_ms"] = timeit(lambda: grouped_advantage(r, ids, fatal, cfg, num_groups=g, validate=False, impl="torch"),
                                 repeat, device)
        if device.type == "cuda":
            tri = lambda: grouped_advantage(r, ids, fatal, cfg, num_groups=g, validate=False, impl="triton")  # noqa: E731
            row["triton_ms"] = timeit(tri, repeat, device)
            row["triton_launches"] = count_launches(tri)
            row["speedup_vs_torch"] = row["torch_ms"] / row["triton_ms"]
        rows.append(row)
    return rows


def bench_policy_loss(sizes: list[int], repeat: int, device: torch.device, try_compile: bool) -> list[dict]:
    rows = []
    cfg = PolicyLossConfig(dual_clip=3.0, kl_coef=0.01, agg="seq-mean-token-mean")
    compiled = None
    compile_error = None
    if try_compile:
        try:
            compiled = torch.compile(policy_loss_reference)
        except Exception as e:  # noqa: BLE001 - report whatever went wrong
            compile_error = f"{type(e).__name__}: {e}"[:200]
    for t in sizes:
        b = t // 512
        cu = torch.arange(0, t + 1, 512, dtype=torch.int32, device=device)
        old = -torch.rand(t, device=device) * 3
        lp0 = old + 0.3 * torch.randn(t, device=device)
        ref = old + 0.2 * torch.randn(t, device=device)
        adv = torch.randn(b, device=device)
        mask = torch.rand(t, device=device) < 0.8

        def step(fn: Callable[..., object]) -> Callable[[], None]:
            def run() -> None:
                lp = lp0.detach().requires_grad_()
                fn(lp, old, adv, mask, cu, ref, cfg).loss.backward()
            return run

        row: dict = {"T": t, "torch_ms": timeit(step(policy_loss_reference), repeat, device)}
        if compiled is not None:
            try:
                t0 = time.perf_counter()
                step(compiled)()
                row["compile_s"] = time.perf_counter() - t0
                row["compiled_ms"] = timeit(step(compiled), repeat, device)
            except Exception as e:  # noqa: BLE001
                compile_error = f"{type(e).__name__}: {e}"[:200]
                compiled = None
        if compile_error:
            row["compile_error"] = compile_error
        if device.type == "cuda":
            fused = lambda *a: masked_policy_loss(*a[:6], config=a[6], validate=False, impl="triton")  # noqa: E731
            row["triton_ms"] = timeit(step(fused), repeat, device)
        rows.append(row)
    return rows


def _logprob_child(args: argparse.Namespace) -> None:
    """Run one log-prob variant in this (fresh) process; print peak memory and time as JSON."""
    t, h, v = args.logprob_shape
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    hidden = torch.randn(t, h, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, h, device=device, dtype=dtype) * h ** -0.5).requires_grad_()
    targets = torch.randint(0, v, (t,), device=device)
    fn = (lambda: logprob_reference(hidden, weight, targets)) if args.child == "materialised" else \
        (lambda: fused_logprob(hidden, weight, targets))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    fn().sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"peak_bytes": peak, "ms": (time.perf_counter() - t0) * 1e3}))


def bench_logprob(shape: tuple[int, int, int], device: torch.device) -> dict:
    out: dict = {"shape_T_H_V": list(shape), "dtype": "bf16" if device.type == "cuda" else "fp32",
                 "memory": "cuda max_memory_allocated" if device.type == "cuda" else "ru_maxrss rise in a fresh subprocess"}
    for variant in ("materialised", "fused"):
        cmd = [sys.executable, __file__, "--child", variant, "--device", str(device),
               "--logprob-shape", ",".join(map(str, shape))]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[variant] = json.loads(res.stdout.strip().splitlines()[-1])
    out["memory_ratio"] = out["fused"]["peak_bytes"] / max(out["materialised"]["peak_bytes"], 1)
    return out




def _table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "compile_error"))
    print(" | ".join(f"{k:>16}" for k in keys))
    for r in rows:
        print(" | ".join(f"{r[k]:>16.3f}" if isinstance(r.get(k), float) else f"{str(r.get(k, '-')):>16}" for k in keys))
    errs = {r["compile_error"] for r in rows if "compile_error" in r}
    for e in errs:
        print(f"  torch.compile failed: {e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile of the loss reference")
    ap.add_argument("--logprob-shape", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                    help="T,H,V (default 8192,4096,151936 on CUDA, 1024,128,151936 on CPU)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.logprob_shape is None:
        args.logprob_shape = (8192, 4096, 151_936) if device.type == "cuda" else (1024, 128, 151_936)
    if args.child:
        _logprob_child(args)
        return
    repeat = 5 if args.quick else 20
    adv_sizes = [1024, 16384, 65536] if args.quick else [1024, 4096, 16384, 65536]
    loss_sizes = [16384] if args.quick else [16384, 65536]
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}")
    adv = bench_advantage(adv_sizes, repeat, device, loop_max=16384 if args.quick else 65536)
    _table("grouped advantage (groups of 16), ms", adv)
    loss = bench_policy_loss(loss_sizes, repeat, device, not args.no_compile)
    _table("masked policy loss fwd+bwd (512-token sequences), ms", loss)
    lp = bench_logprob(args.logprob_shape, device)
    print(f"\nfused log-prob fwd+bwd, T,H,V={lp['shape_T_H_V']} {lp['dtype']}, memory = {lp['memory']}")
    for k in ("materialised", "fused"):
        print(f"  {k:>13}: peak {lp[k]['peak_bytes'] / 2**20:9.1f} MiB   {lp[k]['ms']:9.1f} ms")
    print(f"  fused / materialised peak memory: {lp['memory_ratio']:.3f}")
    print(json.dumps({"bench": "kernels", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "commit": git_commit(), "triton_timed": device.type == "cuda",
                      "advantage": adv, "policy_loss": loss, "fused_logprob": lp}))


if __name__ == "__main__":
    main()
