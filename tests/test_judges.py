"""trainer.judges: rule judges by hand, LLM judges against an OpenAI-style chat server on
127.0.0.1 (malformed replies, HTTP errors, timeouts, a dead server, the concurrency limit).
Run: .venv/bin/python -m pytest -q tests/test_judges.py"""
from __future__ import annotations

import asyncio
import json
import socket
from typing import Any, Callable

import pytest
from aiohttp import web

from spyglass.engine.trajectory import Status, Trajectory, Turn
from spyglass.trainer.judges import (
    JUDGES, JudgeConfig, Judgement, JudgeSession, JudgeUnavailable, LLMJudgeConfig, clip_score,
    normalize_answer, parse_score, parse_verdict, register_judge, run_judge, search_calls, token_f1)

Reply = Callable[[dict[str, Any]], Any]  # request body -> str (content) | web.Response | dict


class ChatServer:
    """/v1/chat/completions on 127.0.0.1. Each request pops the next scripted reply (a content
    string, a raw web.Response, or ("sleep", s)); when the script is empty `default` answers."""

    def __init__(self, default: Reply | None = None, delay: float = 0.0) -> None:
        self.script: list[Any] = []
        self.default = default or (lambda body: "CORRECT")
        self.delay = delay
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.inflight = self.max_inflight = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> "ChatServer":
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            r = self.script.pop(0) if self.script else self.default(body)
            if isinstance(r, tuple) and r[0] == "sleep":
                await asyncio.sleep(r[1])
                r = "CORRECT"
            if isinstance(r, web.StreamResponse):
                return r
            return web.json_response({"id": "x", "object": "chat.completion", "choices": [
                {"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": r}}]})
        finally:
            self.inflight -= 1


def run_with_server(fn: Callable[[ChatServer], Any], **kw: Any) -> Any:
    async def go() -> Any:
        server = await ChatServer(**kw).start()
        try:
            return await asyncio.wait_for(fn(server), timeout=60)
        finally:
            await server.stop()
    return asyncio.run(go())


def llm(url: str, **kw: Any) -> LLMJudgeConfig:
    base = dict(base_url=url, model="judge-7b", api_key_env=None, timeout_s=5.0, retries=2,
                backoff_s=0.01)
    base.update(kw)
    return LLMJudgeConfig(**base)


def traj(answer: str | None, calls: list[list[tuple[str, dict[str, Any]]]] | None = None,
         fatal_step: int | None = None, tid: str = "t0", **meta: Any) -> Trajectory:
    t = Trajectory(id=tid, group_id="g", sample_index=0, prompt_ids=[1],
                   status=Status.ANSWERED if answer is not None else Status.FATAL,
                   prompt_messages=[{"role": "user", "content": "In which city is the tower shown?"}])
    t.meta = meta or {"answer": "Paris", "aliases": ["Paris, France"]}
    for i, step in enumerate(calls or []):
        t.turns.append(Turn(i, calls=[{"name": n, "arguments": json.dumps(a, sort_keys=True)}
                                      for n, a in step]))
    t.answer, t.fatal_step = answer, fatal_step
    return t


def judge(name: str, t: Trajectory, cfg: JudgeConfig) -> Judgement:
    async def go() -> Judgement:
        async with JudgeSession(cfg) as s:
            return await run_judge(name, t, s)
    return asyncio.run(go())


# ----------------------------------------------------------------------------- rule judges
def test_normalize_and_f1() -> None:
    assert normalize_answer("  The   Eiffel-Tower! ") == "eiffeltower"
    assert normalize_answer("ＰＡＲＩＳ，　France") == "paris france"  # NFKC full-width
    assert normalize_answer("Straße") == normalize_answer("STRASSE")  # casefold
    assert normalize_answer("an apple a day") == "apple day"
    assert token_f1("Eiffel Tower in Paris", "the Eiffel Tower") == pytest.approx(2 / 3)  # P 2/4, R 1
    assert token_f1("x", "y") == 0.0 and token_f1("the", "a") == 1.0  # both empty


