"""The entity link graph the synthesis pipeline samples paths from.

Built from pages (trainer/synth/dump.py documents the pages JSONL; a world's docs.jsonl is one):
redirects are resolved (chains followed, cycles dropped) and become aliases of their target;
disambiguation pages, List/Lists/Outline/Index/Timeline-of pages and hubs (in-degree over
GraphConfig.hub_in_degree, default 10,000) are excluded, and links to them dropped. Nodes keep
their infobox; an infobox field whose value names a page (infobox_links, or the value is that
page's title or a redirect to it) is a *relation edge* (src --field--> dst); other infobox
fields are *literal facts*. Relation edges are what questions chain over; plain text links
count toward in-degree only.

    g = build_graph("world/docs.jsonl", GraphConfig(hub_in_degree=10_000))
    g.targets("org-003", "founder")   # ['person-017']
    g.stats()                          # counts, and exclusions by reason
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .dump import normalize_title, read_pages, text_links

LIST_PREFIXES = ("List of ", "Lists of ", "Outline of ", "Index of ", "Timeline of ")
NON_FACT_FIELDS = frozenset({"name", "caption", "alt", "image_caption", "logo_caption",
                             "image_size", "imagesize", "website", "url", "signature",
                             "coordinates", "map_caption"})


@dataclass
class GraphConfig:
    """How pages become the graph (validated)."""

    hub_in_degree: int = 10_000  # in-degree above this: a hub, excluded
    exclude_prefixes: tuple[str, ...] = LIST_PREFIXES
    max_redirect_chain: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.hub_in_degree, int) or self.hub_in_degree < 1:
            raise ValueError(f"GraphConfig.hub_in_degree must be an int >= 1, got {self.hub_in_degree!r}")
        if self.max_redirect_chain < 1:
            raise ValueError(f"GraphConfig.max_redirect_chain must be >= 1, got {self.max_redirect_chain!r}")
        self.exclude_prefixes = tuple(self.exclude_prefixes)


@dataclass
class Node:
    """One entity page."""

    id: str
    title: str
    type: str
    aliases: list[str]
    infobox: dict[str, Any]
    images: list[str]
    url: str
    text: str = ""

    def names(self) -> list[str]:
        """The title and every alias (what a question must not say when hiding the entity)."""
        return list(dict.fromkeys([self.title, *self.aliases]))


@dataclass
class LinkGraph:
    """Nodes, relation edges, literal facts and in-degrees (see module docstring)."""

    nodes: dict[str, Node]
    relations: dict[str, dict[str, list[str]]]  # src -> field -> [dst]
    literals: dict[str, dict[str, Any]]  # src -> field -> value
    in_degree: dict[str, int]
    excluded: dict[str, str] = field(default_factory=dict)  # title -> reason
    redirects: int = 0

    def node(self, node_id: str) -> Node:
        try:
            return self.nodes[node_id]
        except KeyError:
            raise KeyError(f"no node {node_id!r} in the graph") from None

    def targets(self, src: str, rel: str) -> list[str]:
        return self.relations.get(src, {}).get(rel, [])

    def edges(self, src: str) -> list[tuple[str, str]]:
        """(field, dst) relation edges of `src`, sorted."""
        return sorted((r, d) for r, ds in self.relations.get(src, {}).items() for d in ds)

    def types(self) -> list[str]:
        return sorted({n.type for n in self.nodes.values()})

    def stats(self) -> dict[str, Any]:
        reasons = collections.Counter(self.excluded.values())
        return {"nodes": len(self.nodes), "relation_edges": sum(len(ds) for r in self.relations.values()
                                                                for ds in r.values()),
                "literal_facts": sum(len(v) for v in self.literals.values()),
                "redirects": self.redirects, "excluded": dict(sorted(reasons.items())),
                "types": dict(sorted(collections.Counter(n.type for n in self.nodes.values()).items())),
                "with_image": sum(bool(n.images) for n in self.nodes.values())}


def _resolve_redirects(redirects: dict[str, str], cfg: GraphConfig) -> tuple[dict[str, str], list[str]]:
    """Each redirect title -> its final target title; titles in cycles/overlong chains dropped."""
    out, bad = {}, []
    for src in redirects:
        cur, seen = src, {src}
        for _ in range(cfg.max_redirect_chain):
            cur = redirects[cur]
            if cur not in redirects:
                out[src] = cur
                break
            if cur in seen:
                break
            seen.add(cur)
        if src not in out:
            bad.append(src)
    return out, bad


def _exclusion(page: dict[str, Any], title: str, cfg: GraphConfig) -> str | None:
    if page.get("disambiguation") or title.endswith("(disambiguation)") or any(
            "disambiguation" in c.lower() for c in page.get("categories") or []):
        return "disambiguation"
    if title.startswith(cfg.exclude_prefixes):
        return "list"
    return None


def _images(page: dict[str, Any]) -> list[str]:
    imgs = list(page.get("images") or [])
    if page.get("image"):
        imgs.insert(0, page["image"])
    return list(dict.fromkeys(imgs))


def build_graph(pages: str | Path | Iterable[dict[str, Any]], cfg: GraphConfig | None = None) -> LinkGraph:
    """The graph of a pages JSONL path (or of page records); see module docstring."""
    cfg = cfg or GraphConfig()
    records = list(read_pages(pages)) if isinstance(pages, (str, Path)) else list(pages)
    content: dict[str, dict[str, Any]] = {}
    redirects: dict[str, str] = {}
    excluded: dict[str, str] = {}
    for p in records:
        title = normalize_title(p["title"])
        if p.get("redirect_to"):
            redirects[title] = normalize_title(p["redirect_to"])
            continue
        if title in content:
            raise ValueError(f"duplicate page title {title!r}")
        why = _exclusion(p, title, cfg)
        if why:
            excluded[title] = why
        else:
            content[title] = p
    resolved, broken = _resolve_redirects(redirects, cfg)
    for t in broken:
        excluded[t] = "redirect_cycle"
    ids = {t: str(p.get("id") or t) for t, p in content.items()}
    by_key: dict[str, str] = {}  # title / id / redirect title -> node id
    for t, i in ids.items():
        by_key[t] = i
        by_key.setdefault(normalize_title(i), i)
    aliases: dict[str, list[str]] = collections.defaultdict(list)
    for src, dst in resolved.items():
        if dst in ids and src not in by_key:
            by_key[src] = ids[dst]
            aliases[ids[dst]].append(src)

    def resolve(name: Any) -> str | None:
        return by_key.get(normalize_title(str(name))) if isinstance(name, str) and name.strip() else None

    out_links: dict[str, set[str]] = {}
    for t, p in content.items():
        names = p.get("links") if p.get("links") is not None else text_links(p.get("text", ""))
        out_links[ids[t]] = {d for d in map(resolve, names) if d is not None and d != ids[t]}
    indeg = collections.Counter(d for ds in out_links.values() for d in ds)
    hubs = {i for i, n in indeg.items() if n > cfg.hub_in_degree}
    for t, i in ids.items():
        if i in hubs:
            excluded[t] = "hub"
    nodes: dict[str, Node] = {}
    relations: dict[str, dict[str, list[str]]] = {}
    literals: dict[str, dict[str, Any]] = {}
    for t, p in content.items():
        i = ids[t]
        if i in hubs:
            continue
        infobox = dict(p.get("infobox") or {})
        ib_links = p.get("infobox_links") or {}
        kind = p.get("type") or p.get("infobox_type") or "other"
        nodes[i] = Node(i, t, str(kind), list(dict.fromkeys(list(p.get("aliases") or []) + aliases[i])),
                        infobox, _images(p), str(p.get("url") or f"corpus://{i}"), p.get("text") or "")
        rel: dict[str, list[str]] = {}
        lit: dict[str, Any] = {}
        for key, value in infobox.items():
            if key in NON_FACT_FIELDS:
                continue
            names = ib_links.get(key) or [value]
            dsts = [d for d in dict.fromkeys(map(resolve, names)) if d is not None and d != i]
            if dsts:
                rel[key] = dsts
            elif not ib_links.get(key) and isinstance(value, (str, int, float)) and str(value).strip():
                lit[key] = value
        relations[i], literals[i] = rel, lit
    for i in nodes:  # drop edges into excluded pages (hubs)
        relations[i] = {r: [d for d in ds if d in nodes] for r, ds in relations[i].items()}
        relations[i] = {r: ds for r, ds in relations[i].items() if ds}
    in_degree = {i: indeg.get(i, 0) for i in nodes}
    return LinkGraph(nodes, relations, literals, in_degree, excluded, redirects=len(redirects))
