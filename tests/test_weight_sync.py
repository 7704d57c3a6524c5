"""Weight sync over a torch process group (gloo on CPU): the group helper between processes,
bucketing (mixed dtypes, bf16 wire), a protocol-faithful fake SGLang server that really joins
the group in its own process, and the vLLM worker extension driven without vLLM.

    .venv/bin/python -m pytest -q tests/test_weight_sync.py

The fake SGLang server is tests/fake_sglang.py (its own process). This file is also the other
children's program: `python tests/test_weight_sync.py vllm-worker SPEC OUT` runs the vLLM worker
extension on a fake worker; `... recv`, `... trainer-rank` and `... trainer-exit` are the
group's other ends below.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import torch
from test_backend_http import in_thread
from torch import nn

from spyglass.trainer.distributed import free_port

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}


def _runtime(model: nn.Module) -> Any:
    """What iter_weight_buckets reads from a PolicyUpdater: runtime.module.model, rank, stage."""
    return SimpleNamespace(runtime=SimpleNamespace(module=SimpleNamespace(model=model), rank=0, stage=0),
                           model=model)


def _rounded(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype).to(v.dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}


class Mixed(nn.Module):
    """Parameters in fp32 and bf16, an int64 persistent buffer, a non-persistent one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Linear(64, 96)
        self.b = nn.Parameter(torch.randn(33, 7).to(torch.bfloat16))
        self.c = nn.Linear(96, 5, bias=False)
        self.register_buffer("steps", torch.arange(11, dtype=torch.int64))
        self.register_buffer("scratch", torch.ones(3), persistent=False)


# ------------------------------------------------------------------------------ child programs
class _FakeModel:
    """vLLM's model surface the extension uses: load_weights(weights=[(name, tensor), ...])."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.loaded = model, []

    def load_weights(self, weights: Any) -> set[str]:
        params = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        with torch.no_grad():
            for name, t in weights:
                params[name].copy_(t)
                self.loaded.append(name)
        return set(self.loaded)


def _vllm_worker(spec_file: str, out_file: str) -> None:
    """A fake vLLM worker with the extension mixed in, driven like collective_rpc would."""
    from spyglass.engine.backends.vllm_ext import WeightSyncWorker
    from spyglass.engine.offline import tiny

    spec = json.loads(Path(spec_file).read_text())

    class Worker(WeightSyncWorker):
        def __init__(self) -> None:
            self.rank = spec["worker_rank"]
            self.model_runner = SimpleNamespace(model=_FakeModel(tiny.build_tiny_text_lm(seed=0).model))

    w = Worker()
    assert w.spyglass_weight_group_size()["workers"] == 1
    opened = w.spyglass_open_weight_group(json.dumps(spec["open"]))
    answers = [w.spyglass_receive_weights(json.dumps({**m, "group_name": spec["open"]["group_name"],
                                                      "version": 7})) for m in spec["buckets"]]
    closed = w.spyglass_close_weight_group(json.dumps({"group_name": spec["open"]["group_name"]}))
    torch.save({"state": w.model_runner.model.model.state_dict(), "opened": opened, "answers": answers,
                "closed": closed, "version": w._spyglass_version}, out_file)


def _share_worker(out_file: str) -> None:
    """A fake vLLM worker with the extension mixed in, in its own process, driven over
    stdin/stdout one JSON line per call (as collective_rpc drives an engine core's workers):
    ["method", "json-arg" or null] -> the answer, or {"error": ...}; saves its model as
    OUT.v<version> after each update's last bucket."""
    from spyglass.engine.backends.vllm_ext import WeightSyncWorker
    from spyglass.engine.offline import tiny

    class Worker(WeightSyncWorker):
        def __init__(self) -> None:
            self.rank = 0
            self.model_runner = SimpleNamespace(model=_FakeModel(tiny.build_tiny_text_lm(seed=0).model))

    w = Worker()
    for line in sys.stdin:
        method, arg = json.loads(line)
        try:
            answer = getattr(w, method)(*([] if arg is None else [arg]))
        except Exception as e:  # noqa: BLE001 - reported to the caller
            answer = {"error": f"{type(e).__name__}: {e}"}
        if arg is not None and json.loads(arg).get("last") and "error" not in answer:  # a whole version
            torch.save(w.model_runner.model.model.state_dict(), f"{out_file}.v{answer['version']}")
        print(json.dumps(answer), flush=True)


def _receiver(spec_file: str, out_file: str) -> None:
    """Rank 1 of a bare group: receive the buckets listed in the spec, save them."""
    from spyglass.trainer.weight_sync import close_update_group, init_update_group, receive_bucket

    spec = json.loads(Path(spec_file).read_text())
    group = init_update_group("127.0.0.1", spec["port"], 1, 2, group_name="t", timeout_s=60)
    got = {k: v for m in spec["buckets"] for k, v in receive_bucket(group, m["names"], m["dtypes"], m["shapes"])}
    close_update_group(group)
    torch.save(got, out_file)


def _trainer_rank(rank: str, port: str, url: str, out_file: str) -> None:
    """One of two trainer ranks under a default gloo group (a ZeRO trainer's), rank 0 also
    syncing to a fake SGLang server. Its default group binds a device, as DeepSpeed's does on
    CUDA; torch would then build a registered group by splitting the default communicator
    (`_get_split_source`), which only rank 0 would call: here that split is an error."""
    from datetime import timedelta

    import torch.distributed as tdist
    from torch.distributed import distributed_c10d as c10d

    from spyglass.engine.backends.sglang import SGLangBackend, SGLangConfig
    from spyglass.trainer.weight_sync import WeightSync, WeightSyncConfig
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=int(rank), world_size=2,
                             timeout=timedelta(seconds=60))
    if rank == "0":
        default = c10d._get_default_group()
        default.bound_device_id = torch.device("cuda", 0)

        def no_split(_: Any) -> None:
            raise AssertionError("the weight-update group was split from the trainer's default group")
        c10d._get_split_source = no_split
        loop = asyncio.new_event_loop()
        be = SGLangBackend(SGLangConfig(base_url=url, name="sg-0", retries=0))
        sync = WeightSync(WeightSyncConfig(transport="group", timeout_s=60), [be], 0, Path(out_file).parent / "w")
        try:
            metrics = sync(_runtime(Mixed()), 1, loop)
            info = loop.run_until_complete(be.request_json("GET", "/get_server_info"))
        finally:
            sync.close(loop)
            loop.run_until_complete(be.close())
            loop.close()
        default.bound_device_id = None
        Path(out_file).write_text(json.dumps({"metrics": metrics, "info": info}))
    tdist.barrier()  # the default group still works beside the weight-update group
    tdist.destroy_process_group()


