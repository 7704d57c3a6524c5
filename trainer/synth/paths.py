"""Path sampling over the link graph: anchor -> bridge(s) -> answer.

A path starts at an *anchor* (the entity the question's image shows), follows relation edges
through *bridges* and ends at the *answer*: another node, or (when allowed) a literal infobox
fact of the last entity. Hop length (edges) is drawn from PathConfig.hop_lengths with
hop_probs (default 2 / 3 / 4 with 0.4 / 0.4 / 0.2). Seeds are stratified over entity types
(round-robin over the types that have an eligible anchor, in a seeded order); an anchor must
have an image and an infobox (if required) and an in-degree within bounds; every bridge must
have an infobox. A failed walk (dead end, revisit, duplicate path) is retried, with the same
hop length (so retries do not bias the length distribution) and a fresh anchor of the same
type, up to max_retries times, then counted as failed. The same graph, config and seed give the same paths.

    paths, stats = sample_paths(graph, 40, PathConfig(seed=0))
    p.roles()   # [("anchor", "org-003"), ("bridge", "person-017"), ("answer", "place-002")]
"""
from __future__ import annotations

import collections
import random
from dataclasses import dataclass, field
from typing import Any

from .graph import LinkGraph


@dataclass
class PathConfig:
    """How paths are sampled (validated)."""

    hop_lengths: tuple[int, ...] = (2, 3, 4)
    hop_probs: tuple[float, ...] = (0.4, 0.4, 0.2)
    require_image: bool = True
    require_infobox: bool = True
    min_in_degree: int = 0
    max_in_degree: int | None = None  # None: any (hubs are already excluded by the graph)
    types: tuple[str, ...] = ()  # anchor types to stratify over; () = every type present
    literal_answers: bool = True  # the last hop may end at a literal infobox fact
    max_retries: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        self.hop_lengths, self.hop_probs, self.types = (tuple(self.hop_lengths),
                                                        tuple(self.hop_probs), tuple(self.types))
        if not self.hop_lengths or any(not isinstance(k, int) or k < 1 for k in self.hop_lengths):
            raise ValueError(f"PathConfig.hop_lengths must be ints >= 1, got {self.hop_lengths!r}")
        if len(self.hop_probs) != len(self.hop_lengths) or any(p < 0 for p in self.hop_probs) \
                or abs(sum(self.hop_probs) - 1.0) > 1e-6:
            raise ValueError(f"PathConfig.hop_probs must be {len(self.hop_lengths)} non-negative "
                             f"numbers summing to 1, got {self.hop_probs!r}")
        if self.min_in_degree < 0 or (self.max_in_degree is not None and self.max_in_degree < self.min_in_degree):
            raise ValueError(f"PathConfig in-degree bounds [{self.min_in_degree}, {self.max_in_degree}] "
                             "are not a valid range")
        if not isinstance(self.max_retries, int) or self.max_retries < 1:
            raise ValueError(f"PathConfig.max_retries must be an int >= 1, got {self.max_retries!r}")


@dataclass(frozen=True)
class Hop:
    """One edge: relation (infobox field) and where it leads (node id, or None for a literal)."""

    relation: str
    target: str | None
    value: str  # the target's title, or the literal's text


@dataclass
class GraphPath:
    """anchor --hops[0]--> bridge --...--> answer."""

    anchor: str
    hops: list[Hop]

    @property
    def bridges(self) -> list[str]:
        return [h.target for h in self.hops[:-1] if h.target is not None]

    @property
    def answer(self) -> str:
        return self.hops[-1].value

    @property
    def answer_node(self) -> str | None:
        return self.hops[-1].target

    def entities(self) -> list[str]:
        """The anchor then every bridge: the entities the question describes."""
        return [self.anchor, *self.bridges]

    def roles(self) -> list[tuple[str, str]]:
        last = self.hops[-1]
        return ([("anchor", self.anchor)] + [("bridge", b) for b in self.bridges]
                + [("answer", last.target if last.target is not None else f"literal:{last.value}")])

    def key(self) -> tuple:
        return (self.anchor, tuple((h.relation, h.target, h.value) for h in self.hops))

    def to_json(self) -> dict[str, Any]:
        return {"anchor": self.anchor, "hops": [{"relation": h.relation, "target": h.target,
                                                  "value": h.value} for h in self.hops]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "GraphPath":
        return cls(d["anchor"], [Hop(h["relation"], h["target"], h["value"]) for h in d["hops"]])


@dataclass
class PathStats:
    requested: int = 0
    sampled: int = 0
    failed: int = 0
    retries: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    by_length: dict[int, int] = field(default_factory=dict)


def eligible_anchors(graph: LinkGraph, cfg: PathConfig) -> dict[str, list[str]]:
    """Anchor candidates per entity type (sorted ids), under the image/infobox/degree rules."""
    out: dict[str, list[str]] = collections.defaultdict(list)
    for nid in sorted(graph.nodes):
        n = graph.nodes[nid]
        if cfg.types and n.type not in cfg.types:
            continue
        if cfg.require_image and not n.images:
            continue
        if cfg.require_infobox and not n.infobox:
            continue
        deg = graph.in_degree.get(nid, 0)
        if deg < cfg.min_in_degree or (cfg.max_in_degree is not None and deg > cfg.max_in_degree):
            continue
        if not graph.relations.get(nid):
            continue
        out[n.type].append(nid)
    return dict(out)


def _walk(graph: LinkGraph, anchor: str, k: int, cfg: PathConfig, rng: random.Random) -> GraphPath | None:
    cur, seen, hops = anchor, {anchor}, []
    for step in range(k):
        last = step == k - 1
        opts: list[Hop] = [Hop(r, d, graph.nodes[d].title) for r, d in graph.edges(cur)
                           if d not in seen and (last or not cfg.require_infobox or graph.nodes[d].infobox)]
        if last and cfg.literal_answers:
            opts += [Hop(r, None, str(v)) for r, v in sorted(graph.literals.get(cur, {}).items())]
        if not opts:
            return None
        h = rng.choice(opts)
        hops.append(h)
        if h.target is None:
            break
        cur = h.target
        seen.add(cur)
    return GraphPath(anchor, hops) if len(hops) == k else None


def sample_paths(graph: LinkGraph, n: int, cfg: PathConfig | None = None) -> tuple[list[GraphPath], PathStats]:
    """Sample up to n distinct paths, stratified over anchor types (see module docstring)."""
    cfg = cfg or PathConfig()
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"sample_paths: n must be an int >= 0, got {n!r}")
    rng = random.Random(cfg.seed)
    anchors = eligible_anchors(graph, cfg)
    stats = PathStats(requested=n)
    if not anchors:
        raise ValueError(f"no eligible anchors in a graph of {len(graph.nodes)} nodes under {cfg} "
                         "(need an image, an infobox and a relation edge)")
    strata = sorted(anchors)
    rng.shuffle(strata)
    out: list[GraphPath] = []
    keys: set[tuple] = set()
    for i in range(n):
        kind = strata[i % len(strata)]
        k = rng.choices(cfg.hop_lengths, weights=cfg.hop_probs)[0]  # fixed across retries: no bias
        for _ in range(cfg.max_retries):
            anchor = rng.choice(anchors[kind])
            p = _walk(graph, anchor, k, cfg, rng)
            if p is not None and p.key() not in keys:
                keys.add(p.key())
                out.append(p)
                stats.by_type[kind] = stats.by_type.get(kind, 0) + 1
                stats.by_length[k] = stats.by_length.get(k, 0) + 1
                break
            stats.retries += 1
        else:
            stats.failed += 1
    stats.sampled = len(out)
    return out, stats
