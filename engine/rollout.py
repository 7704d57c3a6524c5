"""`spyglass rollout` and `spyglass bench rollout`: the engine over the world, from one config.

run_rollout writes trajectories as JSONL, append-only and fsynced per finished group; a crashed
run started again with the same output skips the groups already on disk and goes on, so nothing
is duplicated or lost. bench_rollout runs the same workload twice, by the async engine and by
the lock-step baseline (cfg.lockstep), and prints throughput and their ratio.

    run_rollout(RolloutConfig(out="runs/r.jsonl"))          # tiny VLM, replay policy, world
    run_rollout(RolloutConfig(model="/models/Qwen2.5-VL-7B-Instruct", policy="sample",
                              env=EnvConfig(data=DataConfig(path="questions.jsonl"))))
    bench_rollout(RolloutConfig())                          # the README's main job
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

from .config import ConfigError, check
from .loader import LoadConfig, LoadedModel, check_model_spec, load_model
from .metrics import device_name, git_commit
from .env import Env, EnvConfig, build_env
from .scheduler import Engine, EngineConfig
from .trajectory import Trajectory, iter_jsonl, truncate_torn_tail, write_jsonl


@dataclass
class RolloutConfig:
    """One rollout run (every field is a CLI flag: --engine.n_samples 4, --env.questions 8)."""

    FLAG_ALIASES: ClassVar[dict[str, str]] = {"data": "env.data.path"}

    engine: EngineConfig = field(default_factory=lambda: EngineConfig(n_samples=4, max_live=64))
    env: EnvConfig = field(default_factory=lambda: EnvConfig(questions=12))
    model: str = "tiny:qwen2_vl"  # a Hugging Face checkpoint dir, a hub id in the local HF cache, or tiny:<family> (the fixture)
    load: LoadConfig = field(default_factory=LoadConfig)  # device, dtype, attention of the loaded model
    backend: str = "hf"  # hf | vllm | vllm-http | sglang | openai (see engine/backends)
    backend_options: dict[str, Any] = field(default_factory=dict)  # that backend's config fields
    servers: int = 1  # backend servers (affinity + failover across them)
    server_urls: str = ""  # a fleet of servers: URL[,URL...] or @FILE (one URL a line); each is one backend
    #   of `backend` (its backend_options with that base_url), health-checked at start ("" = none)
    agent_env: str = ""  # a custom environment by dotted path (pkg.mod:Class, made with no arguments;
    #   engine/scheduler.py AgentEnv): it steps every turn instead of the tools ("" = the tools)
    policy: str = field(default="replay", metadata={"choices": ("replay", "sample", "mixed")})  # replay: forced decoding of solve scripts | sample: the model samples
    #                         mixed: sample 0 of each group replays, the others sample
    out: str = "runs/rollout.jsonl"  # trajectories, one JSONL line each (appended per finished group)
    resume: bool = True  # skip groups already in `out` (False: `out` must not exist yet)
    max_failed_fraction: float = 0.0  # share of trajectories that may fail for infrastructure
    #   reasons (a backend refused or died) before the run ends with an error; they are redone on resume
    timeline: str = ""  # PNG path for the timeline picture ("" = none)
    progress: bool = True  # show a progress bar of finished groups

    def __post_init__(self) -> None:
        check(self.policy in ("replay", "sample", "mixed"),
              f"policy must be replay|sample|mixed, got {self.policy!r}")
        check(self.servers >= 1, f"servers must be >= 1, got {self.servers}")
        from .backends import KINDS, backend_config  # noqa: PLC0415
        check(self.backend in KINDS, f"backend must be one of {sorted(KINDS)}, got {self.backend!r}")
        if self.backend != "hf":  # its options are checked now (hf's go to HFBackend's constructor)
            backend_config(self.backend, **{**self.backend_options, "name": f"{self.backend}-0"})
        check(not self.server_urls or self.backend != "hf", "server_urls needs a server backend (vllm-http, sglang, "
                                                            f"openai), not {self.backend!r}")
        check(not self.server_urls or self.servers == 1, f"server_urls names the fleet: leave servers at 1, got {self.servers}")
        for u in fleet_urls(self.server_urls):
            backend_config(self.backend, **{**self.backend_options, "base_url": u, "name": "x"})
        check(0.0 <= self.max_failed_fraction <= 1.0, f"max_failed_fraction must be in [0, 1], got {self.max_failed_fraction}")
        check_model_spec(self.model)
        if self.agent_env:  # importable now (made per engine)
            from .plugins import load_object  # noqa: PLC0415
            load_object(self.agent_env, "agent_env")
        check(not (self.env.data.path and self.policy in ("replay", "mixed")),
              f"policy {self.policy!r} replays the bundled world's solve scripts; questions from data.path "
              f"{self.env.data.path!r} have none: use --policy sample")


IMAGE_TOOLS = ("Crop", "Sharpen", "SuperResolution", "PerspectiveCorrect", "OCR", "ImageSearch")


def _model_and_codec(cfg: RolloutConfig) -> tuple[LoadedModel | None, Any]:
    """The model (through the one loader) and its chat codec; a server backend loads no
    weights here, only the checkpoint's tokenizer and image processor (the codec)."""
    if cfg.backend != "hf":
        from .loader import codec_only  # noqa: PLC0415
        return None, codec_only(cfg.model, cfg.load)
    loaded = load_model(cfg.model, cfg.load)
    return loaded, loaded.codec()