def test_rule_accuracy_exact_alias_f1_switch_and_no_answer() -> None:
    cfg = JudgeConfig()
    assert judge("rule_accuracy", traj("paris, FRANCE."), cfg).score == 1.0  # the alias
    j = judge("rule_accuracy", traj("It is Paris in France"), cfg)
    # vs "Paris, France": pred [it, is, paris, in, france], ref [paris, france]: F1 = 2*(2/5)/(2/5+1)
    assert j.score == 0.0 and j.details["f1"] == pytest.approx(4 / 7) and not j.details["em"]
    assert judge("rule_accuracy", traj("It is Paris in France"), JudgeConfig(f1_threshold=0.5)).score == 1.0
    assert judge("rule_accuracy", traj("It is Paris in France"), JudgeConfig(f1_threshold=0.6)).score == 0.0
    j = judge("rule_accuracy", traj(None), cfg)
    assert j.score == 0.0 and j.details["reason"] == "no_answer" and j.record() == {
        "name": "rule_accuracy", "model": None}
    assert judge("rule_accuracy", traj("lyon", answers=["Lyon"]), cfg).score == 1.0
    with pytest.raises(ValueError, match="no reference answer"):
        judge("rule_accuracy", traj("x", source="nowhere"), cfg)


def test_search_calls_stop_at_the_fatal_step() -> None:
    steps = [[("TextSearch", {"query": "tower city"}), ("Crop", {"image": "img_1"})],
             [("Visit", {"url": "https://e.org/Eiffel_Tower", "goal": "city"})],
             [("ImageSearch", {"image": "img_1", "box": [0, 0, 5, 5]})],
             [("TextSearch", {"query": "after the cascade"})]]
    calls = search_calls(traj("Paris", steps, fatal_step=3))
    assert [(c.step, c.tool) for c in calls] == [(0, "TextSearch"), (1, "Visit"), (2, "ImageSearch")]
    assert calls[1].text == "city https://e.org/Eiffel_Tower"
    assert len(search_calls(traj("Paris", steps))) == 4


def test_rule_query_by_hand() -> None:
    steps = [[("TextSearch", {"query": "famous tower city"})],       # grounded (tower, city): good
             [("TextSearch", {"query": "Famous tower, city?"})],     # same tokens: repeat
             [("TextSearch", {"query": "weather tomorrow"})],        # no overlap: ungrounded
             [("TextSearch", {"query": "?!"})],                      # normalises to empty
             [("Visit", {"url": "https://e.org/wiki/Paris"})],       # URL word 'paris': good
             [("ImageSearch", {"image": "img_1"})],                  # image search: good
             [("ImageSearch", {"image": "img_1"})],                  # same image and box: repeat
             [("TextSearch", {"query": "tower height"})]]            # after the fatal step
    j = judge("rule_query", traj("Paris", steps, fatal_step=7), JudgeConfig())
    assert j.details == {"n": 7, "good": 3, "empty": 1, "repeat": 2, "ungrounded": 1}
    assert j.score == pytest.approx(3 / 7)
    # dup_jaccard: "famous tower city" vs "tower city museum": 2 shared of 4 -> 0.5
    steps2 = [[("TextSearch", {"query": "famous tower city"})], [("TextSearch", {"query": "tower city museum"})]]
    assert judge("rule_query", traj("Paris", steps2), JudgeConfig(dup_jaccard=0.5)).score == 0.5
    assert judge("rule_query", traj("Paris", steps2), JudgeConfig(dup_jaccard=0.6)).score == 1.0
    j = judge("rule_query", traj("Paris", [[("Crop", {"image": "img_1"})]]), JudgeConfig(empty_query_score=0.25))
    assert j.score == 0.25 and j.details["reason"] == "no_queries"


# ----------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("reply,verdict", [
    ("CORRECT", True), ("Incorrect.", False), ("**correct**", True), ("Not correct", False),
    ("yes", True), ("No", False), ("The predicted answer is correct.", True),
    ("Verdict: INCORRECT", False), ("<think>it might be incorrect... no</think>\nCORRECT", True),
    ("The answer is not correct", False)])
