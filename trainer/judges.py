"""Judges: plain async functions, chosen by name, that score one finished trajectory in [0, 1].

Two kinds, each with a rule-based judge and an LLM judge (any OpenAI-compatible chat endpoint):

* accuracy (r_acc in {0, 1}): ``rule_accuracy`` is a normalised exact match (NFKC, casefold,
  punctuation and the articles a/an/the removed, whitespace collapsed) of the final answer
  against the reference answer and its aliases, optionally also accepting token F1 >=
  ``f1_threshold`` (the best F1 is kept in the details either way); ``llm_accuracy`` asks the
  endpoint for a one-word CORRECT / INCORRECT verdict. No final answer scores 0 without a call.
* query quality (r_query in [0, 1], OpenSearch-VL): the search calls (TextSearch, ImageSearch,
  Visit by default) made before the fatal step. ``llm_query`` grades them with a rubric anchored
  at 0 / 0.3 / 0.5 / 0.7 / 1.0 (relevance, specificity, progression, no redundant repeats);
  ``rule_query`` is a deterministic HEURISTIC, not a quality measure: it is the fraction of
  search calls that are (a) non-empty, (b) novel: not a near-duplicate (token Jaccard >=
  ``dup_jaccard``, or for ImageSearch the same image and box) of an earlier call, and (c)
  grounded: sharing at least one content token (stopwords dropped) with the question or the
  reference answers; ImageSearch calls count as grounded (they search the question's own
  pixels), Visit calls are matched on their goal and the words of their URL. With no search
  calls both query judges give ``empty_query_score`` (default 0) without a call.

Judges take ``(traj, session)`` and return a `Judgement`; `run_judge` looks one up by name and,
when an LLM judge is unavailable (endpoint down, HTTP errors, unparseable replies after the
retries), falls back to the rule judge of the same kind if ``JudgeConfig.fallback`` is set,
recording it. `JudgeSession` holds the aiohttp session and the concurrency limit (one per run
or per group; use it as ``async with``). Register more with ``@register_judge(name, kind)``.

    cfg = JudgeConfig(accuracy="llm_accuracy", query="llm_query",
                      llm=LLMJudgeConfig(base_url="http://127.0.0.1:8000/v1", model="Qwen3-8B",
                                         api_key_env=None))
    async with JudgeSession(cfg) as s:
        j = await run_judge(cfg.accuracy, traj, s)   # j.score, j.record()

Dataset fields read from ``traj.meta``: ``question`` (else the first prompt message), and
``answers`` (list or str) or ``answer`` plus ``aliases``; optionally ``answer_ranges`` ([[lo, hi],
...], numeric references such as InfoSeek's): rule_accuracy also accepts an answer whose number
lies in one of them (``in_numeric_range``, InfoSeek's own numerical metric).
Tests: ``.venv/bin/python -m pytest -q tests/test_judges.py``.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar

import aiohttp

from spyglass.engine.tools.llm import auth_headers
from spyglass.engine.trajectory import Trajectory

T = TypeVar("T")
SEARCH_TOOLS = ("TextSearch", "ImageSearch", "Visit")
QUERY_ANCHORS = (0.0, 0.3, 0.5, 0.7, 1.0)
KINDS = ("accuracy", "query")


class JudgeUnavailable(RuntimeError):
    """An LLM judge could not produce a verdict (endpoint down, HTTP error, bad replies)."""


# ----------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class LLMJudgeConfig:
    """An OpenAI-compatible chat endpoint used as a judge. api_key_env=None: no auth header."""

    base_url: str  # e.g. "http://127.0.0.1:8000/v1"; requests go to {base_url}/chat/completions
    model: str  # the model name sent in each request
    api_key_env: str | None = "OPENAI_API_KEY"  # env variable holding the API key; None = no auth header
    timeout_s: float = 60.0  # per request
    retries: int = 3  # extra attempts after the first (transient errors and unparseable replies)
    backoff_s: float = 0.5  # sleep before retry i is backoff_s * 2**(i-1)
    concurrency: int = 32  # requests in flight per session
    max_tokens: int = 512  # max tokens of the judge's reply
    temperature: float = 0.0  # sampling temperature sent with each request
    max_prompt_chars: int = 16_000  # the query list / answer text in a prompt is cut to this

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"LLMJudgeConfig.base_url must be an http(s) URL, got {self.base_url!r}")
        if not self.model:
            raise ValueError(f"LLMJudgeConfig.model must be set, got {self.model!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"LLMJudgeConfig.timeout_s must be > 0, got {self.timeout_s!r}")
        if self.retries < 0:
            raise ValueError(f"LLMJudgeConfig.retries must be >= 0, got {self.retries!r}")
        if not self.backoff_s >= 0:
            raise ValueError(f"LLMJudgeConfig.backoff_s must be >= 0, got {self.backoff_s!r}")
        if self.concurrency < 1:
            raise ValueError(f"LLMJudgeConfig.concurrency must be >= 1, got {self.concurrency!r}")
        if self.max_tokens < 1:
            raise ValueError(f"LLMJudgeConfig.max_tokens must be >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"LLMJudgeConfig.temperature must be >= 0, got {self.temperature!r}")
        if self.max_prompt_chars < 100:
            raise ValueError(f"LLMJudgeConfig.max_prompt_chars must be >= 100, got {self.max_prompt_chars!r}")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


@dataclass(frozen=True)
class JudgeConfig:
    """Which judges score accuracy and query quality, and how."""

    accuracy: str = "rule_accuracy"  # accuracy judge: rule_accuracy | llm_accuracy (needs llm) | a registered one
    query: str = "rule_query"  # query judge: rule_query | llm_query (needs llm) | a registered one
    llm: LLMJudgeConfig | None = None  # needed by the llm_* judges
    fallback: bool = True  # LLM judge unavailable -> the rule judge of the same kind (recorded)
    f1_threshold: float | None = None  # rule accuracy: None = exact match only; t = or F1 >= t
    search_tools: tuple[str, ...] = SEARCH_TOOLS  # calls graded by the query judges
    dup_jaccard: float = 0.8  # rule_query: token Jaccard at which a query repeats an earlier one
    empty_query_score: float = 0.0  # r_query when there is no search call before the fatal step
    snap_query_score: bool = True  # snap LLM query scores to the nearest rubric anchor

    def __post_init__(self) -> None:
        object.__setattr__(self, "search_tools", tuple(self.search_tools))
        for kind, name in (("accuracy", self.accuracy), ("query", self.query)):
            spec = JUDGES.get(name)
            if spec is None:
                raise ValueError(f"JudgeConfig.{kind}: unknown judge {name!r}; known: {sorted(JUDGES)}")
            if spec.kind != kind:
                raise ValueError(f"JudgeConfig.{kind}: judge {name!r} grades {spec.kind}, not {kind}")
            if spec.needs_llm and self.llm is None:
                raise ValueError(f"JudgeConfig.{kind}={name!r} needs an endpoint: set llm=LLMJudgeConfig(...)")
        if self.f1_threshold is not None and not 0.0 < self.f1_threshold <= 1.0:
            raise ValueError(f"JudgeConfig.f1_threshold must be None or in (0, 1], got {self.f1_threshold!r}")
        if not self.search_tools or not all(isinstance(t, str) and t for t in self.search_tools):
            raise ValueError(f"JudgeConfig.search_tools must be non-empty tool names, got {self.search_tools!r}")
        if not 0.0 < self.dup_jaccard <= 1.0:
            raise ValueError(f"JudgeConfig.dup_jaccard must be in (0, 1], got {self.dup_jaccard!r}")
        if not 0.0 <= self.empty_query_score <= 1.0:
            raise ValueError(f"JudgeConfig.empty_query_score must be in [0, 1], got {self.empty_query_score!r}")


@dataclass
class Judgement:
    """One judge's score for one trajectory, and who gave it."""

    score: float
    judge: str
    model: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    fallback_from: str | None = None  # the LLM judge that was unavailable, when this is a fallback

    def record(self) -> dict[str, Any]:
        """What goes into traj.reward["judge"][kind]: name, model, and any fallback."""
        out: dict[str, Any] = {"name": self.judge, "model": self.model}
        if self.fallback_from is not None:
            out["fallback_from"] = self.fallback_from
            out["error"] = self.details.get("error", "")
        return out