def _trainer_exit(url0: str, url1: str) -> None:
    """Trainer rank 0 syncing a 64 MB tensor to two servers, the first of which refuses the
    bucket while the second stays in the broadcast: prints the BackendError's time, then exits."""
    from spyglass.engine.backends.base import BackendError
    from spyglass.engine.backends.sglang import SGLangBackend, SGLangConfig
    from spyglass.trainer.weight_sync import WeightSync, WeightSyncConfig
    model = nn.Module()
    model.w = nn.Parameter(torch.ones(16 << 20))  # [16M] fp32: more than the sockets buffer
    loop = asyncio.new_event_loop()
    fleet = [SGLangBackend(SGLangConfig(base_url=u, name=f"sg-{i}", retries=0)) for i, u in enumerate((url0, url1))]
    sync = WeightSync(WeightSyncConfig(transport="group", dtype="fp32", timeout_s=90), fleet, 0, "unused")
    try:
        sync(_runtime(model), 1, loop)
        print("SYNCED", flush=True)
    except BackendError as e:
        print(f"FAILED {time.time()} {e}", flush=True)
    finally:
        sync.close(loop)
        for be in fleet:
            loop.run_until_complete(be.close())
        loop.close()


# ------------------------------------------------------------------------------ helpers
def _child(*args: str, stdin: Any = None) -> subprocess.Popen:
    """This file as another program; with `stdin` (a pipe) its stdout carries only answers."""
    return subprocess.Popen([sys.executable, __file__, *args], env=ENV, stdout=subprocess.PIPE, stdin=stdin,
                            stderr=None if stdin is not None else subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 60) -> None:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, out[-4000:]


@contextmanager
def fake_sglang(model_dir: str | Path | None, tmp: Path, *flags: str) -> Iterator[str]:
    """A fake SGLang server process (tests/fake_sglang.py) on 127.0.0.1; yields its URL."""
    port_file = tmp / f"port-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, str(HERE / "fake_sglang.py"), str(port_file), *flags,
                             *(["--model", str(model_dir)] if model_dir else [])], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"fake SGLang server did not start: {proc.communicate()[0][-3000:]}")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port_file.read_text()}"
    finally:
        proc.kill()
        proc.wait(10)


def _send_over_group(port: int, buckets: list, world: int = 2, group_name: str = "t") -> None:
    from spyglass.trainer.weight_sync import close_update_group, init_update_group, send_bucket
    group = init_update_group("127.0.0.1", port, 0, world, group_name=group_name, timeout_s=60)
    for b in buckets:
        send_bucket(group, b.tensors)
    close_update_group(group)


