"""GRPO end to end on CPU: the tiny VLM, real tools on the bundled world, a few steps.

Single process: the loss is finite, the weights change, the generator serves the new version,
and a run resumed from a checkpoint ends bit-for-bit where the uninterrupted run ends.
Two ranks (torchrun, gloo, ZeRO-2): the same loop trains and stays finite."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spyglass.engine.config import from_dict
from spyglass.engine.trajectory import SegmentKind, read_jsonl
from spyglass.engine.offline.world import WorldConfig, ensure_world
from spyglass.trainer.checkpoint import latest_checkpoint
from spyglass.trainer.grpo import GRPOConfig, run_grpo


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world") / "w"
    ensure_world(root, WorldConfig())
    return root


def _cfg(world: Path, out: Path, steps: int) -> GRPOConfig:
    return from_dict(GRPOConfig, {
        "steps": steps, "ckpt_dir": str(out / "ckpt"), "log_dir": str(out),
        "rollout": {"env": {"world_dir": str(world), "questions": 2, "dense_search": False},
                    "engine": {"n_samples": 3, "groups_per_step": 1, "max_live": 8, "max_turns": 6, "max_tokens_per_turn": 96,
                               "temperature": 1.0},
                    "policy": "mixed", "out": str(out / "rollouts.jsonl")},
        "update": {"lr": 1e-3, "micro_batch_tokens": 8192}})


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
    return sd.get("module", sd) if isinstance(sd, dict) else sd


def test_grpo_trains_syncs_and_resumes_exactly(world: Path, tmp_path: Path) -> None:
    a = tmp_path / "a"
    m = run_grpo(_cfg(world, a, steps=2))
    assert torch.isfinite(torch.tensor(m["loss"])) and m["version"] == 2
    w1, w2 = _weights(a / "ckpt" / "step_00000001"), _weights(a / "ckpt" / "step_00000002")
    assert any(not torch.equal(w1[k], w2[k]) for k in w1), "an update changed no weight"
    # the generator served version 1 (after the first sync) in the second step's rollouts
    trajs = read_jsonl(a / "rollouts.jsonl")
    versions = {s.version for t in trajs[3:] for s in t.segments if s.kind is SegmentKind.GEN}
    assert versions == {1}
    # resume from step 1 and finish: the same rollouts token for token, the same rewards, and
    # the same final weights up to float noise (the sampler's logprobs differ at ~1e-7 with how
    # continuous batching happened to group the requests, so bit-equality is not promised)
    b = tmp_path / "b"
    (b / "ckpt").mkdir(parents=True)
    shutil.copytree(a / "ckpt" / "step_00000001", b / "ckpt" / "step_00000001")
    run_grpo(_cfg(world, b, steps=2))
    again = read_jsonl(b / "rollouts.jsonl")
    assert [t.token_ids() for t in again] == [t.token_ids() for t in trajs[3:]]
    assert [t.reward["total"] for t in again] == [t.reward["total"] for t in trajs[3:]]
    wb = _weights(b / "ckpt" / "step_00000002")
    assert max((w2[k] - wb[k]).abs().max().item() for k in w2) < 1e-6
    assert max((w2[k] - w1[k]).abs().max().item() for k in w2) > 1e-4  # ... far below a step


def test_grpo_kl_to_the_initial_policy(world: Path, tmp_path: Path) -> None:
    """update.loss.kl_coef > 0: the loop builds the frozen reference (the initial policy), the KL
    is 0 while the policy is the reference and grows once it moved; a resumed run keeps the
    initial model as its reference (the same KL as the uninterrupted run)."""
    def cfg(out: Path) -> GRPOConfig:
        c = _cfg(world, out, steps=2)
        c.update.loss = dataclasses.replace(c.update.loss, kl_coef=0.5)
        return c
    a, b = tmp_path / "a", tmp_path / "b"
    run_grpo(cfg(a))
    kl = [json.loads(x)["ref_kl"] for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert kl[0] < 1e-7 < kl[1]
    (b / "ckpt").mkdir(parents=True)
    shutil.copytree(a / "ckpt" / "step_00000001", b / "ckpt" / "step_00000001")
    run_grpo(cfg(b))
    again = json.loads((b / "metrics.jsonl").read_text().splitlines()[0])
    assert again["step"] == 2 and again["ref_kl"] == pytest.approx(kl[1], rel=1e-3)


def test_grpo_filter_groups_skips_flat_steps(world: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """algo.filter_groups="acc": the untrained model's own samples are all wrong (a flat group):
    no optimizer step, weights and version unchanged; with the solve script's replay in the
    group (right) beside the samples (wrong) the group is kept and the step trains."""
    def cfg(out: Path, policy: str) -> GRPOConfig:
        c = _cfg(world, out, steps=1)
        c.algo = dataclasses.replace(c.algo, filter_groups="acc")
        c.rollout.policy = policy
        return c
    a, b = tmp_path / "a", tmp_path / "b"
    m = run_grpo(cfg(a, "sample"))
    accs = [t.reward["acc"] for t in read_jsonl(a / "rollouts.jsonl")]
    assert accs == [0.0] * 3 and m["skipped_update"] == 1.0 and m["version"] == 0
    assert m["algo/kept_traj_frac"] == 0.0
    assert "step 1: loss skipped (no kept group)" in capsys.readouterr().out
    # the checkpoint is named by the loop's step, not by the (zero) updates: a resumed run goes
    # on with step 2 and the next prompt
    assert latest_checkpoint(a / "ckpt").name == "step_00000001"
    again = cfg(a, "sample")
    again.steps = 2
    m = run_grpo(again)
    assert m["step"] == 2 and len(read_jsonl(a / "rollouts.jsonl")) == 6
    m = run_grpo(cfg(b, "mixed"))
    accs = sorted(t.reward["acc"] for t in read_jsonl(b / "rollouts.jsonl"))
    assert accs == [0.0, 0.0, 1.0] and m["skipped_update"] == 0.0 and m["version"] == 1
    assert m["algo/kept_traj_frac"] == 1.0 and torch.isfinite(torch.tensor(m["loss"]))


def test_grpo_with_the_sft_term_trains_and_resumes_its_data_position(world: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """update.sft_coef > 0 with sft_data: each step adds the NLL of the next sft_batch
    demonstrations (the teacher's trajectories, trainer.sft's format); the position in them is
    checkpointed, so a resumed run's second step takes the same demonstrations (the same NLL)."""
    from spyglass.engine.env import EnvConfig
    from spyglass.trainer.sft import make_teacher_data

    make_teacher_data(EnvConfig(world_dir=str(world), questions=5, dense_search=False), tmp_path / "data")
    data = tmp_path / "data" / "teacher.jsonl"

    def cfg(out: Path) -> GRPOConfig:
        c = _cfg(world, out, steps=2)
        c.update.sft_coef, c.sft_data, c.sft_batch = 0.5, str(data), 3
        return c
    a, b = tmp_path / "a", tmp_path / "b"
    run_grpo(cfg(a))
    nll = [json.loads(x)["sft_nll"] for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert len(nll) == 2 and all(0 < x < 20 for x in nll) and nll[0] != nll[1]
    assert f"sft_nll {nll[1]:.4f}" in capsys.readouterr().out
    (b / "ckpt").mkdir(parents=True)
    shutil.copytree(a / "ckpt" / "step_00000001", b / "ckpt" / "step_00000001")
    run_grpo(cfg(b))
    again = json.loads((b / "metrics.jsonl").read_text().splitlines()[0])
    assert again["step"] == 2 and again["sft_nll"] == pytest.approx(nll[1], rel=1e-4)
    with pytest.raises(ValueError, match=r"update.sft_coef=0.5 and sft_data='': the NLL term needs both"):
        c = _cfg(world, a, steps=1)
        GRPOConfig(rollout=c.rollout, update=dataclasses.replace(c.update, sft_coef=0.5))
    with pytest.raises(ValueError, match=r"sft_data '/nope.jsonl' is not a file"):
        GRPOConfig(update=dataclasses.replace(c.update, sft_coef=0.5), sft_data="/nope.jsonl")


@pytest.mark.slow
def test_grpo_two_ranks_zero2(world: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPYGLASS_WORLD": str(world)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "spyglass.trainer.cli", "grpo", "--steps", "2", "--groups_per_step", "1",
           "--dist.strategy", "zero2", "--ckpt_dir", str(tmp_path / "ckpt"), "--log_dir", str(tmp_path),
           "--rollout.env.world_dir", str(world), "--rollout.env.questions", "2",
           "--rollout.env.dense_search", "false", "--rollout.engine.n_samples", "3",
           "--rollout.engine.max_tokens_per_turn", "96", "--rollout.out", str(tmp_path / "r.jsonl")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows) and rows[-1]["version"] == 2