# ----------------------------------------------------------------------------- registry
JudgeFn = Callable[[Trajectory, "JudgeSession"], Awaitable[Judgement]]


@dataclass(frozen=True)
class JudgeSpec:
    fn: JudgeFn
    kind: str  # "accuracy" | "query"
    needs_llm: bool = False
    fallback: str | None = None  # judge used when this one is unavailable


JUDGES: dict[str, JudgeSpec] = {}


def register_judge(name: str, kind: str, *, needs_llm: bool = False,
                   fallback: str | None = None) -> Callable[[JudgeFn], JudgeFn]:
    """Decorator: make an async judge ``fn(traj, session) -> Judgement`` available by name."""
    if kind not in KINDS:
        raise ValueError(f"judge kind must be one of {KINDS}, got {kind!r}")
    if not name:
        raise ValueError(f"judge name must be non-empty, got {name!r}")

    def deco(fn: JudgeFn) -> JudgeFn:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"judge {name!r} must be an async function, got {fn!r}")
        JUDGES[name] = JudgeSpec(fn, kind, needs_llm, fallback)
        return fn
    return deco


async def run_judge(name: str, traj: Trajectory, session: "JudgeSession") -> Judgement:
    """Run judge `name`; on JudgeUnavailable fall back (if configured) and record it."""
    spec = JUDGES.get(name)
    if spec is None:
        raise ValueError(f"unknown judge {name!r}; known: {sorted(JUDGES)}")
    try:
        return await spec.fn(traj, session)
    except JudgeUnavailable as e:
        if not (session.cfg.fallback and spec.fallback):
            raise
        j = await JUDGES[spec.fallback].fn(traj, session)
        j.fallback_from = name
        j.details["error"] = str(e)
        session.stats["fallbacks"] += 1
        return j


