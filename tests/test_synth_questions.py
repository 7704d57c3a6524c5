"""Questions from paths: canonical + fuzzy rewriting, uniqueness on the graph, alias leaks, and
the LLM steps against an OpenAI-compatible server on 127.0.0.1 with template fallback."""
from __future__ import annotations

import asyncio
import re
from typing import Any, Awaitable, Callable

import pytest
from aiohttp import web

from spyglass.engine.tools.llm import LLMConfig
from spyglass.trainer.synth.graph import build_graph
from spyglass.trainer.synth.paths import GraphPath, Hop
from spyglass.trainer.synth.questions import (Clue, Rejected, RewriteConfig, answer_set, clean_reply,
                                              is_unique, leaked, make_clue, write_question)


async def with_server(reply: Callable[[dict[str, Any]], web.Response],
                      fn: Callable[[str], Awaitable[Any]]) -> Any:
    """Run fn(base_url) while a chat-completions server answers with reply(request body)."""
    calls: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.json()
        calls.append(body)
        return reply(body)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        return await fn(f"http://127.0.0.1:{port}/v1"), calls
    finally:
        await runner.cleanup()


def chat_reply(text: str) -> web.Response:
    return web.json_response({"choices": [{"message": {"role": "assistant", "content": text}}]})


def _graph(bo_born: int = 1962, bo_job: str = "painter"):
    pages = [
        {"title": "Zeta Works", "type": "org", "image": "z.png", "aliases": ["ZW"],
         "infobox": {"founder": "Ann Lee", "founded": 1920},
         "infobox_links": {"founder": ["Ann Lee", "Bo Ray"]}},
        {"title": "Ann Lee", "type": "person", "aliases": ["A. Lee"],
         "infobox": {"birthplace": "Oslo Town", "born": 1931, "occupation": "chemist"}},
        {"title": "Bo Ray", "type": "person",
         "infobox": {"birthplace": "Port Vale", "born": bo_born, "occupation": bo_job}},
        {"title": "Oslo Town", "type": "place", "aliases": ["Oslo Township"], "infobox": {"population": 52000}},
        {"title": "Port Vale", "type": "place", "infobox": {"population": 900}},
    ]
    return build_graph(pages)


PATH = GraphPath("Zeta Works", [Hop("founder", "Ann Lee", "Ann Lee"), Hop("birthplace", "Oslo Town", "Oslo Town")])


def test_clues_and_uniqueness() -> None:
    g = _graph()
    assert make_clue("born", 1931) == Clue("born", "decade", 1931) and make_clue("population", 52000) == \
        Clue("population", "range", 10000)
    assert Clue("born", "decade", 1931).text() == "whose birth year is in the 1930s"
    assert make_clue("x", 7) is None and make_clue("x", "a very long description of many words") is None
    # named: unique; founder hidden: two founders -> two birthplaces; a born-decade clue fixes it
    assert answer_set(g, PATH, 2, {}) == {"Oslo Town"}
    assert answer_set(g, PATH, 1, {}) == {"Oslo Town", "Port Vale"} and not is_unique(g, PATH, 1, {})
    assert is_unique(g, PATH, 1, {1: [Clue("born", "decade", 1931)]})
    assert is_unique(g, PATH, 0, {1: [Clue("occupation", "eq", "chemist")]})


def test_template_rewrite_adds_clues_until_unique() -> None:
    draft = asyncio.run(write_question(_graph(), PATH, RewriteConfig(clues_per_bridge=0, seed=0)))
    assert draft.canonical == "Ann Lee is the founder of Zeta Works. What is the birthplace of Ann Lee?"
    assert [s["step"] for s in draft.steps] == ["canonical", "bridge", "anchor"]
    assert all(s["source"] == "template" for s in draft.steps)
    assert len(draft.clues[1]) == 1  # exactly what uniqueness needed
    clue = draft.clues[1][0].text()
    assert draft.question == (f"What is the birthplace of the person {clue} who is the founder of the "
                              "organisation shown in the image?")
    assert draft.steps[1]["text"].endswith("founder of Zeta Works?")
    assert not leaked(draft.question, ["Ann Lee", "A. Lee", "Zeta Works", "ZW", "Oslo Town", "Oslo Township"])


def test_not_unique_is_rejected() -> None:
    g = _graph(bo_born=1935, bo_job="chemist")  # Bo matches every clue Ann has
    with pytest.raises(Rejected) as e:
        asyncio.run(write_question(g, PATH, RewriteConfig()))
    assert e.value.reason == "not_unique"
    one_hop = GraphPath("Zeta Works", [Hop("founder", "Ann Lee", "Ann Lee")])  # two founders
    with pytest.raises(Rejected, match="not_unique"):
        asyncio.run(write_question(g, one_hop, RewriteConfig()))


def test_leaks() -> None:
    assert leaked("Who founded ZW?", ["ZW", "Zeta"]) == ["ZW"]
    assert leaked("the zw of it", ["ZW"]) == []  # short acronyms match case-sensitively
    assert leaked("born in Oslo Townships", ["Oslo Town"]) == []  # whole words only
    assert leaked("the OSLO TOWN mayor", ["Oslo Town"]) == ["Oslo Town"]
    assert clean_reply("<think>hm</think>Question: \"What is it?\"") == "What is it?"


def _rewriter(mode: str) -> Callable[[dict[str, Any]], web.Response]:
    def reply(body: dict[str, Any]) -> web.Response:
        prompt = body["messages"][-1]["content"]
        if mode == "500":
            return web.Response(status=500, text="down")
        if prompt.startswith("Facts:"):
            return chat_reply("Question: Starting at Zeta Works, where was its founder Ann Lee born?")
        desc = re.search(r'refer to it only as "(.*?)"', prompt).group(1)
        if mode == "leak":
            return chat_reply(f"Is Oslo Town the birthplace of {desc}?")
        if mode == "drop":  # loses the clue that made the founder unique
            return chat_reply("Where was the founder of the organisation shown in the image born?")
        return chat_reply(f"<think>ok</think>Where was {desc} born?")
    return reply


@pytest.mark.parametrize("mode", ["good", "leak", "drop", "500"])
def test_llm_steps_and_fallback(mode: str) -> None:
    async def go(url: str):
        cfg = RewriteConfig(llm=LLMConfig(base_url=url, model="m", api_key_env=None, timeout_s=5))
        return await write_question(_graph(), PATH, cfg)

    draft, calls = asyncio.run(with_server(_rewriter(mode), go))
    # canonical, bridge, anchor (no call when the anchor is substituted into the LLM's text)
    assert len(calls) == (2 if mode == "good" else 3) and calls[0]["model"] == "m"
    sources = [s["source"] for s in draft.steps]
    if mode == "good":
        assert sources == ["llm", "llm", "llm+substitution"]
        assert draft.canonical == "Starting at Zeta Works, where was its founder Ann Lee born?"
        clue = draft.clues[1][0].text()
        assert draft.question == (f"Where was the person {clue} who is the founder of the organisation "
                                  "shown in the image born?")
    elif mode == "leak":
        assert sources[0] == "llm" and sources[1:] == ["template (llm reply leaks 'Oslo Town')"] * 2
        assert draft.question.startswith("What is the birthplace of the person")
    elif mode == "drop":
        assert sources[0] == "llm" and all(s.startswith("template (llm reply drops") for s in sources[1:])
    else:
        assert all(s.startswith("template (llm error:") for s in sources)
    assert not leaked(draft.question, ["Ann Lee", "A. Lee", "Zeta Works", "ZW", "Oslo Town"])
    assert is_unique(_graph(), PATH, 0, draft.clues)
