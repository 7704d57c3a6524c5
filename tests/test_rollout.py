"""`spyglass rollout` on the embedded default: real tools over the world, the replay policy;
a crashed run (torn last line, missing groups) resumes with nothing duplicated or lost."""
import collections
import json
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


def _text_cfg(world: Path, out: Path, data: Path, **kw) -> RolloutConfig:
    return from_dict(RolloutConfig, {"model": "tiny:qwen2", "policy": "sample", "out": str(out), "progress": False,
                                     "env": {"world_dir": str(world), "dense_search": False, "tools": ["Visit"],
                                             "data": {"path": str(data)}},
                                     "engine": {"n_samples": 2, "max_turns": 1, "max_tokens_per_turn": 4,
                                                "max_server_retries": 1}, **kw})


@pytest.fixture
def refusing_server():
    """A vLLM-style server that is up (its health check answers) but refuses every request (503)."""
    from test_backend_http import FakeServer, in_thread
    fake = FakeServer()
    fake.fail_next = 10**6
    with in_thread(fake):
        yield fake


def test_backend_failures_are_not_finished_work(world: Path, tmp_path: Path, refusing_server) -> None:
    """Trajectories a failing server failed end the run non-zero (on disk, marked) and a rerun
    redoes their groups; the failed lines are kept aside, never deleted. (A server that is down
    at the start is one config error before any work: tests/test_grpo_server.py.)"""
    from spyglass.engine.rollout import RolloutFailed
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": f"{i}?", "answer": "a"}) + "\n" for i in range(3)))
    out = tmp_path / "r.jsonl"
    dead = _text_cfg(world, out, data, backend="vllm-http",
                     backend_options={"base_url": refusing_server.url, "model": "m", "retries": 0})
    with pytest.raises(RolloutFailed, match=r"6 of 6 trajectories failed for infrastructure reasons .* redoes"):
        run_rollout(dead)
    assert {t.stop_reason for t in iter_jsonl(out)} == {"backend_error"}
    s = run_rollout(_text_cfg(world, out, data))  # the same output, a live backend
    assert s["skipped_groups"] == 0 and s["groups"] == 3 and s["infra_failed"] == 0
    assert sorted(collections.Counter(t.group_id for t in iter_jsonl(out)).items()) == [("q0", 2), ("q1", 2), ("q2", 2)]
    (aside,) = tmp_path.glob("r.jsonl.redo-*.jsonl")
    assert len(list(iter_jsonl(aside))) == 6


def test_other_group_sizes_locks_and_no_resume_never_lose_data(world: Path, tmp_path: Path) -> None:
    from spyglass.engine.config import ConfigError
    from spyglass.engine.rollout import exclusive
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"id": "q0", "question": "0?", "answer": "a"}) + "\n")
    out = tmp_path / "r.jsonl"
    run_rollout(_text_cfg(world, out, data))
    before = out.read_text()
    with pytest.raises(ConfigError, match=r"groups of \[2\] trajectories but engine.n_samples is 1"):
        run_rollout(_text_cfg(world, out, data, engine={"n_samples": 1, "max_turns": 1, "max_tokens_per_turn": 4}))
    assert out.read_text() == before
    with pytest.raises(ConfigError, match="exists and resume is off"):
        run_rollout(_text_cfg(world, out, data, resume=False))
    with exclusive(out), pytest.raises(ConfigError, match="another run is writing"):
        run_rollout(_text_cfg(world, out, data))
    s = run_rollout(_text_cfg(world, out, data, engine={"n_samples": 3, "max_turns": 1, "max_tokens_per_turn": 4}))
    assert s["groups"] == 1 and len(list(iter_jsonl(out))) == 3  # the 2-sample group was set aside
    (aside,) = tmp_path.glob("r.jsonl.redo-*.jsonl")
    assert aside.read_text() == before


def test_backend_choice_and_options_are_checked_before_anything_runs(world: Path, tmp_path: Path) -> None:
    from spyglass.engine.config import ConfigError
    with pytest.raises(ConfigError, match=r"backend_options: \['bogus'\] are not options of backend 'vllm-http'"):
        _cfg(world, tmp_path / "a.jsonl", backend="vllm-http", backend_options={"bogus": 1})
    with pytest.raises(ConfigError, match="backend must be one of"):
        _cfg(world, tmp_path / "a.jsonl", backend="nosuch")
    blind = _cfg(world, tmp_path / "b.jsonl", backend="vllm-http", policy="sample",  # the text-only API
                 backend_options={"base_url": "http://127.0.0.1:9", "model": "m", "api": "completions"})
    with pytest.raises(ConfigError, match=r"takes no images but 2 question\(s\) have images"):
        run_rollout(blind)
    assert not (tmp_path / "b.jsonl").exists()


def test_duplicated_lines_from_two_runs_are_kept_once(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    run_rollout(_cfg(world, out))
    lines = out.read_text()
    out.write_text(lines + lines)  # what two unlocked runs on one --out left
    s = run_rollout(_cfg(world, out))
    assert s["skipped_groups"] == 2 and s["groups"] == 0 and out.read_text() == lines
    (aside,) = tmp_path.glob("r.jsonl.redo-*.jsonl")
    assert aside.read_text() == lines