def test_parse_verdict(reply: str, verdict: bool) -> None:
    assert parse_verdict(reply) is verdict


@pytest.mark.parametrize("reply", ["", "maybe", "correct or incorrect, hard to say", "42"])
def test_parse_verdict_rejects(reply: str) -> None:
    with pytest.raises(ValueError):
        parse_verdict(reply)


@pytest.mark.parametrize("reply,raw", [
    ("Score: 0.7", 0.7), ("**Score:** 1.0", 1.0), ("score = 8/10", 0.8), ("Score: 85%", 0.85),
    ("0.3", 0.3), ("<think>between 0.5 and 0.7</think>Score: 0.5", 0.5), ("Score: 1.7", 1.7),
    ("Score: -0.5", -0.5), ("I give these queries a 7/10.", 0.7)])
def test_parse_score(reply: str, raw: float) -> None:
    assert parse_score(reply) == pytest.approx(raw)


@pytest.mark.parametrize("reply", ["good queries", "between 0.5 and 0.7", "Score: 3/0"])
def test_parse_score_rejects(reply: str) -> None:
    with pytest.raises(ValueError):
        parse_score(reply)


def test_clip_and_snap() -> None:
    assert [clip_score(x, True) for x in (-0.5, 0.1, 0.2, 0.62, 0.86, 1.7)] == [0.0, 0.0, 0.3, 0.7, 1.0, 1.0]
    assert clip_score(0.6, True) == 0.5  # a tie goes to the lower anchor
    assert clip_score(0.62, False) == 0.62 and clip_score(1.7, False) == 1.0


# ----------------------------------------------------------------------------- LLM judges
def test_llm_accuracy_verdicts() -> None:
    def grade(body: dict[str, Any]) -> str:
        return "CORRECT" if "Predicted answer: Paris" in body["messages"][1]["content"] else "INCORRECT"

    async def go(s: ChatServer) -> tuple[Judgement, Judgement, Judgement]:
        cfg = JudgeConfig(accuracy="llm_accuracy", llm=llm(s.url))
        async with JudgeSession(cfg) as js:
            return (await run_judge("llm_accuracy", traj("Paris"), js),
                    await run_judge("llm_accuracy", traj("Lyon"), js),
                    await run_judge("llm_accuracy", traj(None), js))
    ok, wrong, none = run_with_server(go, default=grade)
    assert (ok.score, wrong.score, none.score) == (1.0, 0.0, 0.0)
    assert ok.record() == {"name": "llm_accuracy", "model": "judge-7b"}
    assert none.details == {"reason": "no_answer"}


def test_llm_judge_request_shape_and_concurrency_limit() -> None:
    async def go(s: ChatServer) -> list[Judgement]:
        cfg = JudgeConfig(accuracy="llm_accuracy", llm=llm(s.url, concurrency=2))
        async with JudgeSession(cfg) as js:
            return await asyncio.gather(*(run_judge("llm_accuracy", traj("Paris", tid=f"t{i}"), js)
                                          for i in range(6)))

    holder: dict[str, ChatServer] = {}

    async def wrapped(s: ChatServer) -> Any:
        holder["s"] = s
        return await go(s)
    out = run_with_server(wrapped, delay=0.05)
    s = holder["s"]
    assert [j.score for j in out] == [1.0] * 6
    assert s.max_inflight == 2 and len(s.bodies) == 6
    body = s.bodies[0]
    assert body["model"] == "judge-7b" and body["temperature"] == 0.0
    user = body["messages"][1]["content"]
    assert "Reference answer(s): Paris | Paris, France" in user and "In which city" in user
    assert "Authorization" not in s.headers[0]


def _capture(fn: Callable[[ChatServer], Any], script: list[Any], **kw: Any) -> tuple[Any, ChatServer]:
    holder: dict[str, Any] = {}

    async def wrapped(s: ChatServer) -> Any:
        holder["s"] = s
        s.script = list(script)
        return await fn(s)
    return run_with_server(wrapped, **kw), holder["s"]


