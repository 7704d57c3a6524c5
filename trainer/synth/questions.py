"""Questions from paths: the canonical question, then fuzzy rewriting back to the anchor.

For a path A --r1--> B1 --r2--> B2 --r3--> X the *canonical* question names every entity:
"B1 is the r1 of A. B2 is the r2 of B1. What is the r3 of B2?". Fuzzy rewriting then hides
the entities one at a time from the farthest bridge back to the anchor: a hidden bridge is
described through the chain ("the r2 of B1") plus obfuscated clues from its infobox ("the
person whose birth year is in the 1930s who is the r2 of ..."); the anchor is last, replaced by
its visual grounding ("the organisation shown in the image"). After every step the structured
description is evaluated on the graph (`answer_set`): the question is kept only if exactly the
answer satisfies it (clues are added, up to max_clues per entity, to make a description unique),
and the text may not contain the title or an alias of the answer, the anchor or a hidden bridge.
An LLM text must also keep every clue's word ("1930s") and the names still meant to be named;
the anchor step substitutes the grounding for the anchor's title in an LLM text that names it.

Each text is written by an LLM over any OpenAI-compatible endpoint when RewriteConfig.llm is
set (engine/tools/llm.py), and validated (one question, names what it must, leaks nothing);
an endpoint failure or an invalid reply falls back to the deterministic template for that step,
recorded in the step's "source". With llm=None everything is the template: runs offline.

    draft = await write_question(graph, path, RewriteConfig(llm=None, seed=0))
    draft.question, draft.canonical, draft.steps
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from spyglass.engine.tools.base import ToolError
from spyglass.engine.tools.llm import LLMConfig, chat

from .graph import LinkGraph
from .paths import GraphPath

PHRASES = {"born": "birth year", "founded": "founding year", "released": "release year",
           "guest_of_honour": "guest of honour", "birth_place": "birthplace",
           "death_place": "place of death", "birth_date": "birth date", "kind": "kind of place",
           "established": "year of establishment", "opened": "opening year"}
TYPE_NOUNS = {"org": "organisation", "place": "place", "person": "person", "product": "product",
              "event": "event", "work": "work", "other": "entity"}


def phrase(rel: str) -> str:
    """How an infobox field reads in a question."""
    return PHRASES.get(rel, rel.replace("_", " "))


def noun(kind: str) -> str:
    return TYPE_NOUNS.get(kind, kind.replace("_", " "))


# ------------------------------------------------------------------------------------- clues

@dataclass(frozen=True)
class Clue:
    """An obfuscated infobox fact: eq (same text), decade (year in a decade), range (10^e..)."""

    field: str
    op: str
    value: Any

    def matches(self, v: Any) -> bool:
        if v is None:
            return False
        if self.op == "eq":
            return str(v).strip().casefold() == str(self.value).strip().casefold()
        n = _as_int(v)
        if n is None:
            return False
        if self.op == "decade":
            return n // 10 == self.value // 10
        return self.value <= n < self.value * 10

    def text(self) -> str:
        p = phrase(self.field)
        if self.op == "decade":
            return f"whose {p} is in the {self.value // 10 * 10}s"
        if self.op == "range":
            return f"whose {p} is between {self.value:,} and {self.value * 10:,}"
        return f"whose {p} is {self.value}"


def _as_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str) and re.fullmatch(r"-?\d{1,12}", v.strip().replace(",", "")):
        return int(v.strip().replace(",", ""))
    return None


def make_clue(fld: str, value: Any) -> Clue | None:
    """The clue a fact gives, or None when it makes no good clue (long text, floats...)."""
    n = _as_int(value)
    if n is not None:
        if 1000 <= n <= 2100:
            return Clue(fld, "decade", n)
        if n >= 100:
            return Clue(fld, "range", 10 ** (len(str(n)) - 1))
        return None
    if isinstance(value, str) and 0 < len(value) <= 40 and len(value.split()) <= 4:
        return Clue(fld, "eq", value.strip())
    return None


# ------------------------------------------------------------------------------ uniqueness

def answer_set(graph: LinkGraph, path: GraphPath, hidden: int, clues: dict[int, list[Clue]]) -> set[str]:
    """What the description satisfies: entities with index < `hidden` are named, the others are
    described by the chain plus `clues` (index -> clues); the anchor, when hidden, is grounded
    by the image. Returns answer node ids, or literal values for a literal last hop."""
    ents = path.entities()
    cand = {ents[0]}
    for i in range(1, len(ents)):
        if i < hidden:
            cand = {ents[i]}
            continue
        rel = path.hops[i - 1].relation
        nxt = {d for x in cand for d in graph.targets(x, rel)}
        cand = {d for d in nxt if all(c.matches(graph.literals.get(d, {}).get(c.field)) for c in clues.get(i, []))}
    last = path.hops[-1]
    if last.target is not None:
        return {d for x in cand for d in graph.targets(x, last.relation)}
    return {str(graph.literals[x][last.relation]) for x in cand if last.relation in graph.literals.get(x, {})}


def is_unique(graph: LinkGraph, path: GraphPath, hidden: int, clues: dict[int, list[Clue]]) -> bool:
    want = path.answer_node if path.answer_node is not None else path.answer
    return answer_set(graph, path, hidden, clues) == {want}


# ------------------------------------------------------------------------------------ leaks

def _name_re(name: str) -> re.Pattern:
    flags = 0 if (name.isupper() and len(name) <= 4) else re.IGNORECASE
    return re.compile(r"(?<!\w)" + re.escape(name) + r"(?!\w)", flags)


def leaked(text: str, names: list[str]) -> list[str]:
    """The names (titles, aliases, literal answers) that occur in `text` as whole words."""
    return [n for n in names if n and n.strip() and _name_re(n.strip()).search(text)]


def hidden_names(graph: LinkGraph, path: GraphPath, upto: int = 0) -> list[str]:
    """Names a rewritten question must not contain: the answer's, and those of the entities
    with index >= upto (anchor included when upto == 0)."""
    ents = path.entities()
    out = [path.answer]
    if path.answer_node is not None:
        out += graph.node(path.answer_node).names()
    for e in ents[upto:]:
        out += graph.node(e).names()
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------------------------- templates

def _describe(graph: LinkGraph, path: GraphPath, i: int, hidden: int, clues: dict[int, list[Clue]],
              anchor_ref: str = "shown in the image") -> str:
    ents = path.entities()
    n = graph.node(ents[i])
    if i < hidden:
        return n.title
    if i == 0:
        return f"the {noun(n.type)} {anchor_ref}"
    chain = f"the {phrase(path.hops[i - 1].relation)} of {_describe(graph, path, i - 1, hidden, clues, anchor_ref)}"
    cs = clues.get(i, [])
    if not cs:
        return chain
    who = "who is" if n.type == "person" else "that is"
    return f"the {noun(n.type)} {' and '.join(c.text() for c in cs)} {who} {chain}"


def template_question(graph: LinkGraph, path: GraphPath, hidden: int, clues: dict[int, list[Clue]],
                      anchor_ref: str = "shown in the image") -> str:
    """The question with entities [0, hidden) named and the rest described (see docstring);
    a hidden anchor is "the <type> <anchor_ref>"."""
    ents = path.entities()
    facts = [f"{graph.node(ents[i]).title} is the {phrase(path.hops[i - 1].relation)} of "
             f"{graph.node(ents[i - 1]).title}." for i in range(1, min(hidden, len(ents)))]
    last = _describe(graph, path, len(ents) - 1, hidden, clues, anchor_ref)
    ask = f"What is the {phrase(path.hops[-1].relation)} of {last}?"
    return " ".join(facts + [ask])


# ---------------------------------------------------------------------------------------- LLM

@dataclass
class RewriteConfig:
    """Question writing: clues, and the optional LLM (None: templates only)."""

    clues_per_bridge: int = 1  # clues given to every hidden bridge (flavour, text-search hooks)
    max_clues: int = 3  # per entity, while making a description unique
    llm: LLMConfig | None = None
    max_chars: int = 600
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.clues_per_bridge <= self.max_clues:
            raise ValueError(f"RewriteConfig.clues_per_bridge={self.clues_per_bridge!r} must be in "
                             f"[0, max_clues={self.max_clues!r}]")
        if self.max_chars < 40:
            raise ValueError(f"RewriteConfig.max_chars must be >= 40, got {self.max_chars!r}")


def clean_reply(reply: str) -> str:
    """The question in an LLM reply: think blocks, quotes and a 'Question:' label removed."""
    text = re.sub(r"<think>.*?</think>", "", reply, flags=re.DOTALL).strip()
    text = re.sub(r"^(rewritten\s+)?question\s*:\s*", "", text, flags=re.IGNORECASE).strip()
    text = " ".join(text.split())
    return text.strip("\"'“”` ").strip()


def clue_marks(clues: dict[int, list[Clue]]) -> list[str]:
    """The words that carry each clue ("1930s", "10,000", "chemist"): a rewrite that drops one
    has dropped a constraint the uniqueness check relied on."""
    out = []
    for cs in clues.values():
        for c in cs:
            out.append(f"{c.value // 10 * 10}s" if c.op == "decade" else
                       f"{c.value:,}" if c.op == "range" else str(c.value))
    return out


async def _llm_text(cfg: RewriteConfig, prompt: str, must: list[str], forbid: list[str],
                    must_words: tuple[str, ...] = ()) -> tuple[str | None, str]:
    """(valid question, "llm") or (None, why) when there is no LLM or the reply is unusable."""
    if cfg.llm is None:
        return None, "template"
    try:
        reply = await chat(cfg.llm, [{"role": "system", "content": "You write precise quiz "
                                      "questions. Reply with exactly one question and nothing else."},
                                     {"role": "user", "content": prompt}], tool="synth")
    except ToolError as e:
        return None, f"template (llm error: {e.message[:120]})"
    q = clean_reply(reply)
    if not q.endswith("?") or len(q) > cfg.max_chars or q.count("?") > 1:
        return None, "template (llm reply is not one question)"
    bad = leaked(q, forbid)
    if bad:
        return None, f"template (llm reply leaks {bad[0]!r})"
    missing = [m for m in must if not leaked(q, [m])] + [w for w in must_words if w.lower() not in q.lower()]
    if missing:
        return None, f"template (llm reply drops {missing[0]!r})"
    return q, "llm"


# -------------------------------------------------------------------------------- the writer

@dataclass
class QuestionDraft:
    """A path's question after rewriting, with the record of every step."""

    path: GraphPath
    canonical: str
    question: str
    clues: dict[int, list[Clue]]
    steps: list[dict[str, Any]] = field(default_factory=list)


