"""The default agent environment: the offline world, the nine tools, and their runner.

Wires what the engine needs for a real run with no network: the world (engine/offline/world.py) as
prompts and as the corpus of TextSearch / Visit / ImageSearch; the visual and OCR tools; the
Python sandbox; one ToolExecutor (disk cache, C++ coalescer, retries, limits) behind an
ExecutorRunner, the engine's ToolRunner; and replay scripts that solve each world question
the way its hops say (used by the replay policy, and as teacher trajectories).

    env = build_env(EnvConfig())
    engine = Engine(cfg, backends, codec, env.runner, make_turn_parser(env.schemas),
                    tool_schemas=env.prompt_tools)
    prompts = env.prompts()             # world questions with their images
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image


from .config import check
from .scheduler import Prompt, ToolOutcome
from .tools.base import Tool, ToolContext
from .trajectory import Trajectory
from .offline.world import World, ensure_world, load_world

ALL_TOOLS = ("Crop", "Sharpen", "SuperResolution", "PerspectiveCorrect", "OCR", "ImageSearch",
             "TextSearch", "Visit", "Python")


@dataclass
class EnvConfig:
    """Which world and tools, and how calls are executed."""

    world_dir: str | None = None  # None: $SPYGLASS_WORLD or ~/.cache/spyglass/world-v1
    tools: list[str] = field(default_factory=lambda: list(ALL_TOOLS))
    dense_search: bool = True  # MiniLM + faiss beside BM25 in TextSearch
    cache_path: str | None = None  # sqlite tool cache; None: no disk cache
    coalesce: bool = True  # identical in-flight calls run once (C++ coalescer)
    max_batch: int = 16
    max_wait_s: float = 0.002
    questions: int = 0  # 0: all world questions
    questions_file: str = ""  # a synthesized questions.jsonl (trainer/synth) instead of the world's
    prompt_schemas: bool = True  # the tools' JSON schemas in the system prompt (False: ~2,500
    #                              tokens shorter; for a model fine-tuned on the agent format)
    search_top_k: int = 3  # TextSearch / ImageSearch results asked for by the solve scripts

    def __post_init__(self) -> None:
        check(not self.questions_file or Path(self.questions_file).is_file(),
              f"questions_file {self.questions_file!r} does not exist")
        check(self.search_top_k >= 1, f"search_top_k must be >= 1, got {self.search_top_k}")
        bad = [t for t in self.tools if t not in ALL_TOOLS]
        check(not bad, f"tools: unknown {bad}; known {list(ALL_TOOLS)}")
        check(self.max_batch >= 1, f"max_batch must be >= 1, got {self.max_batch}")
        check(self.max_wait_s >= 0, f"max_wait_s must be >= 0, got {self.max_wait_s}")
        check(self.questions >= 0, f"questions must be >= 0, got {self.questions}")


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
    return {t.name: t for t in tools if t.name in want}


class ExecutorRunner:
    """The engine's ToolRunner over a ToolExecutor: a turn's calls run in order against the
    trajectory's visual context, so new images are named img_N consistently."""

    def __init__(self, executor: Any) -> None:
        self.executor = executor

    async def __call__(self, calls: list[dict[str, Any]], traj: Trajectory) -> list[ToolOutcome]:
        ctx = ToolContext(images=traj.images(), trajectory_id=traj.id)
        outs = []
        for c in calls:
            n = len(ctx.images)
            res = await self.executor.execute(c["name"], c["arguments"], ctx)
            if res.ok:
                new = ctx.images[n:]
                refs = [f"img_{n + i + 1}" for i in range(len(new))] if new else None
                outs.append(ToolOutcome(res.text, images=list(new), image_refs=refs))
            else:
                err = res.error
                assert err is not None
                outs.append(ToolOutcome(f"Error ({err.kind.value}): {err.message}", error_kind=err.kind.value))
        return outs


@dataclass
class Env:
    """A built environment (see build_env)."""

    cfg: EnvConfig
    world: World
    tools: dict[str, Tool]
    executor: Any
    runner: ExecutorRunner

    @property
    def schemas(self) -> list[dict[str, Any]]:
        return [self.tools[n].schema() for n in self.cfg.tools if n in self.tools]

    @property
    def prompt_tools(self) -> list[dict[str, Any]]:
        """The schemas the system prompt shows (none with prompt_schemas=False)."""
        return self.schemas if self.cfg.prompt_schemas else []

    def all_questions(self) -> list[dict[str, Any]]:
        """The question records: the world's, or those of `questions_file` (its images under
        its directory, `image_file`)."""
        if not self.cfg.questions_file:
            return list(self.world.questions)
        lines = Path(self.cfg.questions_file).read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def questions(self) -> list[dict[str, Any]]:
        """all_questions(), cut to the first `questions` when that is set."""
        qs = self.all_questions()
        return qs[: self.cfg.questions] if self.cfg.questions else qs

    def image_path(self, q: dict[str, Any]) -> Path:
        """The file of question `q`'s image (a synthesized question's own, possibly degraded, copy)."""
        if self.cfg.questions_file and q.get("image_file"):
            return Path(self.cfg.questions_file).parent / q["image_file"]
        return self.world.image_path(q["image"])

    def _image(self, q: dict[str, Any]) -> Image.Image:
        with Image.open(self.image_path(q)) as im:
            return im.convert("RGB")

    def prompts(self, ids: list[str] | None = None) -> list[Prompt]:
        """Questions as engine prompts (image loaded; answer and aliases in meta)."""
        wanted = set(ids) if ids is not None else None
        qs = self.questions() if wanted is None else [q for q in self.all_questions() if q["id"] in wanted]
        return [Prompt(q["id"], q["question"], images=[self._image(q)],
                       meta={"question": q["question"], "answer": q["answer"],
                             "aliases": q.get("aliases", []), "kind": q.get("kind", "")})
                for q in qs]

    def replay_scripts(self) -> dict[str, list[str]]:
        return {q["id"]: solve_script(q, self.cfg.search_top_k) for q in self.all_questions()}


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
    return Env(cfg, world, tools, executor, ExecutorRunner(executor))


def solve_script(q: dict[str, Any], top_k: int = 3) -> list[str]:
    """The agent turns that solve world question `q` by its hops, using only what the agent has
    seen: fix the image, read it (or search by image), search the text corpus for what it read,
    visit the page found; for every later hop, search for the value the last page gave and
    visit that page; answer. (A page id never comes from outside the conversation: the next
    hop's page is found by searching for the previous hop's value, as an agent would.)"""
    from .policy import script_turns  # noqa: PLC0415

    calls: list[tuple[str, dict[str, Any]]] = []
    cur, n_images, last_value = "img_1", 1, None
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
        else:
            raise ValueError(f"question {q.get('id')!r}: unknown hop action {a!r}")
    return script_turns(calls, q["answer"])
