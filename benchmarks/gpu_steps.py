"""The Python side of `benchmarks/gpu_check.sh`: one function per step of the GPU check kit.

    python benchmarks/gpu_steps.py STEP [STEP ...] [--dry-run] [--result-dir DIR]   # run steps
    python benchmarks/gpu_steps.py env                                             # versions, device
    python benchmarks/gpu_steps.py record STEP --rc N --seconds S --timeout T      # one JSON line
    python benchmarks/gpu_steps.py summary --jsonl FILE --out FILE                 # the markdown table

Steps (gpu_check.sh runs each in its own process under its own time limit, in this order):

  build            the C++ core for this Python (`pip install --no-deps --no-build-isolation -e .`)
  kernel_tests     tests/test_kernels_*.py, the CUDA cases, with the kernels imported compiled
                   before the test modules set TRITON_INTERPRET (they would run interpreted)
  kernel_bench     benchmarks/bench_kernels.py as it is, then DESIGN.md's kernel targets checked
  liger            fused log-prob (+ the GRPO loss) vs Liger-Kernel's fused linear cross-entropy
                   and fused linear GRPO loss and vs materialised logits: time, peak memory, agreement
  policy_update    one bf16 PolicyUpdater step of a random-weight model of Qwen2.5-VL-3B's size
                   (built from a config, never downloaded): packed vs padded attention, tokens/s
                   and peak memory; packed arms: SDPA with the block-diagonal mask transformers builds
                   from restarting positions, flash-attn varlen when installed, flex attention when
                   transformers supports it for the model (not Qwen2.5-VL in 5.17 or 5.24: the arm
                   says so); then the model is saved as a checkpoint directory for `engine`
  weight_transfer  a 3.1 GB bf16 state dict (Qwen2.5-VL-3B's embedding and 16 of its decoder
                   layers) from this process to a second one on the same GPU: CUDA IPC per tensor,
                   CUDA IPC as one bucket, spyglass's ipc transport (trainer/weight_share.py: the
                   bucket buffer's handle opened by GPU UUID, the colocated vLLM path), and the
                   disk path (safetensors); seconds per GB. Then
                   the product's weight-update group (trainer/weight_sync.py: init_update_group,
                   send_bucket) on NCCL with this process alone (NCCL refuses two ranks on one
                   GPU): an API check of the sync's NCCL path on this torch, not a transfer figure
  engine           the engine with the HF backend on the GPU, from that checkpoint directory, on
                   the bundled world (replay policy, all nine real tools, TextSearch BM25-only):
                   async vs lock-step in one process, tokens/s and turns/s, after a warm-up run

Each step writes its result (status, figures, targets, headline) to `<result-dir>/<step>.json`
after every measurement, so a step stopped by its time limit still reports what it finished.
`--dry-run` (CPU): each step builds its configs and checks its commands and imports without
CUDA (the 3B model on the meta device, the weight transfer on CPU tensors with a tiny state
dict); the test suite runs it through `gpu_check.sh --dry-run` (tests/test_gpu_check.py).

The model's vocabulary: there is no real tokenizer offline, so the checkpoint carries the tiny
fixture's tokenizer (~1,300 tokens, Qwen's special tokens and chat template) and the model keeps
Qwen2.5-VL-3B's 151,936 embedding rows; the rows beyond the tokenizer are never produced by it
(the policy step's synthetic tokens do use them: cost does not depend on which ids they are).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/spyglass_gpu"))
WHEELS = ROOT / "benchmarks" / "gpu_wheels.txt"
CKPT_NAME = "qwen2_5_vl_3b_random"
STEPS = ("build", "kernel_tests", "kernel_bench", "liger", "policy_update", "weight_transfer", "engine")
TITLES = {"build": "0 build: C++ core for this Python", "kernel_tests": "1 kernel tests, compiled on CUDA",
          "kernel_bench": "2 bench_kernels.py on the GPU", "liger": "2b fused log-prob/loss vs Liger-Kernel",
          "policy_update": "3 bf16 policy update, Qwen2.5-VL-3B size", "weight_transfer": "5 weight transfer, IPC and disk",
          "engine": "4 engine on the GPU, async vs lock-step"}
# modules the GPU machine lacks -> the distribution gpu_wheels.txt must pin (checked by --dry-run)
CARRIED = {"liger": {"liger_kernel": "liger-kernel"},
           "engine": {"bm25s": "bm25s", "html2text": "html2text", "imagehash": "imagehash", "pywt": "pywavelets",
                      "rapidocr": "rapidocr", "pyclipper": "pyclipper", "shapely": "shapely",
                      "omegaconf": "omegaconf", "colorlog": "colorlog"}}
# Qwen2.5-VL-3B-Instruct's config.json (text and vision towers), the sizes that matter for cost
QWEN25_VL_3B_TEXT = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                         rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
QWEN25_VL_3B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu")


class Skip(Exception):
    """The step cannot run here (no CUDA, a package missing); the reason says why."""


class Result:
    """A step's result file, rewritten after every figure."""

    def __init__(self, step: str, path: Path | None, dry: bool) -> None:
        self.path = path
        self.d: dict[str, Any] = {"step": step, "status": "dry-run" if dry else "ok", "reason": "",
                                  "headline": [], "figures": {}, "targets": {}}
        self.save()

    def fig(self, **kw: Any) -> None:
        self.d["figures"].update(kw)
        self.save()

    def head(self, text: str) -> None:
        print(f"[{self.d['step']}] {text}", flush=True)
        self.d["headline"].append(text)
        self.save()

    def target(self, name: str, value: Any, want: str, met: bool) -> None:
        self.d["targets"][name] = {"value": value, "want": want, "met": bool(met)}
        self.save()

    def end(self, status: str, reason: str) -> None:
        self.d.update(status=status, reason=reason)
        self.save()

    def save(self) -> None:
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.d, default=str))
            os.replace(tmp, self.path)


def need_cuda() -> Any:
    import torch
    if not torch.cuda.is_available():
        raise Skip(f"no CUDA device (torch {torch.__version__} sees none)")
    return torch


def pinned_wheels() -> dict[str, str]:
    """gpu_wheels.txt as {normalised name: version}."""
    out = {}
    for line in WHEELS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, ver = line.partition("==")
            out[name.strip().lower().replace("_", "-")] = ver.strip()
    return out


def check_carried(res: Result, step: str) -> None:
    """Dry run: every module this step needs that the GPU machine lacks is pinned in gpu_wheels.txt."""
    import importlib.util
    pins = pinned_wheels()
    missing = [dist for dist in CARRIED[step].values() if dist not in pins]
    if missing:
        raise RuntimeError(f"gpu_wheels.txt pins no {missing} (step {step} needs them on the GPU machine)")
    res.fig(carried={m: {"wheel": f"{d}=={pins[d]}", "importable_here": importlib.util.find_spec(m) is not None}
                     for m, d in CARRIED[step].items()})


