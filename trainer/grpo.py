"""Fatal-aware GRPO (OpenSearch-VL Sec. 4.2): the outer loop, on one screen.

    rollout (engine, streaming groups) -> reward -> advantage (kernel) -> update (masked loss
    kernel on packed micro-batches) -> weight sync -> periodic eval and checkpoint

Rank 0 owns the engine and its backends; the finished batch is broadcast so every rank trains
on the same global batch (DeepSpeed ZeRO shards the work). A resumed run restores weights,
optimizer, RNG and the data position, pushes the weights to the backends, and continues exactly
(rollout seeds depend only on the config seed, the trajectory id and the turn).

    spyglass grpo --steps 3                                   # CPU, tiny VLM, bundled world
    torchrun --nproc_per_node=2 -m spyglass.trainer.cli grpo --dist.strategy zero2 --steps 2
"""
from __future__ import annotations

import asyncio
import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch

from spyglass.engine.config import check
from spyglass.engine.env import build_env
from spyglass.engine.gateway import Gateway, ServeConfig, serve
from spyglass.engine.loader import load_model
from spyglass.engine.rollout import RolloutConfig, build_engine, check_fleet, make_backends
from spyglass.engine.scheduler import EngineConfig
from spyglass.engine.trajectory import write_jsonl
from spyglass.trainer.algorithm import AlgoConfig, compute_advantages
from spyglass.trainer.checkpoint import export_model, latest_checkpoint, load_checkpoint, save_checkpoint
from spyglass.trainer.distributed import DistConfig, init_distributed, sleep_backends, wake_backends
from spyglass.trainer.reward import RewardConfig, score_group
from spyglass.trainer.sft import SFTDataConfig, load_sft_data
from spyglass.trainer.update import PolicyUpdater, UpdateConfig
from spyglass.trainer.weight_sync import WeightSync, WeightSyncConfig


def _rollout_defaults() -> RolloutConfig:
    return RolloutConfig(engine=EngineConfig(n_samples=4, max_live=32, max_turns=6, max_tokens_per_turn=64,
                                             temperature=1.0, groups_per_step=2),
                         policy="mixed", out="runs/grpo/rollouts.jsonl")


@dataclass
class GRPOConfig:
    """Every field is a flag: --algo.mode fatal_mask, --update.lr 1e-5, --dist.strategy zero2."""

    FLAG_ALIASES: ClassVar[dict[str, str]] = {"model": "rollout.model", "data": "rollout.env.data.path",
                                              "groups_per_step": "rollout.engine.groups_per_step"}

    rollout: RolloutConfig = field(default_factory=_rollout_defaults)
    replay_per_group: int = 1  # policy "mixed": samples per group that replay the solve script
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    update: UpdateConfig = field(default_factory=lambda: UpdateConfig(lr=1e-3, micro_batch_tokens=8192))
    dist: DistConfig = field(default_factory=DistConfig)
    sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)  # trainer -> servers after each update
    steps: int = 3  # training steps (rollout, reward, update) in all; a resumed run goes on up to it
    colocate: bool = False  # generation sleeps (frees its memory) during each update
    eval_every: int = 0  # 0: no periodic eval
    eval_questions: int = 4  # the last prompts, held out of training for the eval (when eval_every > 0)
    ckpt_dir: str = "runs/grpo/ckpt"  # checkpoints are saved in (and resumed from) this directory
    ckpt_every: int = 1  # steps between checkpoints; 0: no checkpoints
    resume: bool = True  # continue from the latest checkpoint in ckpt_dir, if there is one
    log_dir: str = "runs/grpo"  # metrics.jsonl (and TensorBoard logs, if installed) go here
    export_dir: str = ""  # "" = no export; else the final model is saved there (a --model directory)
    # demonstrations for the NLL term (update.sft_coef > 0): SFT data, trajectory JSONL or
    # ShareGPT (trainer.sft's formats); sft_batch of them, in a seeded order, each step
    sft_data: str = ""
    # train an external agent: rank 0 serves the policy on this OpenAI-compatible gateway
    # (engine/gateway.py) and each step trains on the groups its clients close with a reward
    serve: Optional[ServeConfig] = None
    sft_batch: int = 4  # demonstrations per step for the NLL term (with sft_data)
    seed: int = 0  # torch seed of the trainer and the order of the demonstrations
    #   (rollout sampling uses rollout.engine.seed)

    def __post_init__(self) -> None:
        check(self.steps >= 0, f"steps must be >= 0, got {self.steps}")
        check(self.rollout.engine.groups_per_step >= 1, f"rollout.engine.groups_per_step (prompts per step) must be "
                                                         f">= 1, got {self.rollout.engine.groups_per_step}")
        check(self.replay_per_group >= 0, f"replay_per_group must be >= 0, got {self.replay_per_group}")
        check(self.serve is None or not self.eval_every, "eval_every needs the engine's own rollouts, not serve")
        check(self.sft_batch >= 1, f"sft_batch must be >= 1, got {self.sft_batch}")
        check(bool(self.sft_data) == (self.update.sft_coef > 0),
              f"update.sft_coef={self.update.sft_coef} and sft_data={self.sft_data!r}: the NLL term needs both or neither")
        check(not self.sft_data or Path(self.sft_data).is_file(), f"sft_data {self.sft_data!r} is not a file")
        check(self.update.temperature == self.rollout.engine.temperature or self.rollout.policy == "replay",
              f"update.temperature {self.update.temperature} must equal the sampling temperature "
              f"{self.rollout.engine.temperature}: the old logprobs are the sampler's")


