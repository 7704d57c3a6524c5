"""Evaluation (`spyglass eval`): the engine with a policy over benchmark files, judged, reported.

For every benchmark file the items (image(s), question, reference answers) become engine
prompts; the engine runs them with the tools (agentic mode) and, as in the papers' tables, once
more as a direct-answer baseline (no tools: empty tool list, one turn, the model's own
sampling); the accuracy judge (`trainer.judges`, via `trainer.reward.score_group`, reward
"accuracy") scores each trajectory. The report gives per benchmark and mode: accuracy, tool use
(turns, calls per tool, tool errors, fatal rate) and cost (prompt / generated / observation
tokens, tool calls, generation and tool seconds, wall time). It is written as
`<out_dir>/report.json` and a readable table `<out_dir>/report.md` (also printed), with the
trajectories in `<out_dir>/<mode>.jsonl`.

Benchmark files: JSONL (one record per line), a JSON list, or Parquet (needs pyarrow).
`--benchmarks layout:path,...`; the layouts map field names (first present wins; "a.b" reads a
nested field; an item with no id field gets its image file's stem, else "row<N>"):

  layout         id              image                         question           answers (+ aliases)
  world          id              image                         question           answer + aliases
  simplevqa      data_id|id      image|image_path|image_url    question           answer          (guessed)
  vdr            id|qid|data_id  image|image_path|images       question|query|prompt  answer|answers
                                                                                  (guessed, but id and answer)
  mmsearch       sample_id       query_image|image             query              gt_answer + alternative_gt_answers
                                 (null: a text-only item)
  livevqa        id|sample_id    img_path|query_image|image|image_path  question|query
                                                                        Ground_Truth_List|gt_answer|answer
                 (one item per level1_qa / level2_qa; images also in <dir>_imgs/, <dir>_images/)
  browsecomp_vl  id|idx          image_path|file_path|image    question|prompt    answers|answer
  fvqa           data_id|id      images|image|image_path       prompt|question    reward_model.ground_truth|answer
                                                                                  + reward_model.candidate_answers
  infoseek       data_id|id      images|image_path|image|image_id  question|prompt  answer|reward_model.ground_truth
                                                                    + answer_eval|reward_model.candidate_answers

Sources (read from the authors' repositories): MMSearch: CaraJ7/MMSearch eval_end2end.py on the HF
end2end split (sample_id, query, query_image (None for its text-only queries), gt_answer,
alternative_gt_answers). LiveVQA: fumingyang2004/LIVEVQA liveVQA_benchmarks/<News|Paper|Video>/
benchmark.json (a JSON list; id, img_path, level1_qa / level2_qa each with question,
Ground_Truth_List, img_path; images in <bench>/<bench>_imgs or _images, as its
unified_benchmark.py reads them); the HF release's `query_image` is from the tracker issue, its
other columns are not confirmed here. BrowseComp-VL: WebWatcher's benchmark/bc_vl_level{1,2}.jsonl
(question, image_path (an https URL in the newer release), answers, domain; no id), and the
older eval files WebWatcher's agent_eval.py reads (prompt, file_path). FVQA / InfoSeek-human:
MMSearch-R1 parquet (prompt messages, images [{bytes, path}], reward_model {ground_truth,
candidate_answers: a JSON list string; a Python-style str(list), per the tracker issue, is
parsed too}; no id column).
InfoSeek: edchengg/infoseek_eval (data_id, image_id, question, answer, answer_eval; a numerical
answer_eval is [{"wikidata": v, "range": [lo, hi]}]: v joins the answers and [lo, hi] goes to
meta["answer_ranges"], which the rule judge scores with InfoSeek's own numeric-range metric).
VDR-Bench: only `id` and `answer` are confirmed (OpenSearch-VL's judge reads them from the
testmini parquet); the VDR-Bench README layout and the rest of its field names were not
reachable here, nor were SimpleVQA's: those are guesses.

An image is a path (absolute, else under `image_root` or the file's directory, or the layout's
extra folders; an InfoSeek image_id is looked up as <image_root>/<id>.jpg), a {bytes|path} dict,
base64 / data: URL text, or a list of these (all become prompt images). There is no network: an
http(s) URL is used only if a local copy exists under the image root (its last one or two path
components, e.g. level1/level1_1.jpg, as WebWatcher's eval looks for basename(file_path) in
IMAGE_DIR), else the row is refused with that reason. A `prompt` that is a list of chat
messages gives its last user text, `<image>` placeholders removed.

A bad row (invalid JSON, a missing field, an image that is missing, unreadable or only a URL,
a duplicate id) is skipped with one warning naming FILE:LINE (logger "spyglass.eval", the first
20, then a summary line), as engine/data.py does for --data; a file with no good row is an
error (load_benchmark(..., strict=True) raises on the first bad row instead).

    run_eval(EvalConfig())                      # CPU: the world's questions as a benchmark file,
                                                # tiny Qwen2-VL, its own (sampled) policy, direct baseline
    spyglass eval --benchmarks mmsearch:/data/mmsearch.jsonl,fvqa:/data/fvqa.parquet \\
                  --model runs/sft/final --policy sample

Tests: `.venv/bin/python -m pytest -q tests/test_eval.py tests/test_layouts_real.py`.
"""
from __future__ import annotations