# ----------------------------------------------------------------------------- session
class _Retryable(Exception):
    """A failed attempt worth retrying (HTTP 429/5xx, malformed or unparseable reply)."""


class JudgeSession:
    """The aiohttp session and concurrency limit the LLM judges share; use as `async with`."""

    def __init__(self, cfg: JudgeConfig) -> None:
        self.cfg = cfg
        self.stats: dict[str, int] = {"requests": 0, "retries": 0, "failures": 0, "fallbacks": 0}
        self._http: aiohttp.ClientSession | None = None
        self._sem: asyncio.Semaphore | None = None
        self._headers: dict[str, str] = {}

    async def __aenter__(self) -> "JudgeSession":
        llm = self.cfg.llm
        if llm is not None:
            self._headers = auth_headers(llm.base_url, llm.api_key_env, "judge")
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=llm.timeout_s))
            self._sem = asyncio.Semaphore(llm.concurrency)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _post(self, messages: list[dict[str, str]]) -> str:
        llm = self.cfg.llm
        assert llm is not None and self._http is not None and self._sem is not None
        body = {"model": llm.model, "messages": messages, "max_tokens": llm.max_tokens,
                "temperature": llm.temperature}
        async with self._sem:
            self.stats["requests"] += 1
            async with self._http.post(llm.url, json=body, headers=self._headers) as resp:
                if resp.status == 429 or resp.status >= 500:
                    raise _Retryable(f"HTTP {resp.status}")
                if resp.status != 200:
                    detail = (await resp.text())[:300]
                    raise JudgeUnavailable(f"judge endpoint {llm.url} answered HTTP {resp.status}: {detail}")
                raw = await resp.text()
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable(f"no choices[0].message.content in reply {raw[:200]!r}") from None
        if not isinstance(content, str):
            raise _Retryable(f"non-text content {type(content).__name__} in reply")
        return content

    async def complete(self, messages: list[dict[str, str]], parse: Callable[[str], T]) -> tuple[T, str]:
        """One judged completion: (parse(reply), reply), retrying transient failures and replies
        `parse` rejects (ValueError); raises JudgeUnavailable when the attempts are spent."""
        llm = self.cfg.llm
        if llm is None:
            raise ValueError("this judge needs JudgeConfig.llm (an OpenAI-compatible endpoint)")
        if self._http is None:
            raise RuntimeError("JudgeSession is not open: use `async with JudgeSession(cfg) as s`")
        last = ""
        for attempt in range(llm.retries + 1):
            if attempt:
                self.stats["retries"] += 1
                await asyncio.sleep(llm.backoff_s * 2 ** (attempt - 1))
            try:
                reply = await self._post(messages)
                try:
                    return parse(reply), reply
                except ValueError as e:
                    raise _Retryable(f"unparseable reply: {e}") from None
            except (_Retryable, asyncio.TimeoutError, aiohttp.ClientError) as e:
                last = f"{type(e).__name__}: {e}"
            except JudgeUnavailable:
                self.stats["failures"] += 1
                raise
        self.stats["failures"] += 1
        raise JudgeUnavailable(f"judge {llm.model} at {llm.url} failed {llm.retries + 1} "
                               f"attempt(s); last: {last}")


