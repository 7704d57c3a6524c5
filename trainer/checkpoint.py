"""Checkpoints of a training run: model, optimizer, RNG, data position, engine state, step, version.

    path = save_checkpoint("runs/x/ckpt", updater, data_state={"epoch": 0, "offset": 128},
                           engine_state={...}, keep_last=3)
    state = load_checkpoint("runs/x/ckpt", updater)      # newest complete checkpoint under the root
    state["data_state"], state["engine_state"], state["step"], state["version"]

Layout: `<root>/step_00000004/` with `meta.json` (format, step, version, strategy, world size),
`state.pt` (updater counters, the loop's opaque data / engine dicts), `rng_rank<r>.pt` (python,
numpy, torch CPU and CUDA generators of rank r), and the model + optimizer: `model.pt` and
`optimizer.pt` on the plain path, DeepSpeed's own `ds/` checkpoint (per-rank ZeRO partitions)
under ZeRO. Writes are atomic: everything goes to `<root>/.tmp-step_...` and rank 0 renames it
into place after a barrier (multi-node runs need `root` on a shared filesystem), then deletes
all but the newest `keep_last` checkpoints. A directory without meta.json is never a
checkpoint, so a crash mid-save leaves the previous one as the newest. Resuming needs the same
strategy and world size; the run then continues exactly (bit for bit on CPU, see
tests/test_checkpoint.py). These files are pickles: load only checkpoints you wrote.
Tests: `.venv/bin/python -m pytest -q tests/test_checkpoint.py`.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

FORMAT = 1
_NAME = re.compile(r"^step_(\d{8,})$")


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root` (those with meta.json), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _NAME.match(p.name)) and (p / "meta.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The newest complete checkpoint under `root`, or None."""
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def save_checkpoint(root: str | Path, updater: Any, *, data_state: Optional[dict[str, Any]] = None,
                    engine_state: Optional[dict[str, Any]] = None, keep_last: int = 3,
                    step: Optional[int] = None) -> Path:
    """Save everything needed to resume; every rank must call it. Returns the checkpoint dir.
    `step`: the caller's loop step it resumes after (default: the updater's update count; GRPO
    passes its own, which runs ahead when a step had nothing to train on)."""
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
    for name, d in (("data_state", data_state), ("engine_state", engine_state)):
        if d is not None and not isinstance(d, dict):
            raise TypeError(f"{name} must be a dict or None, got {type(d).__name__}")
    rt = updater.runtime
    root = Path(root)
    step = updater.steps if step is None else int(step)
    name = f"step_{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if rt.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    rt.barrier()
    torch.save(_rng_state(), tmp / f"rng_rank{rt.rank}.pt")
    if rt.stage == 0:
        torch.save(rt.module.model.state_dict(), tmp / "model.pt")
        torch.save(rt.optimizer.state_dict(), tmp / "optimizer.pt")
    else:
        rt.engine.save_checkpoint(str(tmp / "ds"), tag="state", save_latest=False)
    if rt.rank == 0:
        torch.save({"updater": updater.state_dict(), "data_state": data_state or {},
                    "engine_state": engine_state or {}}, tmp / "state.pt")
        meta = {"format": FORMAT, "step": step, "version": updater.version,
                "stage": rt.stage, "world_size": rt.world_size}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    rt.barrier()
    if rt.rank == 0:
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    rt.barrier()
    return final


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def load_checkpoint(path: str | Path, updater: Any) -> dict[str, Any]:
    """Restore model, optimizer, RNG and counters from `path` (a checkpoint dir, or a root whose
    newest checkpoint is taken). Returns {"step", "version", "data_state", "engine_state", "path"}."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        newest = latest_checkpoint(path)
        if newest is None:
            raise FileNotFoundError(f"no checkpoint at {path} (no meta.json, no step_* dirs with one)")
        path = newest
    meta = json.loads((path / "meta.json").read_text())
    rt = updater.runtime
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')!r} is not {FORMAT}")
    if meta["stage"] != rt.stage or meta["world_size"] != rt.world_size:
        raise ValueError(f"{path} was saved with ZeRO stage {meta['stage']} on {meta['world_size']} ranks; "
                         f"this run has stage {rt.stage} on {rt.world_size}")
    if rt.stage == 0:
        rt.module.model.load_state_dict(torch.load(path / "model.pt", map_location=rt.device))
        rt.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=rt.device))
    else:
        loaded, _ = rt.engine.load_checkpoint(str(path / "ds"), tag="state", load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load {path / 'ds'}")
    state = torch.load(path / "state.pt", weights_only=False)
    updater.load_state_dict(state["updater"])
    _set_rng_state(torch.load(path / f"rng_rank{rt.rank}.pt", weights_only=False))
    return {"step": meta["step"], "version": meta["version"], "data_state": state["data_state"],
            "engine_state": state["engine_state"], "path": path}


def export_model(updater: Any, model_spec: str, path: str | Path, load: Any = None) -> Optional[Path]:
    """The trained weights written as a checkpoint directory like `model_spec`'s, resolved with the
    run's LoadConfig `load` (so a tiny fixture is found where the run made it) (its config,
    tokenizer and chat template, image processor; engine/loader.save_model), which every command
    takes as --model. Every rank must call it (ZeRO-3 gathers); rank 0 writes and returns the
    path, the others None."""
    from spyglass.engine.loader import LoadedModel, resolve_checkpoint, save_model  # noqa: PLC0415
    from spyglass.engine.loader import load_image_processor, load_tokenizer, model_family  # noqa: PLC0415
    from spyglass.trainer.distributed import full_state_dict  # noqa: PLC0415

    sd = full_state_dict(updater, rank0_only=True)
    if updater.runtime.rank != 0:
        return None
    src = resolve_checkpoint(model_spec, load)
    family = model_family(src)
    model = updater.model if not hasattr(updater.model, "module") else updater.model.module
    improc = load_image_processor(src) if hasattr(model.config, "vision_config") else None
    return save_model(LoadedModel(family, model, load_tokenizer(src), improc, src), path, state_dict=sd)
