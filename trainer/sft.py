"""Supervised fine-tuning on multimodal multi-turn agent trajectories (`spyglass sft`).

Three data layouts become the same thing, a `Trajectory` whose GEN segments are the assistant
turns, and train through the same packer, padded VLM forward and fused log-prob as GRPO
(`trainer/update.py`), under the same runtimes (plain or DeepSpeed ZeRO, `trainer.distributed`)
and checkpoints (`trainer.checkpoint`). The loss is the token-mean NLL of the assistant tokens
(loss mask = `traj.loss_mask()`: every assistant turn with its <|im_end|>; never the system,
user, tool output or image pad tokens).

The data layouts (ShareGPT as OpenSearch-VL released it, ms-swift / OpenAI `messages`,
spyglass Trajectory JSONL) and their readers live in trainer/sft_data.py.

    trajectories_to_sharegpt(trajs, "d/teacher.sharegpt.jsonl", codec, tools=env.schemas)
    trajs = load_sharegpt("d/teacher.sharegpt.jsonl", codec)      # and back (round trip exact
                                                                   # for canonical turns)
    metrics = run_sft(SFTConfig(steps=4))   # CPU: tiny Qwen2-VL, teacher data from the replay
                                            # policy over the world, written in both layouts
    spyglass sft --steps 4 --data.env.questions 4 --out_dir runs/sft        # same, from the CLI

Tests: `.venv/bin/python -m pytest -q tests/test_sft.py`.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from spyglass.engine.config import check
from spyglass.engine.env import EnvConfig
from spyglass.engine.trajectory import Status, Trajectory, iter_jsonl, write_jsonl
from spyglass.engine.loader import LoadConfig, check_model_spec, load_model
from spyglass.trainer.distributed import DistConfig
from spyglass.trainer.update import PolicyUpdater, UpdateConfig

from spyglass.trainer.sft_data import (  # noqa: F401  (the public names are re-exported)
    CALL_STYLES, IMAGE, RecordError, ShareGPTTags, load_sharegpt, media_dirs, read_records, render_call,
    sharegpt_to_trajectory, sniff_format, trajectories_to_sharegpt, trajectory_to_sharegpt)


class SFTUpdater(PolicyUpdater):
    """PolicyUpdater with a plain NLL objective on the same packed micro-batches.

    Reuses update.py's batch preparation (`_build`: masks inside GEN segments, image tokens
    checked against the images), micro-batch unpacking (`_padded_inputs`: right-padded VLM
    forward, only the loss tokens' hidden states gathered) and the fused log-prob; the loss is
    -sum(logp) / (loss tokens of the whole batch), so accumulating over micro-batches and
    ranks gives the token-mean NLL gradient. One `step` = one optimizer step."""

    def step(self, trajs: Sequence[Trajectory], masks: Sequence[Any] | None = None,  # type: ignore[override]
             lr: float | None = None) -> dict[str, float]:
        if not trajs:
            raise ValueError("SFT step needs at least one trajectory, got none")
        masks = list(masks) if masks is not None else [np.asarray(t.loss_mask(), dtype=np.int64) for t in trajs]
        seqs, _, _ = self._build(trajs, masks)
        rt = self.runtime
        if lr is not None:
            for g in rt.optimizer.param_groups:
                g["lr"] = lr
        rt.zero_grad()
        nll, n_micro = self._nll_backward(seqs, 1.0)
        norm = rt.step()
        if not math.isfinite(norm):
            self._raise(f"non-finite grad norm {norm} in SFT batch {[t.id for t in trajs]} (step skipped)", "grad norm")
        self.steps += 1
        self.version += 1
        total = float(sum(int(s.mask.sum()) for s in seqs))
        return {"loss": nll, "ppl": math.exp(min(nll, 50.0)), "grad_norm": norm,
                "loss_tokens": total, "tokens": float(sum(s.ids.size for s in seqs)),
                "trajectories": float(len(seqs)), "micro_batches": float(n_micro),
                "lr": float(rt.optimizer.param_groups[0]["lr"]), "step": float(self.steps)}


# ------------------------------------------------------------------------------ config + loop
@dataclass
class SFTDataConfig:
    """Where the SFT data comes from."""

    path: str = ""  # "" = teacher data: the replay policy over the world, written in both layouts
    format: str = field(default="auto", metadata={"choices": ("auto", "trajectory", "sharegpt")})  # layout of
    #   the data file (sharegpt: also ms-swift / OpenAI `messages` records); auto: by its first record
    #   (sniff_format), else by name (*.sharegpt.json[l] / *.json -> sharegpt, else trajectory)
    media_dir: str = ""  # ShareGPT image root; "" = LLaMA-Factory's dataset_dir, else the file's folder (media_dirs)
    tags: ShareGPTTags = field(default_factory=ShareGPTTags)
    call_style: str = field(default="compact", metadata={"choices": CALL_STYLES})  # ShareGPT tool calls:
    #   compact: <tool_call>{json}</tool_call> | qwen: newlines inside the tags
    answered_only: bool = True  # trajectory JSONL: train only on answered trajectories
    env: EnvConfig = field(default_factory=lambda: EnvConfig(questions=8, dense_search=False))  # teacher data

    def __post_init__(self) -> None:
        check(self.format in ("auto", "trajectory", "sharegpt"),
              f"data.format must be auto|trajectory|sharegpt, got {self.format!r}")
        check(self.call_style in CALL_STYLES, f"data.call_style must be one of {CALL_STYLES}, got {self.call_style!r}")
        check(not self.path or Path(self.path).is_file(), f"data.path {self.path!r} is not a file")

    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        return sniff_format(self.path, self.tags) or \
            ("sharegpt" if ".sharegpt." in Path(self.path).name or self.path.endswith(".json") else "trajectory")


@dataclass
class SFTConfig:
    """One SFT run (every field is a CLI flag: --steps 4, --data.path d.jsonl, --dist.strategy zero2)."""

    model: str = "tiny:qwen2_vl"  # a Hugging Face checkpoint dir, a hub id in the local HF cache, or tiny:<family> (the fixture)
    load: LoadConfig = field(default_factory=LoadConfig)  # device, dtype, attention of the loaded model
    out_dir: str = "runs/sft"  # run directory: data/ (teacher data), ckpt/, final/, metrics.jsonl
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    steps: int = 0  # optimizer steps; 0 = epochs * ceil(N / batch_size)
    epochs: int = 3  # passes over the data, used when steps is 0
    batch_size: int = 4  # trajectories per optimizer step (a multiple of the data-parallel world size)
    micro_batch_tokens: int = 16384  # packed tokens per micro-batch (one forward/backward)
    lr: float = 1e-4  # the paper's 2e-5 is for 8B+ models; the tiny model likes more
    lr_schedule: str = field(default="cosine", metadata={"choices": ("cosine", "constant")})  # cosine (to 0)
    #   | constant, both after a linear warmup
    warmup_ratio: float = 0.1  # share of the total steps with a linear lr warmup; 0 = none
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    gradient_checkpointing: bool = False  # recompute activations in the backward (less memory, more compute)
    seed: int = 0  # data order: each epoch is a permutation seeded by it
    save_every: int = 0  # checkpoint every this many steps (0: only at the end)
    keep_last: int = 2  # checkpoints kept under out_dir/ckpt (older ones are deleted)
    resume: bool = True  # continue from the newest checkpoint under out_dir/ckpt
    export: bool = True  # write the trained model to out_dir/final (a checkpoint dir every command takes as --model)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self) -> None:
        check_model_spec(self.model)
        for k in ("epochs", "batch_size", "micro_batch_tokens", "keep_last"):
            check(getattr(self, k) >= 1, f"{k} must be >= 1, got {getattr(self, k)!r}")
        for k in ("steps", "save_every"):
            check(getattr(self, k) >= 0, f"{k} must be >= 0, got {getattr(self, k)!r}")
        check(self.lr > 0 and math.isfinite(self.lr), f"lr must be a finite number > 0, got {self.lr!r}")
        check(self.lr_schedule in ("cosine", "constant"), f"lr_schedule must be cosine|constant, got {self.lr_schedule!r}")
        check(0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")


def lr_at(cfg: SFTConfig, step: int, total: int) -> float:
    """Linear warmup over warmup_ratio * total steps, then constant or cosine decay to 0."""
    warm = int(cfg.warmup_ratio * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.lr_schedule == "constant":
        return cfg.lr
    frac = (step - warm) / max(total - warm, 1)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


def make_teacher_data(env_cfg: EnvConfig, out_dir: str | Path, model: str = "tiny:qwen2_vl",
                      load: LoadConfig | None = None) -> dict[str, Any]:
    """Roll out the world with the replay policy (forced decoding of the solve scripts), keep the
    answered-and-correct trajectories, write them as Trajectory JSONL and as ShareGPT JSONL."""
    from spyglass.engine.env import build_env
    from spyglass.engine.rollout import RolloutConfig, build_engine
    from spyglass.engine.scheduler import EngineConfig
    from spyglass.trainer.judges import normalize_answer, references_of

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = build_env(env_cfg)
    rcfg = RolloutConfig(engine=EngineConfig(n_samples=1, max_live=64), env=env_cfg, model=model,
                         load=load or LoadConfig(), policy="replay", out=str(out / "teacher.jsonl"), resume=False, progress=False)
    engine, backends, _ = build_engine(rcfg, env)

    async def collect() -> list[Trajectory]:
        try:
            return [t async for g in engine.run(env.prompts()) for t in g]
        finally:
            for b in backends:
                await b.close()

    trajs = asyncio.run(collect())
    keep = [t for t in trajs if t.status is Status.ANSWERED and t.answer is not None and
            normalize_answer(t.answer) in {normalize_answer(r) for r in references_of(t)}]
    traj_path, sg_path = out / "teacher.jsonl", out / "teacher.sharegpt.jsonl"
    write_jsonl(traj_path, keep, append=False)
    trajectories_to_sharegpt(keep, sg_path, engine.codec, env.prompt_tools)
    return {"trajectory": str(traj_path), "sharegpt": str(sg_path), "rolled_out": len(trajs), "kept": len(keep)}


def load_sft_data(cfg: SFTDataConfig, path: str, codec: Any, fmt: str | None = None) -> list[Trajectory]:
    fmt = fmt or cfg.resolved_format()
    if fmt == "sharegpt":
        return load_sharegpt(path, codec, media_dir=cfg.media_dir or None, tags=cfg.tags, call_style=cfg.call_style)
    trajs = list(iter_jsonl(path))
    return [t for t in trajs if t.status is Status.ANSWERED] if cfg.answered_only else trajs


def _data(cfg: SFTConfig, codec: Any, rt: Any) -> tuple[list[Trajectory], dict[str, Any]]:
    info: dict[str, Any] = {}
    path, fmt = cfg.data.path, None
    if not path:
        if rt.rank == 0:
            info = make_teacher_data(cfg.data.env, Path(cfg.out_dir) / "data", cfg.model)
        rt.barrier()
        path = str(Path(cfg.out_dir) / "data" / "teacher.jsonl")
        fmt = "trajectory" if cfg.data.format in ("auto", "trajectory") else "sharegpt"
        if fmt == "sharegpt":
            path = str(Path(cfg.out_dir) / "data" / "teacher.sharegpt.jsonl")
    trajs = load_sft_data(cfg.data, path, codec, fmt)
    if not trajs:
        raise ValueError(f"no SFT trajectories in {path}")
    return trajs, {**info, "path": path, "format": fmt or cfg.data.resolved_format(), "examples": len(trajs)}


def run_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Fine-tune on the data; returns metrics (losses per step, checkpoint, exported model).

    CPU example: `run_sft(SFTConfig(steps=4, data=SFTDataConfig(env=EnvConfig(questions=4,
    dense_search=False))))` rolls out 4 world questions with the replay policy, trains the tiny
    Qwen2-VL for 4 steps and writes runs/sft/{data,ckpt,final,metrics.jsonl}."""
    from spyglass.engine.chat import HFCodec
    from spyglass.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    vlm = load_model(cfg.model, cfg.load)
    codec = vlm.codec()
    ucfg = UpdateConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                        micro_batch_tokens=cfg.micro_batch_tokens, gradient_checkpointing=cfg.gradient_checkpointing,
                        seed=cfg.seed)
    updater = SFTUpdater(vlm.model, ucfg, image_processor=vlm.image_processor, dist=cfg.dist)
    rt = updater.runtime
    trajs, data_info = _data(cfg, codec, rt)
    n = len(trajs)
    total = cfg.steps or cfg.epochs * math.ceil(n / cfg.batch_size)
    if cfg.batch_size % rt.world_size:
        raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of the world size {rt.world_size}")
    pos = 0  # position in the stream of epochs, each a seeded permutation of the data
    ckpt_root = out / "ckpt"
    if cfg.resume and latest_checkpoint(ckpt_root) is not None:
        pos = int(load_checkpoint(ckpt_root, updater)["data_state"]["position"])
    start = updater.steps
    log = []
    ckpt = None
    while updater.steps < total:
        idx = [int(np.random.default_rng(cfg.seed * 1_000_003 + k // n).permutation(n)[k % n])
               for k in range(pos, pos + cfg.batch_size)]  # full batches, wrapping into the next epoch
        m = updater.step([trajs[i] for i in idx], lr=lr_at(cfg, updater.steps, total))
        m["epoch"] = float(pos // n)
        log.append(m)
        pos += cfg.batch_size
        if rt.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(m) + "\n")
        last = updater.steps == total
        if last or (cfg.save_every and updater.steps % cfg.save_every == 0):
            ckpt = save_checkpoint(ckpt_root, updater, data_state={"position": pos, "epoch": pos // n},
                                   keep_last=cfg.keep_last)
    final = _export(cfg, updater, out / "final") if cfg.export else None
    losses = [m["loss"] for m in log]
    return {"steps": updater.steps, "resumed_from": start, "losses": losses,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "loss_tokens": sum(m["loss_tokens"] for m in log), "data": data_info,
            "checkpoint": str(ckpt or latest_checkpoint(ckpt_root) or ""), "model_dir": str(final or ""),
            "wall_s": time.perf_counter() - t0}


def _export(cfg: SFTConfig, updater: SFTUpdater, path: Path) -> Path | None:
    """The trained weights written as a checkpoint directory like the input's (rank 0)."""
    from spyglass.trainer.checkpoint import export_model
    return export_model(updater, cfg.model, path, cfg.load)
