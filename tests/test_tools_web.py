"""Visit: SSRF guard (direct and after redirects), limits, decoding, markdown, evidence, corpus.

Every server here is an aiohttp app on 127.0.0.1; the Visit config admits exactly the main
test server's address and port, so everything else (other ports, ::1, 169.254.169.254,
redirect targets) is still checked.

    .venv/bin/python -m pytest -q tests/test_tools_web.py
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from spyglass.engine.tools.base import ErrorKind, ToolContext, ToolError, ToolResult
from spyglass.engine.tools.executor import ToolExecutor
from spyglass.engine.tools.llm import LLMConfig
from spyglass.engine.tools.web import (VisitConfig, check_address, decode_body, paragraphs,
                                       visit_tool)

ARTICLE = """<html><head><title>The Nile &amp; its delta</title></head><body>
<nav><a href="/">Home</a> | <a href="/about">About</a></nav>
<h1>The Nile</h1>
<p>The Nile is a major north-flowing river in northeastern Africa.</p>
<p>It is about 6,650 kilometres long, among the longest rivers in the world.</p>
<p>The river's delta begins near Cairo and fans out into the Mediterranean Sea.</p>
<p>Ancient Egyptian civilisation depended on the annual flood for agriculture.</p>
<img src="pic.png" alt="a photo">
</body></html>"""


@contextlib.asynccontextmanager
async def serve(routes: list[web.RouteDef]) -> AsyncIterator[tuple[str, int]]:
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        await runner.cleanup()


def main_routes(other: str, hits: list[str]) -> list[web.RouteDef]:
    async def page(req: web.Request) -> web.Response:
        hits.append(req.path)
        return web.Response(text=ARTICLE, content_type="text/html")

    def redirect_to(target: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def h(req: web.Request) -> web.Response:
            raise web.HTTPFound(target)
        return h

    async def huge(req: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(req)
        chunk = ("word " * 2000 + "\n\n").encode()
        for _ in range(1000):  # ~10 MB unless the client hangs up
            try:
                await resp.write(chunk)
            except (ConnectionError, RuntimeError):
                break
        return resp

    async def slow(req: web.Request) -> web.Response:
        await asyncio.sleep(1.5)
        return web.Response(text="late")

    async def raw(req: web.Request) -> web.Response:
        body, ctype = RAW[req.match_info["name"]]
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def status(req: web.Request) -> web.Response:
        return web.Response(status=int(req.match_info["code"]), text="status page")
    return [web.get("/page", page), web.get("/huge", huge), web.get("/slow", slow),
            web.get("/raw/{name}", raw), web.get("/status/{code}", status),
            web.get("/to-metadata", redirect_to("http://169.254.169.254/latest/meta-data/")),
            web.get("/to-other", redirect_to(other + "/secret")),
            web.get("/to-v6", redirect_to("http://[::1]/")),
            web.get("/to-same", redirect_to("/page")),
            web.get("/to-file", redirect_to("file:///etc/passwd")),
            web.get("/loop", redirect_to("/loop"))]


JAPANESE = "東京は日本の首都であり、世界最大の都市圏の一つです。" * 20
RAW: dict[str, tuple[bytes, str]] = {
    "latin1": ("<p>Café crème à Paris — naïve façade</p>".replace("—", "-").encode("latin-1"),
               "text/html; charset=iso-8859-1"),
    "meta": (b'<html><head><meta charset="windows-1252"></head><body><p>\x93quoted\x94 '
             b'price \x80 5</p></body></html>', "text/html"),
    "sjis": (f"<html><body><p>{JAPANESE}</p></body></html>".encode("shift_jis"), "text/html"),
    "junk": (b"plain \xff\xfe\xfd bytes \x80 here", "text/plain"),
    "png": (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "image/png"),
    "json": (json.dumps({"answer": 42}).encode(), "application/json"),
}


def run_visits(calls: list[dict[str, Any]], **cfg_kw: Any) -> tuple[list[ToolResult], list[str]]:
    """Start the main server (admitted by address:port) and a second one (not admitted)."""
    other_hits: list[str] = []
    main_hits: list[str] = []

    async def other_page(req: web.Request) -> web.Response:
        other_hits.append(req.path)
        return web.Response(text="secret")

    async def go() -> list[ToolResult]:
        async with serve([web.get("/{tail:.*}", other_page)]) as (other, _):
            async with serve(main_routes(other, main_hits)) as (base, port):
                cfg = VisitConfig(allow_addresses=(f"127.0.0.1:{port}",), **cfg_kw)
                tool = visit_tool(cfg)
                out = []
                for c in calls:
                    c = {k: v.replace("{base}", base).replace("{other}", other) for k, v in c.items()}
                    try:
                        out.append(await tool.fn(c, ToolContext()))
                    except ToolError as e:
                        out.append(ToolResult(error=e))
                return out
    return asyncio.run(go()), other_hits


def assert_refused(res: ToolResult, *words: str) -> None:
    assert res.error is not None and res.error.kind is ErrorKind.BAD_ARGS, res
    for w in words:
        assert w in res.error.message, res.error.message


def test_fetches_html_and_extracts_evidence_for_the_goal() -> None:
    (res,), _ = run_visits([{"url": "{base}/page", "goal": "how long is the river in kilometres"}])
    assert res.ok, res.error
    assert res.text.startswith("Title: The Nile & its delta\nURL: http://127.0.0.1:")
    assert "6,650 kilometres" in res.text and "Ancient Egyptian" not in res.text
    assert "Passages relevant to the goal" in res.text and "pic.png" not in res.text
    assert res.meta["extractor"] == "bm25" and res.meta["status"] == 200
    assert res.meta["truncated"] is False


def test_goal_without_match_returns_the_opening() -> None:
    (res,), _ = run_visits([{"url": "{base}/page", "goal": "zebra quantum"}], max_paragraphs=2)
    assert res.ok and "No passage matched the goal 'zebra quantum'; the page begins:" in res.text
    assert "Home" in res.text and "Ancient" not in res.text


def test_private_loopback_and_link_local_addresses_are_refused() -> None:
    out, other_hits = run_visits([
        {"url": "{other}/secret"},                      # loopback, port not admitted
        {"url": "http://169.254.169.254/latest/meta-data/"},
        {"url": "http://[::1]:9/"},
        {"url": "http://10.1.2.3/"},
        {"url": "http://localhost:9/"},
        {"url": "http://2130706433/"},                  # 127.0.0.1 as one decimal number
        {"url": "http://[::ffff:127.0.0.1]:9/"},
        {"url": "file:///etc/passwd"},
        {"url": "ftp://example.com/x"},
    ])
    for res in out[:7]:
        assert_refused(res, "non-public address")
    assert_refused(out[1], "169.254.169.254")
    assert_refused(out[2], "::1")
    assert_refused(out[6], "127.0.0.1")
    for res in out[7:]:
        assert_refused(res, "only http(s) and corpus:// URLs")
    assert other_hits == []


def test_redirects_are_checked_at_every_hop() -> None:
    out, other_hits = run_visits([
        {"url": "{base}/to-metadata"}, {"url": "{base}/to-other"}, {"url": "{base}/to-v6"},
        {"url": "{base}/to-file"}, {"url": "{base}/to-same", "goal": "delta Cairo"},
        {"url": "{base}/loop"}])
    assert_refused(out[0], "169.254.169.254")
    assert_refused(out[1], "127.0.0.1")
    assert_refused(out[2], "::1")
    assert_refused(out[3], "file:///etc/passwd")
    assert out[4].ok and out[4].meta["final_url"].endswith("/page") and "Cairo" in out[4].text
    assert_refused(out[5], "redirected more than 5 times")
    assert other_hits == []


def test_allow_private_admits_everything_and_bad_entries_are_named() -> None:
    (res,), other_hits = run_visits([{"url": "{other}/x"}], allow_private=True)
    assert res.ok and other_hits == ["/x"]
    with pytest.raises(ValueError, match=r"entry 'localhost:80' is not 'ip:port'"):
        VisitConfig(allow_addresses=("localhost:80",))
    cfg = VisitConfig(allow_addresses=("[::1]:8080",))
    check_address("::1", 8080, cfg)
    with pytest.raises(ToolError, match="non-public"):
        check_address("::1", 8081, cfg)
    check_address("93.184.215.14", 80, VisitConfig())  # a public address passes
    with pytest.raises(ToolError):
        check_address("100.64.0.1", 80, VisitConfig())  # CGNAT is not global


def test_huge_bodies_are_cut() -> None:
    (res,), _ = run_visits([{"url": "{base}/huge", "goal": "word"}], max_bytes=100_000)
    assert res.ok and res.meta["truncated"] is True and res.meta["bytes"] == 100_000
    assert "[the page was cut at 100000 bytes]" in res.text
    assert len(res.text) < 5000


def test_timeouts_are_transient() -> None:
    (res,), _ = run_visits([{"url": "{base}/slow"}], timeout_s=0.5)
    assert res.error.kind is ErrorKind.TRANSIENT and "timed out after 0.5s" in res.error.message


def test_http_errors_are_classified() -> None:
    out, _ = run_visits([{"url": "{base}/status/404"}, {"url": "{base}/status/503"},
                         {"url": "{base}/status/429"}, {"url": "{base}/raw/png"},
                         {"url": "http://no-such-host.invalid/"}], timeout_s=5)
    assert out[0].error.kind is ErrorKind.BAD_ARGS and "HTTP 404" in out[0].error.message
    assert out[1].error.kind is ErrorKind.TRANSIENT and "HTTP 503" in out[1].error.message
    assert out[2].error.kind is ErrorKind.TRANSIENT
    assert_refused(out[3], "'image/png', not a text or HTML page")
    # NXDOMAIN is the model's bad URL; no reachable resolver (EAI_AGAIN, timeout) is transient
    assert out[4].error.kind in (ErrorKind.BAD_ARGS, ErrorKind.TRANSIENT)
    assert "no-such-host.invalid" in out[4].error.message


def test_non_utf8_bodies_are_decoded() -> None:
    out, _ = run_visits([{"url": "{base}/raw/latin1"}, {"url": "{base}/raw/meta"},
                         {"url": "{base}/raw/sjis"}, {"url": "{base}/raw/junk"},
                         {"url": "{base}/raw/json", "goal": "answer"}])
    assert all(r.ok for r in out), [r.error for r in out]
    assert "Café crème à Paris" in out[0].text
    assert "\u201cquoted\u201d price \u20ac 5" in out[1].text
    assert "東京は日本の首都" in out[2].text
    assert "plain" in out[3].text and "here" in out[3].text
    assert '"answer": 42' in out[4].text


def test_decode_body_handles_cut_multibyte_and_bom() -> None:
    body = "naïve café".encode("utf-8")
    assert decode_body(body[:-1], None, truncated=True) == "naïve caf"
    assert decode_body(b"\xef\xbb\xbfhello", None) == "hello"
    assert decode_body("hé".encode("latin-1"), "no-such-charset") != ""


def test_paragraph_splitting() -> None:
    text = "a short one\n\n" + "This is a sentence. " * 100
    paras = paragraphs(text, 200)
    assert paras[0] == "a short one" and all(len(p) <= 200 for p in paras)
    assert "".join(paras[1:]).replace(" ", "") == ("This is a sentence. " * 100).replace(" ", "")


def test_llm_extracts_evidence_when_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []

    async def chat(req: web.Request) -> web.Response:
        seen.append(await req.json())
        return web.json_response({"choices": [{"message": {"content": "It is 6,650 km long."}}]})

    async def go() -> ToolResult:
        async with serve([web.post("/v1/chat/completions", chat)]) as (llm_url, _):
            async with serve(main_routes("http://127.0.0.1:9", [])) as (base, port):
                cfg = VisitConfig(allow_addresses=(f"127.0.0.1:{port}",),
                                  llm=LLMConfig(base_url=llm_url + "/v1", model="m", api_key_env=None))
                return await visit_tool(cfg).fn({"url": base + "/page", "goal": "length"},
                                                ToolContext())
    res = asyncio.run(go())
    assert res.ok and res.meta["extractor"] == "llm"
    assert res.text.endswith("Evidence for the goal 'length':\n\nIt is 6,650 km long.")
    prompt = seen[0]["messages"][0]["content"]
    assert prompt.startswith("Goal: length") and "6,650 kilometres" in prompt


def test_corpus_pages_are_served_offline(tmp_path: Path) -> None:
    docs = [{"id": "eiffel", "title": "Eiffel Tower", "url": "corpus://eiffel",
             "text": "The tower is 330 metres tall.\n\nIt was built for the 1889 World's Fair.",
             "links": ["paris", "gone"], "infobox": {"height": "330 m"}, "image": None},
            {"id": "paris", "title": "Paris", "url": "corpus://paris", "text": "Capital of France.",
             "links": [], "infobox": {}, "image": None}]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tool = visit_tool(VisitConfig(corpus=str(path)))
    ex = ToolExecutor({"Visit": tool})

    async def go() -> list[ToolResult]:
        return [await ex.execute("Visit", json.dumps(a), ToolContext()) for a in (
            {"url": "corpus://eiffel", "goal": "when was it built"},
            {"url": "corpus://eiffel"}, {"url": "corpus://nope"}, {"goal": "x"},
            {"url": "corpus://eiffel", "goal": "x", "extra": 1})]
    built, whole, missing, no_url, extra = asyncio.run(go())
    assert built.ok and "1889 World's Fair" in built.text and built.meta["source"] == "corpus"
    assert "- height: 330 m" in whole.text and "Paris (corpus://paris)" in whole.text
    assert "corpus://gone" in whole.text
    assert_refused(missing, "no document 'corpus://nope'")
    assert_refused(no_url, "missing required argument(s) ['url']")
    assert_refused(extra, "unknown argument(s) ['extra']")
    with pytest.raises(ToolError, match="need VisitConfig.corpus"):
        asyncio.run(visit_tool().fn({"url": "corpus://eiffel"}, ToolContext()))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_bytes must be > 0, got 0"):
        VisitConfig(max_bytes=0)
    with pytest.raises(ValueError, match="max_redirects must be >= 0, got -1"):
        VisitConfig(max_redirects=-1)


def test_a_page_without_words_says_so_instead_of_failing() -> None:
    """bm25s raises on an index with no terms: a page of punctuation or stopwords only is an
    ordinary (empty) result, not a fatal tool error."""
    from spyglass.engine.tools.web import extract_evidence
    cfg = VisitConfig()
    assert extract_evidence("!!! ???", "the mayor", cfg) == ("", False)
    assert extract_evidence("the of and a", "the mayor", cfg) == ("the of and a", False)
    assert extract_evidence("the of\n\nThe mayor is Ana.", "mayor", cfg) == ("The mayor is Ana.", True)


def test_a_menu_of_links_does_not_crowd_out_the_evidence() -> None:
    """Link targets are not scored and a passage of links only (a menu item) is not scored at all,
    so a navigation list whose URLs and titles repeat the goal's words cannot fill the evidence."""
    from spyglass.engine.tools.web import extract_evidence, ranked_text
    assert ranked_text("- [History of Lima](https://x.org/wiki/Lima_population)") == ""
    assert ranked_text("1. [![icon](i.png)](/wiki/Lima_population) <https://x.org/lima>") == ""  # links only
    assert ranked_text("| [Lima](/a) | [Peru](/b) |") == ""
    assert ranked_text("1. ![map](lima.png) [Lima](https://x.org/lima) has 10 million people") == \
        "1. map Lima has 10 million people"
    assert ranked_text("- [Population](/wiki/Population): 10,092,000") == "- Population: 10,092,000"  # an infobox row
    assert ranked_text("History[[edit]](/w/index.php?title=Lima_population&action=edit)") == "History[edit]"
    assert ranked_text('[a](/x "Lima (city) population") b') == "a b"
    menu = "\n".join(f"- [Lima population {y}](https://x.org/wiki/Lima_population_{y})" for y in range(2000, 2010))
    fact = "The population of Lima was 10,092,000 in [2023](https://x.org/c/9)."
    page = f"{menu}\n\nLima is the capital of Peru.\n\n{fact}\n"
    evidence, matched = extract_evidence(page, "population of Lima", VisitConfig(max_paragraphs=2))
    assert matched and evidence.split("\n\n")[0] == fact and "x.org/wiki" not in evidence