def median_ms(fn: Callable[[], Any], reps: int) -> float:
    import statistics

    import torch
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def stream(cmd: list[str], **kw: Any) -> tuple[int, list[str]]:
    """Run cmd, echoing its output to ours (the step's log); (exit code, lines)."""
    import subprocess
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw) as p:
        assert p.stdout is not None
        for line in p.stdout:
            print(line, end="", flush=True)
            lines.append(line.rstrip("\n"))
    return p.returncode, lines


# ----------------------------------------------------------------------------------- 0 build
def step_build(res: Result, a: argparse.Namespace, dry: bool) -> None:
    import importlib.util
    import shutil
    import subprocess
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."]
    res.fig(command="python3 " + " ".join(cmd[1:]), python=sys.version.split()[0])
    missing = [p for p in ("pyproject.toml", "csrc/CMakeLists.txt", "csrc/bindings.cpp") if not (ROOT / p).is_file()]
    if missing or "scikit_build_core" not in (ROOT / "pyproject.toml").read_text():
        raise RuntimeError(f"not a scikit-build-core project here (missing {missing})")
    tools = {m: importlib.util.find_spec(m) is not None for m in ("scikit_build_core", "pybind11")}
    tools.update(cmake=bool(shutil.which("cmake")) or importlib.util.find_spec("cmake") is not None,
                 ninja=bool(shutil.which("ninja")) or importlib.util.find_spec("ninja") is not None)
    res.fig(build_tools=tools)
    if not all(tools[k] for k in ("scikit_build_core", "pybind11", "cmake")):
        raise RuntimeError(f"build tools missing: {[k for k, v in tools.items() if not v]}")
    if dry:
        res.head("pyproject, csrc and the build tools are there")
        return
    t0 = time.perf_counter()
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 4)}
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    res.fig(build_s=round(time.perf_counter() - t0, 1), pip_rc=rc)
    probe_env = dict(os.environ)
    if rc:  # e.g. site-packages not writable: a plain install into WORK/pkg (gpu_check.sh adds it to PYTHONPATH)
        print(f"[build] pip install -e . exited {rc}; trying --target {WORK / 'pkg'}", flush=True)
        rc2 = subprocess.call([*cmd[:-2], "--target", str(WORK / "pkg"), "."], cwd=ROOT, env=env)
        res.fig(build_s=round(time.perf_counter() - t0, 1), target_rc=rc2)
        if rc2:
            raise RuntimeError(f"pip install -e . exited {rc} and --target exited {rc2} (the compiler's error is above)")
        probe_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(WORK / "pkg"), os.environ.get("PYTHONPATH")]))
        res.head(f"editable install failed (exit {rc}); installed into {WORK / 'pkg'} instead")
    probe = subprocess.run([sys.executable, "-c", "import spyglass.engine._core as c; print(c.__file__)"],
                           capture_output=True, text=True, cwd="/", env=probe_env)
    if probe.returncode:
        raise RuntimeError("built, but spyglass.engine._core does not import: "
                           + (probe.stderr.strip().splitlines() or ["?"])[-1])
    res.fig(core=probe.stdout.strip())
    res.head(f"C++ core built in {res.d['figures']['build_s']:.0f} s for Python {res.d['figures']['python']}")


# ----------------------------------------------------------------------------- 1 kernel tests
class _Tally:
    """A pytest plugin counting outcomes."""

    def __init__(self) -> None:
        self.selected, self.outcomes, self.failed = 0, {"passed": 0, "failed": 0, "skipped": 0}, []

    def pytest_collection_finish(self, session: Any) -> None:
        self.selected = len(session.items)

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call" or report.outcome != "passed":
            self.outcomes[report.outcome] = self.outcomes.get(report.outcome, 0) + 1
            if report.failed:
                self.failed.append(f"{report.nodeid} ({report.when})")


def step_kernel_tests(res: Result, a: argparse.Namespace, dry: bool) -> None:
    import tempfile

    import pytest
    files = sorted(str(p) for p in (ROOT / "tests").glob("test_kernels_*.py"))
    res.fig(files=[Path(f).name for f in files], selection="-k cuda (the [cuda] cases; CPU/interpreter cases run in CI)")
    if not files:
        raise RuntimeError("no tests/test_kernels_*.py")
    tally = _Tally()
    if dry:
        saved = dict(os.environ)  # the test modules set TRITON_INTERPRET when collected
        try:
            rc = pytest.main([*files, "--collect-only", "-q", "-p", "no:cacheprovider", f"--rootdir={ROOT}"],
                             plugins=[tally])
        finally:
            os.environ.clear()
            os.environ.update(saved)
        if rc != 0:
            raise RuntimeError(f"pytest could not collect {files} (exit {int(rc)})")
        res.fig(collected=tally.selected)
        res.head(f"{len(files)} kernel test files, {tally.selected} cases collected")
        return
    need_cuda()
    cache = Path(tempfile.mkdtemp(prefix="triton-cache-"))
    os.environ["TRITON_CACHE_DIR"] = str(cache)  # fresh: its .cubin files count the compiled kernels
    os.environ.pop("TRITON_INTERPRET", None)
    # Triton decides compiled vs interpreted when @triton.jit runs (module import); the test
    # modules set TRITON_INTERPRET=1 before importing the kernels, so import them first, here.
    import spyglass.kernels.advantage as adv
    import spyglass.kernels.fused_logprob as flp
    import spyglass.kernels.policy_loss as pl
    kinds = sorted({type(v).__name__ for m in (adv, flp, pl) for k, v in vars(m).items()
                    if k.startswith("_") and k.endswith("_kernel")})
    res.fig(kernel_objects=kinds)
    if any("Interpreted" in k for k in kinds):
        raise RuntimeError(f"the kernels were built interpreted ({kinds}): TRITON_INTERPRET was set at import")
    os.chdir(ROOT)
    rc = pytest.main([*files, "-q", "-k", "cuda", "-rfE", "-p", "no:cacheprovider"], plugins=[tally])
    cubins = sum(1 for _ in cache.rglob("*.cubin"))
    res.fig(pytest_rc=int(rc), cuda_cases=tally.selected, **tally.outcomes, failed_ids=tally.failed[:20],
            compiled_kernels=cubins)
    if tally.selected == 0:
        raise RuntimeError("no CUDA test case was selected (-k cuda)")
    if cubins == 0:
        raise RuntimeError("no Triton kernel was compiled: the CUDA cases ran interpreted")
    res.head(f"{tally.outcomes['passed']}/{tally.selected} CUDA cases passed, {cubins} kernels compiled")
    if rc != 0:
        raise RuntimeError(f"{tally.outcomes['failed']} of {tally.selected} CUDA cases failed: {tally.failed[:5]}")