def check_text_only(codec: Any, env: Env, model: str) -> None:
    """A text-only model cannot see images: image tools or questions with images are a config
    error naming them (the engine never drops an image silently)."""
    if getattr(codec, "takes_images", True):
        return
    tools = [t for t in env.tools if t in IMAGE_TOOLS]
    check(not tools, f"model {model!r} is text-only: tools {tools} work on images; choose text tools "
                     f"(--env.tools TextSearch,Visit,Python)")
    with_images = [r.id for r in env.records if r.images]
    check(not with_images, f"model {model!r} is text-only but {len(with_images)} question(s) have images "
                           f"(first: {with_images[:3]}); use a vision-language checkpoint or text-only data")


def fleet_urls(spec: str) -> list[str]:
    """The URLs of `server_urls`: a comma-separated list, or @FILE with one URL a line (# comments)."""
    if not spec:
        return []
    if spec.startswith("@"):
        path = Path(spec[1:])
        check(path.is_file(), f"server_urls: {path} is not a file")
        lines = [x.split("#", 1)[0].strip() for x in path.read_text().splitlines()]
    else:
        lines = [x.strip() for x in spec.split(",")]
    urls = [x for x in lines if x]
    check(bool(urls), f"server_urls {spec!r} names no URL")
    check(len(set(urls)) == len(urls), f"server_urls repeats a URL: {urls}")
    return urls


async def check_fleet(backends: list[Any]) -> None:
    """Every server answers its health check, or one ConfigError names those that do not."""
    ok = await asyncio.gather(*(b.health() for b in backends))
    dead = [getattr(b, "name", str(i)) for i, (b, up) in enumerate(zip(backends, ok)) if not up]
    check(not dead, f"servers not answering their health check: {dead} (of {len(backends)})")


def make_backends(cfg: RolloutConfig, loaded: LoadedModel | None, prefix: str | None = None) -> list[Any]:
    """The config's generation servers (the one place they are built): `servers` HF backends
    over `loaded` (the model this process holds), or `servers` clients of another kind from
    `backend_options`."""
    from .backends import backend_config, make_backend  # noqa: PLC0415
    from .backends.hf import HFBackend  # noqa: PLC0415
    prefix = prefix or cfg.backend
    if cfg.backend == "hf":
        check(loaded is not None, "the hf backend needs the loaded model")
        opts = {k: v for k, v in cfg.backend_options.items() if k != "name"}
        return [HFBackend.from_model(loaded, name=f"{prefix}-{i}", **opts) for i in range(cfg.servers)]
    if cfg.server_urls:  # a fleet: one backend per URL, named by it
        return [make_backend(backend_config(cfg.backend, **{**cfg.backend_options, "base_url": u, "name": u}))
                for u in fleet_urls(cfg.server_urls)]
    return [make_backend(backend_config(cfg.backend, **{**cfg.backend_options, "name": f"{prefix}-{i}"}))
            for i in range(cfg.servers)]