def test_malformed_replies_are_retried_then_succeed() -> None:
    script = [web.Response(text="not json", content_type="application/json"),
              web.json_response({"choices": []}),
              web.Response(status=503, text="busy")]

    async def go(s: ChatServer) -> tuple[Judgement, dict[str, int]]:
        cfg = JudgeConfig(accuracy="llm_accuracy", llm=llm(s.url, retries=3))
        async with JudgeSession(cfg) as js:
            return await run_judge("llm_accuracy", traj("Paris"), js), js.stats
    (j, stats), s = _capture(go, script)
    assert j.score == 1.0 and j.fallback_from is None
    assert stats == {"requests": 4, "retries": 3, "failures": 0, "fallbacks": 0}


def test_unparseable_verdicts_fall_back_to_the_rule_judge() -> None:
    async def go(s: ChatServer) -> tuple[Judgement, dict[str, int]]:
        cfg = JudgeConfig(accuracy="llm_accuracy", llm=llm(s.url, retries=2))
        async with JudgeSession(cfg) as js:
            return await run_judge("llm_accuracy", traj("paris"), js), js.stats
    (j, stats), s = _capture(go, ["maybe", "hmm", "correct or incorrect"])
    assert j.score == 1.0 and j.judge == "rule_accuracy"
    rec = j.record()
    assert rec["fallback_from"] == "llm_accuracy" and "unparseable" in rec["error"]
    assert stats == {"requests": 3, "retries": 2, "failures": 1, "fallbacks": 1}

    async def strict(s: ChatServer) -> Any:
        cfg = JudgeConfig(accuracy="llm_accuracy", llm=llm(s.url, retries=1), fallback=False)
        async with JudgeSession(cfg) as js:
            return await run_judge("llm_accuracy", traj("paris"), js)
    with pytest.raises(JudgeUnavailable, match="2 attempt"):
        _capture(strict, ["maybe", "hmm"])


def test_client_errors_are_not_retried() -> None:
    async def go(s: ChatServer) -> Any:
        cfg = JudgeConfig(accuracy="llm_accuracy", llm=llm(s.url, retries=3), fallback=False)
        async with JudgeSession(cfg) as js:
            try:
                await run_judge("llm_accuracy", traj("Paris"), js)
            except JudgeUnavailable as e:
                return str(e), js.stats
    (msg, stats), s = _capture(go, [web.Response(status=401, text="bad key")])
    assert "HTTP 401: bad key" in msg and stats["requests"] == 1 and stats["retries"] == 0


def test_timeouts_are_retried() -> None:
    async def go(s: ChatServer) -> tuple[Judgement, dict[str, int]]:
        cfg = JudgeConfig(accuracy="llm_accuracy", llm=llm(s.url, timeout_s=0.2, retries=2))
        async with JudgeSession(cfg) as js:
            return await run_judge("llm_accuracy", traj("Lyon"), js), js.stats
    (j, stats), _ = _capture(go, [("sleep", 2.0), "INCORRECT"])
    assert j.judge == "llm_accuracy" and j.score == 0.0 and stats["retries"] == 1


def test_dead_server_falls_back_and_is_recorded() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    cfg = JudgeConfig(accuracy="llm_accuracy", query="llm_query",
                      llm=llm(f"http://127.0.0.1:{port}/v1", retries=2))
    steps = [[("TextSearch", {"query": "tower city"})]]

    async def go() -> tuple[Judgement, Judgement, dict[str, int]]:
        async with JudgeSession(cfg) as js:
            a = await run_judge("llm_accuracy", traj("Paris", steps), js)
            q = await run_judge("llm_query", traj("Paris", steps), js)
            return a, q, js.stats
    a, q, stats = asyncio.run(go())
    assert (a.judge, a.score, a.fallback_from) == ("rule_accuracy", 1.0, "llm_accuracy")
    assert (q.judge, q.score, q.fallback_from) == ("rule_query", 1.0, "llm_query")
    assert "Connect" in a.record()["error"]
    assert stats == {"requests": 6, "retries": 4, "failures": 2, "fallbacks": 2}


