"""Checkpoint save/resume: .venv/bin/python -m pytest -q tests/test_checkpoint.py"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from spyglass.trainer.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from spyglass.trainer.update import PolicyUpdater, UpdateConfig
from test_update import fresh, make_batch, weights

CFG = dict(lr=3e-3, micro_batch_tokens=150, mini_batches=2, ppo_epochs=2)


def _updater(v):
    return PolicyUpdater(v.model, UpdateConfig(**CFG), image_processor=v.image_processor)


def test_resumed_run_continues_bit_for_bit(tmp_path):
    torch.use_deterministic_algorithms(True)
    try:
        v = fresh()
        trajs, adv, masks = make_batch(v, n=4)
        batches = [(trajs, adv * s, masks) for s in (1.0, -0.5, 2.0, 1.0)]
        up = _updater(v)
        for b in batches[:2]:
            up.step(*b)
        ckpt = save_checkpoint(tmp_path, up, data_state={"offset": 8}, engine_state={"pending": ["g3"]})
        rng_after_save = (random.random(), float(np.random.rand()), torch.rand(3))
        straight = [up.step(*b) for b in batches[2:]]
        w_straight = weights(v.model)

        v2 = fresh()  # a new process would start from the same seeded model and re-load
        up2 = _updater(v2)
        state = load_checkpoint(tmp_path, up2)
        assert state["path"] == ckpt and state["step"] == 2 and state["version"] == 2
        assert state["data_state"] == {"offset": 8} and state["engine_state"] == {"pending": ["g3"]}
        rng = (random.random(), float(np.random.rand()), torch.rand(3))
        assert rng[:2] == rng_after_save[:2] and torch.equal(rng[2], rng_after_save[2])
        resumed = [up2.step(*b) for b in batches[2:]]
        assert all(torch.equal(w_straight[k], p) for k, p in weights(v2.model).items())
        assert resumed == straight and up2.version == 4
    finally:
        torch.use_deterministic_algorithms(False)


def test_keep_last_and_atomicity(tmp_path):
    v = fresh()
    trajs, adv, masks = make_batch(v, n=2)
    up = _updater(v)
    for _ in range(4):
        up.step(trajs, adv, masks)
        save_checkpoint(tmp_path, up, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    # a save that died before meta.json was written is not a checkpoint
    (tmp_path / ".tmp-step_00000005").mkdir()
    (tmp_path / "step_00000009").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    assert not list(tmp_path.glob(".tmp-step_0000000[1-4]"))
    meta = json.loads((tmp_path / "step_00000004" / "meta.json").read_text())
    assert meta["step"] == 4 and meta["version"] == 4 and meta["world_size"] == 1


def test_errors_name_the_problem(tmp_path):
    v = fresh()
    up = _updater(v)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path, up)
    with pytest.raises(ValueError, match="keep_last must be an int >= 1, got 0"):
        save_checkpoint(tmp_path, up, keep_last=0)
    with pytest.raises(TypeError, match="data_state must be a dict or None, got list"):
        save_checkpoint(tmp_path, up, data_state=[1])
    path = save_checkpoint(tmp_path, up)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "world_size": 2, "stage": 2}))
    with pytest.raises(ValueError, match="saved with ZeRO stage 2 on 2 ranks; this run has stage 0 on 1"):
        load_checkpoint(path, up)