# ----------------------------------------------------------------------------- text helpers
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_STOPWORDS = frozenset(
    "a an the of in on at to for from by with and or is are was were be been what which who whom "
    "whose when where why how this that these those it its as into about than then there their "
    "does do did has have had not no yes image picture photo shown show".split())


def normalize_answer(s: str) -> str:
    """NFKC, casefold, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    s = unicodedata.normalize("NFKC", s).casefold()
    s = "".join(ch for ch in s if not unicodedata.category(ch).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", s).split())


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style token F1 of the normalised strings (1.0 if both normalise to empty)."""
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def _content_tokens(s: str) -> set[str]:
    """Words of s with punctuation and symbols as separators ('Saint-Denis', URLs), minus stopwords."""
    s = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in unicodedata.normalize("NFKC", s))
    return {w for w in normalize_answer(s).split() if w not in _STOPWORDS}


def question_of(traj: Trajectory) -> str:
    """The question: meta["question"], else the first prompt message's text."""
    q = traj.meta.get("question")
    if isinstance(q, str) and q:
        return q
    for m in traj.prompt_messages:
        c = m.get("content")
        if isinstance(c, str):
            return c
        if isinstance(c, list):
            return " ".join(p.get("text", "") for p in c if isinstance(p, dict))
    return ""


def references_of(traj: Trajectory) -> list[str]:
    """Reference answers: meta["answers"] (list or str), else meta["answer"] + meta["aliases"]."""
    m = traj.meta
    refs: Any = m.get("answers")
    if refs is None:
        refs = [m["answer"]] + list(m.get("aliases") or []) if "answer" in m else []
    if isinstance(refs, str):
        refs = [refs]
    refs = [str(r) for r in refs if r is not None and str(r).strip()]
    if not refs:
        raise ValueError(f"trajectory {traj.id!r} has no reference answer: meta needs 'answers' "
                         f"or 'answer' (meta keys: {sorted(m)})")
    return refs


@dataclass(frozen=True)
class SearchCall:
    step: int
    tool: str
    text: str  # TextSearch query; Visit goal + URL; ImageSearch "image=.. box=.."
    key: str  # identity for repeat detection of non-text calls