import ast
import asyncio
import base64
import collections
import dataclasses
import io
import json
import logging
import re
import statistics
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

from PIL import Image

from spyglass.engine.config import check
from spyglass.engine.env import EnvConfig
from spyglass.engine.rollout import RolloutConfig
from spyglass.engine.scheduler import EngineConfig, Prompt
from spyglass.engine.trajectory import SegmentKind, Status, Trajectory, write_jsonl
from spyglass.trainer.judges import JudgeConfig

DIRECT_SYSTEM = ("You are a visual question answering assistant. Look at the image and answer the question "
                 "directly, without tools. Give the final answer inside <answer></answer>.")


@dataclass(frozen=True)
class Layout:
    """Candidate field names per role (first present wins) and the layout's quirks."""

    id: tuple[str, ...]
    image: tuple[str, ...]
    question: tuple[str, ...]
    answers: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    text_only_ok: bool = False  # a row without an image is a text-only item, not a bad row
    expand: tuple[str, ...] = ()  # sub-records that each hold one item (merged over the record)
    image_dirs: tuple[str, ...] = ()  # more folders for relative images ("{dir}": the file's folder name)


LAYOUTS: dict[str, Layout] = {
    "world": Layout(("id",), ("image",), ("question",), ("answer",), ("aliases",)),
    "simplevqa": Layout(("data_id", "id"), ("image", "image_path", "image_url"), ("question",), ("answer",)),
    "vdr": Layout(("id", "qid", "data_id"), ("image", "image_path", "images"), ("question", "query", "prompt"),
                  ("answer", "answers")),
    "mmsearch": Layout(("sample_id",), ("query_image", "image"), ("query",), ("gt_answer",),
                       ("alternative_gt_answers",), text_only_ok=True),
    "livevqa": Layout(("id", "sample_id"), ("img_path", "query_image", "image", "image_path"), ("question", "query"),
                      ("Ground_Truth_List", "gt_answer", "answer"), expand=("level1_qa", "level2_qa"),
                      image_dirs=("{dir}_imgs", "{dir}_images")),
    "browsecomp_vl": Layout(("id", "idx"), ("image_path", "file_path", "image"), ("question", "prompt"),
                            ("answers", "answer")),
    "fvqa": Layout(("data_id", "id"), ("images", "image", "image_path"), ("prompt", "question"),
                   ("reward_model.ground_truth", "answer"), ("reward_model.candidate_answers",)),
    "infoseek": Layout(("data_id", "id"), ("images", "image_path", "image", "image_id"), ("question", "prompt"),
                       ("answer", "reward_model.ground_truth"), ("answer_eval", "reward_model.candidate_answers")),
}
MAX_WARNINGS = 20
log = logging.getLogger("spyglass.eval")