# --------------------------------------------------------------------------- 2 kernel bench
def step_kernel_bench(res: Result, a: argparse.Namespace, dry: bool) -> None:
    import importlib.util
    script = ROOT / "benchmarks" / "bench_kernels.py"
    res.fig(command=f"python3 {script.relative_to(ROOT)}")
    spec = importlib.util.spec_from_file_location("bench_kernels", script)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"{script} is missing")
    if dry:
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)  # its imports resolve; main() is not run
        if not callable(getattr(mod, "main", None)):
            raise RuntimeError(f"{script} has no main()")
        res.head(f"{script.name} imports")
        return
    need_cuda()
    rc, lines = stream([sys.executable, str(script)], cwd=ROOT)
    js = next((json.loads(x) for x in reversed(lines) if x.startswith("{")), None)
    if js is None:
        raise RuntimeError(f"bench_kernels.py exited {rc} without its JSON line")
    res.fig(bench=js)
    big = max(js["advantage"], key=lambda r: r["N"])
    if "speedup_vs_torch" in big:
        res.target("advantage_64k_speedup_vs_torch", round(big["speedup_vs_torch"], 2), ">= 5", big["speedup_vs_torch"] >= 5)
        res.target("advantage_64k_launches", big.get("triton_launches"), "== 1", big.get("triton_launches") == 1)
        res.head(f"advantage N={big['N']}: {big['triton_ms']:.3f} ms vs torch {big['torch_ms']:.3f} ms "
                 f"({big['speedup_vs_torch']:.1f}x), {big.get('triton_launches')} launch(es)")
    for r in js["policy_loss"]:
        if "compiled_ms" in r and "triton_ms" in r:
            res.target(f"policy_loss_T{r['T']}_vs_compile", round(r["compiled_ms"] / r["triton_ms"], 2), "> 1",
                       r["triton_ms"] < r["compiled_ms"])
            res.head(f"masked loss fwd+bwd T={r['T']}: {r['triton_ms']:.3f} ms vs torch.compile "
                     f"{r['compiled_ms']:.3f} ms vs torch {r['torch_ms']:.3f} ms")
        elif "compile_error" in r:
            res.head(f"masked loss T={r['T']}: torch.compile failed: {r['compile_error'][:120]}")
    lp = js["fused_logprob"]
    res.target("logprob_peak_memory_ratio", round(lp["memory_ratio"], 4), "<= 0.2", lp["memory_ratio"] <= 0.2)
    res.head(f"fused log-prob T,H,V={lp['shape_T_H_V']}: peak {lp['fused']['peak_bytes'] / 2**20:.0f} MiB vs "
             f"materialised {lp['materialised']['peak_bytes'] / 2**20:.0f} MiB (ratio {lp['memory_ratio']:.3f})")
    if rc:
        raise RuntimeError(f"bench_kernels.py exited {rc}")