def search_calls(traj: Trajectory, tools: tuple[str, ...] = SEARCH_TOOLS) -> list[SearchCall]:
    """The search calls made before the fatal step (all steps when there is none)."""
    f = traj.fatal_step if traj.fatal_step is not None else len(traj.turns)
    out = []
    for turn in traj.turns[:f]:
        for c in turn.calls:
            if c.get("name") not in tools:
                continue
            args = c.get("arguments", {})
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except ValueError:
                    args = {"query": args}
            args = args if isinstance(args, dict) else {}
            name = c["name"]
            if name == "ImageSearch":
                img = args.get("image", "")
                text = f"image={img} box={args.get('box')}" if img else ""
            elif name == "Visit":
                text = f"{args.get('goal', '')} {args.get('url', '')}".strip()
            else:
                text = str(args.get("query", "") or " ".join(str(v) for v in args.values()))
            out.append(SearchCall(turn.index, name, text.strip(), f"{name}:{text.strip()}"))
    return out


def _strip_think(reply: str) -> str:
    return reply.rsplit("</think>", 1)[-1] if "</think>" in reply else reply


_VERDICT = re.compile(r"\b(not\s+correct|incorrect|correct)\b")
_YES, _NO = frozenset({"correct", "yes", "true", "right"}), frozenset({"incorrect", "no", "false", "wrong", "not"})


def parse_verdict(reply: str) -> bool:
    """CORRECT -> True, INCORRECT -> False, after any <think> block. Verdict mentions
    ('correct' vs 'incorrect' / 'not correct') must all agree; a first word that is a verdict
    word (correct/yes/true/right vs incorrect/no/false/wrong/not) decides, else the mentions do.
    Anything else (empty, no verdict, conflicting verdicts) is a ValueError."""
    text = _strip_think(reply).lower()
    words = re.findall(r"[a-z]+", text)
    found = {m == "correct" for m in (re.sub(r"\s+", " ", x) for x in _VERDICT.findall(text))}
    first = (words[0] in _YES) if words and (words[0] in _YES or words[0] in _NO) else None
    if len(found) > 1 or (first is not None and found and first not in found):
        raise ValueError(f"conflicting verdicts in reply {reply[:200]!r}")
    if first is not None:
        return first
    if not found:
        raise ValueError(f"no verdict in reply {reply[:200]!r}")
    return found.pop()


_SCORE = re.compile(r"score\W{0,6}?(-?\d+(?:\.\d+)?)\s*(?:(%)|/\s*(\d+(?:\.\d+)?))?", re.I)
_NUMBER = re.compile(r"(-?\d+(?:\.\d+)?)\s*(?:(%)|/\s*(\d+(?:\.\d+)?))?")


def parse_score(reply: str) -> float:
    """The number after 'score' (else the only number in the reply); 'x/y' -> x/y, 'x%' -> x/100.
    Not clipped (see clip_score). ValueError when there is no such number."""
    text = _strip_think(reply)
    m = _SCORE.search(text)
    if m is None:
        nums = _NUMBER.findall(text)
        if len(nums) != 1:
            raise ValueError(f"no single score in reply {reply[:200]!r}")
        val, pct, den = nums[0]
    else:
        val, pct, den = m.groups()
    x = float(val)
    if pct:
        return x / 100.0
    if den:
        if float(den) <= 0:
            raise ValueError(f"score denominator {den} in reply {reply[:200]!r}")
        return x / float(den)
    return x


def clip_score(x: float, snap: bool) -> float:
    """Clip to [0, 1]; with snap, move to the nearest rubric anchor (ties go to the lower)."""
    x = min(max(x, 0.0), 1.0)
    if not snap:
        return x
    return min(QUERY_ANCHORS, key=lambda a: (round(abs(a - x), 9), a))


_RANGE_NUM = re.compile(r"[-+]?\.?\d+(?:,\d{3})*\.?\d*(?:[eE][-+]?\d+)?")