class BenchmarkError(ValueError):
    """A bad benchmark file or record; the message names the file and line."""


@dataclass
class BenchmarkFile:
    """What read_benchmark read: the items as prompts and the skipped rows ((where, reason))."""

    prompts: list[Prompt]
    bad: list[tuple[str, str]]


# ------------------------------------------------------------------------------ loading
def _get(rec: dict[str, Any], dotted: str) -> Any:
    cur: Any = rec
    for k in dotted.split("."):
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


def _absent(v: Any) -> bool:  # None, "", [], {} or a null image struct {"bytes": None, "path": None}
    return v is None or v == "" or v == [] or (isinstance(v, dict) and all(x is None for x in v.values()))


def _first(rec: dict[str, Any], names: tuple[str, ...]) -> tuple[str | None, Any]:
    for n in names:
        v = _get(rec, n)
        if not _absent(v):
            return n, v
    return None, None


def _open_bytes(data: bytes, where: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises several kinds
        raise BenchmarkError(f"{where}: image bytes do not decode: {e}") from None


def _local_copy(url: str, dirs: list[Path]) -> Path | None:
    """A downloaded copy of an image URL: its last one or two path components under a folder."""
    parts = [p for p in urllib.parse.urlsplit(url).path.split("/") if p]
    tails = [Path(*parts[-k:]) for k in (2, 1) if len(parts) >= k]
    return next((d / t for d in dirs for t in tails if (d / t).is_file()), None)


def load_image(value: Any, base: Path, where: str, name: str = "image",
               dirs: tuple[Path, ...] = ()) -> list[Image.Image]:
    """The image(s) a benchmark field holds (see the module docstring for the forms); relative
    paths resolve under `base`, then under each of `dirs`."""
    if isinstance(value, Image.Image):
        return [value.convert("RGB")]
    if isinstance(value, list):
        return [im for v in value for im in load_image(v, base, where, name, dirs)]
    if isinstance(value, (bytes, bytearray)):
        return [_open_bytes(bytes(value), where)]
    if isinstance(value, dict):
        if value.get("bytes"):
            b = value["bytes"]
            return [_open_bytes(b if isinstance(b, (bytes, bytearray)) else base64.b64decode(b), where)]
        if value.get("path"):
            return load_image(value["path"], base, where, name, dirs)
        raise BenchmarkError(f"{where}: field {name!r}: image object has neither 'bytes' nor 'path'")
    if not isinstance(value, str) or not value:
        raise BenchmarkError(f"{where}: field {name!r}: not an image: {value!r:.80}")
    roots = [base, *dirs]
    if value.startswith(("http://", "https://")):
        local = _local_copy(value, roots)
        if local is None:
            tail = "/".join([x for x in urllib.parse.urlsplit(value).path.split("/") if x][-2:])
            raise BenchmarkError(f"{where}: field {name!r}: {value!r} is a URL and there is no network here; "
                                 f"download it to {str(base / tail)!r} (or give --image_root)")
        value = str(local.resolve())
    if value.startswith("data:"):
        return [_open_bytes(base64.b64decode(value.split(",", 1)[-1]), where)]
    if len(value) >= 64 and re.fullmatch(r"[A-Za-z0-9+/=\s]+", value):  # base64 text, not a path
        try:
            return [_open_bytes(base64.b64decode(value), where)]
        except (ValueError, BenchmarkError):
            pass
    cands = [Path(value)] if Path(value).is_absolute() else [r / value for r in roots]
    if name == "image_id":
        cands = [base / f"{value}{ext}" for ext in (".jpg", ".JPEG", ".jpeg", ".png")]
    for p in cands:
        if p.is_file():
            try:
                with Image.open(p) as im:
                    return [im.convert("RGB")]
            except Exception as e:  # noqa: BLE001 - PIL raises several kinds
                raise BenchmarkError(f"{where}: field {name!r}: image file {str(p)!r} does not decode: {e}") from None
    raise BenchmarkError(f"{where}: field {name!r}: image file {str(cands[0])!r} does not exist")


def _question(value: Any, where: str, name: str) -> str:
    if isinstance(value, list):  # chat messages: the last user text
        users = [m for m in value if isinstance(m, dict) and m.get("role", "user") == "user"]
        if not users:
            raise BenchmarkError(f"{where}: field {name!r}: no user message in {value!r:.80}")
        c = users[-1].get("content")
        value = c if isinstance(c, str) else " ".join(p.get("text", "") for p in c or [] if isinstance(p, dict))
    if not isinstance(value, str):
        raise BenchmarkError(f"{where}: field {name!r}: expected text, got {type(value).__name__}")
    q = re.sub(r"\s*<image>\s*", " ", value).strip()
    if not q:
        raise BenchmarkError(f"{where}: field {name!r}: empty question")
    return q


def _number_text(x: Any) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


def _answers(value: Any, where: str, name: str | None) -> tuple[list[str], list[list[float]]]:
    """(reference strings, numeric [lo, hi] ranges) of an answer field: a string, a list, a JSON
    or Python-style list string ("['a', 'b']", FVQA's candidate_answers), or InfoSeek's numerical
    answer_eval [{"wikidata": v, "range": [lo, hi]}] (v is a reference, [lo, hi] a range)."""
    if isinstance(value, str) and value.strip()[:1] in "[(" and value.strip()[-1:] in "])":
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(value.strip())
                break
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                continue
    vals = value if isinstance(value, (list, tuple)) else [value]
    out, ranges = [], []
    for v in vals:
        if isinstance(v, dict) and "range" in v:
            r = v["range"]
            try:
                lo, hi = float(r[0]), float(r[1])
            except (TypeError, ValueError, IndexError, KeyError):
                raise BenchmarkError(f"{where}: field {name!r}: numeric range {r!r:.60} is not [lo, hi]") from None
            ranges.append([min(lo, hi), max(lo, hi)])
            v = v.get("wikidata")
        if v is not None and not isinstance(v, (dict, list)) and str(v).strip():
            out.append(_number_text(v) if isinstance(v, (int, float)) else str(v))
    return out, ranges


def _rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(FILE:LINE, object) per JSONL line (a bad line yields a BenchmarkError as its object),
    (FILE:item N, object) per element of a .json list, (FILE:row N, dict) per Parquet row."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise BenchmarkError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), "
                                 "or convert the file to JSONL") from None
        yield from ((f"{path}:row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist()))
        return
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path}: starts with '[' but is not one valid JSON list: {e}") from None
        yield from ((f"{path}:item {i}", r) for i, r in enumerate(items))
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{n}", BenchmarkError(f"{path}:{n}: not valid JSON: {e}")


def _items(layout: Layout, where: str, rec: Any) -> list[tuple[str, dict[str, Any], str]]:
    """(where, record, id suffix) per item of a row: the row itself, or each expand sub-record."""
    if isinstance(rec, BenchmarkError):
        raise rec
    if not isinstance(rec, dict):
        raise BenchmarkError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    subs = [(k, rec[k]) for k in layout.expand if isinstance(rec.get(k), dict)]
    if not subs:
        return [(where, rec, "")]
    return [(f"{where} {k}", {**rec, **sub}, f":{k.removesuffix('_qa')}") for k, sub in subs]


def _prompt(layout: str, lay: Layout, where: str, rec: dict[str, Any], k: int, suffix: str, base: Path,
            dirs: tuple[Path, ...], name: str) -> Prompt:
    """One item as a Prompt; BenchmarkError naming `where` if it is bad."""
    got = {role: _first(rec, getattr(lay, role)) for role in ("id", "image", "question", "answers")}
    for role in ("question", "answers") + (() if lay.text_only_ok else ("image",)):
        if got[role][0] is None:
            raise BenchmarkError(f"{where}: {layout} record has no {role} (tried {list(getattr(lay, role))}); "
                                 f"its keys: {sorted(rec)}")
    img_field, img = got["image"]
    if got["id"][0] is not None:
        iid = str(got["id"][1])
    elif isinstance(img, str) and not img.startswith("data:") and len(img) < 512 and Path(img).stem:
        iid = Path(urllib.parse.urlsplit(img).path).stem  # BrowseComp-VL: level1_7
    else:
        iid = f"row{k}"
    iid += suffix
    answers, ranges = _answers(got["answers"][1], where, got["answers"][0])
    if lay.aliases:
        alias_field, alias = _first(rec, lay.aliases)
        more, more_ranges = _answers(alias, where, alias_field)
        answers, ranges = answers + more, ranges + more_ranges
    if not answers and not ranges:
        raise BenchmarkError(f"{where}: field {got['answers'][0]!r}: empty reference answer")
    q = _question(got["question"][1], where, got["question"][0])
    images = load_image(img, base, where, img_field, dirs) if img_field is not None else []
    meta = {"question": q, "answers": list(dict.fromkeys(answers or [f"{lo:g}-{hi:g}" for lo, hi in ranges])),
            "benchmark": name, "item_id": iid}
    if ranges:
        meta["answer_ranges"] = ranges
    return Prompt(f"{name}:{iid}", q, images=images, meta=meta)


def read_benchmark(layout: str, path: str | Path, *, image_root: str = "", limit: int = 0,
                   name: str | None = None, strict: bool = False) -> BenchmarkFile:
    """A benchmark file's items as engine prompts (id "<name>:<item id>"; meta: question, answers,
    [answer_ranges,] benchmark, item_id: what the judge reads) and its skipped rows. A bad row is
    skipped with a warning (strict: raised); no good row at all is a BenchmarkError."""
    if layout not in LAYOUTS:
        raise BenchmarkError(f"unknown benchmark layout {layout!r}; known: {sorted(LAYOUTS)}")
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"benchmark file {str(path)!r} does not exist")
    lay, name = LAYOUTS[layout], name or layout
    base = Path(image_root) if image_root else path.parent
    dirs = tuple(base / d.format(dir=path.parent.name) for d in lay.image_dirs)
    out: list[Prompt] = []
    bad: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for k, (row_where, rec) in enumerate(_rows(path), start=1):
        try:
            items = _items(lay, row_where, rec)
        except BenchmarkError as e:
            _skip(bad, row_where, e, strict)
            continue
        for where, item, suffix in items:
            try:
                p = _prompt(layout, lay, where, item, k, suffix, base, dirs, name)
                iid = p.meta["item_id"]
                if iid in seen:
                    raise BenchmarkError(f"{where}: duplicate id {iid!r} (first at {seen[iid]})")
            except BenchmarkError as e:
                _skip(bad, where, e, strict)
                continue
            seen[iid] = where
            out.append(p)
            if limit and len(out) >= limit:
                return _done(layout, path, out, bad)
    return _done(layout, path, out, bad)