# ---------------------------------------------------------------------------------- 2b liger
def _import_liger() -> tuple[Any, Any, str]:
    """Liger-Kernel's fused linear CE and GRPO loss classes, and where they came from."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        import liger_kernel
        return LigerFusedLinearCrossEntropyLoss, LigerFusedLinearGRPOLoss, str(Path(liger_kernel.__file__).parent)
    except ImportError as e:
        raise Skip(f"liger_kernel does not import ({e}): carry .whl with gpu_wheels.txt's liger-kernel") from None


def step_liger(res: Result, a: argparse.Namespace, dry: bool) -> None:
    t, h, v = a.liger_shape
    b = a.liger_seqs
    res.fig(shape_T_H_V=[t, h, v], sequences=b, dtype="bf16",
            loss="PPO clip 0.2/0.28, seq-mean-token-mean (Liger loss_type='grpo'), no KL")
    if dry:
        check_carried(res, "liger")
        res.head(f"liger-kernel=={pinned_wheels()['liger-kernel']} pinned")
        return
    torch = need_cuda()
    flce_cls, grpo_cls, where = _import_liger()
    from spyglass.kernels.fused_logprob import fused_logprob, logprob_reference
    from spyglass.kernels.policy_loss import PolicyLossConfig, masked_policy_loss, policy_loss_reference
    res.fig(liger_from=where)
    dev, n = torch.device(a.device), t // b
    g = torch.Generator(device=dev).manual_seed(0)
    h0 = torch.randn(t, h, device=dev, dtype=torch.bfloat16, generator=g)
    w0 = (torch.randn(v, h, device=dev, generator=g) * h ** -0.5).to(torch.bfloat16)
    y = torch.randint(0, v, (t,), device=dev, generator=g)
    up = torch.randn(t, device=dev, generator=g)  # upstream gradient of the per-token log-probs
    with torch.no_grad():
        old = fused_logprob(h0, w0, y) + 0.1 * torch.randn(t, device=dev, generator=g)  # ratios near 1, some clipped
    mask = torch.rand(t, device=dev, generator=g) < 0.8
    mask.view(b, n)[:, 0] = False
    adv = torch.randn(b, device=dev, generator=g)
    cu = torch.arange(0, t + 1, n, device=dev, dtype=torch.int32)
    cfg = PolicyLossConfig(clip_low=0.2, clip_high=0.28, agg="seq-mean-token-mean")
    flce = flce_cls(reduction="none")
    variants: dict[str, Callable[[Any, Any], Any]] = {
        "logprob_materialised": lambda hh, ww: (logprob_reference(hh, ww, y) * up).sum(),
        "logprob_fused": lambda hh, ww: (fused_logprob(hh, ww, y, impl="triton") * up).sum(),
        "logprob_liger": lambda hh, ww: (-flce(ww, hh, y).float() * up).sum(),  # fused linear CE, per token
        "grpo_materialised": lambda hh, ww: policy_loss_reference(logprob_reference(hh, ww, y), old, adv, mask, cu,
                                                                  None, cfg).loss,
        "grpo_fused": lambda hh, ww: masked_policy_loss(fused_logprob(hh, ww, y, impl="triton"), old, adv, mask, cu,
                                                        None, cfg, impl="triton").loss,
    }
    grpo = {"liger": grpo_cls(beta=0.0, use_ref_model=False, loss_type="grpo", epsilon_low=0.2, epsilon_high=0.28,
                              compiled=True)}

    def liger_grpo(hh: Any, ww: Any) -> Any:
        out = grpo["liger"](hh.view(b, n, h), ww, y.view(b, n), mask.view(b, n).long(), adv,
                            old_per_token_logps=old.view(b, n))
        return out[0] if isinstance(out, tuple) else out

    variants["grpo_liger"] = liger_grpo
    refs: dict[str, Any] = {}
    rows: dict[str, Any] = {}
    for name, fn in variants.items():
        def once() -> Any:
            hh, ww = h0.detach().requires_grad_(), w0.detach().requires_grad_()
            loss = fn(hh, ww)
            loss.backward()
            return loss.detach().float(), hh.grad
        try:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                first = once()
            except Exception as e:  # noqa: BLE001 - torch.compile of Liger's loss: retry uncompiled
                if name != "grpo_liger":
                    raise
                print(f"[liger] compiled GRPO loss failed ({type(e).__name__}: {e}); retrying with compiled=False")
                grpo["liger"].compiled = False
                rows["grpo_liger_compile_error"] = f"{type(e).__name__}: {e}"[:300]
                first = once()
            torch.cuda.synchronize()
            first_ms = (time.perf_counter() - t0) * 1e3
            del first
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            loss, gh = once()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            ms = median_ms(once, a.reps)
            row = {"ms": round(ms, 3), "first_call_ms": round(first_ms, 1), "peak_mib": round(peak / 2**20, 1),
                   "loss": float(loss)}
            kind = name.split("_")[0]
            if name.endswith("materialised"):
                refs[kind] = (loss, gh.float())
            elif kind in refs:
                rl, rg = refs[kind]
                row["loss_rel_diff"] = float((loss - rl).abs() / rl.abs().clamp_min(1e-6))
                row["grad_hidden_rel_err"] = float((gh.float() - rg).abs().max() / rg.abs().max().clamp_min(1e-12))
            del gh
            rows[name] = row
        except Exception as e:  # noqa: BLE001 - one variant failing must not hide the others
            traceback.print_exc()
            rows[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        res.fig(variants=rows)
    for kind in ("logprob", "grpo"):
        m, f, lg = (rows.get(f"{kind}_{s}", {}) for s in ("materialised", "fused", "liger"))
        if "ms" in f and "ms" in m:
            res.target(f"{kind}_fused_peak_vs_materialised", round(f["peak_mib"] / max(m["peak_mib"], 1e-9), 4),
                       "<= 0.2", f["peak_mib"] <= 0.2 * m["peak_mib"])
        if "ms" in f and "ms" in lg:
            res.head(f"{kind}: fused {f['ms']:.1f} ms / {f['peak_mib']:.0f} MiB vs Liger {lg['ms']:.1f} ms / "
                     f"{lg['peak_mib']:.0f} MiB vs materialised {m.get('ms', float('nan')):.1f} ms / "
                     f"{m.get('peak_mib', float('nan')):.0f} MiB")
    errors = {k: r["error"] for k, r in rows.items() if isinstance(r, dict) and "error" in r}
    if errors:
        raise RuntimeError(f"variants failed: {errors}")


# ------------------------------------------------------------- the Qwen2.5-VL-3B-sized model
def qwen3b_parts() -> tuple[Any, Any, Any]:
    """(tokenizer, Qwen2_5_VLConfig of Qwen2.5-VL-3B's size, image processor): the tokenizer and
    the special-token ids are the tiny fixture's (see the module docstring)."""
    from transformers import Qwen2_5_VLConfig

    from spyglass.engine.offline import tiny
    tok = tiny.build_tokenizer(family="qwen2_5_vl")
    ids = tiny.special_ids(tok)
    text = dict(QWEN25_VL_3B_TEXT, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(QWEN25_VL_3B_VISION),
                              image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                              vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    # the real preprocessor's limits: 3,136 .. 12,845,056 pixels (4 .. 16,384 visual tokens)
    return tok, config, tiny.build_image_processor("qwen2_5_vl", max_image_tokens=16384)


def build_model(config: Any, device: str, attn: str = "sdpa") -> Any:
    """Random-weight Qwen2_5_VLForConditionalGeneration in bf16, initialised on `device`."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration
    with torch.device(device):
        return Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16, attn_implementation=attn)


def synth_trajectories(tok: Any, improc: Any, n: int, lo: int, hi: int, seed: int = 0) -> list[Any]:
    """n agent-shaped trajectories of lo..hi tokens: a prompt with one 448x448 image (256 visual
    tokens), then generated turns (100-400 tokens, with sampled log-probs) and observations
    (50-300 tokens) alternating, ending with a generated turn."""
    import numpy as np
    from PIL import Image

    from spyglass.engine.chat import encode_chat
    from spyglass.engine.trajectory import Segment, Trajectory
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (448, 448, 3), dtype=np.uint8))
    out = []
    for i in range(n):
        enc = encode_chat(tok, improc, [{"role": "user", "content": [
            {"type": "image", "image": img}, {"type": "text", "text": f"question {i}: what does the sign say?"}]}])
        target, length, segs, turn = int(rng.integers(lo, hi)), len(enc.input_ids), [], 0
        while True:
            k = int(max(8, min(rng.integers(100, 400), target - length)))
            segs.append(Segment("gen", rng.integers(2000, 150000, k).tolist(), turn,
                                logprobs=(-12.0 + 0.5 * rng.standard_normal(k)).tolist(), version=0))
            length += k
            if length >= target:
                break
            k = int(rng.integers(50, 300))
            segs.append(Segment("obs", rng.integers(2000, 150000, k).tolist(), turn))
            length, turn = length + k, turn + 1
        out.append(Trajectory(f"t{i}", f"g{i // 4}", i % 4, enc.input_ids, prompt_images=enc.images, segments=segs))
    return out


def ensure_checkpoint(res: Result, model: Any = None, tok: Any = None, improc: Any = None) -> Path:
    """The model's checkpoint directory under WORK (written once, atomically, by save_model)."""
    import torch

    from spyglass.engine.loader import LoadedModel, save_model
    ckpt = WORK / CKPT_NAME
    if (ckpt / "config.json").is_file():
        return ckpt
    t0 = time.perf_counter()
    if model is None:
        tok, config, improc = qwen3b_parts()
        model = build_model(config, "cuda")
    model.to(torch.bfloat16)
    save_model(LoadedModel("qwen2_5_vl", model, tok, improc), ckpt)
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    res.fig(checkpoint=str(ckpt), checkpoint_gb=round(size / 1e9, 2), checkpoint_save_s=round(time.perf_counter() - t0, 1))
    return ckpt


# --------------------------------------------------------------------------- 3 policy update
ARMS = {"padded": ("padded", "sdpa"), "packed_sdpa": ("packed", "sdpa"),
        "packed_flash": ("packed", "flash_attention_2"), "packed_flex": ("packed", "flex_attention")}


def _arm_unavailable(model: Any, attn: str) -> str:
    import importlib.util

    import transformers
    if attn == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    if attn == "flex_attention" and not getattr(model, "_supports_flex_attn", False):
        return (f"transformers {transformers.__version__}: {type(model).__name__} does not support "
                f"flex_attention (_supports_flex_attn is False)")
    return ""


def step_policy_update(res: Result, a: argparse.Namespace, dry: bool) -> None:
    import numpy as np
    import torch

    from spyglass.engine.packer import pack
    from spyglass.trainer.update import PolicyLogprobModel, PolicyUpdater, UpdateConfig
    if not dry:
        need_cuda()
    tok, config, improc = qwen3b_parts()
    trajs = synth_trajectories(tok, improc, 2 if dry else a.trajectories, a.min_len, a.max_len)
    tokens = sum(t.num_tokens for t in trajs)
    res.fig(model="Qwen2.5-VL-3B size, random weights, bf16 (fp32 master weights, AdamW)",
            vocab=f"tokenizer {len(tok)} tokens (the tiny fixture's), embedding rows {config.text_config.vocab_size}",
            trajectories=len(trajs), tokens_per_step=tokens, micro_batch_tokens=a.micro_batch_tokens,
            gradient_checkpointing=True)
    ucfgs = {arm: UpdateConfig(lr=1e-6, attention=layout, gradient_checkpointing=True,
                               micro_batch_tokens=a.micro_batch_tokens) for arm, (layout, _) in ARMS.items()}
    if dry:
        with torch.device("meta"):
            from transformers import Qwen2_5_VLForConditionalGeneration
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16,
                                                                    attn_implementation="sdpa")
        params = sum(p.numel() for p in model.parameters())
        if not 3.5e9 < params < 4.1e9:
            raise RuntimeError(f"the Qwen2.5-VL-3B config built {params / 1e9:.2f}B parameters, not ~3.75B")
        PolicyLogprobModel(model, 1.0, True)
        mbs = pack([np.asarray(t.token_ids(), np.int64) for t in trajs], [np.asarray(t.loss_mask(), bool) for t in trajs],
                   a.micro_batch_tokens, allow_oversize=True)
        off = {k: r for k, (_, at) in ARMS.items() if (r := _arm_unavailable(model, at))}
        res.fig(params_b=round(params / 1e9, 3), micro_batches=len(mbs), arms=list(ucfgs), arms_unavailable=off)
        res.head(f"config: {params / 1e9:.3f}B parameters (meta device); arms "
                 f"{', '.join(k for k in ARMS if k not in off)}; not here: {', '.join(off) or 'none'}")
        return
    t0 = time.perf_counter()
    model = build_model(config, "cuda")
    res.fig(params_b=round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
            build_s=round(time.perf_counter() - t0, 1))
    adv = torch.randn(len(trajs), generator=torch.Generator().manual_seed(0))
    masks = [torch.tensor(t.loss_mask()) for t in trajs]
    arms: dict[str, Any] = {}
    for arm, (layout, attn) in ARMS.items():
        why = _arm_unavailable(model, attn)
        if why:
            arms[arm] = {"skipped": why}
            res.fig(arms=arms)
            continue
        if time.perf_counter() - t0 > a.arm_deadline_s:
            arms[arm] = {"skipped": f"step time spent ({a.arm_deadline_s:.0f} s)"}
            res.fig(arms=arms)
            continue
        upd = None
        try:
            for p in model.parameters():
                p.grad = None
            model.to(torch.bfloat16)  # the previous arm's updater upcast it to fp32 master weights
            model.set_attn_implementation(attn)
            torch.cuda.empty_cache()
            upd = PolicyUpdater(model, ucfgs[arm], image_processor=improc)
            torch.cuda.synchronize()
            w0 = time.perf_counter()
            upd.step(trajs, adv, masks)  # warm-up: optimizer states, kernels
            torch.cuda.synchronize()
            row: dict[str, Any] = {"attention": f"{layout} ({attn})", "warmup_s": round(time.perf_counter() - w0, 2)}
            torch.cuda.reset_peak_memory_stats()
            times, m = [], {}
            for _ in range(a.timed_steps):
                s0 = time.perf_counter()
                m = upd.step(trajs, adv, masks)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - s0)
            step_s = float(np.median(times))
            row.update(step_s=round(step_s, 3), tokens_per_s=round(m["tokens"] / step_s),
                       loss_tokens_per_s=round(m["loss_tokens"] / step_s),
                       peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                       micro_batches=int(m["micro_batches"]), grad_norm=m["grad_norm"], loss=m["loss"])
            arms[arm] = row
            res.head(f"{arm}: {row['tokens_per_s']:,} tokens/s, peak {row['peak_gib']} GiB (step {step_s:.2f} s)")
        except Exception as e:  # noqa: BLE001 - the next arm still runs
            traceback.print_exc()
            arms[arm] = {"error": f"{type(e).__name__}: {e}"[:300]}
        finally:
            del upd
            torch.cuda.empty_cache()
        res.fig(arms=arms)
    pk, pd = arms.get("packed_sdpa", {}), arms.get("padded", {})
    if "tokens_per_s" in pk and "tokens_per_s" in pd:
        res.fig(packed_vs_padded_speedup=round(pk["tokens_per_s"] / pd["tokens_per_s"], 3),
                packed_vs_padded_memory=round(pk["peak_gib"] / max(pd["peak_gib"], 1e-9), 3))
    for p in model.parameters():
        p.grad = None
    model.set_attn_implementation("sdpa")
    ensure_checkpoint(res, model, tok, improc)  # for the engine step
    errors = {k: r["error"] for k, r in arms.items() if "error" in r}
    if errors:
        raise RuntimeError(f"arms failed: {errors}")