def test_list_items_are_passages_and_evidence_comes_best_first() -> None:
    """An infobox (a markdown list) is one passage per item, so the goal's field line is returned
    alone, ahead of an earlier prose paragraph that also matches; equal scores keep page order;
    prose whose wrapped line starts like an item stays whole; with no match the opening keeps
    its lists whole."""
    from spyglass.engine.tools.web import extract_evidence
    prose = "Ana Lopez (born 1948) is an architect from Lima, where she was born and raised."
    page = (f"# Ana Lopez\n\n{prose}\n\n- birthplace: Lima\n- born: 1948\n  (in winter)\n- occupation: architect\n\n"
            "She moved in\n1975. Her studio grew.\n\n1. first born item\n2) second born item")
    assert paragraphs(page) == ["# Ana Lopez", prose, "- birthplace: Lima", "- born: 1948\n  (in winter)",
                                "- occupation: architect", "She moved in\n1975. Her studio grew.",
                                "1. first born item", "2) second born item"]
    cfg = VisitConfig()
    assert extract_evidence(page, "occupation", cfg) == ("- occupation: architect", True)
    evidence, matched = extract_evidence(page, "born", cfg)
    items = evidence.split("\n\n")
    assert matched and items[0] == "- born: 1948\n  (in winter)" and items.index(prose) > 0  # best first, not page order
    assert items.index("1. first born item") < items.index("2) second born item")  # a tie: page order
    assert len(extract_evidence(page, "born", VisitConfig(max_paragraphs=2))[0].split("\n\n")) == 2
    opening, matched = extract_evidence(page, "zebra", VisitConfig(max_paragraphs=3))
    assert not matched and opening.split("\n\n")[2] == "- birthplace: Lima\n- born: 1948\n  (in winter)\n- occupation: architect"