def test_llm_query_rubric_prefix_only_and_snapping() -> None:
    steps = [[("TextSearch", {"query": "tall iron lattice tower"})],
             [("ImageSearch", {"image": "img_1", "box": [1, 2, 30, 40]})],
             [("TextSearch", {"query": "SECRET-AFTER-FATAL"})]]

    async def go(s: ChatServer) -> list[Judgement]:
        out = []
        for snap in (True, False):
            cfg = JudgeConfig(query="llm_query", llm=llm(s.url), snap_query_score=snap)
            async with JudgeSession(cfg) as js:
                out.append(await run_judge("llm_query", traj("Paris", steps, fatal_step=2), js))
        cfg = JudgeConfig(query="llm_query", llm=llm(s.url))
        async with JudgeSession(cfg) as js:
            out.append(await run_judge("llm_query", traj("Paris", [], fatal_step=0), js))
        return out
    (snapped, raw, empty), s = _capture(go, ["**Score:** 0.62", "Score: 1.4"])
    assert snapped.score == 0.7 and snapped.details["raw"] == pytest.approx(0.62)
    assert raw.score == 1.0 and raw.details["raw"] == pytest.approx(1.4)
    assert empty.score == 0.0 and empty.details["reason"] == "no_queries" and len(s.bodies) == 2
    user = s.bodies[0]["messages"][1]["content"]
    assert "1. [TextSearch] tall iron lattice tower" in user
    assert "2. [ImageSearch] image=img_1 box=[1, 2, 30, 40]" in user
    assert "SECRET-AFTER-FATAL" not in user and "0.3 -" in user


def test_configs_and_registry() -> None:
    with pytest.raises(ValueError, match="unknown judge 'gpt'"):
        JudgeConfig(accuracy="gpt")
    with pytest.raises(ValueError, match="grades query, not accuracy"):
        JudgeConfig(accuracy="rule_query")
    with pytest.raises(ValueError, match="needs an endpoint"):
        JudgeConfig(query="llm_query")
    with pytest.raises(ValueError, match="f1_threshold"):
        JudgeConfig(f1_threshold=0.0)
    with pytest.raises(ValueError, match="dup_jaccard"):
        JudgeConfig(dup_jaccard=1.5)
    with pytest.raises(ValueError, match="base_url"):
        LLMJudgeConfig(base_url="127.0.0.1:8000", model="m")
    with pytest.raises(ValueError, match="concurrency"):
        LLMJudgeConfig(base_url="http://h/v1", model="m", concurrency=0)
    with pytest.raises(ValueError, match="retries"):
        LLMJudgeConfig(base_url="http://h/v1", model="m", retries=-1)
    with pytest.raises(TypeError, match="async"):
        register_judge("sync", "accuracy")(lambda t, s: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="kind"):
        register_judge("x", "style")

    @register_judge("test_length_judge", "accuracy")
    async def length_judge(t: Trajectory, s: JudgeSession) -> Judgement:
        return Judgement(float(len(t.answer or "") > 3), "test_length_judge")
    try:
        cfg = JudgeConfig(accuracy="test_length_judge")
        assert judge("test_length_judge", traj("Paris"), cfg).score == 1.0
    finally:
        del JUDGES["test_length_judge"]


def test_missing_api_key_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPYGLASS_NO_SUCH_KEY", raising=False)
    cfg = JudgeConfig(accuracy="llm_accuracy",
                      llm=llm("http://127.0.0.1:9/v1", api_key_env="SPYGLASS_NO_SUCH_KEY"))
    with pytest.raises(ValueError, match="SPYGLASS_NO_SUCH_KEY"):
        judge("llm_accuracy", traj("Paris"), cfg)


def test_bearer_header_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPYGLASS_TEST_KEY", "sk-abc")

    async def go(s: ChatServer) -> Judgement:
        cfg = JudgeConfig(accuracy="llm_accuracy", llm=llm(s.url, api_key_env="SPYGLASS_TEST_KEY"))
        async with JudgeSession(cfg) as js:
            return await run_judge("llm_accuracy", traj("Paris"), js)
    j, s = _capture(go, [])
    assert j.score == 1.0 and s.headers[0]["Authorization"] == "Bearer sk-abc"