def run_grpo(cfg: GRPOConfig) -> dict[str, Any]:
    """The outer loop (see the module docstring); returns the last step's metrics."""
    info = init_distributed(cfg.dist)
    torch.manual_seed(cfg.seed)
    run = _Run(cfg, info.rank, asyncio.new_event_loop())
    metrics: dict[str, Any] = {}
    try:
        for step in range(run.start, cfg.steps):
            t0 = time.perf_counter()
            trajs = run.broadcast(run.rollout_and_score() if run.rank == 0 else None)  # rollout, reward
            algo = compute_advantages(trajs, cfg.algo, fatal_k=cfg.rollout.engine.fatal_k,  # advantage
                                      fatal_errors=cfg.rollout.engine.fatal_errors)
            t1 = time.perf_counter()
            run.colocate("sleep")
            metrics = {"step": step + 1, **run.update(trajs, algo),
                       **{f"algo/{k}": v for k, v in algo.metrics.items()}}            # update
            run.colocate("wake")
            t2 = time.perf_counter()
            metrics.update(run.sync())                                                 # weight sync
            metrics.update({"time/rollout_s": t1 - t0, "time/update_s": t2 - t1,
                            "time/sync_s": time.perf_counter() - t2})
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and run.rank == 0:
                metrics.update(run.evaluate())                                         # eval
            run.log(metrics, trajs)
            if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0:                  # checkpoint
                save_checkpoint(cfg.ckpt_dir, run.updater, data_state=run.data_state(),
                                engine_state={"version": run.updater.version}, step=step + 1)
        if cfg.export_dir:
            export_model(run.updater, cfg.rollout.model, cfg.export_dir, cfg.rollout.load)
    finally:
        run.close()
    return metrics