# ------------------------------------------------------------------------------ tests
def test_config_is_validated():
    import pytest

    from spyglass.trainer.weight_sync import WeightSyncConfig
    for bad, msg in [({"transport": "nccl"}, "sync.transport"), ({"bucket_mb": 0}, "sync.bucket_mb"),
                     ({"dtype": "fp8"}, "sync.dtype"), ({"master_port": 70000}, "sync.master_port"),
                     ({"timeout_s": 0}, "sync.timeout_s")]:
        with pytest.raises(ValueError, match=msg):
            WeightSyncConfig(**bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            WeightSyncConfig(backend="nccl").group_backend()


def test_buckets_mixed_dtypes_bf16_wire_reproduce_the_weights(tmp_path):
    """Several buckets over a real two-process gloo group give back every persistent tensor:
    floating ones rounded to bf16 (the wire), the int buffer exact, tied parameters once."""
    from spyglass.trainer.weight_sync import iter_weight_buckets

    model = Mixed()
    buckets = list(iter_weight_buckets(_runtime(model), 8 << 10, torch.bfloat16, torch.device("cpu")))
    assert len(buckets) >= 3 and all(b.nbytes <= 8 << 10 or len(b.names) == 1 for b in buckets)
    port = free_port()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"port": port, "buckets": [b.meta() for b in buckets]}))
    proc = _child("recv", str(spec), str(tmp_path / "got.pt"))
    _send_over_group(port, buckets)
    _finish(proc)
    got, want = torch.load(tmp_path / "got.pt"), _rounded(model)
    assert set(got) == set(want) and "scratch" not in got
    for k, v in want.items():
        assert got[k].dtype == (torch.int64 if k == "steps" else torch.bfloat16), k
        assert torch.equal(got[k].to(v.dtype), v), k
    tied = _runtime(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)))
    tied.runtime.module.model[1].weight = tied.runtime.module.model[0].weight
    names = [n for b in iter_weight_buckets(tied, 1 << 20, torch.float32, torch.device("cpu")) for n in b.names]
    assert names == ["0.weight"]


def test_vllm_worker_extension_loads_buckets_through_load_weights(tmp_path):
    """The extension on the two fake workers of a TP=2 server (ranks 0 and 1, rank_offset 1):
    each joins as rank_offset + its rank, receives every bucket and loads it with the model's
    load_weights; both hold the trainer's (bf16-rounded) weights exactly."""
    from spyglass.engine.offline import tiny
    from spyglass.trainer.weight_sync import iter_weight_buckets

    trained = tiny.build_tiny_text_lm(seed=1).model
    buckets = list(iter_weight_buckets(_runtime(trained), 512 << 10, torch.bfloat16, torch.device("cpu")))
    port, procs = free_port(), []
    for worker in (0, 1):
        spec = tmp_path / f"spec{worker}.json"
        spec.write_text(json.dumps({"worker_rank": worker, "buckets": [b.meta() for b in buckets], "open": {
            "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 3,
            "group_name": "t", "backend": "gloo", "timeout_s": 60}}))
        procs.append(_child("vllm-worker", str(spec), str(tmp_path / f"out{worker}.pt")))
    _send_over_group(port, buckets, world=3)
    want = _rounded(trained)
    for worker, proc in enumerate(procs):
        _finish(proc)
        out = torch.load(tmp_path / f"out{worker}.pt")
        assert out["opened"] == {"rank": 1 + worker} and out["version"] == 7 and out["closed"]["closed"]
        assert [a["tensors"] for a in out["answers"]] == [len(b.names) for b in buckets] and len(buckets) >= 2
        assert all(torch.equal(out["state"][k], want[k]) for k in want)


