"""The default agent environment: the questions, the nine tools, and their runner.

Wires what the engine needs for a real run with no network: the questions (the user's dataset,
`data.path`, read by engine/data.py; else the bundled offline world's questions, converted to the
same records and read by the same reader); the offline world (engine/offline/world.py) as the
corpus of TextSearch / Visit / ImageSearch; the visual and OCR tools; the
Python sandbox; one ToolExecutor (disk cache, C++ coalescer, retries, limits) behind an
ExecutorRunner, the engine's ToolRunner (behind a FaultyRunner when `faults` injects tool
failures, engine/faults.py); and replay scripts that solve each world question
the way its hops say (used by the replay policy, and as teacher trajectories).

    env = build_env(EnvConfig())
    engine = Engine(cfg, backends, codec, env.runner, make_turn_parser(env.schemas),
                    tool_schemas=env.prompt_tools)
    prompts = env.prompts()             # the questions with their images

A record's own `tools` list limits what its prompt shows and what the runner executes (a call
to another tool is refused with a bad-arguments error); its `system` replaces the system prompt.
Replay scripts exist only for records that carry the world's `hops`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image


from .config import ConfigError, check
from .data import BadRecord, DataConfig, DataError, Record, load_dataset, parse_record
from .faults import FaultConfig, FaultyRunner, wrap_runner
from .plugins import PluginError, is_plugin_path, load_tools
from .tools.base import Tool, ToolContext
from .trajectory import ErrorKind, Prompt, ToolResult, Trajectory
from .offline.world import World, ensure_world, load_world

ALL_TOOLS = ("Crop", "Sharpen", "SuperResolution", "PerspectiveCorrect", "OCR", "ImageSearch",
             "TextSearch", "Visit", "Python")


@dataclass
class EnvConfig:
    """Which world and tools, and how calls are executed."""

    world_dir: str | None = None  # None: $SPYGLASS_WORLD or ~/.cache/spyglass/world-v1
    tools: list[str] = field(default_factory=lambda: list(ALL_TOOLS))  # tools offered: built-ins Crop,
    #   Sharpen, SuperResolution, PerspectiveCorrect, OCR, ImageSearch, TextSearch, Visit, Python, and
    #   plugins 'pkg.module:attr' (a function, a Tool or a list of them; engine/plugins.py)
    dense_search: bool = True  # MiniLM + faiss beside BM25 in TextSearch
    cache_path: str | None = None  # sqlite tool cache; None: no disk cache
    coalesce: bool = True  # identical in-flight calls run once (C++ coalescer)
    max_batch: int = 16  # calls of one batchable tool executed together
    max_wait_s: float = 0.002  # how long a batch waits to fill before it runs (seconds)
    data: DataConfig = field(default_factory=DataConfig)  # your own questions (engine/data.py); path "" = the world's
    questions: int = 0  # use the first N questions (0: all)
    questions_file: str = ""  # a synthesized questions.jsonl (trainer/synth, world layout) instead of the world's
    prompt_schemas: bool = True  # the tools' JSON schemas in the system prompt (False: ~2,500
    #                              tokens shorter; for a model fine-tuned on the agent format)
    search_top_k: int = 3  # TextSearch / ImageSearch results asked for by the solve scripts
    faults: FaultConfig = field(default_factory=FaultConfig)  # injected tool failures (engine/faults.py); off by default

    def __post_init__(self) -> None:
        check(not self.questions_file or Path(self.questions_file).is_file(),
              f"questions_file {self.questions_file!r} does not exist")
        check(not (self.questions_file and self.data.path),
              f"questions_file {self.questions_file!r} and data.path {self.data.path!r}: give one of them")
        check(self.search_top_k >= 1, f"search_top_k must be >= 1, got {self.search_top_k}")
        self._check_tools()
        check(self.max_batch >= 1, f"max_batch must be >= 1, got {self.max_batch}")
        check(self.max_wait_s >= 0, f"max_wait_s must be >= 0, got {self.max_wait_s}")
        check(self.questions >= 0, f"questions must be >= 0, got {self.questions}")

    def _check_tools(self) -> None:
        """Each entry a built-in name or a plugin path that loads (engine/plugins.py) to tools
        whose names are new: no built-in's, no other plugin's."""
        bad = [t for t in self.tools if t not in ALL_TOOLS and not is_plugin_path(t)]
        check(not bad, f"tools: unknown {bad}; known {list(ALL_TOOLS)} or a plugin 'pkg.module:attr'")
        dup = sorted({t for t in self.tools if self.tools.count(t) > 1})
        check(not dup, f"tools: {dup} listed more than once")
        seen: dict[str, str] = {}
        for path in filter(is_plugin_path, self.tools):
            try:
                names = [t.name for t in load_tools(path)]
            except PluginError as e:
                raise ConfigError(f"tools: {e}") from None
            for n in names:
                check(n not in ALL_TOOLS, f"tools: plugin {path!r} has a tool named {n!r}, a built-in's name; "
                                          f"rename it (tool(fn, name=...))")
                check(n not in seen, f"tools: plugins {seen.get(n)!r} and {path!r} both have a tool named {n!r}")
                seen[n] = path


def _build_tools(cfg: EnvConfig, world: World) -> dict[str, Tool]:
    from .tools.image_search import ImageSearchConfig, image_search_tools  # noqa: PLC0415
    from .tools.ocr import ocr_tools  # noqa: PLC0415
    from .tools.python_tool import python_tool  # noqa: PLC0415
    from .tools.search import TextSearchConfig, build_index, text_search_tool  # noqa: PLC0415
    from .tools.visual import visual_tools  # noqa: PLC0415
    from .tools.web import VisitConfig, visit_tool  # noqa: PLC0415

    want = set(cfg.tools)
    tools: list[Tool] = []
    if want & {"Crop", "Sharpen", "SuperResolution", "PerspectiveCorrect"}:
        tools += visual_tools()
    if "OCR" in want:
        tools += ocr_tools()
    if "ImageSearch" in want:
        tools += image_search_tools(ImageSearchConfig(corpus_dir=str(world.root)))
    if "TextSearch" in want:
        index = world.root / ("index-dense" if cfg.dense_search else "index-bm25")
        if not (index / "manifest.json").exists():
            build_index(world.root / "docs.jsonl", index, dense=cfg.dense_search)
        tools.append(text_search_tool(TextSearchConfig(index_dir=str(index), use_dense=cfg.dense_search)))
    if "Visit" in want:
        tools.append(visit_tool(VisitConfig(corpus=str(world.root / "docs.jsonl"))))
    if "Python" in want:
        tools.append(python_tool())
    built = {t.name: t for t in tools}
    out: dict[str, Tool] = {}
    for entry in cfg.tools:  # in the config's order, which is the prompt's
        for t in load_tools(entry) if is_plugin_path(entry) else [built[entry]]:
            out[t.name] = t
    return out


class ExecutorRunner:
    """The engine's ToolRunner over a ToolExecutor: a turn's calls run in order against the
    trajectory's visual context, so new images are named img_N consistently. Each result is
    the executor's ToolResult with the images this call added to the context (named in its
    text: image_refs), or for an error its observation text "Error (<kind>): <message>"."""

    def __init__(self, executor: Any) -> None:
        self.executor = executor

    async def __call__(self, calls: list[dict[str, Any]], traj: Trajectory) -> list[ToolResult]:
        ctx = ToolContext(images=traj.images(), trajectory_id=traj.id)
        outs = []
        allowed = traj.meta.get("tools")
        for c in calls:
            if allowed is not None and c["name"] not in allowed:
                outs.append(ToolResult(f"Error (bad_args): tool {c['name']!r} is not offered for this question "
                                       f"(its tools: {allowed})", error=ErrorKind.BAD_ARGS))
                continue
            n = len(ctx.images)
            res = await self.executor.execute(c["name"], c["arguments"], ctx)
            if res.ok:
                new = ctx.images[n:]
                refs = [f"img_{n + i + 1}" for i in range(len(new))] if new else None
                outs.append(dataclasses.replace(res, images=list(new), image_refs=refs))
            else:  # a copy: the executor may share one result between callers
                err = res.error
                outs.append(dataclasses.replace(res, text=f"Error ({err.kind.value}): {err.message}", images=[]))
        return outs


@dataclass
class Env:
    """A built environment (see build_env)."""

    cfg: EnvConfig
    world: World
    tools: dict[str, Tool]
    executor: Any
    runner: ExecutorRunner | FaultyRunner  # the ExecutorRunner, behind a FaultyRunner when cfg.faults injects

    @property
    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self.tools.values()]

    @property
    def prompt_tools(self) -> list[dict[str, Any]]:
        """The schemas the system prompt shows (none with prompt_schemas=False)."""
        return self.schemas if self.cfg.prompt_schemas else []

    @property
    def records(self) -> list[Record]:
        """Every question as a data Record: the dataset's (bad records skipped and counted,
        engine/data.py), or the world's / questions_file's through the same reader."""
        return self._loaded[0]

    @property
    def bad_records(self) -> list[BadRecord]:
        """The dataset's skipped records (engine/data.py); [] for the world's questions."""
        return self._loaded[1]

    @functools.cached_property
    def _loaded(self) -> tuple[list[Record], list[BadRecord]]:
        if self.cfg.data.path:
            ds = load_dataset(self.cfg.data, limit=self.cfg.questions)
            if ds.bad:
                print(ds.summary(), flush=True)
            return ds.records, ds.bad
        src = Path(self.cfg.questions_file) if self.cfg.questions_file else self.world.root / "questions.jsonl"
        out = []
        for i, q in enumerate(self.world_rows()):
            raw = {k: v for k, v in q.items() if k not in ("image", "image_file")}
            raw["images"] = [str(self.image_path(q))]
            try:
                out.append(parse_record(raw, f"{src}:{i + 1}", self.cfg.data, src.parent))
            except DataError as e:  # the bundled world's or a synthesized file's: never silently skipped
                raise DataError(f"{e} (the world or questions_file is broken: regenerate it)") from None
        return out, []

    def world_rows(self) -> list[dict[str, Any]]:
        """The world's (or questions_file's) question rows as stored, cut to `questions`; [] when
        the questions come from a dataset (data.path)."""
        if self.cfg.data.path:
            return []
        rows = ([json.loads(line) for line in Path(self.cfg.questions_file).read_text().splitlines() if line.strip()]
                if self.cfg.questions_file else list(self.world.questions))
        return rows[: self.cfg.questions] if self.cfg.questions else rows

    def image_path(self, q: dict[str, Any]) -> Path:
        """The file of world question `q`'s image (a synthesized question's own, possibly degraded, copy)."""
        if self.cfg.questions_file and q.get("image_file"):
            return Path(self.cfg.questions_file).parent / q["image_file"]
        return self.world.image_path(q["image"])

    def prompts(self, ids: list[str] | None = None) -> list[Prompt]:
        """Records as engine prompts (images loaded; answer, aliases and extra fields in meta;
        the record's tools and system prompt)."""
        wanted = set(ids) if ids is not None else None
        recs = [r for r in self.records if wanted is None or r.id in wanted]
        unknown = sorted({t for r in recs for t in (r.tools or []) if t not in self.tools})
        check(not unknown, f"data: records name tools {unknown} that this run does not have; "
                           f"its tools: {sorted(self.tools)}")
        return [Prompt(r.id, r.question, images=list(r.images), tools=r.tools, system=r.system,
                       meta={**r.meta, "question": r.question, "answer": r.answer, "aliases": r.aliases,
                             "kind": r.meta.get("kind", "")})
                for r in recs]

    def replay_scripts(self) -> dict[str, list[str]]:
        """Solve scripts of the records that carry the world's `hops` (the others have none)."""
        return {r.id: solve_script({"id": r.id, "answer": r.answer, **r.meta}, self.cfg.search_top_k)
                for r in self.records if r.meta.get("hops")}


def build_env(cfg: EnvConfig | None = None) -> Env:
    """Load (or generate) the world and build the tools, executor and runner."""
    from .coalescer import Coalescer  # noqa: PLC0415
    from .tools.cache import ToolCache  # noqa: PLC0415
    from .tools.executor import ToolExecutor  # noqa: PLC0415

    cfg = cfg or EnvConfig()
    world = load_world(cfg.world_dir) if cfg.world_dir and Path(cfg.world_dir, "manifest.json").exists() \
        else ensure_world(cfg.world_dir)
    tools = _build_tools(cfg, world)
    factory = functools.partial(Coalescer, max_batch=cfg.max_batch, max_wait_s=cfg.max_wait_s) \
        if cfg.coalesce else None
    executor = ToolExecutor(tools, cache=ToolCache(cfg.cache_path) if cfg.cache_path else None,
                            coalescer_factory=factory)
    return Env(cfg, world, tools, executor, wrap_runner(ExecutorRunner(executor), cfg.faults))


def solve_script(q: dict[str, Any], top_k: int = 3) -> list[str]:
    """The agent turns that solve world question `q` by its hops, using only what the agent has
    seen: fix the image, read it (or search by image), search the text corpus for what it read,
    visit the page found; for every later hop, search for the value the last page gave and
    visit that page; answer, quoting the last page's line (`field: value`) in the thought. (A
    page id never comes from outside the conversation: the next hop's page is found by searching
    for the previous hop's value, as an agent would.)"""
    from .policy import script_turns  # noqa: PLC0415

    calls: list[tuple[str, dict[str, Any]]] = []
    cur, n_images, last_value, evidence = "img_1", 1, None, ""
    fix = {"perspective": "PerspectiveCorrect", "sharpen": "Sharpen", "super_resolution": "SuperResolution"}
    for h in q["hops"]:
        a = h["action"]
        if a in fix:
            calls.append((fix[a], {"image": cur}))
            n_images += 1
            cur = f"img_{n_images}"
        elif a == "crop":
            calls.append(("Crop", {"image": cur, "box": h["box"]}))
            n_images += 1
            cur = f"img_{n_images}"
        elif a == "ocr":
            calls.append(("OCR", {"image": cur}))
            calls.append(("TextSearch", {"query": h["value"], "top_k": top_k}))
        elif a == "image_search":
            calls.append(("ImageSearch", {"image": cur, "top_k": top_k}))
        elif a == "visit":
            if last_value is not None:
                calls.append(("TextSearch", {"query": last_value, "top_k": top_k}))
            calls.append(("Visit", {"url": f"corpus://{h['doc']}", "goal": h["field"]}))
            last_value = h["value"]
            evidence = f"{h['field']}: {h['value']}"
        else:
            raise ValueError(f"question {q.get('id')!r}: unknown hop action {a!r}")
    return script_turns(calls, q["answer"], evidence=evidence)