def _demonstrations(cfg: GRPOConfig, codec: Any) -> list:
    """The NLL term's demonstrations in a seeded order ([] when there is none)."""
    if not cfg.sft_data:
        return []
    demos = load_sft_data(SFTDataConfig(path=cfg.sft_data), cfg.sft_data, codec)
    check(len(demos) > 0, f"sft_data {cfg.sft_data!r} holds no (answered) trajectories")
    order = torch.randperm(len(demos), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    return [demos[i] for i in order]


class _Run:
    """The state the loop carries: model copies, engine, updater, data position, logs."""

    def __init__(self, cfg: GRPOConfig, rank: int, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg, self.rank, self.loop, self.pos, self.start, self.sft_pos = cfg, rank, loop, 0, 0, 0
        vlm = load_model(cfg.rollout.model, cfg.rollout.load)  # the trainer's weights, whatever serves them
        codec = vlm.codec()
        self.demos = _demonstrations(cfg, codec)
        # the trainer owns its own copy: DeepSpeed wraps it and train() mode must not leak;
        # with a KL term the reference is a frozen copy of the initial policy (--rollout.model,
        # also on resume: the checkpoint restores only the trained copy)
        ref = copy.deepcopy(vlm.model) if cfg.update.loss.kl_coef > 0 else None
        self.updater = PolicyUpdater(copy.deepcopy(vlm.model), cfg.update, image_processor=vlm.image_processor,
                                     ref_model=ref, dist=cfg.dist,
                                     max_lag=lag if (lag := cfg.rollout.engine.max_version_lag) >= 0 else None)
        self.backends, self.engine, self.writer, self.slept, self.gateway = [], None, None, [], None
        if rank == 0 and cfg.serve is not None:  # an external agent's sessions are the rollouts
            self.gateway = _start_gateway(self, vlm, codec)
        elif rank == 0:
            self.env = build_env(cfg.rollout.env)
            self.prompts = self.env.prompts()
            held = cfg.eval_questions if cfg.eval_every else 0
            check(len(self.prompts) > held, f"eval_questions={held} leaves no training prompts "
                                            f"out of {len(self.prompts)}")
            self.train_prompts = self.prompts[:len(self.prompts) - held]  # eval never trains
            self.engine, self.backends, _ = build_engine(cfg.rollout, self.env, vlm=vlm,
                                                         replay_per_group=cfg.replay_per_group)
            self.loop.run_until_complete(check_fleet(self.backends))  # every server answers, or one line
        if rank == 0:
            Path(cfg.log_dir).mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
                self.writer = SummaryWriter(cfg.log_dir)
            except ImportError:  # tensorboard is in the `train` extra; the console log stays
                self.writer = None
        self.syncer = WeightSync(cfg.sync, self.backends, rank, Path(cfg.log_dir) / "weights")
        self.syncer.prepare(self.loop, self.broadcast)  # probe the servers now: a config error before any rollout
        if cfg.resume and latest_checkpoint(cfg.ckpt_dir) is not None:
            state = load_checkpoint(cfg.ckpt_dir, self.updater)
            self.start, self.pos = state["step"], state["data_state"]["pos"]
            self.sft_pos = state["data_state"].get("sft_pos", 0)
            out, size = Path(cfg.rollout.out), state["data_state"].get("rollout_bytes", 0)
            if rank == 0 and cfg.rollout.out and out.exists() and out.stat().st_size > size:
                with open(out, "rb+") as f:  # steps after the checkpoint are redone: drop their lines
                    f.truncate(size)
            self.sync()  # the generator serves the restored weights and version

    def rollout_and_score(self) -> list:
        """Rank 0: the next groups_per_step prompts (cycling over the training split), rolled
        out and scored; with `serve`, the next groups_per_step groups the agent's clients closed
        with a reward."""
        if self.gateway is not None:
            return self.loop.run_until_complete(_gateway_groups(self))
        n = len(self.train_prompts)
        batch = [self.train_prompts[(self.pos + i) % n] for i in range(self.cfg.rollout.engine.groups_per_step)]
        self.pos += len(batch)
        trajs = self.loop.run_until_complete(self._collect(batch))
        self.loop.run_until_complete(score_group(trajs, self.cfg.reward))
        return trajs

    def update(self, trajs: list, algo: Any) -> dict[str, Any]:
        """One policy update on the trajectories algo.filter_groups kept; none kept (every group
        flat) skips the update: no optimizer step, the weights and their version stay."""
        keep = algo.keep.tolist()
        if not any(keep):
            print("[grpo] every group is flat under filter_groups: no update this step", flush=True)
            return {"skipped_update": 1.0, "version": self.updater.version}
        idx = [i for i, k in enumerate(keep) if k]
        return {**self.updater.step([trajs[i] for i in idx], algo.advantages[idx].cpu(),
                                    [algo.masks[i] for i in idx], sft=self.next_demos()), "skipped_update": 0.0}

    def next_demos(self) -> list:
        """The next sft_batch demonstrations (every rank draws the same ones); [] without them."""
        if not self.demos:
            return []
        n = len(self.demos)
        batch = [self.demos[(self.sft_pos + i) % n] for i in range(self.cfg.sft_batch)]
        self.sft_pos += len(batch)
        return batch

    def broadcast(self, obj: Any) -> Any:
        if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def colocate(self, phase: str) -> None:
        """Colocated mode: backends that can sleep free their memory for the update (vLLM with
        sleep mode); the others (HF on CPU) have nothing to release and are listed as awake."""
        if self.cfg.colocate and self.rank == 0:
            fn = sleep_backends if phase == "sleep" else wake_backends
            self.slept = self.loop.run_until_complete(fn(self.backends))

    def data_state(self) -> dict[str, Any]:
        """What resumes the data stream: the prompt position and the rollouts file's length."""
        out = Path(self.cfg.rollout.out) if self.cfg.rollout.out else None
        return {"pos": self.pos, "sft_pos": self.sft_pos,
                "rollout_bytes": out.stat().st_size if out and out.exists() else 0}

    def sync(self) -> dict[str, float]:
        """The new weights to every backend (every rank calls it; see trainer/weight_sync.py):
        servers that can join a weight-update group get bucketed broadcasts (sync.transport),
        an in-process vLLM engine the same buckets through shared memory, the others reload a
        checkpoint dir under log_dir/weights (the newest kept), in-process HF the state dict.
        The engine is idle here (each step's rollout has finished),
        so no turn is in flight and no group is dropped. The gateway keeps serving on this loop,
        so it is paused around the sync: new turns are held, turns still generating after
        serve.drain_s are aborted and redone under the new weights after resume (a client
        sees a slower reply, never a turn of two versions). Returns sync/<transport>_s metrics."""
        hold = self.gateway is not None and self.updater.version != self.syncer.synced  # else nothing changes
        if hold:
            self.loop.run_until_complete(self.gateway.pause(self.cfg.serve.drain_s))
        try:
            return self.syncer(self.updater, self.updater.version, self.loop, self.broadcast)
        finally:
            if hold:
                self.gateway.resume()

    def evaluate(self) -> dict[str, float]:
        """The model's own sampled rollouts (no replay) of the held-out questions, one sample
        each, scored by the reward's judge."""
        held_out = self.prompts[-self.cfg.eval_questions:]
        policy, self.engine.policy = self.engine.policy, None
        cfg, self.engine.cfg = self.engine.cfg, EngineConfig(**{**asdict(self.engine.cfg), "n_samples": 1})
        try:
            trajs = self.loop.run_until_complete(self._collect(held_out))
            self.loop.run_until_complete(score_group(trajs, self.cfg.reward))
        finally:
            self.engine.policy, self.engine.cfg = policy, cfg
        return {"eval/accuracy": sum(t.reward.get("acc", 0.0) for t in trajs) / max(len(trajs), 1),
                "eval/fatal_rate": sum(t.fatal_step is not None for t in trajs) / max(len(trajs), 1)}

    async def _collect(self, prompts: list) -> list:
        return [t async for g in self.engine.run(prompts) for t in g]

    def log(self, metrics: dict[str, Any], trajs: list) -> None:
        if self.rank != 0:
            return
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        metrics["reward/mean"] = sum(t.reward.get("total", 0.0) for t in trajs) / max(len(trajs), 1)
        metrics["version"] = self.updater.version
        loss = "skipped (no kept group)" if metrics.get("skipped_update") else f"{metrics.get('loss', float('nan')):.4f}"
        print(f"[grpo] step {metrics['step']}: loss {loss} "
              f"reward {metrics['reward/mean']:.3f} clip {metrics.get('clip_fraction', 0):.3f} "
              f"kl {metrics.get('approx_kl', 0):.2e} grad {metrics.get('grad_norm', 0):.3f} "
              f"tokens {metrics.get('loss_tokens', 0)} version {metrics['version']}"
              + (f" sft_nll {metrics['sft_nll']:.4f}" if "sft_nll" in metrics else ""), flush=True)
        with open(Path(self.cfg.log_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), **metrics}) + "\n")
        if self.cfg.rollout.out:
            write_jsonl(self.cfg.rollout.out, trajs)
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, metrics["step"])
            self.writer.flush()

    def close(self) -> None:
        self.syncer.close(self.loop)
        if self.gateway is not None:
            self.loop.run_until_complete(self.gateway.runner.cleanup())
        for b in self.backends:
            self.loop.run_until_complete(b.close())
        if self.writer is not None:
            self.writer.close()
        self.loop.close()