def test_sglang_servers_take_weights_over_the_group(tmp_path):
    """GRPO's sync against two fake SGLang servers, each in its own process, in one group
    (rank offsets 1 and 2): /generate then answers with version 1 on both, and the logprobs are
    the trainer's recomputation with the bf16-rounded new weights (not the old ones). The
    second server has SGLang 0.5.21's weight-update sessions: the update is wrapped in
    begin/end there, and the first server's 404 to them is asked once only."""
    import pytest

    from spyglass.engine.backends.base import BackendError, GenerateRequest, SamplingParams
    from spyglass.engine.backends.sglang import SGLangBackend, SGLangConfig
    from spyglass.engine.backends.vllm import VLLMHTTPBackend, VLLMHTTPConfig
    from spyglass.engine.config import ConfigError
    from spyglass.engine.offline import tiny
    from spyglass.trainer.weight_sync import SyncPlan, WeightSync, WeightSyncConfig

    path = tiny.save_tiny_text_lm(tmp_path / "lm0", seed=0)
    old, trained = tiny.build_tiny_text_lm(seed=0).model, tiny.build_tiny_text_lm(seed=1).model
    prompt = [5, 17, 33, 2, 9]

    def logprobs(model: nn.Module, tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1], -1)
        return lp.gather(1, torch.tensor(tokens)[:, None]).squeeze(1)

    rounded = tiny.build_tiny_text_lm(seed=0).model
    rounded.load_state_dict(_rounded(trained))
    loop = asyncio.new_event_loop()
    with fake_sglang(path, tmp_path) as url0, fake_sglang(path, tmp_path, "--sessions") as url1:
        fleet = [SGLangBackend(SGLangConfig(base_url=u, name=f"sg-{i}")) for i, u in enumerate((url0, url1))]
        sync = WeightSync(WeightSyncConfig(transport="group", bucket_mb=1, timeout_s=60), fleet, 0, tmp_path / "w")
        greedy = SamplingParams(max_tokens=8, temperature=0)
        try:
            before = loop.run_until_complete(fleet[0].generate(GenerateRequest("a", prompt, greedy)))
            metrics = sync(_runtime(trained), 1, loop)
            skipped = sync(_runtime(trained), 1, loop)  # no new version (a skipped update): nothing sent
            after = [loop.run_until_complete(be.generate(GenerateRequest("b", prompt, greedy))) for be in fleet]
            info = [loop.run_until_complete(be.request_json("GET", "/get_server_info")) for be in fleet]
        finally:
            sync.close(loop)
            for be in fleet:
                loop.run_until_complete(be.close())
    assert before.version == 0 and [a.version for a in after] == [1, 1] and [be.version for be in fleet] == [1, 1]
    assert set(metrics) == {"sync/group_s", "sync/group_gb", "sync/nccl"} and metrics["sync/group_gb"] > 0
    assert metrics["sync/nccl"] == 0.0  # gloo on CPU
    assert skipped == {"sync/skipped": 1.0}
    assert info[0]["calls"] == ["end404", "init", "update", "update"]  # 1.3 MB in 1 MB buckets; 404: asked once
    # a stale session is ended (none: refused) before the group opens; one session per update
    assert info[1]["calls"] == ["end", "init", "begin", "update", "update", "end"], info[1]["calls"]
    # the version is sent with the last bucket only: SGLang applies one whenever it is sent,
    # and would label outputs v1 while the first bucket's weights alone are in
    assert all(i["versions"] == [None, "1"] for i in info), info
    assert torch.allclose(torch.tensor(before.logprobs), logprobs(old, before.token_ids), atol=1e-4)
    for a in after:
        got, want = torch.tensor(a.logprobs), logprobs(rounded, a.token_ids)
        assert torch.allclose(got, want, atol=1e-4), (got, want)
        assert not torch.allclose(got, logprobs(old, a.token_ids), atol=1e-2)
    # a server that cannot join: "group" refuses naming it, "auto" falls back to disk
    http = VLLMHTTPBackend(VLLMHTTPConfig(base_url="http://127.0.0.1:9", model="m", name="vl-0"))
    with pytest.raises(ConfigError, match="'vl-0' cannot join a weight-update group.*VLLM_SERVER_DEV_MODE"):
        WeightSync(WeightSyncConfig(transport="group"), [http], 0, tmp_path / "w")(_runtime(trained), 2, loop)
    auto = WeightSync(WeightSyncConfig(transport="auto"), [http], 0, tmp_path / "w")
    assert loop.run_until_complete(auto._decide()) == SyncPlan(group=False, state_dict=True, disk=True)
    # a server that refuses to join: an error naming it at once, not a hang until the timeout
    with in_thread(_Refuses({"tp_size": 1})) as (refuses,):
        bad = SGLangBackend(SGLangConfig(base_url=refuses.url, name="sg-bad", retries=0))
        t0 = time.monotonic()
        with pytest.raises(BackendError, match=r"\[sg-bad\] /init_weights_update_group failed"):
            WeightSync(WeightSyncConfig(transport="group", timeout_s=5), [bad], 0, tmp_path / "w")(
                _runtime(trained), 2, loop)
        assert time.monotonic() - t0 < 4
    for b in (http, bad):
        loop.run_until_complete(b.close())
    loop.close()


def test_group_never_splits_from_a_trainer_default_group(tmp_path):
    """Two trainer ranks under a default gloo group whose default group binds a device (as
    DeepSpeed's does on CUDA): rank 0 syncs a fake SGLang server over its own group, built
    without torch's group registry (no split from the default communicator), and both ranks
    then still use their default group."""
    url_port = free_port()
    with fake_sglang(None, tmp_path) as url:
        procs = [_child("trainer-rank", str(r), str(url_port), url, str(tmp_path / "out.json")) for r in (0, 1)]
        for p in procs:
            _finish(p, 120)
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["info"]["calls"] == ["end404", "init", "update"] and out["info"]["received"] == 5
    assert out["info"]["weight_version"] == "1" and out["metrics"]["sync/group_gb"] > 0