def _skip(bad: list[tuple[str, str]], where: str, err: BenchmarkError, strict: bool) -> None:
    if strict:
        raise err
    reason = str(err).removeprefix(f"{where}: ")
    bad.append((where, reason))
    if len(bad) <= MAX_WARNINGS:
        more = " (further bad rows are not logged)" if len(bad) == MAX_WARNINGS else ""
        log.warning("skipping bad benchmark row %s: %s%s", where, reason, more)


def _done(layout: str, path: Path, out: list[Prompt], bad: list[tuple[str, str]]) -> BenchmarkFile:
    first = f"{bad[0][0]}: {bad[0][1]}" if bad else ""
    if not out:
        raise BenchmarkError(f"{path}: no usable {layout} records ({len(bad)} bad{'; first: ' if bad else ''}{first})")
    if bad:
        log.warning("benchmark %s %s: %d items, %d rows skipped (first: %s)", layout, path, len(out), len(bad), first)
    return BenchmarkFile(out, bad)


def load_benchmark(layout: str, path: str | Path, *, image_root: str = "", limit: int = 0,
                   name: str | None = None, strict: bool = False) -> list[Prompt]:
    """read_benchmark's prompts (bad rows skipped with a warning; strict: the first one raises)."""
    return read_benchmark(layout, path, image_root=image_root, limit=limit, name=name, strict=strict).prompts