def _start_gateway(run: _Run, vlm: Any, codec: Any) -> Gateway:
    """Rank 0 with `serve`: the gateway over the rollout config's backends, listening on the
    run's event loop (it answers while a step waits for groups; requests queue during updates,
    and are held by Gateway.pause during each weight sync)."""
    run.backends = make_backends(run.cfg.rollout, vlm, prefix="gateway")
    gw = Gateway(run.cfg.serve, run.cfg.rollout.engine, codec, run.backends)
    gw.group_iter = gw.groups(run.cfg.rollout.engine.n_samples)  # one stream: partial groups carry over steps
    gw.runner = run.loop.run_until_complete(serve(gw))
    print(f"[grpo] serving the policy on http://{run.cfg.serve.host}:{run.cfg.serve.port}/v1", flush=True)
    return gw


async def _gateway_groups(run: _Run) -> list:
    """The next groups_per_step groups (rollout.engine.n_samples sessions each) closed with a
    reward, within serve.wait_s; their sampling temperature must be the update's."""
    e, want = run.cfg.rollout.engine, run.cfg.rollout.engine.groups_per_step
    groups, it = [], run.gateway.group_iter
    try:
        while len(groups) < want:
            groups.append(await asyncio.wait_for(it.__anext__(), run.cfg.serve.wait_s))
    except asyncio.TimeoutError:
        raise TimeoutError(f"serve: {len(groups)} of {want} groups of {e.n_samples} rewarded sessions arrived "
                           f"in wait_s={run.cfg.serve.wait_s}") from None
    trajs = [t for g in groups for t in g]
    bad = [t.id for t in trajs if any(x != run.cfg.update.temperature for x in t.meta.get("temperatures", []))]
    check(not bad, f"sessions {bad[:3]} sampled at a temperature other than update.temperature "
                   f"{run.cfg.update.temperature}: their logprobs are not the trained policy's")
    return trajs