# ------------------------------------------------------------------------ 5 weight transfer
def transfer_spec(layers: int, tiny: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """Qwen2.5-VL-3B's embedding and `layers` decoder layers' tensors (tiny: the same names, small)."""
    hid, inter, kv, voc = (64, 176, 16, 1000) if tiny else (2048, 11008, 256, 151936)
    spec: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (voc, hid))]
    for i in range(layers):
        p = f"model.layers.{i}."
        spec += [(p + "self_attn.q_proj.weight", (hid, hid)), (p + "self_attn.q_proj.bias", (hid,)),
                 (p + "self_attn.k_proj.weight", (kv, hid)), (p + "self_attn.k_proj.bias", (kv,)),
                 (p + "self_attn.v_proj.weight", (kv, hid)), (p + "self_attn.v_proj.bias", (kv,)),
                 (p + "self_attn.o_proj.weight", (hid, hid)), (p + "mlp.gate_proj.weight", (inter, hid)),
                 (p + "mlp.up_proj.weight", (inter, hid)), (p + "mlp.down_proj.weight", (hid, inter)),
                 (p + "input_layernorm.weight", (hid,)), (p + "post_attention_layernorm.weight", (hid,))]
    return spec


def _checksum(tensors: Any) -> float:
    import torch
    return float(torch.stack([t.float().sum() for t in tensors]).sum())


def _receive(kind: str, payload: Any, dst: dict[str, Any], spec: list[tuple[str, tuple[int, ...]]], dev: Any) -> None:
    if kind == "tensors":
        for name, t in payload.items():
            dst[name].copy_(t)
    elif kind == "bucket":
        flat, offsets = payload
        for (name, _), (o, k) in zip(spec, offsets):
            dst[name].view(-1).copy_(flat[o:o + k])
    elif kind == "shared":  # spyglass's ipc transport: the trainer's buffer opened by handle, viewed, copied
        from spyglass.trainer.weight_share import open_shared, unpack
        handle, shapes, offsets = payload
        for name, v in unpack(open_shared(handle), [name for name, _ in spec], [dst[name].dtype for name, _ in spec],
                              shapes, offsets):
            dst[name].copy_(v)
    elif kind == "disk":
        from safetensors.torch import load_file
        for name, t in load_file(payload, device=str(dev)).items():
            dst[name].copy_(t)


