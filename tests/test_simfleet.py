"""The latency-modelled fleet (engine/simfleet.py) and the main job that prints it
(`spyglass bench rollout`): .venv/bin/python -m pytest -q tests/test_simfleet.py"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from spyglass.engine.config import from_dict
from spyglass.engine.offline.world import WorldConfig, ensure_world
from spyglass.engine.rollout import RolloutConfig, bench_rollout
from spyglass.engine.simfleet import (MIN_TURN_TOKENS, Workload, des_bound, from_trajectories,
                                      lockstep_makespan, run_engine)
from spyglass.engine.trajectory import Trajectory, Turn


def test_the_engine_on_the_fleet_is_near_its_bound_and_lockstep_matches_its_model() -> None:
    w = Workload(prompts=32, mean_extra_turns=3, tokens_mean=100, tool_median_s=0.5, live=16, seed=3)
    work = w.sample()
    bound = des_bound(work, w.live, w.step_a_s, w.step_b_s)
    lock_model = lockstep_makespan(work, w.live, w.step_a_s, w.step_b_s)
    run = dict(live=w.live, step_a_s=w.step_a_s, step_b_s=w.step_b_s, time_scale=0.02)
    eng, engine = asyncio.run(run_engine(work, **run))
    lock, _ = asyncio.run(run_engine(work, **run, lockstep=True))
    eng, lock = eng / 0.02, lock / 0.02
    assert engine.stats.turns == sum(map(len, work))
    assert bound * 0.98 < eng < bound * 1.25, (eng, bound)      # timer slack on a loaded machine
    assert lock_model * 0.95 < lock < lock_model * 1.3, (lock, lock_model)
    assert lock_model > bound * 1.2                               # the workload separates them


def test_from_trajectories_keeps_the_turn_structure() -> None:
    def traj(tokens: list[int]) -> Trajectory:
        t = Trajectory(id="x", group_id="g", sample_index=0, prompt_ids=[1])
        t.turns = [Turn(index=i, gen_tokens=n) for i, n in enumerate(tokens)]
        return t
    work = from_trajectories([traj([300, 20, 150]), traj([]), traj([90])], tool_median_s=2.0, seed=1)
    assert [[n for n, _ in w] for w in work] == [[300, MIN_TURN_TOKENS, 150], [90]]
    assert all(lat > 0 for _, lat in work[0][:-1]) and work[0][-1][1] == 0 and work[1] == [(90, 0.0)]
    assert from_trajectories([traj([300, 20, 150])], tool_median_s=2.0, seed=1) == work[:1]  # seeded


def test_the_main_job_prints_both_machines_and_one_json_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    world = tmp_path / "w"
    ensure_world(world, WorldConfig())
    cfg = from_dict(RolloutConfig, {"env": {"world_dir": str(world), "questions": 2, "dense_search": False},
                                    "engine": {"n_samples": 2}, "progress": False,
                                    "timeline": str(tmp_path / "t.png")})
    line = bench_rollout(cfg)
    out = capsys.readouterr().out
    assert "warm-up first, untimed" in out and "on this machine" in out and "latency-modelled fleet" in out
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(line))
    assert line["async_trajectories"] == line["lockstep_trajectories"] == 4
    assert line["async_answered_right"] == line["lockstep_answered_right"] == 4
    assert line["fleet_bound_s"] <= line["fleet_async_s"] * 1.02 and line["fleet_lockstep_s"] > line["fleet_bound_s"]
    assert (tmp_path / "t.png").stat().st_size > 0 and f"timeline: {tmp_path / 't.png'}" in out