def test_reopen_after_a_failed_sync_and_after_a_trainer_restart(tmp_path):
    """A server keeps a group until it is destroyed and refuses its name again (torch does):
    after a refused bucket the next sync destroys the dropped group and opens one under a new
    name; a second trainer (the first never closed) opens its own against the same server. The
    server has weight-update sessions (SGLang >= 0.5.21): the one the refused bucket left open is
    ended before the reopen."""
    import pytest

    from spyglass.engine.backends.base import BackendError
    from spyglass.engine.backends.sglang import SGLangBackend, SGLangConfig
    from spyglass.trainer.weight_sync import WeightSync, WeightSyncConfig

    loop = asyncio.new_event_loop()
    with fake_sglang(None, tmp_path, "--refuse-updates", "1", "--sessions") as url:
        be = SGLangBackend(SGLangConfig(base_url=url, name="sg-0", retries=0))
        first = WeightSync(WeightSyncConfig(transport="group", timeout_s=30), [be], 0, tmp_path / "w")
        with pytest.raises(BackendError, match=r"\[sg-0\] POST /update_weights_from_distributed -> HTTP 400"):
            first(_runtime(Mixed()), 1, loop)
        assert first(_runtime(Mixed()), 1, loop)["sync/group_gb"] > 0  # reopened
        restarted = WeightSync(WeightSyncConfig(transport="group", timeout_s=30), [be], 0, tmp_path / "w")
        assert restarted(_runtime(Mixed()), 2, loop)["sync/group_gb"] > 0
        info = loop.run_until_complete(be.request_json("GET", "/get_server_info"))
        restarted.close(loop)
        loop.run_until_complete(be.close())
    loop.close()
    assert info["calls"] == ["end", "init", "begin", "update",  # refused: its session stays open
                             "destroy", "end", "init", "begin", "update", "end",  # reopened, stale session ended
                             "end", "init", "begin", "update", "end"], info["calls"]  # the second trainer
    assert info["versions"] == [None, "1", "2"] and len(info["groups"]) == 2 and info["received"] == 10


def test_trainer_exits_soon_after_a_failed_sync(tmp_path):
    """A server refuses a bucket while its peer stays in the broadcast: trainer rank 0 raises
    naming it, and its process then exits within seconds (the broadcast left waiting runs on a
    daemon thread and the group is aborted), not after sync.timeout_s."""
    with fake_sglang(None, tmp_path, "--refuse-updates", "1") as url0, fake_sglang(None, tmp_path) as url1:
        proc = _child("trainer-exit", url0, url1)
        try:
            out, _ = proc.communicate(timeout=80)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        ended = time.time()
    failed = [line for line in out.splitlines() if line.startswith("FAILED ")]
    assert failed and "[sg-0] POST /update_weights_from_distributed -> HTTP 400" in failed[0], out[-3000:]
    assert ended - float(failed[0].split()[1]) < 10, out[-3000:]


def test_servers_that_cannot_join_as_tp_ranks_are_refused():
    """SGLang joins as rank_offset + tp_rank: pipeline or data parallel servers are refused
    naming the server and the value; vLLM workers must report ranks 0..n-1."""
    import pytest

    from spyglass.engine.backends.base import BackendError
    from spyglass.engine.backends.sglang import SGLangBackend, SGLangConfig
    from spyglass.trainer.weight_sync import check_worker_ranks

    loop = asyncio.new_event_loop()
    for key in ("pp_size", "dp_size"):
        with in_thread(_Refuses({"tp_size": 2, key: 2})) as (srv,):
            be = SGLangBackend(SGLangConfig(base_url=srv.url, name="sg-pp", retries=0))
            with pytest.raises(BackendError, match=rf"\[sg-pp\] {key}=2"):
                loop.run_until_complete(be.weight_group_size())
            loop.run_until_complete(be.close())
    with in_thread(_Refuses({"tp_size": 2, "pp_size": 1, "dp_size": 1})) as (srv,):
        be = SGLangBackend(SGLangConfig(base_url=srv.url, name="sg-tp", retries=0))
        assert loop.run_until_complete(be.weight_group_size()) == 2
        loop.run_until_complete(be.close())
    loop.close()
    assert check_worker_ranks("vl", [1, 0, 2]) == 3
    with pytest.raises(BackendError, match=r"\[vl\] its workers report ranks \[0, 1, 0, 1\]"):
        check_worker_ranks("vl", [0, 1, 0, 1])