def make_engine(cfg: EngineConfig, backends: list[Any], codec: Any, runner: Any, schemas: list[dict[str, Any]],
                prompt_tools: list[dict[str, Any]] | None = None, policy: Any = None,
                record_spans: bool = False, reward: Any = None, env: Any = None) -> Engine:
    """The one assembly of an Engine: the C++ turn parser over `schemas`, the prompt's tool list
    (`prompt_tools`, default the same schemas), image token counts from the codec; `reward`: an
    async function scoring each finished group (list of Trajectory) before the engine yields it."""
    from .toolcall import make_turn_parser  # noqa: PLC0415
    return Engine(cfg, backends, codec, runner, make_turn_parser(schemas),
                  tool_schemas=schemas if prompt_tools is None else prompt_tools, policy=policy,
                  image_tokens=getattr(codec, "image_tokens", None), record_spans=record_spans, reward=reward,
                  env=env)


def agent_env(path: str) -> Any:
    """The custom environment a dotted path names (a class or factory called with no arguments,
    giving an object with an async `step`), or None for ""."""
    if not path:
        return None
    from .plugins import PluginError, load_object  # noqa: PLC0415
    made = load_object(path, "agent_env")()
    if not callable(getattr(made, "step", None)):
        raise PluginError(f"agent_env {path!r}: {type(made).__name__} has no step(traj, turn) method")
    return made


def build_engine(cfg: RolloutConfig, env: Env, engine_cfg: EngineConfig | None = None,
                 record_spans: bool = False, vlm: Any = None, replay_per_group: int = 1,
                 scripts: dict[str, list[str]] | None = None, prompts: list[Any] | None = None
                 ) -> tuple[Engine, list[Any], str]:
    """The engine for a config: model and codec (loaded here unless `vlm`, a model already
    loaded for this config, e.g. shared with a trainer), backends, the env's tools, the C++
    parser, the policy. `replay_per_group`: samples per group that replay under policy "mixed";
    `scripts` / `prompts`: solve scripts and prompts other than the env's (synthesized questions)."""
    from .policy import MixedPolicy, ReplayPolicy  # noqa: PLC0415
    vlm, codec = (vlm, vlm.codec()) if vlm is not None else _model_and_codec(cfg)
    check_text_only(codec, env, cfg.model)
    backends = make_backends(cfg, vlm)
    blind = [b.name for b in backends if not getattr(b, "supports_images", True)]
    with_images = [r.id for r in env.records if r.images] if blind else []
    check(not with_images, f"backend {blind[0] if blind else ''!r} takes no images but {len(with_images)} question(s) "
                           f"have images (first: {with_images[:3]}): use the hf backend or text-only data")
    scripts = env.replay_scripts() if scripts is None else scripts
    if cfg.policy in ("replay", "mixed"):
        ids = [p.id for p in prompts] if prompts is not None else [r.id for r in env.records]
        missing = [i for i in ids if i not in scripts]
        check(not missing, f"policy {cfg.policy!r} replays solve scripts, which only the bundled world's questions "
                           f"have; {len(missing)} question(s) have none (first: {missing[:3]}): use --policy sample")
    replay = ReplayPolicy(codec, scripts)
    policy = {"replay": replay, "sample": None,
              "mixed": MixedPolicy(replay, replay_per_group)}[cfg.policy]
    engine = make_engine(engine_cfg or cfg.engine, backends, codec, env.runner, env.schemas, env.prompt_tools,
                         policy, record_spans, env=agent_env(cfg.agent_env))
    name = policy.name if policy is not None else "sample (the model's own policy)"
    return engine, backends, name


