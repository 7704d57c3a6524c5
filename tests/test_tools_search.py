"""TextSearch: docs loading, the on-disk hybrid index (BM25 + MiniLM/faiss, RRF), snippets,
the tool through the executor, the Serper-style web backend and LLM summaries (local servers).

    .venv/bin/python -m pytest -q tests/test_tools_search.py
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from aiohttp import web

from spyglass.engine.tools.base import ErrorKind, ToolContext
from spyglass.engine.tools.executor import ToolExecutor
from spyglass.engine.tools.llm import LLMConfig
from spyglass.engine.tools.search import (LocalIndex, SerperConfig, TextSearchConfig, build_index,
                                          load_docs, main, rrf, snippet, text_search_tool)

DOCS = [
    {"id": "eiffel", "title": "Eiffel Tower", "text": "The Eiffel Tower is a wrought-iron lattice "
     "tower in Paris. It is 330 metres tall. It was completed in 1889 for the World's Fair."},
    {"id": "cat", "title": "Mittens", "text": "The feline dozed peacefully upon the woven rug "
     "near the fireplace."},
    {"id": "berlin", "title": "Berlin", "text": "Berlin is the capital and largest city of "
     "Germany. The Brandenburg Gate stands in its centre."},
    {"id": "python", "title": "Python (language)", "text": "Python is a high-level programming "
     "language created by Guido van Rossum. Its first release was in 1991."},
    {"id": "nile", "title": "Nile", "text": "The Nile is a major river in northeastern Africa. "
     "It flows north into the Mediterranean Sea."},
    {"id": "tokyo", "title": "Tokyo Skytree", "text": "Tokyo Skytree is a broadcasting tower in "
     "Sumida, Tokyo. At 634 metres it is the tallest tower in the world."},
]


def write_docs(path: Path, docs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps({**d, "url": f"corpus://{d['id']}", "links": [],
                                        "infobox": {}, "image": None}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("search")
    return build_index(write_docs(tmp / "docs.jsonl", DOCS), tmp / "index")


def test_load_docs_rejects_bad_files(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"id": "a", "title": "A", "text": "x"}\n{"id": "b", "title": "B"\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid JSON"):
        load_docs(p)
    p.write_text('{"id": "a", "title": "A", "text": 3}\n')
    with pytest.raises(ValueError, match=r":1: field 'text' must be a string, got 3"):
        load_docs(p)
    p.write_text('{"id": "a", "title": "A", "text": ""}\n{"id": "a", "title": "B", "text": ""}\n')
    with pytest.raises(ValueError, match="duplicate document id 'a'"):
        load_docs(p)
    p.write_text("\n")
    with pytest.raises(ValueError, match="no documents"):
        load_docs(p)
    p.write_text('{"id": "a", "title": "A", "text": "x"}\n')
    assert load_docs(p)[0]["url"] == "corpus://a"


def test_rrf_fuses_ranks() -> None:
    fused = rrf([[1, 2, 3], [3, 1]], k=60)
    assert [i for i, _ in fused] == [1, 3, 2]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)
    assert fused[2][1] == pytest.approx(1 / 62)
    assert rrf([[]]) == []


def test_snippet_is_query_focused() -> None:
    text = "Alpha one. Beta two is here. Gamma three. Delta four."
    assert snippet(text, "gamma", 12) == "Gamma three."
    assert snippet(text, "gamma", 60).startswith("Beta two") or "Gamma three." in snippet(text, "gamma", 60)
    assert snippet(text, "nothing matches", 10) == "Alpha one."
    assert len(snippet("x" * 1000, "x", 50)) == 50


def test_index_builds_reloads_and_fuses_lexical_and_dense(index_dir: Path) -> None:
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert manifest["n_docs"] == 6 and manifest["dense"] and manifest["dim"] == 384
    idx = LocalIndex(index_dir)
    lexical, paraphrase, none = idx.search(
        ["Brandenburg Gate", "a cat sleeping on the carpet", "zzzz qqqq"], top_k=3)
    assert lexical[0].id == "berlin" and lexical[0].url == "corpus://berlin"
    assert "Brandenburg Gate" in lexical[0].snippet
    assert paraphrase[0].id == "cat"  # no shared word: only the dense retriever finds it
    assert len(none) == 3  # dense always ranks something
    bm25_only = LocalIndex(index_dir, use_dense=False)
    assert bm25_only.search(["a cat sleeping on the carpet"], 3)[0] == []
    tallest = idx.search(["tallest tower in the world height metres"], 2)[0]
    assert {h.id for h in tallest} == {"tokyo", "eiffel"}


def test_cli_builds_bm25_only_index(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    docs = write_docs(tmp_path / "docs.jsonl", DOCS)
    assert main(["build", str(docs), str(tmp_path / "idx"), "--no-dense"]) == 0
    assert json.loads(capsys.readouterr().out)["dense"] is False
    assert main(["query", str(tmp_path / "idx"), "Guido van Rossum", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Results for 'Guido van Rossum':\n1. Python (language)")
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        LocalIndex(tmp_path)


def test_tool_through_the_executor(index_dir: Path) -> None:
    tool = text_search_tool(TextSearchConfig(index_dir=str(index_dir), max_top_k=4, default_top_k=4))
    ex = ToolExecutor({"TextSearch": tool})

    async def go() -> list[Any]:
        return await asyncio.gather(
            ex.execute("TextSearch", '{"query": "river in Africa", "top_k": 1}', ToolContext()),
            ex.execute("TextSearch", '{"query": "Eiffel Tower height"}', ToolContext()),
            ex.execute("TextSearch", '{"query": "x", "top_k": 9}', ToolContext()),
            ex.execute("TextSearch", '{"q": "x"}', ToolContext()),
            ex.execute("TextSearch", '{"query": "   "}', ToolContext()))
    nile, eiffel, big_k, wrong_key, empty = asyncio.run(go())
    assert nile.ok and nile.text.startswith("Results for 'river in Africa':\n1. Nile\n   URL: corpus://nile")
    assert "2." not in nile.text and nile.meta["urls"] == ["corpus://nile"]
    assert eiffel.meta["urls"][0] == "corpus://eiffel" and len(eiffel.meta["urls"]) == 4
    assert big_k.error.kind is ErrorKind.BAD_ARGS and "'top_k'=9 is outside [1, 4]" in big_k.error.message
    assert wrong_key.error.kind is ErrorKind.BAD_ARGS and "unknown argument(s) ['q']" in wrong_key.error.message
    assert empty.error.kind is ErrorKind.BAD_ARGS and "must not be empty" in empty.error.message


def test_batch_fn_answers_each_item(index_dir: Path) -> None:
    tool = text_search_tool(TextSearchConfig(index_dir=str(index_dir)))
    items = [({"query": "Guido", "top_k": 1}, ToolContext()), ({"top_k": 2}, ToolContext()),
             ({"query": "Skytree Sumida", "top_k": 2}, ToolContext())]
    out = asyncio.run(tool.batch_fn(items))
    assert out[0].meta["urls"] == ["corpus://python"]
    assert out[1].error.kind is ErrorKind.BAD_ARGS and "missing required" in out[1].error.message
    assert out[2].meta["urls"][0] == "corpus://tokyo" and len(out[2].meta["urls"]) == 2


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="needs index_dir"):
        TextSearchConfig()
    with pytest.raises(ValueError, match="'local' or 'web', got 'bing'"):
        TextSearchConfig(backend="bing")
    with pytest.raises(ValueError, match="default_top_k=30"):
        TextSearchConfig(index_dir="x", default_top_k=30)


# ----------------------------------------------------------------------- web backend (local)
@contextlib.asynccontextmanager
async def serve(routes: list[web.RouteDef]) -> AsyncIterator[str]:
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def serper_routes(seen: list[dict[str, Any]], status: dict[str, int]) -> list[web.RouteDef]:
    async def search(req: web.Request) -> web.Response:
        body = await req.json()
        seen.append({"key": req.headers.get("X-API-KEY"), **body})
        if status.get("sleep"):
            await asyncio.sleep(status["sleep"])
        if status.get("code", 200) != 200:
            return web.Response(status=status["code"], text="nope")
        organic = [{"title": f"Result {i} for {body['q']}", "link": f"https://ex.com/{i}",
                    "snippet": f"snippet {i}", "position": i + 1} for i in range(10)]
        return web.json_response({"searchParameters": body, "organic": organic[:body["num"]]})

    async def chat(req: web.Request) -> web.Response:
        body = await req.json()
        seen.append({"llm": body})
        return web.json_response({"choices": [{"message": {"role": "assistant",
                                                           "content": " It says things [1]. "}}]})
    return [web.post("/search", search), web.post("/v1/chat/completions", chat)]


def test_web_backend_speaks_serper(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERPER_API_KEY", "k-123")
    seen: list[dict[str, Any]] = []
    status: dict[str, int] = {}

    async def go() -> list[Any]:
        async with serve(serper_routes(seen, status)) as url:
            cfg = TextSearchConfig(backend="web", serper=SerperConfig(endpoint=url + "/search",
                                                                      timeout_s=0.5))
            tool = text_search_tool(cfg)
            ok = await tool.fn({"query": "eiffel", "top_k": 3}, ToolContext())
            status["code"] = 503
            busy = await tool.batch_fn([({"query": "a"}, ToolContext())])
            status["code"] = 403
            denied = await tool.batch_fn([({"query": "a"}, ToolContext())])
            status.update(code=200, sleep=2)
            slow = await tool.batch_fn([({"query": "a"}, ToolContext())])
            return [ok, busy[0], denied[0], slow[0]]
    ok, busy, denied, slow = asyncio.run(go())
    assert seen[0] == {"key": "k-123", "q": "eiffel", "num": 3}
    assert ok.meta["urls"] == [f"https://ex.com/{i}" for i in range(3)]
    assert "1. Result 0 for eiffel\n   URL: https://ex.com/0\n   snippet 0" in ok.text
    assert busy.error.kind is ErrorKind.TRANSIENT and "HTTP 503" in busy.error.message
    assert denied.error.kind is ErrorKind.FATAL and "HTTP 403" in denied.error.message
    assert slow.error.kind is ErrorKind.TRANSIENT and "TimeoutError" in slow.error.message


def test_web_backend_needs_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SERPER_API_KEY", raising=False)
    with pytest.raises(ValueError, match="environment variable SERPER_API_KEY, which is unset"):
        text_search_tool(TextSearchConfig(backend="web"))


def test_llm_summary_is_appended(index_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    monkeypatch.setenv("TEST_LLM_KEY", "sk-test")

    async def go() -> Any:
        async with serve(serper_routes(seen, {})) as url:
            llm = LLMConfig(base_url=url + "/v1", model="tiny", api_key_env="TEST_LLM_KEY")
            tool = text_search_tool(TextSearchConfig(index_dir=str(index_dir), summary_llm=llm))
            return await tool.fn({"query": "capital of Germany", "top_k": 2}, ToolContext())
    res = asyncio.run(go())
    assert res.ok and res.text.endswith("Summary: It says things [1].") and res.meta["summarised"]
    prompt = seen[0]["llm"]["messages"][0]["content"]
    assert seen[0]["llm"]["model"] == "tiny" and "Search query: capital of Germany" in prompt
    assert "corpus://berlin" in prompt
    monkeypatch.delenv("TEST_LLM_KEY")
    llm = LLMConfig(base_url="http://127.0.0.1:9/v1", model="tiny", api_key_env="TEST_LLM_KEY")
    with pytest.raises(ValueError, match="environment variable TEST_LLM_KEY"):
        llm.headers()
    res = asyncio.run(text_search_tool(TextSearchConfig(index_dir=str(index_dir), summary_llm=llm))
                      .fn({"query": "Berlin"}, ToolContext()))
    assert res.error.kind is ErrorKind.FATAL and "TEST_LLM_KEY" in res.error.message
    with pytest.raises(ValueError, match="base_url must be an http"):
        LLMConfig(base_url="localhost:8000", model="m")


def test_world_questions_are_answerable_by_search_then_visit(tmp_path: Path) -> None:
    """On the offline world: each visit hop's doc is the top hit for the name the previous hop
    produced, and Visit with the hop's field as goal shows the hop's value."""
    from spyglass.engine.tools.web import VisitConfig, visit_tool
    from spyglass.engine.offline.world import generate_world
    world = generate_world(tmp_path / "world")
    index = build_index(tmp_path / "world" / "docs.jsonl", tmp_path / "index")
    chains = []
    for q in world.questions:
        prev = None
        for hop in q["hops"]:
            if hop["action"] == "visit" and prev:
                chains.append((str(prev), hop["doc"], hop["field"], str(hop["value"])))
            if hop["action"] in ("ocr", "visit"):
                prev = hop.get("value")
    assert len(chains) >= 20
    search = text_search_tool(TextSearchConfig(index_dir=str(index), default_top_k=3))
    visit = visit_tool(VisitConfig(corpus=str(index)))
    ex = ToolExecutor({"TextSearch": search, "Visit": visit})

    async def go() -> list[tuple[Any, Any]]:
        out = []
        for name, doc, fld, _value in chains:
            s = await ex.execute("TextSearch", json.dumps({"query": name}), ToolContext())
            v = await ex.execute("Visit", json.dumps({"url": f"corpus://{doc}", "goal": fld}),
                                 ToolContext())
            out.append((s, v))
        return out
    for (name, doc, fld, value), (s, v) in zip(chains, asyncio.run(go())):
        assert s.ok and s.meta["urls"][0] == f"corpus://{doc}", (name, s.text)
        assert v.ok and value in v.text, (doc, fld, value, v.text)