def test_loopback_group_address_with_a_remote_server_is_a_config_error(monkeypatch):
    import pytest

    from spyglass.engine.backends.sglang import SGLangBackend, SGLangConfig
    from spyglass.engine.config import ConfigError
    from spyglass.trainer.weight_sync import WeightSyncConfig, group_address

    local = SGLangBackend(SGLangConfig(base_url="http://127.0.0.1:30000", name="here"))
    remote = SGLangBackend(SGLangConfig(base_url="http://10.1.2.3:30000", name="there"))
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert group_address(WeightSyncConfig(), [local]) == "127.0.0.1"
    with pytest.raises(ConfigError, match=r"address '127.0.0.1' is loopback but server 'there' is at "
                                          r"'http://10.1.2.3:30000'"):
        group_address(WeightSyncConfig(), [local, remote])
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    with pytest.raises(ConfigError, match="'localhost' is loopback"):
        group_address(WeightSyncConfig(), [remote])
    assert group_address(WeightSyncConfig(master_addr="10.1.2.4"), [remote]) == "10.1.2.4"
    for be in (local, remote):
        asyncio.run(be.close())


class _Refuses:
    """An SGLang-shaped server with this /get_server_info whose /init_weights_update_group
    answers success: false."""

    runner: Any = None

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info

    async def start(self) -> None:
        from aiohttp import web
        async def info(_: web.Request) -> web.Response:
            return web.json_response(self.info)

        async def refuse(_: web.Request) -> web.Response:
            return web.json_response({"success": False, "message": "no NCCL here"})

        app = web.Application()
        app.router.add_get("/get_server_info", info)
        app.router.add_post("/init_weights_update_group", refuse)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        await self.runner.cleanup()



# ------------------------------------------------------------------------------ shared memory ("ipc")
def _child_engine(out_file: Path) -> Any:
    """VLLMBackend's weight-sync surface (receive_shared, the probe) over `_share_worker` in
    another process, standing in for vLLM's engine core (whose collective_rpc hands each
    worker the same JSON argument)."""
    from spyglass.engine.backends.base import BackendError
    from spyglass.engine.backends.vllm import VLLMBackend

    class ChildEngine(VLLMBackend):
        def __init__(self) -> None:  # no vLLM: the product's methods over a child process
            self.name, self.version, self._closed, self._tmp = "eng-0", 0, False, None
            self.proc = _child("share-worker", str(out_file), stdin=subprocess.PIPE)
            self.calls: list[str] = []

        async def _rpc(self, method: str, payload: Any, timeout_s: float) -> list[Any]:
            self.calls.append(method)
            self.proc.stdin.write(json.dumps([method, None if payload is None else json.dumps(payload)]) + "\n")
            self.proc.stdin.flush()
            line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout_s)
            answer = json.loads(line)
            if "error" in answer:
                raise BackendError(self.name, f"collective_rpc {method} failed: {answer['error']}")
            return [answer]

        async def _reset_cache(self) -> None:
            self.calls.append("reset_prefix_cache")

        async def close(self) -> None:
            _finish(self.proc)  # closes its stdin: the worker saves its model and exits

    return ChildEngine()


def test_shared_layout_views_every_dtype_in_place():
    """Offsets are ALIGN-aligned; unpack gives views of the buffer (no copy) equal to the packed
    tensors, bf16 / fp16 / int64 / bool / 0-d / empty alike; an offset past the end is refused."""
    import pytest

    from spyglass.trainer.weight_share import ALIGN, layout, pack, unpack

    ts = [torch.randn(3, 5).to(torch.bfloat16), torch.arange(7), torch.randn(()), torch.zeros(0, 4),
          torch.tensor([True, False, True]), torch.randn(2, 3, dtype=torch.float16), torch.randn(129)]
    offsets, total = layout(ts)
    assert all(o % ALIGN == 0 for o in offsets) and total % ALIGN == 0
    assert all(o + t.nbytes <= nxt for o, t, nxt in zip(offsets, ts, offsets[1:] + [total]))  # no overlap
    flat = torch.zeros(total, dtype=torch.uint8)
    pack(flat, ts, offsets)
    names = [f"t{i}" for i in range(len(ts))]
    pairs = unpack(flat, names, [t.dtype for t in ts], [list(t.shape) for t in ts], offsets)
    assert [n for n, _ in pairs] == names
    views = [v for _, v in pairs]
    assert all(torch.equal(v, t) and v.dtype == t.dtype for v, t in zip(views, ts))
    flat[offsets[1]:offsets[1] + 8].fill_(0xFF)  # views, not copies: the int64 0 becomes -1
    assert views[1][0] == -1 and views[1][1] == 1 and views[1].data_ptr() == flat.data_ptr() + offsets[1]
    with pytest.raises(ValueError, match="does not fit"):
        unpack(flat, ["w"], [torch.float32], [[1000]], [offsets[-1]])
    with pytest.raises(ValueError, match="a shared bucket has 2 names, 1 dtypes, 1 shapes and 1 offsets"):
        unpack(flat, ["w", "x"], [torch.float32], [[1]], [0])