def transfer_receiver(q_in: Any, q_out: Any, spec: list[tuple[str, tuple[int, ...]]], device: str) -> None:
    """The second process (an inference engine's weights): copies each transfer into its own tensors."""
    import torch
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dst = {name: torch.empty(shape, dtype=torch.bfloat16, device=dev) for name, shape in spec}
    q_out.put(("ready", None))
    while True:
        try:
            kind, payload = q_in.get()  # CUDA tensors arrive as IPC handles, opened here
            if kind == "stop":
                return
            t0 = time.perf_counter()
            _receive(kind, payload, dst, spec, dev)
            del payload
            if dev.type == "cuda":
                torch.cuda.synchronize()
            q_out.put(("done", {"receive_s": time.perf_counter() - t0, "checksum": _checksum(dst.values())}))
        except Exception as e:  # noqa: BLE001 - reported to the sender, which goes on with the next method
            q_out.put(("error", f"{type(e).__name__}: {e}"[:300]))


def _fs_type(path: Path) -> str:
    best, fs = "", "?"
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
            best, fs = parts[1], parts[2]
    return f"{fs} ({best})"


def step_weight_transfer(res: Result, a: argparse.Namespace, dry: bool) -> None:
    import queue

    import torch
    import torch.multiprocessing as tmp
    from safetensors.torch import save_file
    if not dry:
        need_cuda()
    dev = torch.device("cpu" if dry else a.device)
    spec = transfer_spec(2 if dry else a.layers, tiny=dry)
    gen = torch.Generator(device=dev).manual_seed(0)
    src = {name: torch.randn(shape, device=dev, generator=gen).to(torch.bfloat16) for name, shape in spec}
    nbytes = sum(t.numel() * t.element_size() for t in src.values())
    gb = nbytes / 1e9
    path = WORK / "transfer" / "weights.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    res.fig(tensors=len(spec), gb=round(gb, 3), device=str(dev), disk=_fs_type(path.parent),
            note="CPU shared memory in the dry run" if dry else "same GPU, second process (spawn)")
    ctx = tmp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=transfer_receiver, args=(q_in, q_out, spec, str(dev)), daemon=True)
    proc.start()

    def answer(timeout: float) -> dict[str, Any]:
        try:
            kind, body = q_out.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"the receiver did not answer in {timeout:.0f} s") from None
        if kind == "error":
            raise RuntimeError(f"receiver: {body}")
        return body or {}

    from spyglass.trainer.weight_share import SharedBuffer, layout, pack
    methods: dict[str, Any] = {}
    shared: list[Any] = []  # spyglass's SharedBuffer and offsets, once made
    try:
        answer(180)
        want = _checksum(src.values())
        total = sum(t.numel() for t in src.values())
        flat = torch.empty(total, dtype=torch.bfloat16, device=dev)
        offsets, o = [], 0
        for name, t in src.items():
            offsets.append((o, t.numel()))
            o += t.numel()

        def send(kind: str) -> dict[str, Any]:
            t0, extra = time.perf_counter(), {}
            if kind == "tensors":
                payload: Any = src
            elif kind == "shared":  # the product's sender side (trainer/weight_share.py), buffer made once
                if not shared:
                    offs, total = layout(list(src.values()))
                    shared.extend([SharedBuffer(total, dev), offs])
                buf, offs = shared
                pack(buf.flat, list(src.values()), offs)
                payload = (buf.handle(), [list(t.shape) for t in src.values()], offs)
            elif kind == "bucket":
                for (name, t), (off, k) in zip(src.items(), offsets):
                    flat[off:off + k].copy_(t.view(-1))
                payload = (flat, offsets)
            else:  # disk: device -> host -> safetensors file; the receiver loads it onto its device
                save_file({name: t.cpu() for name, t in src.items()}, str(path))
                extra["save_s"] = time.perf_counter() - t0
                payload = str(path)
            q_in.put((kind, payload))
            body = answer(120)
            s = time.perf_counter() - t0
            if abs(body["checksum"] - want) > 1e-6 * max(abs(want), 1.0):
                raise RuntimeError(f"{kind}: the receiver's weights differ (checksum {body['checksum']} vs {want})")
            return {"s": s, "receive_s": body["receive_s"], **extra}

        for kind, label in (("tensors", "ipc_per_tensor"), ("bucket", "ipc_bucket"), ("shared", "ipc_spyglass"),
                            ("disk", "disk")):
            reps = 1 if dry else (a.disk_reps if kind == "disk" else a.ipc_reps)
            try:
                runs = [send(kind) for _ in range(reps)]
                warm = runs[1:] or runs
                best = min(warm, key=lambda r: r["s"])
                row = {"cold_s": round(runs[0]["s"], 4), "s": round(best["s"], 4),
                       "s_per_gb": round(best["s"] / gb, 4), "gb_per_s": round(gb / best["s"], 2),
                       "receive_s": round(best["receive_s"], 4), "runs": len(runs)}
                if "save_s" in best:
                    row["save_s"] = round(best["save_s"], 3)
                methods[label] = row
                if not dry:
                    res.head(f"{label}: {row['s_per_gb']:.4f} s/GB ({row['gb_per_s']:.1f} GB/s; first {row['cold_s']:.3f} s)")
            except Exception as e:  # noqa: BLE001 - the other methods still run
                traceback.print_exc()
                methods[label] = {"error": f"{type(e).__name__}: {e}"[:300]}
            res.fig(methods=methods)
    finally:
        q_in.put(("stop", None))
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
        path.unlink(missing_ok=True)
        if shared:
            shared[0].close()
    methods["group_1rank"] = g = _group_alone(src, "gloo" if dry else "nccl")
    res.fig(methods=methods)
    if not dry:
        res.head(f"weight-update group on {g['backend']}, one rank: " + (f"ok, {g['s']:.3f} s" if "s" in g
                                                                          else g["error"]))
    errors = {k: r["error"] for k, r in methods.items() if "error" in r}
    if errors:
        raise RuntimeError(f"methods failed: {errors}")
    if dry:
        res.head(f"{len(spec)} tensors through a spawned process: {', '.join(methods)} (CPU, tiny)")


def _group_alone(src: dict[str, Any], backend: str) -> dict[str, Any]:
    """The product's weight-update group with this process as its only rank: open it on
    `backend`, broadcast every tensor of `src` as one bucket, close it (what the trainer's side
    of a sync calls); the seconds it took, or the error."""
    import socket

    from spyglass.trainer.weight_sync import close_update_group, init_update_group, send_bucket
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    t0 = time.perf_counter()
    try:
        group = init_update_group("127.0.0.1", port, 0, 1, backend=backend, group_name="gpu-check", timeout_s=60)
        try:
            send_bucket(group, list(src.values()))
        finally:
            close_update_group(group)
    except Exception as e:  # noqa: BLE001 - reported as the method's error
        traceback.print_exc()
        return {"backend": backend, "error": f"{type(e).__name__}: {e}"[:300]}
    return {"backend": backend, "s": round(time.perf_counter() - t0, 4), "tensors": len(src),
            "note": "one rank: an API check, not a transfer figure"}


