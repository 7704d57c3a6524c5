"""`spyglass rollout` on the embedded default: real tools over the world, the replay policy;
a crashed run (torn last line, missing groups) resumes with nothing duplicated or lost."""
import collections
from pathlib import Path

import pytest

from spyglass.engine.config import from_dict
from spyglass.engine.rollout import RolloutConfig, run_rollout
from spyglass.engine.trajectory import iter_jsonl, read_jsonl
from spyglass.engine.offline.world import WorldConfig, ensure_world
from spyglass.trainer.cli import main


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world") / "w"
    ensure_world(root, WorldConfig())
    return root


def _cfg(world: Path, out: Path, **kw) -> RolloutConfig:
    return from_dict(RolloutConfig, {"env": {"world_dir": str(world), "questions": 2, "dense_search": False},
                                     "engine": {"n_samples": 2, "check_tokens": True, "strict_tokens": True},
                                     "out": str(out), "progress": False, **kw})


def test_rollout_answers_with_real_tools_and_draws_timeline(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    s = run_rollout(_cfg(world, out, timeline=str(tmp_path / "t.png")))
    trajs = read_jsonl(out)
    assert len(trajs) == 4 and s["groups"] == 2 and "replay" in s["policy"]
    assert all(t.status.value == "answered" and t.answer == t.meta["answer"] for t in trajs)
    assert all(t.turns[0].calls and t.turns[0].ok for t in trajs)
    assert (tmp_path / "t.png").stat().st_size > 1000
    assert s["tools"]["coalescing_ratio"] >= 1.0


def test_crashed_run_resumes_without_duplicates_or_losses(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    run_rollout(_cfg(world, out))
    lines = out.read_text().splitlines(keepends=True)
    first_group = [x for x in lines if '"group_id": "q-000"' in x]
    assert len(first_group) == 2
    out.write_text("".join(first_group) + lines[-1][: len(lines[-1]) // 2])  # a crash mid-write
    assert main(["rollout", "--out", str(out), "--env.world_dir", str(world), "--env.questions", "3",
                 "--env.dense_search", "false", "--engine.n_samples", "2", "--progress", "false"]) == 0
    trajs = list(iter_jsonl(out))
    per_group = collections.Counter(t.group_id for t in trajs)
    assert per_group == {"q-000": 2, "q-001": 2, "q-002": 2}
    assert len({t.id for t in trajs}) == 6


def test_incomplete_group_is_redone_whole(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    run_rollout(_cfg(world, out))
    lines = out.read_text().splitlines(keepends=True)
    # a crash between the two lines of group q-001: one of its lines made it to disk
    out.write_text("".join(x for x in lines if '"group_id": "q-000"' in x)
                   + next(x for x in lines if '"group_id": "q-001"' in x))
    run_rollout(_cfg(world, out))
    per_group = collections.Counter(t.group_id for t in iter_jsonl(out))
    assert per_group == {"q-000": 2, "q-001": 2}