def write_world_benchmark(env: Any, path: str | Path) -> Path:
    """The environment's questions (the world's, or its questions_file's; cut to
    env.cfg.questions) as a `world`-layout JSONL benchmark file (absolute image paths)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for q in env.world_rows():
            f.write(json.dumps({"id": q["id"], "image": str(env.image_path(q).resolve()),
                                "question": q["question"], "answer": q["answer"],
                                "aliases": q.get("aliases", []), "kind": q.get("kind", "")},
                               ensure_ascii=False) + "\n")
    return path


# ------------------------------------------------------------------------------ config
def _rollout_defaults() -> RolloutConfig:
    return RolloutConfig(engine=EngineConfig(n_samples=1, max_live=64, temperature=0.0),
                         env=EnvConfig(questions=8, dense_search=False), policy="sample", out="", resume=False,
                         progress=False)


@dataclass
class EvalConfig:
    """One evaluation run (every field is a flag: --benchmarks mmsearch:f.jsonl --model DIR --data FILE)."""

    FLAG_ALIASES: ClassVar[dict[str, str]] = {"model": "rollout.model", "data": "rollout.env.data.path",
                                              "policy": "rollout.policy"}
    benchmarks: list[str] = field(default_factory=list)  # layout:path; [] = --data's records, else the world's questions
    # model, load, backend, engine, env (data, tools); policy sample (the model's own: the default) |
    # replay (a diagnostic: the world's scripted solve turns through the real tools)
    rollout: RolloutConfig = field(default_factory=_rollout_defaults)
    judge: JudgeConfig = field(default_factory=JudgeConfig)  # how answers are graded (rule or model judge)
    agentic: bool = True  # run with the tools (False: the direct baseline alone)
    direct_baseline: bool = True  # also run without tools (one turn, the model samples)
    direct_max_tokens: int = 256  # token budget of a direct-baseline answer
    limit: int = 0  # items per benchmark (0 = all)
    image_root: str = ""  # relative image paths resolve here ("" = each file's directory)
    out_dir: str = "runs/eval"  # report.json, report.md and <mode>.jsonl go here

    def __post_init__(self) -> None:
        check(self.rollout.policy in ("replay", "sample"),
              f"rollout.policy must be replay|sample for eval, got {self.rollout.policy!r}")
        for b in self.benchmarks:
            layout = b.split(":", 1)[0]
            check(":" in b and layout in LAYOUTS, f"benchmarks entry {b!r} must be layout:path with layout "
                  f"one of {sorted(LAYOUTS)}")
        check(self.agentic or self.direct_baseline, "agentic and direct_baseline are both off: nothing to run")
        check(self.direct_max_tokens >= 1, f"direct_max_tokens must be >= 1, got {self.direct_max_tokens}")
        check(self.limit >= 0, f"limit must be >= 0, got {self.limit}")


# ------------------------------------------------------------------------------ statistics
def traj_stats(trajs: list[Trajectory]) -> dict[str, Any]:
    """Accuracy, tool use and cost of finished, judged trajectories."""
    n = max(len(trajs), 1)
    calls = collections.Counter(c["name"] for t in trajs for tr in t.turns for c in tr.calls)
    gen = sum(len(s.token_ids) for t in trajs for s in t.segments if s.kind is SegmentKind.GEN)
    obs = sum(len(s.token_ids) for t in trajs for s in t.segments if s.kind is SegmentKind.OBS)
    return {
        "n": len(trajs), "accuracy": sum(float(t.reward.get("acc", 0.0)) for t in trajs) / n,
        "answered_rate": sum(t.status is Status.ANSWERED for t in trajs) / n,
        "fatal_rate": sum(t.fatal_step is not None for t in trajs) / n,  # a tool-error cascade
        "cascade_rate": sum(t.status is Status.FATAL for t in trajs) / n,
        "status": dict(collections.Counter(t.status.value for t in trajs)),
        "turns_mean": sum(len(t.turns) for t in trajs) / n,
        "tool_calls": sum(calls.values()), "tool_calls_per_traj": sum(calls.values()) / n,
        "calls_per_tool": dict(sorted(calls.items())),
        "tool_errors": sum(len(tr.tool_errors) for t in trajs for tr in t.turns),
        "format_errors": sum(len(tr.parse_errors) for t in trajs for tr in t.turns),
        "prompt_tokens": sum(len(t.prompt_ids) for t in trajs), "gen_tokens": gen, "obs_tokens": obs,
        "context_tokens_mean": sum(t.num_tokens for t in trajs) / n,
        "gen_s": sum(tr.gen_s for t in trajs for tr in t.turns),
        "tool_s": sum(tr.tool_s for t in trajs for tr in t.turns),
        "latency_s_median": statistics.median([t.finished_at - t.started_at for t in trajs]) if trajs else 0.0,
    }


# ------------------------------------------------------------------------------ running
def _prompts(cfg: EvalConfig, env: Any, out: Path) -> list[Prompt]:
    specs = list(cfg.benchmarks)
    if not specs and env.cfg.data.path:  # the user's dataset (engine/data.py records)
        name = Path(env.cfg.data.path).stem
        return [dataclasses.replace(p, meta={**p.meta, "answers": [p.meta["answer"], *p.meta["aliases"]],
                                             "benchmark": name, "item_id": p.id})
                for p in env.prompts()][: cfg.limit or None]
    if not specs:
        specs = [f"world:{write_world_benchmark(env, out / 'world_benchmark.jsonl')}"]
    prompts = []
    for spec in specs:
        layout, path = spec.split(":", 1)
        name = layout if sum(s.split(":", 1)[0] == layout for s in specs) == 1 else f"{layout}:{Path(path).stem}"
        prompts += load_benchmark(layout, path, image_root=cfg.image_root, limit=cfg.limit, name=name)
    return prompts


def _replay_scripts(prompts: list[Prompt], env: Any) -> dict[str, list[str]]:
    world = env.replay_scripts()
    missing = [p.id for p in prompts if p.meta["item_id"] not in world]
    if missing:
        raise BenchmarkError(f"policy 'replay' has solve scripts only for world questions; no script for "
                             f"{missing[:5]} (use --policy sample for other benchmarks)")
    return {p.id: world[p.meta["item_id"]] for p in prompts}


async def _run_mode(engine: Any, prompts: list[Prompt]) -> tuple[list[Trajectory], float]:
    t0 = time.perf_counter()
    trajs = [t async for g in engine.run(prompts) for t in g]
    return trajs, time.perf_counter() - t0


async def _evaluate(cfg: EvalConfig, env: Any, prompts: list[Prompt]) -> dict[str, tuple[list[Trajectory], float]]:
    from spyglass.engine.chat import HFCodec
    from spyglass.engine.policy import ReplayPolicy
    from spyglass.engine.rollout import build_engine, make_engine
    from spyglass.trainer.reward import RewardConfig, score_group

    rcfg = dataclasses.replace(cfg.rollout, policy="sample", resume=False, progress=False)
    engine, backends, _ = build_engine(rcfg, env)
    if cfg.rollout.policy == "replay":
        engine.policy = ReplayPolicy(engine.codec, _replay_scripts(prompts, env))
    modes: dict[str, tuple[list[Trajectory], float]] = {}
    try:
        if cfg.agentic:
            modes["agentic"] = await _run_mode(engine, prompts)
        if cfg.direct_baseline:
            codec = engine.codec
            direct_codec = HFCodec(codec.tokenizer, codec.image_processor, system=DIRECT_SYSTEM) \
                if isinstance(codec, HFCodec) else codec
            dcfg = dataclasses.replace(cfg.rollout.engine, max_turns=1, max_tokens_per_turn=cfg.direct_max_tokens)
            direct = make_engine(dcfg, backends, direct_codec, env.runner, [])
            modes["direct"] = await _run_mode(direct, prompts)
    finally:
        for b in backends:
            await b.close()
    await score_group([t for trajs, _ in modes.values() for t in trajs], RewardConfig(name="accuracy", judge=cfg.judge))
    return modes


def _report(cfg: EvalConfig, modes: dict[str, tuple[list[Trajectory], float]], names: list[str]) -> dict[str, Any]:
    rep: dict[str, Any] = {"model": cfg.rollout.model, "policy": cfg.rollout.policy, "benchmarks": names, "modes": {}}
    for mode, (trajs, wall) in modes.items():
        per = {b: traj_stats([t for t in trajs if t.meta["benchmark"] == b]) for b in names}
        rep["modes"][mode] = {"benchmarks": per, "overall": traj_stats(trajs),
                              "average_accuracy": sum(s["accuracy"] for s in per.values()) / max(len(per), 1),
                              "wall_s": wall}
    return rep


def format_table(rep: dict[str, Any]) -> str:
    """The report as markdown tables: accuracy per benchmark (papers' layout), tool use, cost."""
    names = rep["benchmarks"]
    policy = rep["policy"] + (" (a diagnostic: scripted solve turns, not the model's own answers)"
                              if rep["policy"] == "replay" else " (the model's own policy)")
    lines = [f"spyglass eval: model {rep['model']}, policy {policy}", "",
             "| mode | " + " | ".join(names) + " | avg |", "|---" * (len(names) + 2) + "|"]
    for mode, m in rep["modes"].items():
        accs = [f"{100 * m['benchmarks'][b]['accuracy']:.1f}" for b in names]
        lines.append(f"| {mode} | " + " | ".join(accs) + f" | {100 * m['average_accuracy']:.1f} |")
    lines += ["", "| mode | benchmark | n | turns | calls/traj | calls per tool | tool err | fatal % |",
              "|---|---|---|---|---|---|---|---|"]
    for mode, m in rep["modes"].items():
        for b in names:
            s = m["benchmarks"][b]
            tools = ", ".join(f"{k} {v}" for k, v in s["calls_per_tool"].items()) or "-"
            lines.append(f"| {mode} | {b} | {s['n']} | {s['turns_mean']:.2f} | {s['tool_calls_per_traj']:.2f} | "
                         f"{tools} | {s['tool_errors']} | {100 * s['fatal_rate']:.1f} |")
    lines += ["", "| mode | prompt tok | gen tok | obs tok | tool calls | gen s | tool s | wall s |",
              "|---|---|---|---|---|---|---|---|"]
    for mode, m in rep["modes"].items():
        o = m["overall"]
        lines.append(f"| {mode} | {o['prompt_tokens']} | {o['gen_tokens']} | {o['obs_tokens']} | {o['tool_calls']} | "
                     f"{o['gen_s']:.2f} | {o['tool_s']:.2f} | {m['wall_s']:.2f} |")
    return "\n".join(lines)


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate; writes report.json, report.md and <mode>.jsonl under out_dir; returns the report.

    CPU example: `run_eval(EvalConfig(rollout=RolloutConfig(env=EnvConfig(questions=2,
    dense_search=False)), direct_max_tokens=16))` evaluates the replay policy on two world questions (accuracy 1.0)
    and the tiny model's direct answers (accuracy 0.0)."""
    from spyglass.engine.env import build_env

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = build_env(cfg.rollout.env)
    prompts = _prompts(cfg, env, out)
    names = list(dict.fromkeys(p.meta["benchmark"] for p in prompts))
    modes = asyncio.run(_evaluate(cfg, env, prompts))
    for mode, (trajs, _) in modes.items():
        write_jsonl(out / f"{mode}.jsonl", trajs, append=False)
    rep = _report(cfg, modes, names)
    rep["config"] = asdict(cfg)
    table = format_table(rep)
    (out / "report.json").write_text(json.dumps(rep, indent=1, default=str), encoding="utf-8")
    (out / "report.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    rep["report"] = str(out / "report.json")
    return rep