# ---------------------------------------------------------------------------------- 4 engine
def _rollout_once(cfg: Any, loaded: Any, mode: str, cache: Path, questions: int, samples: int) -> dict[str, Any]:
    """One run of the world's questions through the engine (the same assembly as bench_rollout)."""
    import asyncio
    import collections
    import dataclasses

    from spyglass.engine import rollout
    from spyglass.engine.env import build_env
    env = build_env(dataclasses.replace(cfg.env, cache_path=str(cache), questions=questions))
    prompts = env.prompts()
    ecfg = dataclasses.replace(cfg.engine, lockstep=(mode == "lockstep"), n_samples=samples)
    engine, _, policy = rollout.build_engine(cfg, env, ecfg, vlm=loaded)
    t0 = time.perf_counter()
    groups = asyncio.run(rollout._drive(engine, prompts, None, False))
    wall = time.perf_counter() - t0
    trajs = [t for g in groups for t in g]
    st, ts = engine.stats, env.executor.stats()
    s = st.summary()
    return {"wall_s": round(wall, 2), "trajectories": len(trajs), "turns": st.turns, "gen_tokens": st.gen_tokens,
            "tokens_per_s": round(st.gen_tokens / wall, 1), "turns_per_s": round(st.turns / wall, 2),
            "trajectories_per_s": round(len(trajs) / wall, 3),
            "answered_right": sum(t.status.value == "answered" and t.answer == t.meta.get("answer") for t in trajs),
            "status": dict(collections.Counter(t.status.value for t in trajs)), "tool_calls": ts.get("calls"),
            "mean_gen_s": round(s["mean_gen_s"], 4), "mean_tool_s": round(s["mean_tool_s"], 4),
            "generator_busy_fraction": round(s["generator_busy_fraction"], 3), "policy": policy}


def _config_only_checkpoint(path: Path) -> Path:
    """Dry run: the 3B checkpoint directory without weights (config, tokenizer, image processor)."""
    tok, config, improc = qwen3b_parts()
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    tok.save_pretrained(path)
    improc.save_pretrained(path)
    return path