def in_numeric_range(answer: str, ranges: Any) -> bool:
    """InfoSeek's numerical scoring (edchengg/infoseek_eval ``metric_numerical_range``) against
    ``ranges``, a list of [lo, hi] (meta["answer_ranges"], from InfoSeek's answer_eval
    {"wikidata", "range"}): the answer's first number lies in some [lo, hi] (inclusive); or, when
    the answer is itself a range ("9-10", "9 to 10": its first two numbers, ascending), that range
    lies inside [lo, hi] or overlaps it with IoU >= 0.5. No ranges or no number: False."""
    if not ranges or not isinstance(answer, str):
        return False
    text = re.sub(r"(?<=\d)-", " - ", answer)  # "9-10" is a range, "-3" a negative number
    nums = [float(n.replace(",", "").strip(".")) for n in _RANGE_NUM.findall(text)][:2]
    if not nums:
        return False
    pred = nums if len(nums) == 2 and nums[0] <= nums[1] else nums[:1]
    for lo, hi in ((float(r[0]), float(r[1])) for r in ranges):
        if all(lo <= x <= hi for x in pred):
            return True
        if len(pred) == 2:
            overlap = max(0.0, min(pred[1], hi) - max(pred[0], lo))
            union = (pred[1] - pred[0]) + (hi - lo) + 2e-12 - overlap
            if overlap / union >= 0.5 - 1e-12:
                return True
    return False


def _cut(s: str, n: int) -> str:
    return s if len(s) <= n else s[:n] + " [...]"


# ----------------------------------------------------------------------------- accuracy judges
@register_judge("rule_accuracy", "accuracy")
async def rule_accuracy(traj: Trajectory, session: JudgeSession) -> Judgement:
    """Normalised exact match against the references (and F1 >= f1_threshold when set)."""
    refs = references_of(traj)
    if traj.answer is None:
        return Judgement(0.0, "rule_accuracy", details={"reason": "no_answer"})
    pred = normalize_answer(traj.answer)
    em = [r for r in refs if normalize_answer(r) == pred]
    f1, best = max((token_f1(traj.answer, r), r) for r in refs)
    thr = session.cfg.f1_threshold
    ok = bool(em) or (thr is not None and f1 >= thr)
    details: dict[str, Any] = {"em": bool(em), "f1": f1, "matched": em[0] if em else best}
    if traj.meta.get("answer_ranges"):  # numeric references (InfoSeek): a number in range counts
        details["in_range"] = in_numeric_range(traj.answer, traj.meta["answer_ranges"])
        ok = ok or details["in_range"]
    return Judgement(float(ok), "rule_accuracy", details=details)


_ACC_SYSTEM = "You are a strict, impartial grader of short answers. You reply with one word."
_ACC_PROMPT = """Question: {question}
Reference answer(s): {refs}
Predicted answer: {answer}

Does the predicted answer mean the same as one of the reference answers? Judge meaning, not
wording: paraphrases, abbreviations, aliases, transliterations and equivalent formats or units
count as the same. A more general or less specific answer, a partially correct one, a hedged one,
or one that lists several candidates does not. Extra details that contradict the reference make
it wrong. Do not use your own knowledge to overrule the reference answers.
Reply with exactly one word: CORRECT or INCORRECT."""


@register_judge("llm_accuracy", "accuracy", needs_llm=True, fallback="rule_accuracy")
async def llm_accuracy(traj: Trajectory, session: JudgeSession) -> Judgement:
    """One-word CORRECT/INCORRECT verdict from the endpoint."""
    llm = session.cfg.llm
    refs = references_of(traj)
    model = llm.model if llm is not None else None
    if traj.answer is None:
        return Judgement(0.0, "llm_accuracy", model, {"reason": "no_answer"})
    n = llm.max_prompt_chars if llm is not None else 16_000
    prompt = _ACC_PROMPT.format(question=_cut(question_of(traj), n), refs=" | ".join(refs),
                                answer=_cut(traj.answer, n))
    ok, reply = await session.complete(
        [{"role": "system", "content": _ACC_SYSTEM}, {"role": "user", "content": prompt}],
        parse_verdict)
    return Judgement(float(ok), "llm_accuracy", model, {"reply": reply[:200]})