INFRA_FAILURES = ("backend_error", "engine_error")  # stop reasons that are not the policy's doing


class RolloutFailed(RuntimeError):
    """More trajectories failed for infrastructure reasons than max_failed_fraction allows
    (they are on disk, marked, and redone by a resumed run)."""


def finished_groups(path: str | Path, group_size: int) -> set[str]:
    """Group ids finished in an existing output: group_size trajectories, none of them failed for
    an infrastructure reason (INFRA_FAILURES). The others (a crash between a group's lines, a
    backend that failed, an earlier run with fewer samples) are moved, atomically, to
    `<out>.redo-<time>.jsonl` (never deleted) and redone whole, never duplicated; a torn last
    line is cut first. Groups larger than group_size (an earlier run with more samples) are a
    ConfigError: nothing is changed."""
    p = Path(path)
    if not p.exists():
        return set()
    truncate_torn_tail(p)
    counts: dict[str, int] = {}
    failed: set[str] = set()
    seen: set[str] = set()
    lines: list[tuple[str, bool]] = []  # per line: its group, and whether it is a trajectory's first copy
    for t in iter_jsonl(p):  # one pass for the bookkeeping; the file is read again only to move lines
        lines.append((t.group_id, t.id not in seen))
        if t.id in seen:  # two runs wrote the same trajectory (before the lock): keep the first
            continue
        seen.add(t.id)
        counts[t.group_id] = counts.get(t.group_id, 0) + 1
        if t.status.value == "error" and t.stop_reason in INFRA_FAILURES:
            failed.add(t.group_id)
    larger = sorted({c for c in counts.values() if c > group_size})
    check(not larger, f"{p} holds groups of {larger} trajectories but engine.n_samples is {group_size}: "
                      f"use the same n_samples or another --out (nothing was changed)")
    done = {g for g, c in counts.items() if c == group_size} - failed
    keep = {i for i, (g, first) in enumerate(lines) if first and g in done}
    total = len(lines)
    if len(keep) < total:
        aside = p.with_name(f"{p.name}.redo-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        tmp = p.with_name(p.name + ".resume-tmp")
        tmp.unlink(missing_ok=True)
        write_jsonl(tmp, (t for i, t in enumerate(iter_jsonl(p)) if i in keep))
        write_jsonl(aside, (t for i, t in enumerate(iter_jsonl(p)) if i not in keep))
        os.replace(tmp, p)
        print(f"[rollout] {total - len(keep)} line(s) of unfinished groups or duplicates moved to {aside}; "
              f"{len(counts) - len(done)} group(s) are redone", flush=True)
    return done


@contextlib.contextmanager
def exclusive(path: str | Path) -> Iterator[None]:
    """An exclusive lock on `<path>.lock` for the run (a second run on the same output fails
    with a clear error instead of duplicating its trajectories)."""
    import fcntl  # noqa: PLC0415
    lock = Path(f"{path}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another run is writing {path} (it holds {lock}); wait for it or use another --out") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


async def _drive(engine: Engine, prompts: list, out: str | None, progress: bool) -> list[list[Trajectory]]:
    from tqdm import tqdm  # noqa: PLC0415
    groups = []
    try:
        await check_fleet(engine.backends)  # a dead server is one line before any work, not a failed run
        with tqdm(total=len(prompts), desc="groups", disable=not progress, leave=False) as bar:
            async for g in engine.run(prompts):
                if out:
                    write_jsonl(out, g)  # one group, flushed and fsynced: a crash loses no group
                groups.append(g)
                bar.update(1)
    finally:
        for b in engine.backends:
            await b.close()
    return groups


def run_rollout(cfg: RolloutConfig) -> dict[str, Any]:
    """Roll out the questions into cfg.out; returns (and prints) the summary. Raises
    RolloutFailed (after writing everything) when more than max_failed_fraction of the
    trajectories failed for infrastructure reasons."""
    env = build_env(cfg.env)
    prompts = env.prompts()
    with exclusive(cfg.out):
        check(cfg.resume or not Path(cfg.out).exists(),
              f"out {cfg.out!r} exists and resume is off: move it or choose another --out (nothing is deleted)")
        done = finished_groups(cfg.out, cfg.engine.n_samples) if cfg.resume else set()
        todo = [p for p in prompts if p.id not in done]
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        engine, _, policy = build_engine(cfg, env, record_spans=bool(cfg.timeline))
        groups = asyncio.run(_drive(engine, todo, cfg.out, cfg.progress))
    failed = [t for g in groups for t in g if t.status.value == "error" and t.stop_reason in INFRA_FAILURES]
    summary = {"policy": policy, "skipped_groups": len(done), "groups": len(groups),
               "bad_records": len(env.bad_records), "infra_failed": len(failed),
               **engine.stats.summary(), "tools": env.executor.stats().get("coalescer", {})}
    if cfg.timeline:
        from .timeline import draw_timeline  # noqa: PLC0415
        draw_timeline(engine.stats.spans, cfg.timeline, title=f"{len(groups)} groups, {policy}")
        summary["timeline"] = cfg.timeline
    n = sum(len(g) for g in groups)
    if failed and len(failed) > cfg.max_failed_fraction * n:
        first = failed[0].meta.get("engine_error", failed[0].stop_reason)
        raise RolloutFailed(f"{len(failed)} of {n} trajectories failed for infrastructure reasons (first: "
                            f"{failed[0].id}: {first}); they are in {cfg.out} and a rerun of the same command "
                            f"redoes their groups")
    return summary


FLEET = {"step_a_s": 0.020, "step_b_s": 0.00005, "tool_median_s": 1.5, "tool_sigma": 1.0, "time_scale": 0.05}


def bench_rollout(cfg: RolloutConfig) -> dict[str, Any]:
    """The main job: the same workload by the async engine and by the lock-step baseline on this
    machine, then the same trajectories on a latency-modelled fleet (engine/simfleet.py)."""
    import tempfile  # noqa: PLC0415
    rows = {}
    scratch = tempfile.TemporaryDirectory(prefix="spyglass-bench-")  # removed when collected
    t0 = time.perf_counter()
    _bench_mode(cfg, scratch.name, "warmup", limit=1)  # loads the tools' models, first forwards: untimed
    warm = time.perf_counter() - t0
    trajs: list[Trajectory] = []
    for mode in ("async", "lockstep"):
        rows[mode], policy, n_prompts, got = _bench_mode(cfg, scratch.name, mode)
        trajs = trajs or got
    ratio = rows["lockstep"]["wall_s"] / rows["async"]["wall_s"]
    fleet = bench_fleet(trajs, cfg.engine.max_live)
    print(f"spyglass bench rollout: backend {cfg.backend} ({cfg.model}), policy: {policy}")
    print(f"workload: {n_prompts} world questions x {cfg.engine.n_samples} samples, real tools, "
          f"live <= {cfg.engine.max_live} (warm-up first, untimed: {warm:.1f} s)")
    print(f"\non this machine ({device_name()}; the model and the tools share its cores):")
    print(f"{'schedule':<12}{'wall s':>9}{'traj/s':>9}{'tok/s':>9}{'turns':>7}{'calls':>7}{'right':>7}")
    for mode, r in rows.items():
        print(f"{mode:<12}{r['wall_s']:>9.2f}{r['trajectories_per_s']:>9.2f}{r['tokens_per_s']:>9.0f}"
              f"{r['turns']:>7}{r['tool_calls']:>7}{r['answered_right']:>4}/{r['trajectories']}")
    print(f"async / lock-step speed-up: {ratio:.2f}x")
    f = FLEET
    print(f"\nthe same {len(trajs)} trajectories on a latency-modelled fleet (a server whose decode step "
          f"takes {f['step_a_s'] * 1e3:g} ms + {f['step_b_s'] * 1e3:g} ms a sequence; web tools, "
          f"lognormal latency, median {f['tool_median_s']:g} s), model seconds:")
    print(f"{'schedule':<28}{'makespan s':>11}{'vs bound':>10}")
    for name, key in (("zero-overhead bound (DES)", "bound_s"), ("async engine", "async_s"), ("lock-step", "lockstep_s")):
        print(f"{name:<28}{fleet[key]:>11.1f}{fleet[key] / fleet['bound_s']:>10.3f}")
    print(f"async / lock-step speed-up: {fleet['lockstep_s'] / fleet['async_s']:.2f}x")
    if cfg.timeline:
        print(f"timeline: {cfg.timeline}")
    line = {"bench": "rollout_hf", "device": device_name(), "commit": git_commit(), "policy": policy,
            "speedup_vs_lockstep": ratio, "warmup_s": warm,
            **{f"{m}_{k}": v for m, r in rows.items() for k, v in r.items()},
            **{f"fleet_{k}": v for k, v in fleet.items()},
            "fleet_speedup_vs_lockstep": fleet["lockstep_s"] / fleet["async_s"]}
    print(json.dumps(line))
    return line


def _bench_mode(cfg: RolloutConfig, scratch: str, mode: str, limit: int = 0
                ) -> tuple[dict[str, Any], str, int, list[Trajectory]]:
    """One timed pass of the main job. A fresh executor per mode: its own coalescer and its own
    empty disk cache (as in production, a call repeated after the first finished is a cache hit,
    not a re-run)."""
    env = build_env(dataclasses.replace(cfg.env, cache_path=cfg.env.cache_path or
                                        str(Path(scratch) / f"{mode}.sqlite")))
    prompts = env.prompts()[:limit or None]
    ecfg = dataclasses.replace(cfg.engine, lockstep=(mode == "lockstep"), n_samples=1 if limit else cfg.engine.n_samples)
    engine, _, policy = build_engine(cfg, env, ecfg, record_spans=bool(cfg.timeline) and mode == "async")
    t0 = time.perf_counter()
    groups = asyncio.run(_drive(engine, prompts, None, cfg.progress and not limit))
    wall = time.perf_counter() - t0
    trajs = [t for g in groups for t in g]
    ok = sum(t.status.value == "answered" and t.answer == t.meta.get("answer") for t in trajs)
    ts = env.executor.stats()
    row = {"wall_s": wall, "trajectories": len(trajs), "turns": engine.stats.turns,
           "gen_tokens": engine.stats.gen_tokens, "trajectories_per_s": len(trajs) / wall,
           "tokens_per_s": engine.stats.gen_tokens / wall, "answered_right": ok,
           "tool_calls": ts["calls"], "cache_hits": ts["cache_hits"],
           "coalescing_ratio": ts.get("coalescer", {}).get("coalescing_ratio")}
    if mode == "async" and cfg.timeline:
        from .timeline import draw_timeline  # noqa: PLC0415
        draw_timeline(engine.stats.spans, cfg.timeline, title=f"async engine, {policy}")
    return row, policy, len(prompts), trajs


def bench_fleet(trajs: list[Trajectory], live: int) -> dict[str, float]:
    """The turn structure of `trajs` on the latency-modelled fleet of FLEET: the zero-overhead
    bound, the async engine and lock-step, in model seconds."""
    from .simfleet import des_bound, from_trajectories, run_engine  # noqa: PLC0415
    f = FLEET
    work = from_trajectories(trajs, f["tool_median_s"], f["tool_sigma"])
    live = min(live, len(work))
    run = dict(live=live, step_a_s=f["step_a_s"], step_b_s=f["step_b_s"], time_scale=f["time_scale"])
    return {"bound_s": des_bound(work, live, f["step_a_s"], f["step_b_s"]),
            "async_s": asyncio.run(run_engine(work, **run))[0] / f["time_scale"],
            "lockstep_s": asyncio.run(run_engine(work, **run, lockstep=True))[0] / f["time_scale"]}
