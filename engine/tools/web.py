"""Visit: fetch a page and extract the evidence it holds for a goal.

Arguments {"url": str, "goal": str}. http(s) pages are fetched over aiohttp with a size cap
(the body is cut at `max_bytes` and marked truncated), a time cap (connect, read, and a total
for all hops) and a redirect cap. Redirects are followed by hand so that every hop is checked.

SSRF guard: before each hop the host is resolved and every resolved address is checked with
`ipaddress`; anything not globally routable (private, loopback, link-local such as
169.254.169.254, CGNAT, multicast, reserved, unspecified; IPv4-mapped IPv6 is unwrapped) is
refused, unless `allow_private` is set or the exact address and port is listed in
`allow_addresses` (e.g. "127.0.0.1:8123", "[::1]:8123": how tests admit exactly their own test
server while redirects from it are still checked). The connection then goes to the checked
addresses only (a pinned resolver), so a second DNS answer cannot swap in another address.

Bodies are decoded by the charset in Content-Type, else a <meta> charset, else a BOM, else
strict UTF-8, else charset-normalizer's guess, else UTF-8 with replacement characters. HTML
becomes markdown with html2text; text/* and JSON are kept as they are; other types are refused.

Evidence: an OpenAI-compatible LLM (VisitConfig.llm) extracts what the page says about the
goal. With no LLM configured (the default), the documented extractive fallback: the page is
split into passages (blank-line paragraphs, each item of a markdown list its own passage, long
ones cut at sentence ends), BM25 (bm25s) scores them against the goal (link targets dropped, a
passage of links only, a menu item, not scored), and the best
`max_paragraphs` with a positive score are returned best first (ties in page order) within
`max_evidence_chars`, so an infobox line that names the asked field leads the evidence; when none
matches, the page's opening paragraphs (lists kept whole) are returned and the observation says so.

`corpus://<id>` URLs are served from the local docs (VisitConfig.corpus: an index dir built by
search.py or a docs.jsonl), so the offline world needs no network.

    tool = visit_tool(VisitConfig(corpus="world/index"))
    res = await tool.fn({"url": "corpus://eiffel", "goal": "height"}, ToolContext())
"""
from __future__ import annotations

import asyncio
import codecs
import functools
import html
import ipaddress
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import html2text
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from spyglass.engine.tools.args import check_args
from spyglass.engine.tools.base import ErrorKind, Tool, ToolContext, ToolError, ToolResult
from spyglass.engine.tools.llm import LLMConfig, chat
from spyglass.engine.tools.search import WIKILINK, load_docs

_REDIRECTS = {301, 302, 303, 307, 308}
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.I | re.S)
_TEXT_TYPES = ("text/", "application/json", "application/xml", "application/xhtml+xml")