def test_shared_memory_sync_reaches_a_worker_in_another_process(tmp_path):
    """sync.transport auto with an in-process engine: the plan is ipc (no group, no disk); the
    buckets reach the worker process through /dev/shm and its model ends up with the trainer's
    bf16-rounded weights exactly, version set and cache reset once, on the last bucket. A second
    update in 64 KB buckets (the embedding alone is larger: the buffer grows) lands as exactly,
    and a third with the buffer freed after its last bucket (as on CUDA); the shared file is gone
    after close."""
    from spyglass.engine.offline import tiny
    from spyglass.trainer.weight_share import ShareSender
    from spyglass.trainer.weight_sync import SyncPlan, WeightSync, WeightSyncConfig, iter_weight_buckets, stream_update

    first, second = tiny.build_tiny_text_lm(seed=1).model, tiny.build_tiny_text_lm(seed=2).model
    loop = asyncio.new_event_loop()
    eng = _child_engine(tmp_path / "worker.pt")
    sync = WeightSync(WeightSyncConfig(transport="auto", bucket_mb=1, timeout_s=60), [eng], 0, tmp_path / "w")
    small = ShareSender(SimpleNamespace(bucket_bytes=64 << 10, timeout_s=60), [eng], torch.device("cpu"))
    try:
        assert sync.prepare(loop) == SyncPlan(group=False, state_dict=False, disk=False, ipc=True)
        m = sync(_runtime(first), 1, loop)
        assert set(m) == {"sync/ipc_s", "sync/ipc_gb"} and m["sync/ipc_gb"] > 0 and eng.version == 1
        assert eng.calls.count("spyglass_receive_shared") >= 2 and eng.calls[-1] == "reset_prefix_cache"
        assert eng.calls.count("reset_prefix_cache") == 1 and not (tmp_path / "w").exists()
        shm = sync.sharer.buffer.path
        assert os.path.exists(shm)
        assert sync(_runtime(first), 1, loop) == {"sync/skipped": 1.0}
        files, orig = [], small._room
        small._room = lambda n: (lambda buf: (files.append(buf.path), buf)[1])(orig(n))
        buckets = sorted(iter_weight_buckets(_runtime(second), 64 << 10, torch.bfloat16, torch.device("cpu")),
                         key=lambda b: b.nbytes)  # smallest first: the buffer must grow on the way
        loop.run_until_complete(stream_update([small], buckets, 2))
        assert len(set(files)) >= 2 and small.buffer.nbytes > 64 << 10 and eng.version == 2
        assert not any(os.path.exists(f) for f in set(files) - {small.buffer.path})  # outgrown ones removed
        small.keep = False  # as on CUDA: the buffer is freed after the update's last bucket, and remade
        loop.run_until_complete(stream_update([small], iter_weight_buckets(
            _runtime(first), 64 << 10, torch.bfloat16, torch.device("cpu")), 3))
        assert small.buffer is None and not any(os.path.exists(f) for f in files) and eng.version == 3
    finally:
        sync.close(loop)
        loop.run_until_complete(small.close())
        loop.run_until_complete(eng.close())
        loop.close()
    assert not os.path.exists(shm)
    for v, model in ((1, first), (2, second), (3, first)):
        got, want = torch.load(tmp_path / f"worker.pt.v{v}"), _rounded(model)
        assert set(want) <= set(got) and all(torch.equal(got[k], want[k]) for k in want), v


def test_a_mixed_fleet_streams_each_bucket_over_the_group_and_through_shared_memory(tmp_path):
    """sync.transport auto with a remote server (a fake SGLang process: the group) and an
    in-process engine (shared memory): one bucket stream reaches both, and each transport's
    seconds and bytes are reported on their own."""
    from spyglass.engine.backends.sglang import SGLangBackend, SGLangConfig
    from spyglass.engine.offline import tiny
    from spyglass.trainer.weight_sync import SyncPlan, WeightSync, WeightSyncConfig

    trained = tiny.build_tiny_text_lm(seed=1).model
    loop = asyncio.new_event_loop()
    eng = _child_engine(tmp_path / "worker.pt")
    with fake_sglang(None, tmp_path) as url:
        sg = SGLangBackend(SGLangConfig(base_url=url, name="sg-0"))
        sync = WeightSync(WeightSyncConfig(transport="auto", bucket_mb=1, timeout_s=60), [sg, eng], 0, tmp_path / "w")
        try:
            assert sync.prepare(loop) == SyncPlan(group=True, state_dict=False, disk=False, ipc=True)
            m = sync(_runtime(trained), 1, loop)
            info = loop.run_until_complete(sg.request_json("GET", "/get_server_info"))
        finally:
            sync.close(loop)
            loop.run_until_complete(sg.close())
            loop.run_until_complete(eng.close())
            loop.close()
    assert set(m) == {"sync/group_s", "sync/group_gb", "sync/nccl", "sync/ipc_s", "sync/ipc_gb"}
    assert m["sync/group_gb"] == m["sync/ipc_gb"] > 0 and m["sync/group_s"] > 0 and m["sync/ipc_s"] > 0
    want = _rounded(trained)
    got = torch.load(tmp_path / "worker.pt.v1")
    assert all(torch.equal(got[k], want[k]) for k in want) and eng.version == sg.version == 1
    assert info["received"] == len(want) and info["versions"][-1] == "1"


