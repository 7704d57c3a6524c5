"""trainer.reward: r = r_fmt * (alpha * r_acc + (1 - alpha) * r_query) by hand, the named reward
functions, group concurrency, judge records and fallbacks.
Run: .venv/bin/python -m pytest -q tests/test_reward.py"""
from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
from aiohttp import web

from spyglass.engine.trajectory import Status, Trajectory, Turn, read_jsonl, write_jsonl
from spyglass.trainer.judges import (
    JUDGES, JudgeConfig, Judgement, JudgeSession, JudgeUnavailable, LLMJudgeConfig, register_judge)
from spyglass.trainer.reward import REWARDS, RewardConfig, format_score, register_reward, score_group

ERR = [{"name": "TextSearch", "kind": "transient", "message": "timeout"}]


def search(q: str) -> dict[str, str]:
    return {"name": "TextSearch", "arguments": json.dumps({"query": q})}


def scored_traj(tid: str = "t", answer: str | None = "Paris", fatal_step: int | None = None,
                status: Status = Status.ANSWERED, gid: str = "g") -> Trajectory:
    """Steps: search ok | search failed (tool error) | repeat search ok | answer.
    r_fmt = 3/4; rule_query over the 3 searches: 'eiffel tower city' good, the failed
    'weather today' ungrounded, the repeat of the first a repeat -> 1/3."""
    t = Trajectory(id=tid, group_id=gid, sample_index=0, prompt_ids=[1], status=status,
                   meta={"question": "Which city is this tower in?", "answer": "Paris"})
    t.turns = [Turn(0, calls=[search("eiffel tower city")]),
               Turn(1, calls=[search("weather today")], tool_errors=ERR),
               Turn(2, calls=[search("Eiffel tower, city")]),
               Turn(3, answered=answer is not None)]
    t.answer, t.fatal_step = answer, fatal_step
    return t


def score(trajs: list[Trajectory], cfg: RewardConfig) -> list[float]:
    return asyncio.run(score_group(trajs, cfg))


def test_format_score() -> None:
    assert format_score(scored_traj()) == 0.75
    t = scored_traj()
    t.turns = []
    assert format_score(t) == 0.0
    t.turns = [Turn(0)]  # no call, no answer: a format error
    assert format_score(t) == 0.0


def test_opensearch_vl_by_hand() -> None:
    t = scored_traj()
    [r] = score([t], RewardConfig())
    # 0.75 * (0.8 * 1 + 0.2 * 1/3) = 0.65
    assert r == pytest.approx(0.65) and t.reward["total"] == r
    assert (t.reward["fmt"], t.reward["acc"]) == (0.75, 1.0)
    assert t.reward["query"] == pytest.approx(1 / 3)
    assert t.reward["judge"] == {"accuracy": {"name": "rule_accuracy", "model": None},
                                 "query": {"name": "rule_query", "model": None}}
    assert t.reward["details"]["accuracy"]["f1"] == 1.0
    assert t.reward["details"]["query"] == {"n": 3, "good": 1, "empty": 0, "repeat": 1, "ungrounded": 1}
    [r] = score([scored_traj(answer="Lyon")], RewardConfig(alpha=0.5))
    assert r == pytest.approx(0.75 * 0.5 / 3)  # acc 0


def test_no_answer_and_pre_fatal_prefix_only() -> None:
    t = scored_traj(answer=None, status=Status.FATAL, fatal_step=1)
    [r] = score([t], RewardConfig())
    # fmt 2/4 (the last step neither calls nor answers); acc 0; query over step 0 only: 1 good / 1
    assert (t.reward["fmt"], t.reward["acc"], t.reward["query"]) == (0.5, 0.0, 1.0)
    assert r == pytest.approx(0.5 * 0.2)
    assert t.reward["details"]["accuracy"] == {"reason": "no_answer"}


def test_alpha_one_skips_the_query_judge_and_other_rewards() -> None:
    t = scored_traj()
    [r] = score([t], RewardConfig(alpha=1.0))
    assert r == 0.75 and t.reward["query"] is None and "query" not in t.reward["judge"]
    [r] = score([scored_traj()], RewardConfig(alpha=0.0))
    assert r == pytest.approx(0.25)
    t = scored_traj()
    assert score([t], RewardConfig(name="accuracy")) == [1.0] and t.reward["fmt"] == 0.75
    assert score([scored_traj()], RewardConfig(name="format_accuracy")) == [0.75]
    assert score([scored_traj(answer="Rome")], RewardConfig(name="accuracy")) == [0.0]