@dataclass
class VisitConfig:
    """Limits, the SSRF policy, the local corpus and the optional LLM extractor of Visit."""

    corpus: str | None = None                # index dir or docs.jsonl for corpus://<id>
    allow_private: bool = False              # admit every non-global address (never in prod)
    allow_addresses: tuple[str, ...] = ()    # exact "ip:port" exemptions, e.g. a test server
    max_bytes: int = 2_000_000
    timeout_s: float = 20.0                  # total, all hops
    connect_timeout_s: float = 5.0
    max_redirects: int = 5
    user_agent: str = "Mozilla/5.0 (compatible; spyglass-visit/0.1)"
    max_evidence_chars: int = 4000
    max_paragraphs: int = 8
    paragraph_chars: int = 800               # longer paragraphs are split at sentences
    llm: LLMConfig | None = None             # off by default: the BM25 extractive fallback
    max_concurrency: int = 16
    allowed: frozenset = field(init=False, repr=False, default=frozenset())  # parsed exemptions

    def __post_init__(self) -> None:
        for name in ("max_bytes", "timeout_s", "connect_timeout_s", "max_evidence_chars",
                     "max_paragraphs", "paragraph_chars", "max_concurrency"):
            if getattr(self, name) <= 0:
                raise ValueError(f"VisitConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.max_redirects < 0:
            raise ValueError(f"VisitConfig.max_redirects must be >= 0, got {self.max_redirects}")
        self.allowed = frozenset(_parse_addr(a) for a in self.allow_addresses)


def _parse_addr(text: str) -> tuple[Any, int]:
    """'1.2.3.4:80' or '[::1]:80' -> (ip_address, port); bad input names the value."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([0-9.]+):(\d+)", text.strip())
    try:
        if m is None:
            raise ValueError
        ip, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        return ipaddress.ip_address(ip), int(port)
    except ValueError:
        raise ValueError(f"VisitConfig.allow_addresses entry {text!r} is not 'ip:port' or "
                         f"'[ipv6]:port'") from None


def check_address(ip: str, port: int, cfg: VisitConfig, url: str = "") -> None:
    """Refuse a non-global address unless allowed (bad_args naming the URL and address)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if (addr.is_global and not addr.is_multicast) or cfg.allow_private:
        return
    if (addr, port) in cfg.allowed:
        return
    raise ToolError(ErrorKind.BAD_ARGS, f"Visit: refusing {url or ip}: it resolves to {addr}, a "
                    f"private, loopback, link-local or otherwise non-public address", "Visit")


async def resolve(host: str, port: int) -> list[tuple[str, int]]:
    """All (ip, family) for host; a literal IP resolves to itself."""
    try:
        addr = ipaddress.ip_address(host)
        return [(str(addr), socket.AF_INET6 if addr.version == 6 else socket.AF_INET)]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        kind = ErrorKind.TRANSIENT if e.errno == socket.EAI_AGAIN else ErrorKind.BAD_ARGS
        raise ToolError(kind, f"Visit: cannot resolve host {host!r}: {e.strerror}", "Visit") from None
    return sorted({(str(info[4][0]), int(info[0])) for info in infos})


class PinnedResolver(AbstractResolver):
    """Answers only with addresses that were resolved and checked before the request."""

    def __init__(self) -> None:
        self.pins: dict[str, list[tuple[str, int]]] = {}

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if host not in self.pins:
            raise OSError(f"host {host!r} was not checked before connecting")
        return [ResolveResult(hostname=host, host=ip, port=port, family=fam, proto=0,
                              flags=socket.AI_NUMERICHOST) for ip, fam in self.pins[host]]

    async def close(self) -> None:
        return None


@dataclass
class Page:
    url: str
    status: int
    content_type: str
    charset: str | None
    body: bytes
    truncated: bool


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> tuple[bytes, bool]:
    buf = bytearray()
    async for chunk in resp.content.iter_chunked(1 << 16):
        buf += chunk
        if len(buf) > cap:
            return bytes(buf[:cap]), True
    return bytes(buf), False


async def fetch(url: str, cfg: VisitConfig) -> Page:
    """GET `url`, following redirects by hand with every hop checked; classified errors."""
    resolver = PinnedResolver()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout_s,
                                    sock_read=cfg.timeout_s)
    connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False, limit=4)
    headers = {"User-Agent": cfg.user_agent, "Accept": "text/html,text/plain,*/*;q=0.5"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        current = URL(url)
        for _hop in range(cfg.max_redirects + 1):
            host = current.raw_host
            if current.scheme not in ("http", "https") or not host:
                raise ToolError(ErrorKind.BAD_ARGS, f"Visit: cannot fetch {str(current)!r}: only "
                                f"http(s) and corpus:// URLs are supported", "Visit")
            port = current.port or (443 if current.scheme == "https" else 80)
            ips = await resolve(host, port)
            for ip, _fam in ips:
                check_address(ip, port, cfg, str(current))
            resolver.pins[host] = ips
            async with session.get(current, allow_redirects=False, headers=headers) as resp:
                if resp.status in _REDIRECTS:
                    location = resp.headers.get("Location")
                    if not location:
                        raise ToolError(ErrorKind.BAD_ARGS, f"Visit: {current} redirected "
                                        f"(HTTP {resp.status}) without a Location", "Visit")
                    current = current.join(URL(location))
                    continue
                if resp.status == 429 or resp.status >= 500:
                    raise ToolError(ErrorKind.TRANSIENT, f"Visit: {current} answered HTTP "
                                    f"{resp.status}", "Visit")
                if resp.status >= 400:
                    raise ToolError(ErrorKind.BAD_ARGS, f"Visit: {current} answered HTTP "
                                    f"{resp.status}", "Visit")
                body, truncated = await _read_capped(resp, cfg.max_bytes)
                return Page(str(current), resp.status, resp.content_type, resp.charset,
                            body, truncated)
        raise ToolError(ErrorKind.BAD_ARGS, f"Visit: {url} redirected more than "
                        f"{cfg.max_redirects} times", "Visit")


# ------------------------------------------------------------------------------ decoding
def _usable(enc: str | None) -> str | None:
    if not enc:
        return None
    try:
        return codecs.lookup(enc.strip().strip("\"'")).name
    except LookupError:
        return None


def decode_body(body: bytes, header_charset: str | None, *, truncated: bool = False) -> str:
    """Decode a page body (see the module docstring for the order of guesses)."""
    m = _META_CHARSET.search(body[:4096])
    bom = "utf-8-sig" if body.startswith(codecs.BOM_UTF8) else (
        "utf-16" if body[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else None)
    for enc in (_usable(header_charset), _usable(m.group(1).decode("ascii", "ignore")) if m
                else None, bom, "utf-8"):
        if enc is None:
            continue
        try:  # incremental: a body cut mid-character is not an error
            return codecs.getincrementaldecoder(enc)("strict").decode(body, final=not truncated)
        except UnicodeDecodeError:
            continue
    try:
        import charset_normalizer
        best = charset_normalizer.from_bytes(body).best()
        if best is not None:
            return str(best)
    except ImportError:
        pass
    return body.decode("utf-8", errors="replace")


def to_markdown(page: Page, text: str) -> tuple[str, str]:
    """(title, markdown) of a decoded page; unsupported content types are bad_args."""
    ctype = page.content_type.lower()
    is_html = "html" in ctype or (ctype in ("", "application/octet-stream")
                                  and "<html" in text[:2000].lower())
    if is_html:
        m = _TITLE.search(text)
        title = html.unescape(re.sub(r"\s+", " ", m.group(1))).strip() if m else ""
        conv = html2text.HTML2Text()
        conv.body_width, conv.ignore_images, conv.ignore_emphasis = 0, True, True
        return title, conv.handle(text)
    if ctype.startswith(_TEXT_TYPES) or ctype == "":
        return "", text
    raise ToolError(ErrorKind.BAD_ARGS, f"Visit: {page.url} is {page.content_type!r}, not a "
                    f"text or HTML page", "Visit")


# ------------------------------------------------------------------------------ evidence
_LIST_ITEM = re.compile(r"^\s{0,3}(?:[-*+]|\d{1,9}[.)])\s")
# a markdown link or image, [text](target "title"), one level of brackets in the text and of
# parentheses in the target; an autolink, <https://...>
_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\((?:[^()]|\([^()]*\))*\)")
_AUTOLINK = re.compile(r"<[a-z][a-z0-9+.-]*://[^>\s]*>", re.I)


def ranked_text(passage: str) -> str:
    """What BM25 scores of a passage: its text with every link's target dropped (its text kept);
    nothing when the passage is only links (a menu item such as "- [History](/wiki/History)", a
    row of links), so a page's navigation does not crowd out its evidence."""
    text = _AUTOLINK.sub("", passage)
    rest = "\n".join(_LIST_ITEM.sub("", line) for line in _LINK.sub("", text).splitlines())
    if not re.search(r"\w", rest):
        return ""
    for _ in range(2):  # an image inside a link's text: [![logo](logo.png)](/wiki/Lima)
        text = _LINK.sub(r"\1", text)
    return text


def paragraphs(markdown: str, max_chars: int = 800, split_lists: bool = True) -> list[str]:
    """The page's passages: blank-line paragraphs, and (split_lists) a list's every item on its
    own when the paragraph is a markdown list (its first line an item; an item's continuation
    lines stay with it: a hard-wrapped prose line that starts with "1948. " does not split its
    paragraph); longer ones are split at sentence ends into <= max_chars pieces."""
    blocks = []
    for para in re.split(r"\n\s*\n", markdown):
        lines = para.strip().splitlines()
        if not (split_lists and lines and _LIST_ITEM.match(lines[0])):
            blocks.append(para)
            continue
        block: list[str] = []
        for line in lines:
            if _LIST_ITEM.match(line) and block:
                blocks.append("\n".join(block))
                block = []
            block.append(line)
        blocks.append("\n".join(block))
    out = []
    for para in blocks:
        para = para.strip()
        if not para:
            continue
        while len(para) > max_chars:
            cut = max(para.rfind(". ", 0, max_chars), para.rfind("\n", 0, max_chars))
            cut = cut + 1 if cut > max_chars // 4 else max_chars
            out.append(para[:cut].strip())
            para = para[cut:].strip()
        if para:
            out.append(para)
    return out


def extract_evidence(markdown: str, goal: str, cfg: VisitConfig) -> tuple[str, bool]:
    """The BM25 extractive fallback: (evidence, matched) — see the module docstring."""
    import bm25s
    paras = paragraphs(markdown, cfg.paragraph_chars)
    if not any(re.search(r"\w", p) for p in paras):  # no words at all ("!!! ???"): nothing to rank or show
        return "", False
    chosen: list[int] = []
    query = bm25s.tokenize([goal], stopwords="en", return_ids=False, show_progress=False)
    corpus = bm25s.tokenize([ranked_text(p) for p in paras], stopwords="en", show_progress=False)
    if query[0] and corpus.vocab:  # a page of stopwords only has no index (bm25s raises on it)
        retriever = bm25s.BM25()
        retriever.index(corpus, show_progress=False)
        scores = retriever.get_scores(query[0])
        chosen = sorted((i for i in range(len(paras)) if scores[i] > 0),
                        key=lambda i: (-scores[i], i))[:cfg.max_paragraphs]
    matched = bool(chosen)
    if not matched:  # the opening, its lists kept whole (a menu's items would fill max_paragraphs)
        paras = paragraphs(markdown, cfg.paragraph_chars, split_lists=False)
        chosen = list(range(min(cfg.max_paragraphs, len(paras))))
    out, used = [], 0
    for i in chosen:
        if used + len(paras[i]) > cfg.max_evidence_chars and out:
            continue
        out.append(paras[i][:cfg.max_evidence_chars])
        used += len(out[-1])
    return "\n\n".join(out), matched


async def llm_evidence(cfg: LLMConfig, url: str, markdown: str, goal: str) -> str:
    prompt = (f"Goal: {goal}\n\nWeb page {url}:\n\n{markdown[:cfg.max_input_chars]}\n\n"
              "Quote the passages of this page that are relevant to the goal, then give a short "
              "summary of what they establish. If nothing is relevant, say so.")
    return await chat(cfg, [{"role": "user", "content": prompt}], tool="Visit")


# -------------------------------------------------------------------------------- corpus
@functools.lru_cache(maxsize=4)
def corpus_docs(path: str) -> dict[str, dict[str, Any]]:
    """id -> document, from an index dir (its docs.jsonl) or a docs.jsonl."""
    p = Path(path)
    return {d["id"]: d for d in load_docs(p / "docs.jsonl" if p.is_dir() else p)}


def render_doc(doc: dict[str, Any], docs: dict[str, dict[str, Any]]) -> str:
    """A corpus document as markdown: title, aliases, infobox, text ([[Title]] links become
    markdown links to corpus:// URLs), links."""
    lines = [f"# {doc['title']}", ""]
    aliases = [a for a in doc.get("aliases") or [] if isinstance(a, str)]
    if aliases:
        lines += [f"Also known as: {'; '.join(aliases)}", ""]
    infobox = doc.get("infobox") or {}
    if infobox:
        lines += [f"- {k}: {v}" for k, v in infobox.items()] + [""]
    by_title = {docs[lid]["title"]: lid for lid in doc.get("links") or [] if lid in docs}
    lines += [WIKILINK.sub(lambda m: f"[{m.group(1)}](corpus://{by_title[m.group(1)]})"
                            if m.group(1) in by_title else m.group(1), doc["text"]), ""]
    links = [lid for lid in doc.get("links") or [] if isinstance(lid, str)]
    if links:
        lines.append("Links: " + "; ".join(
            f"{docs[lid]['title']} (corpus://{lid})" if lid in docs else f"corpus://{lid}"
            for lid in links))
    return "\n".join(lines).strip() + "\n"


# ---------------------------------------------------------------------------------- tool
PARAMETERS: dict[str, Any] = {"type": "object", "properties": {
    "url": {"type": "string", "minLength": 1, "maxLength": 4096,
            "description": "http(s) or corpus:// URL to open"},
    "goal": {"type": "string", "default": "", "maxLength": 2000,
             "description": "what to look for on the page"}},
    "required": ["url"], "additionalProperties": False}


async def visit(args: dict[str, Any], cfg: VisitConfig) -> ToolResult:
    """Open the page, convert it, extract evidence for the goal."""
    a = check_args("Visit", PARAMETERS, args)
    url, goal = a["url"].strip(), a["goal"].strip()
    meta: dict[str, Any] = {"url": url}
    if url.startswith("corpus://"):
        if cfg.corpus is None:
            raise ToolError(ErrorKind.FATAL, "Visit: corpus:// URLs need VisitConfig.corpus", "Visit")
        docs = corpus_docs(cfg.corpus)
        doc = docs.get(url[len("corpus://"):].strip("/"))
        if doc is None:
            raise ToolError(ErrorKind.BAD_ARGS, f"Visit: no document {url!r} in the corpus", "Visit")
        title, markdown = doc["title"], render_doc(doc, docs)
        meta.update(final_url=url, source="corpus")
    else:
        try:
            page = await asyncio.wait_for(fetch(url, cfg), cfg.timeout_s)
        except asyncio.TimeoutError:
            raise ToolError(ErrorKind.TRANSIENT, f"Visit: {url} timed out after "
                            f"{cfg.timeout_s:g}s", "Visit") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise ToolError(ErrorKind.TRANSIENT, f"Visit: fetching {url} failed: "
                            f"{type(e).__name__}: {e}", "Visit") from None
        except (aiohttp.InvalidURL, ValueError) as e:
            raise ToolError(ErrorKind.BAD_ARGS, f"Visit: bad URL {url!r}: {e}", "Visit") from None
        text = decode_body(page.body, page.charset, truncated=page.truncated)
        title, markdown = await asyncio.to_thread(to_markdown, page, text)
        meta.update(final_url=page.url, status=page.status, bytes=len(page.body),
                    truncated=page.truncated, content_type=page.content_type, source="web")
    if cfg.llm is not None and goal:
        evidence, meta["extractor"] = await llm_evidence(cfg.llm, url, markdown, goal), "llm"
        head = f"Evidence for the goal {goal!r}:"
    else:
        evidence, matched = await asyncio.to_thread(extract_evidence, markdown, goal, cfg)
        meta["extractor"] = "bm25"
        head = (f"Passages relevant to the goal {goal!r}:" if matched else
                f"No passage matched the goal {goal!r}; the page begins:" if goal else
                "The page begins:")
    note = f"\n[the page was cut at {cfg.max_bytes} bytes]" if meta.get("truncated") else ""
    text = (f"Title: {title or '(none)'}\nURL: {meta['final_url']}\n{head}\n\n"
            f"{evidence or '(the page has no text)'}{note}")
    return ToolResult(text=text, meta=meta)


def visit_tool(cfg: VisitConfig | None = None) -> Tool:
    """The `Visit` tool: arguments {"url": str, "goal": str}."""
    cfg = cfg or VisitConfig()

    async def fn(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        return await visit(args, cfg)

    return Tool(name="Visit", description="Open a web page (or corpus:// document) and return "
                "the passages relevant to a goal.", parameters=PARAMETERS, fn=fn,
                timeout_s=cfg.timeout_s + (cfg.llm.timeout_s if cfg.llm else 0.0) + 10.0,
                max_concurrency=cfg.max_concurrency, retries=2, cache_ttl_s=24 * 3600.0)