def test_shared_buffers_are_named_by_pid_swept_when_dead_and_handles_are_plain_data(tmp_path):
    """A buffer's file carries the trainer's pid and its lock; one left by a killed trainer
    (nobody holds its lock) is removed when the next buffer is made, a locked one stays, and so
    does the new buffer's own file when another is made. open_shared maps only spyglass buffer
    files, and the CUDA export is sent as the fields torch's rebuild_cuda_tensor takes by name
    (no pickle)."""
    import fcntl
    import inspect

    import pytest
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    from spyglass.trainer import weight_share
    from spyglass.trainer.weight_share import PREFIX, SharedBuffer, open_shared

    dead, live = tmp_path / f"{PREFIX}999999999-abc", tmp_path / f"{PREFIX}{os.getppid()}-def"
    dead.write_bytes(b"x")
    live.write_bytes(b"x")
    with open(live) as held:
        fcntl.flock(held, fcntl.LOCK_SH)  # as its trainer does while alive
        buf = SharedBuffer(4096, torch.device("cpu"), shm_dir=str(tmp_path))
        other = SharedBuffer(4096, torch.device("cpu"), shm_dir=str(tmp_path))
    assert not dead.exists() and live.exists() and Path(buf.path).name.startswith(f"{PREFIX}{os.getpid()}-")
    assert os.path.exists(buf.path) and os.path.exists(other.path)  # made second, the first survived
    handle = buf.handle()
    assert json.loads(json.dumps(handle)) == handle and open_shared(handle).numel() == 4096
    buf.close()
    other.close()
    SharedBuffer(4096, torch.device("cpu"), shm_dir=str(tmp_path)).close()  # the lock released: swept now
    assert not live.exists() and not list(tmp_path.glob(f"{PREFIX}*"))
    with pytest.raises(ValueError, match="not a spyglass weight buffer"):
        open_shared({"kind": "shm", "path": str(live.with_name("passwd")), "nbytes": 1})
    sent = {"tensor_cls", "tensor_size", "tensor_stride", "tensor_offset", "storage_cls", "dtype", "storage_device",
            "requires_grad", "event_sync_required", *weight_share._INTS, *weight_share._BYTES}
    assert set(inspect.signature(rebuild_cuda_tensor).parameters) == sent


def test_ipc_transport_refuses_a_server_that_cannot_map_the_trainers_memory(tmp_path):
    """sync.transport ipc with an HTTP server (it answers the group probe, but is no child of
    the trainer): one ConfigError naming it, before any weights move; a too-small shared-memory
    folder is one error naming the sizes, and leaves no file behind."""
    import pytest

    from spyglass.engine.backends.sglang import SGLangBackend, SGLangConfig
    from spyglass.engine.config import ConfigError
    from spyglass.trainer.weight_share import SharedBuffer
    from spyglass.trainer.weight_sync import WeightSync, WeightSyncConfig

    loop = asyncio.new_event_loop()
    with in_thread(_Refuses({"tp_size": 1})) as (srv,):
        be = SGLangBackend(SGLangConfig(base_url=srv.url, name="sg-far", retries=0))
        with pytest.raises(ConfigError, match="transport 'ipc': server 'sg-far' cannot take weights through shared"):
            WeightSync(WeightSyncConfig(transport="ipc"), [be], 0, tmp_path / "w")(_runtime(Mixed()), 1, loop)
        loop.run_until_complete(be.close())
    loop.close()
    with pytest.raises(RuntimeError, match=r"shared-memory sync needs \d+ MB in .* MB is free"):
        SharedBuffer(1 << 60, torch.device("cpu"), shm_dir=str(tmp_path))
    assert not list(tmp_path.glob("spyglass-weights-*"))


if __name__ == "__main__":
    role = sys.argv[1]
    {"vllm-worker": _vllm_worker, "share-worker": _share_worker, "recv": _receiver, "trainer-rank": _trainer_rank,
     "trainer-exit": _trainer_exit}[role](*sys.argv[2:])