class Rejected(Exception):
    """A path that yields no valid question; `reason` says why (counted by the pipeline)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _clue_pool(graph: LinkGraph, path: GraphPath, i: int, forbid: list[str]) -> list[Clue]:
    ents = path.entities()
    skip = path.hops[-1].relation if (i == len(ents) - 1 and path.answer_node is None) else None
    out = []
    for f, v in sorted(graph.literals.get(ents[i], {}).items()):
        c = make_clue(f, v)
        if c is not None and f != skip and not leaked(c.text(), forbid):
            out.append(c)
    return out


async def write_question(graph: LinkGraph, path: GraphPath, cfg: RewriteConfig | None = None,
                         anchor_ref: str = "shown in the image") -> QuestionDraft:
    """Canonical question, then fuzzy rewriting from the farthest bridge back to the anchor,
    which becomes "the <type> <anchor_ref>" (its visual grounding); raises Rejected
    (not_unique | leak) when no valid question exists for the path."""
    cfg = cfg or RewriteConfig()
    rng = random.Random(f"{cfg.seed}:{path.key()}")
    ents = path.entities()
    clues: dict[int, list[Clue]] = {}
    if not is_unique(graph, path, len(ents), clues):
        raise Rejected("not_unique")  # the last relation has several values: ambiguous as asked
    anchor = graph.node(ents[0])
    facts = "\n".join(f"- {graph.node(ents[i - 1]).title} --{phrase(path.hops[i - 1].relation)}--> "
                      f"{graph.node(ents[i]).title}" for i in range(1, len(ents)))
    answer_forbid = hidden_names(graph, path, upto=len(ents))
    prompt = (f"Facts:\n{facts}\nWrite one question that names every entity above, starting from "
              f"{anchor.title}, and asks for the {phrase(path.hops[-1].relation)} of "
              f"{graph.node(ents[-1]).title}. Do not state the answer.")
    text, source = await _llm_text(cfg, prompt, [graph.node(e).title for e in ents], answer_forbid)
    canonical = text or template_question(graph, path, len(ents), clues)
    steps = [{"step": "canonical", "entity": None, "text": canonical, "source": source}]
    current = canonical
    for i in range(len(ents) - 1, -1, -1):  # farthest bridge back to the anchor
        forbid = hidden_names(graph, path, upto=i)
        if i > 0:
            pool = _clue_pool(graph, path, i, forbid)
            rng.shuffle(pool)
            clues[i] = pool[:cfg.clues_per_bridge]
            rest = pool[cfg.clues_per_bridge:]
            while not is_unique(graph, path, i, clues) and rest and len(clues[i]) < cfg.max_clues:
                clues[i].append(rest.pop(0))
        if not is_unique(graph, path, i, clues):
            raise Rejected("not_unique")
        desc = _describe(graph, path, i, i, clues, anchor_ref)
        role = "anchor" if i == 0 else "bridge"
        prompt = (f"Question: {current}\nRewrite this question so that it no longer names "
                  f"{graph.node(ents[i]).title}; refer to it only as \"{desc}\". Keep the rest "
                  "of its meaning; do not add facts.")
        keep = [graph.node(e).title for e in ents[:i]]
        marks = tuple(clue_marks(clues)) + (("image",) if i == 0 else ())
        text, source = None, "template"
        if i == 0 and steps[-1]["source"] == "llm" and leaked(current, [anchor.title]):
            # the anchor is named verbatim in the LLM's text: ground it by substitution
            sub = _name_re(anchor.title).sub(lambda _m: desc, current)
            if not leaked(sub, forbid):
                text, source = sub, "llm+substitution"
        if text is None:
            text, source = await _llm_text(cfg, prompt, keep, forbid, marks)
        current = text or template_question(graph, path, i, clues, anchor_ref)
        steps.append({"step": role, "entity": ents[i], "description": desc, "text": current,
                      "source": source})
    bad = leaked(current, hidden_names(graph, path, upto=0))
    if bad:
        raise Rejected("leak")  # the template itself names something (e.g. a clue value)
    return QuestionDraft(path, canonical, current, clues, steps)