def step_engine(res: Result, a: argparse.Namespace, dry: bool) -> None:
    from spyglass.engine import rollout
    from spyglass.engine.env import ALL_TOOLS, EnvConfig
    from spyglass.engine.loader import LoadConfig, codec_only, load_model
    from spyglass.engine.scheduler import EngineConfig
    missing = [n for n in ("RolloutConfig", "build_engine", "_drive") if not hasattr(rollout, n)]
    if missing:
        raise RuntimeError(f"spyglass.engine.rollout has no {missing} (the step drives them)")
    env_cfg = EnvConfig(tools=list(ALL_TOOLS), dense_search=False, questions=a.questions)
    res.fig(workload=f"{a.questions} world questions x {a.samples} samples, replay policy, live <= {a.max_live}",
            tools=f"{', '.join(ALL_TOOLS)}; TextSearch BM25 only (no faiss/MiniLM on the GPU machine)")

    def rcfg(model: str, device: str) -> Any:
        return rollout.RolloutConfig(model=model, load=LoadConfig(device=device, dtype="bfloat16"),
                                     policy="replay", env=env_cfg, progress=False,
                                     engine=EngineConfig(n_samples=a.samples, max_live=a.max_live))
    if dry:
        check_carried(res, "engine")
        ckpt = _config_only_checkpoint(WORK / "dry" / CKPT_NAME)
        codec = codec_only(str(ckpt), rcfg(str(ckpt), "cpu").load)
        res.fig(codec=type(codec).__name__)
        res.head(f"RolloutConfig and the loader's codec from a config-only checkpoint dir; {len(CARRIED['engine'])} "
                 f"tool packages pinned in gpu_wheels.txt")
        return
    torch = need_cuda()
    ckpt = ensure_checkpoint(res)
    cfg = rcfg(str(ckpt), "cuda")
    t0 = time.perf_counter()
    loaded = load_model(cfg.model, cfg.load)
    res.fig(load_s=round(time.perf_counter() - t0, 1), attention=loaded.model.config._attn_implementation,
            dtype=str(next(loaded.model.parameters()).dtype))
    scratch = WORK / "engine"
    scratch.mkdir(parents=True, exist_ok=True)
    modes: dict[str, Any] = {}
    for mode, q, n in (("warmup", 1, 1), ("async", a.questions, a.samples), ("lockstep", a.questions, a.samples)):
        modes[mode] = _rollout_once(cfg, loaded, "async" if mode == "warmup" else mode,
                                    scratch / f"{mode}-{time.time_ns()}.sqlite", q, n)
        torch.cuda.synchronize()
        res.fig(modes=modes, peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
        if mode != "warmup":
            r = modes[mode]
            res.head(f"{mode}: {r['wall_s']} s, {r['tokens_per_s']:,} tokens/s, {r['turns_per_s']} turns/s, "
                     f"{r['answered_right']}/{r['trajectories']} right")
    speedup = modes["lockstep"]["wall_s"] / modes["async"]["wall_s"]
    res.fig(async_vs_lockstep=round(speedup, 3))
    res.head(f"async / lock-step speed-up: {speedup:.2f}x")


# ------------------------------------------------------------------------ records and summary
def env_info(with_torch: bool = True) -> dict[str, Any]:
    """Versions, the device (with_torch=False: no torch import, device "cpu (dry run)") and the commit."""
    import importlib.metadata as md
    import platform
    info: dict[str, Any] = {"python": platform.python_version(), "host_cpus": os.cpu_count()}
    for name in ("torch", "triton", "transformers", "liger-kernel", "flash-attn"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = None
    info["device"] = "cpu (dry run)"
    if with_torch:
        try:
            import torch
            info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
            info["cuda"] = torch.version.cuda
        except Exception as e:  # noqa: BLE001
            info["device"] = f"torch failed: {e}"
    commit = os.environ.get("SPYGLASS_COMMIT", "")
    if not commit:
        import subprocess
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip()
        except OSError:
            pass
    info["commit"] = commit or "unknown"
    return info


def record(a: argparse.Namespace) -> dict[str, Any]:
    """The step's JSON line from its result file, exit code, time and log (stdout)."""
    res: dict[str, Any] = {}
    if a.result and Path(a.result).is_file():
        try:
            res = json.loads(Path(a.result).read_text())
        except ValueError:
            res = {}
    log_tail = ""
    if a.log and Path(a.log).is_file():
        lines = [x for x in Path(a.log).read_text(errors="replace").splitlines() if x.strip()]
        log_tail = lines[-1][:300] if lines else ""
    status, reason = res.get("status", ""), res.get("reason", "")
    if a.skip:
        status, reason = "skipped", a.skip
    elif a.imports_rc:
        status, reason = "failed", f"imports: {a.imports_error or 'failed'}"
    elif a.rc in (124, 137):
        status, reason = "failed", f"timed out after {a.timeout:.0f} s" + (f" ({reason})" if reason else "")
    elif a.rc != 0:
        status, reason = ("skipped" if status == "skipped" else "failed"), reason or log_tail or f"exit {a.rc}"
    elif a.mode == "dry-run":
        status = "dry-run" if status == "dry-run" else "failed"
        reason = reason or ("" if status == "dry-run" else "no dry-run result")
    elif status not in ("ok", "skipped"):
        status, reason = "failed", reason or "no result"
    env = json.loads(Path(a.env).read_text()) if a.env and Path(a.env).is_file() else {}
    line = {"step": a.step, "title": TITLES.get(a.step, a.step), "status": status, "reason": reason,
            "mode": a.mode, "rc": a.rc, "seconds": round(a.seconds or res.get("seconds", 0.0), 1), "timeout_s": a.timeout,
            "headline": res.get("headline", []), "targets": res.get("targets", {}),
            "figures": res.get("figures", {}), "device": env.get("device", ""), "commit": env.get("commit", ""),
            "env": env}
    print(json.dumps(line, default=str))
    return line


def summary(a: argparse.Namespace) -> str:
    rows = [json.loads(x) for x in Path(a.jsonl).read_text().splitlines() if x.strip()]
    env = next((r["env"] for r in rows if r.get("env")), {})
    out = [f"# GPU check: {env.get('device', '?')}, commit {env.get('commit', '?')}, "
           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
           f"python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), triton {env.get('triton')}, "
           f"transformers {env.get('transformers')}, liger-kernel {env.get('liger-kernel')}, "
           f"flash-attn {env.get('flash-attn')}", "",
           "| step | status | s | figures | reason |", "|---|---|---:|---|---|"]
    for r in rows:
        figs = "<br>".join(r.get("headline", [])) or "-"
        out.append(f"| {r.get('title', r['step'])} | {r['status']} | {r.get('seconds', 0):.0f} | {figs} | "
                   f"{(r.get('reason') or '').replace('|', '/')[:300]} |")
    targets = [(r["step"], k, t) for r in rows for k, t in r.get("targets", {}).items()]
    if targets:
        out += ["", "| target | value | want | met |", "|---|---:|---|---|"]
        out += [f"| {s}: {k} | {t['value']} | {t['want']} | {'yes' if t['met'] else 'NO'} |" for s, k, t in targets]
    text = "\n".join(out) + "\n"
    Path(a.out).write_text(text)
    print(text)
    return text


# -------------------------------------------------------------------------------------- main
STEP_FNS: dict[str, Callable[[Result, argparse.Namespace, bool], None]] = {
    "build": step_build, "kernel_tests": step_kernel_tests, "kernel_bench": step_kernel_bench,
    "liger": step_liger, "policy_update": step_policy_update, "weight_transfer": step_weight_transfer,
    "engine": step_engine}


def run_steps(a: argparse.Namespace) -> int:
    rc = 0
    rdir = Path(a.result_dir) if a.result_dir else None
    if rdir:
        rdir.mkdir(parents=True, exist_ok=True)
    for step in a.steps:
        res = Result(step, rdir / f"{step}.json" if rdir else None, a.dry_run)
        t0 = time.perf_counter()
        print(f"[{step}] {'dry run' if a.dry_run else 'run'}: {TITLES[step]}", flush=True)
        try:
            STEP_FNS[step](res, a, a.dry_run)
        except Skip as e:
            res.end("skipped", str(e))
        except Exception as e:  # noqa: BLE001 - reported in the step's JSON line
            traceback.print_exc()
            res.end("failed", f"{type(e).__name__}: {e}"[:500])
            rc = 1
        res.d["seconds"] = round(time.perf_counter() - t0, 2)
        res.save()
        print(f"[{step}] {res.d['status']} in {res.d['seconds']:.1f} s {res.d['reason']}", flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["env"]:
        print(json.dumps(env_info(with_torch="--no-torch" not in argv)))
        return 0
    if argv[:1] == ["record"]:
        ap = argparse.ArgumentParser(prog="gpu_steps.py record")
        ap.add_argument("step")
        ap.add_argument("--rc", type=int, default=0)
        ap.add_argument("--seconds", type=float, default=0.0)
        ap.add_argument("--timeout", type=float, default=0.0)
        ap.add_argument("--mode", default="run", choices=("run", "dry-run"))
        ap.add_argument("--result", default="")
        ap.add_argument("--log", default="")
        ap.add_argument("--env", default="")
        ap.add_argument("--skip", default="", help="the step did not run: why")
        ap.add_argument("--imports-rc", type=int, default=0)
        ap.add_argument("--imports-error", default="")
        record(ap.parse_args(argv[1:]))
        return 0
    if argv[:1] == ["summary"]:
        ap = argparse.ArgumentParser(prog="gpu_steps.py summary")
        ap.add_argument("--jsonl", required=True)
        ap.add_argument("--out", required=True)
        summary(ap.parse_args(argv[1:]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("steps", nargs="+", choices=STEPS)
    ap.add_argument("--dry-run", action="store_true", help="CPU: build configs, check commands and imports")
    ap.add_argument("--result-dir", default="", help="write <step>.json here")
    ap.add_argument("--device", default="cuda", help="liger and weight_transfer: the CUDA device")
    ap.add_argument("--reps", type=int, default=5, help="timed repeats (liger)")
    ap.add_argument("--liger-shape", type=lambda s: tuple(int(x) for x in s.split(",")), default=(8192, 4096, 151936))
    ap.add_argument("--liger-seqs", type=int, default=8, help="sequences the liger shape's T is split into")
    ap.add_argument("--trajectories", type=int, default=12, help="policy update: trajectories per step")
    ap.add_argument("--min-len", type=int, default=1024)
    ap.add_argument("--max-len", type=int, default=6144)
    ap.add_argument("--micro-batch-tokens", type=int, default=16384)
    ap.add_argument("--timed-steps", type=int, default=2, help="policy update: timed steps per arm (after one warm-up)")
    ap.add_argument("--arm-deadline-s", type=float, default=110.0, help="policy update: no new arm after this")
    ap.add_argument("--layers", type=int, default=16, help="weight transfer: decoder layers (16: 3.1 GB)")
    ap.add_argument("--ipc-reps", type=int, default=3)
    ap.add_argument("--disk-reps", type=int, default=2)
    ap.add_argument("--questions", type=int, default=12, help="engine: world questions")
    ap.add_argument("--samples", type=int, default=4, help="engine: samples per question")
    ap.add_argument("--max-live", type=int, default=64)
    return run_steps(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