def test_a_group_is_judged_concurrently() -> None:
    n = 5
    state: dict[str, Any] = {"in": 0, "max": 0}

    @register_judge("test_barrier_judge", "accuracy")
    async def barrier_judge(t: Trajectory, s: JudgeSession) -> Judgement:
        state["in"] += 1
        state["max"] = max(state["max"], state["in"])
        if state["in"] == n:
            state["event"].set()
        await asyncio.wait_for(state["event"].wait(), timeout=5)  # only if all n run at once
        return Judgement(float(t.sample_index % 2), "test_barrier_judge")

    async def go() -> list[float]:
        state["event"] = asyncio.Event()
        group = [scored_traj(tid=f"t{i}") for i in range(n)]
        for i, t in enumerate(group):
            t.sample_index = i
        return await score_group(group, RewardConfig(judge=JudgeConfig(accuracy="test_barrier_judge")))
    try:
        out = asyncio.run(go())
    finally:
        del JUDGES["test_barrier_judge"]
    assert state["max"] == n
    assert out == pytest.approx([0.75 * (0.8 * (i % 2) + 0.2 / 3) for i in range(n)])


def test_llm_judges_recorded_and_fallback_when_the_endpoint_dies() -> None:
    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        content = "Score: 0.7" if "Rubric" in body["messages"][1]["content"] else "CORRECT"
        return web.json_response({"choices": [{"message": {"role": "assistant", "content": content}}]})

    async def go() -> tuple[Trajectory, Trajectory]:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        ep = LLMJudgeConfig(base_url=f"http://127.0.0.1:{port}/v1", model="judge-m",
                            api_key_env=None, retries=1, backoff_s=0.01, timeout_s=5)
        cfg = RewardConfig(judge=JudgeConfig(accuracy="llm_accuracy", query="llm_query", llm=ep))
        up, down = scored_traj("up"), scored_traj("down")
        async with JudgeSession(cfg.judge) as s:
            await score_group([up], cfg, s)
            await runner.cleanup()  # the endpoint goes away
            await score_group([down], cfg, s)
        return up, down
    up, down = asyncio.run(asyncio.wait_for(go(), timeout=60))
    assert up.reward["total"] == pytest.approx(0.75 * (0.8 + 0.2 * 0.7))
    assert up.reward["judge"] == {"accuracy": {"name": "llm_accuracy", "model": "judge-m"},
                                  "query": {"name": "llm_query", "model": "judge-m"}}
    rec = down.reward["judge"]
    assert rec["accuracy"]["name"] == "rule_accuracy" and rec["accuracy"]["fallback_from"] == "llm_accuracy"
    assert rec["query"]["name"] == "rule_query" and rec["query"]["fallback_from"] == "llm_query"
    assert down.reward["total"] == pytest.approx(0.65)


def test_scored_trajectories_round_trip(tmp_path: Any) -> None:
    t = scored_traj()
    score([t], RewardConfig())
    write_jsonl(tmp_path / "s.jsonl", [t])
    assert read_jsonl(tmp_path / "s.jsonl")[0].reward == t.reward


def test_errors() -> None:
    with pytest.raises(ValueError, match="alpha must be in \\[0, 1\\], got 1.2"):
        RewardConfig(alpha=1.2)
    with pytest.raises(ValueError, match="unknown reward 'f1'"):
        RewardConfig(name="f1")
    with pytest.raises(TypeError, match="JudgeConfig"):
        RewardConfig(judge={"accuracy": "rule_accuracy"})  # type: ignore[arg-type]
    t = scored_traj(status=Status.RUNNING)
    with pytest.raises(ValueError, match="'t' is still running"):
        score([t], RewardConfig())
    assert score([], RewardConfig()) == []

    async def mismatch() -> None:
        async with JudgeSession(JudgeConfig(f1_threshold=0.5)) as s:
            await score_group([scored_traj()], RewardConfig(), s)
    with pytest.raises(ValueError, match="different JudgeConfig"):
        asyncio.run(mismatch())
    with pytest.raises(TypeError, match="async"):
        register_reward("sync")(lambda trajs, cfg, s: [])  # type: ignore[arg-type,return-value]
    assert {"opensearch_vl", "accuracy", "format_accuracy"} <= set(REWARDS)


def test_dead_endpoint_from_the_start() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    ep = LLMJudgeConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", api_key_env=None,
                        retries=0)
    t = scored_traj()
    score([t], RewardConfig(alpha=1.0, judge=JudgeConfig(accuracy="llm_accuracy", llm=ep)))
    assert t.reward["judge"]["accuracy"]["fallback_from"] == "llm_accuracy" and t.reward["acc"] == 1.0
    with pytest.raises(JudgeUnavailable, match="failed 1 attempt"):
        score([scored_traj()], RewardConfig(judge=JudgeConfig(accuracy="llm_accuracy", llm=ep,
                                                                fallback=False)))