# ----------------------------------------------------------------------------- query judges
@register_judge("rule_query", "query")
async def rule_query(traj: Trajectory, session: JudgeSession) -> Judgement:
    """HEURISTIC: fraction of pre-fatal search calls that are non-empty, novel and grounded
    (see the module docstring for the exact definition)."""
    cfg = session.cfg
    calls = search_calls(traj, cfg.search_tools)
    if not calls:
        return Judgement(cfg.empty_query_score, "rule_query", details={"reason": "no_queries"})
    try:
        refs = references_of(traj)
    except ValueError:
        refs = []
    anchor = _content_tokens(" ".join([question_of(traj)] + refs))
    seen_keys: set[str] = set()
    seen_toks: list[set[str]] = []
    good = empty = repeat = ungrounded = 0
    for c in calls:
        if c.tool == "ImageSearch":
            toks, is_empty = set(), not c.text
            novel, grounded = c.key not in seen_keys, True
        else:
            toks = _content_tokens(c.text)
            is_empty = not normalize_answer(c.text)
            novel = c.key not in seen_keys and all(
                len(toks & s) / len(toks | s) < cfg.dup_jaccard for s in seen_toks)
            grounded = bool(toks & anchor)
        seen_keys.add(c.key)
        if toks:
            seen_toks.append(toks)
        empty += is_empty
        repeat += (not is_empty) and (not novel)
        ungrounded += (not is_empty) and novel and (not grounded)
        good += (not is_empty) and novel and grounded
    return Judgement(good / len(calls), "rule_query", details={
        "n": len(calls), "good": good, "empty": empty, "repeat": repeat, "ungrounded": ungrounded})


_QUERY_SYSTEM = "You are a careful grader of web-search behaviour. You reply with one line."
_QUERY_PROMPT = """An agent answered a question about an image by calling search tools. Grade the
quality of its search calls (not whether its final answer is right).

Question: {question}
Reference answer(s): {refs}

The agent's search calls, in order:
{calls}

Rubric (use exactly one of these scores):
1.0 - Every call is relevant and specific (it names the entities, attributes or constraints that
      matter) and the sequence makes clear progress: each call builds on what earlier results
      revealed and the last ones target exactly what the answer needs. No redundant repeats.
0.7 - Relevant and mostly specific and progressive, with minor issues: one vague or slightly
      redundant call, or a short detour that is corrected.
0.5 - Mixed: some relevant calls, but several are vague or generic, or repeat earlier ones with
      trivial changes; progress toward the answer is slow or partial.
0.3 - Mostly poor: generic or weakly related calls, heavy repetition, little use of earlier
      results.
0.0 - No useful searching: irrelevant, empty or nonsensical calls, or one call repeated.

Reply with one line: Score: X (X is 0, 0.3, 0.5, 0.7 or 1.0)."""


def _format_calls(calls: list[SearchCall], limit: int) -> str:
    lines = [f"{i + 1}. [{c.tool}] {c.text or '(empty)'}" for i, c in enumerate(calls)]
    return _cut("\n".join(lines), limit)


@register_judge("llm_query", "query", needs_llm=True, fallback="rule_query")
async def llm_query(traj: Trajectory, session: JudgeSession) -> Judgement:
    """OpenSearch-VL's query-quality rubric graded by the endpoint; score clipped (and snapped)."""
    cfg = session.cfg
    llm = cfg.llm
    model = llm.model if llm is not None else None
    calls = search_calls(traj, cfg.search_tools)
    if not calls:
        return Judgement(cfg.empty_query_score, "llm_query", model, {"reason": "no_queries"})
    try:
        refs = " | ".join(references_of(traj))
    except ValueError:
        refs = "(not given)"
    n = llm.max_prompt_chars if llm is not None else 16_000
    prompt = _QUERY_PROMPT.format(question=_cut(question_of(traj), n), refs=refs,
                                  calls=_format_calls(calls, n))
    raw, reply = await session.complete(
        [{"role": "system", "content": _QUERY_SYSTEM}, {"role": "user", "content": prompt}],
        parse_score)
    return Judgement(clip_score(raw, cfg.snap_query_score), "llm_query", model,
                     {"raw": raw, "n": len(calls), "reply": reply[:200]})
