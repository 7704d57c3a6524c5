"""The synthesis pipeline end to end: graph -> paths -> grounding -> questions -> difficulty
filter -> degradation subset -> teacher trajectories.

Each sampled path's anchor is grounded first (which image, and which view of it: its page
image, its board in a street scene, its emblem), because the question refers to the anchor
through that view; then the question is written and rewritten (trainer/synth/questions.py).
Paths whose question is not unique or leaks, or whose anchor has no usable image, are dropped
and counted. The difficulty filter (none | llm | engine, or any solver passed in) runs on the
survivors; the degradation subset is drawn among those left with a clean page image.

    python -m spyglass.trainer.synth --world DIR --out DIR            # offline, templates
    python -m spyglass.trainer.synth --pages pages.jsonl --images-dir imgs --out DIR --no-trajectories
    report = asyncio.run(run_pipeline(SynthConfig(world="w", out="o")))

Writes into `out`:
  questions.jsonl     one question per line: id, question, canonical_question, answer, aliases,
                      image_file (relative to out), image (source image id), kind, hops (the
                      solve script's steps, the format of the world's questions), path
                      (anchor + hops), roles, steps (every rewriting step and its source: llm |
                      template), clues, grounding (method, score, view, scene region),
                      degradation + fix_tool, difficulty (the solver's answers per mode)
  images/<id>.png     each question's image (a degraded copy for the degradation subset)
  graph.json          graph statistics (nodes, edges, exclusions by reason)
  trajectories.jsonl  accepted teacher trajectories (Trajectory JSONL), with a world only
  trajectories.sharegpt.jsonl (+ trajectories_images/)  the same in the SFT format (ShareGPT)
  report.json         counts at every stage and drops by reason
"""
from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from spyglass.engine.tools.llm import LLMConfig

from .filters import Difficulty, EngineSolver, LLMSolver, Solver, difficulty_filter, tool_image_search
from .graph import GraphConfig, LinkGraph, build_graph
from .grounding import (FIX_HOP, FIX_TOOL, Grounding, ImageCatalog, OCRScorer, Scorer, Ungrounded,
                        degrade, ground_anchor, pick_degraded)
from .paths import GraphPath, PathConfig, sample_paths
from .questions import QuestionDraft, Rejected, RewriteConfig, write_question
from .trajectories import TeacherConfig

GROUNDINGS = ("page", "ocr")
VIEWS = ("page", "scene", "emblem")
DIFFICULTIES = ("none", "llm", "engine")


@dataclass
class SynthConfig:
    """One synthesis run (validated)."""

    out: str
    world: str = ""  # a world directory (docs.jsonl is the graph; images.jsonl the images)
    pages: str = ""  # or a pages JSONL (trainer/synth/dump.py); questions only
    images_dir: str = ""  # with pages: where the pages' image files are
    n_questions: int = 24
    oversample: float = 3.0  # paths sampled per wanted question
    seed: int = 0
    graph: GraphConfig = field(default_factory=GraphConfig)
    paths: PathConfig = field(default_factory=PathConfig)
    rewrite: RewriteConfig = field(default_factory=RewriteConfig)
    grounding: str = "page"  # page: the anchor's own image | ocr: candidates ranked by OCRScorer
    grounding_threshold: float = 0.6
    views: tuple[str, ...] = VIEWS  # how the image may show the anchor (scene: crop; emblem: image search)
    degrade_rate: float = 0.1
    difficulty: str = "none"  # none | llm (needs difficulty_llm) | engine (the teacher samples)
    difficulty_llm: LLMConfig | None = None
    difficulty_max_tokens: int = 256  # engine solver: tokens per turn (the teacher's model samples)
    trajectories: bool = True
    teacher: TeacherConfig = field(default_factory=TeacherConfig)

    def __post_init__(self) -> None:
        if bool(self.world) == bool(self.pages):
            raise ValueError(f"SynthConfig: give exactly one of world ({self.world!r}) or pages ({self.pages!r})")
        if self.world and not (Path(self.world) / "docs.jsonl").is_file():
            raise ValueError(f"SynthConfig.world={self.world!r} has no docs.jsonl")
        if self.pages and self.trajectories:
            raise ValueError("SynthConfig: teacher trajectories need a world (its tools' corpus); "
                             "with pages=... set trajectories=False (not done for dumps)")
        if not isinstance(self.n_questions, int) or self.n_questions < 1:
            raise ValueError(f"SynthConfig.n_questions must be an int >= 1, got {self.n_questions!r}")
        if self.oversample < 1:
            raise ValueError(f"SynthConfig.oversample must be >= 1, got {self.oversample!r}")
        if self.grounding not in GROUNDINGS:
            raise ValueError(f"SynthConfig.grounding must be one of {GROUNDINGS}, got {self.grounding!r}")
        if not 0 <= self.grounding_threshold <= 1:
            raise ValueError(f"SynthConfig.grounding_threshold must be in [0, 1], got {self.grounding_threshold!r}")
        self.views = tuple(self.views)
        if not self.views or any(v not in VIEWS for v in self.views):
            raise ValueError(f"SynthConfig.views must be a non-empty subset of {VIEWS}, got {self.views!r}")
        if not 0 <= self.degrade_rate <= 1:
            raise ValueError(f"SynthConfig.degrade_rate must be in [0, 1], got {self.degrade_rate!r}")
        if self.difficulty not in DIFFICULTIES:
            raise ValueError(f"SynthConfig.difficulty must be one of {DIFFICULTIES}, got {self.difficulty!r}")
        if self.difficulty_max_tokens < 1:
            raise ValueError(f"SynthConfig.difficulty_max_tokens must be >= 1, got {self.difficulty_max_tokens!r}")
        if self.difficulty == "llm" and self.difficulty_llm is None:
            raise ValueError("SynthConfig.difficulty='llm' needs difficulty_llm=LLMConfig(...)")


def _hops(graph: LinkGraph, path: GraphPath, g: Grounding, catalog: ImageCatalog) -> list[dict[str, Any]]:
    """The solve steps: identify the anchor from the image (fix its degradation and read it;
    crop its board out of a scene and read it; or search by its emblem), then visit each
    hop's page."""
    rec = catalog.records[g.image]
    if g.view == "emblem":
        see = [{"action": "image_search", "value": rec["source_image"]}]
    elif g.view == "scene":
        assert g.region is not None
        see = [{"action": "crop", "box": g.region["box"]}, {"action": "ocr", "value": g.region["text"][0]}]
    else:
        fix = [{"action": FIX_HOP[g.degradation]}] if g.degradation in FIX_HOP else []
        see = fix + [{"action": "ocr", "value": (rec.get("text") or [graph.node(path.anchor).title])[0]}]
    ents = path.entities()
    return see + [{"action": "visit", "doc": ents[i], "field": h.relation, "value": h.value}
                  for i, h in enumerate(path.hops)]


def _record(k: int, graph: LinkGraph, d: QuestionDraft, g: Grounding, catalog: ImageCatalog) -> dict[str, Any]:
    p = d.path
    aliases = graph.node(p.answer_node).aliases if p.answer_node else []
    return {"id": f"syn-{k:04d}", "question": d.question, "canonical_question": d.canonical,
            "answer": p.answer, "aliases": list(aliases), "image": g.image,
            "image_file": f"images/syn-{k:04d}.png",
            "kind": f"synth-{len(p.hops)}hop-{g.view}" + ("" if g.degradation == "none" else f"-{g.degradation}"),
            "hops": _hops(graph, p, g, catalog), "path": p.to_json(), "roles": p.roles(),
            "anchor_type": graph.node(p.anchor).type,
            "steps": d.steps, "clues": {p.entities()[i]: [c.text() for c in cs] for i, cs in d.clues.items() if cs},
            "grounding": {"method": g.method, "score": g.score, "view": g.view, "region": g.region,
                          "source_degradation": g.degradation},
            "degradation": g.degradation, "fix_tool": FIX_TOOL.get(g.degradation)}


def attach_views(graph: LinkGraph, catalog: ImageCatalog, views: tuple[str, ...]) -> int:
    """Add each node's scene/emblem views (when allowed) to node.images, so that entities seen
    only on a street scene can be anchors; returns how many were added."""
    n = 0
    for node in graph.nodes.values():
        for iid, kind, _ in catalog.views(node):
            if kind != "page" and kind in views and iid not in node.images:
                node.images.append(iid)
                n += 1
    return n


def _scorer(cfg: SynthConfig) -> Scorer | None:
    return OCRScorer() if cfg.grounding == "ocr" else None


def _solver(cfg: SynthConfig, catalog_root: Path | None) -> tuple[Solver | None, Any]:
    """(solver, thing to close) for cfg.difficulty."""
    if cfg.difficulty == "none":
        return None, None
    search = None
    if catalog_root is not None and cfg.world:
        from spyglass.engine.tools.image_search import ImageSearchConfig, image_search_tools  # noqa: PLC0415
        search = next(t for t in image_search_tools(ImageSearchConfig(corpus_dir=str(catalog_root)))
                      if t.name == "ImageSearch")
    if cfg.difficulty == "llm":
        assert cfg.difficulty_llm is not None
        return LLMSolver(cfg.difficulty_llm, tool_image_search(search) if search else None), None
    s = EngineSolver(replace(cfg.teacher, policy="sample", max_tokens_per_turn=cfg.difficulty_max_tokens), search)
    return s, s


async def make_questions(cfg: SynthConfig, graph: LinkGraph, catalog: ImageCatalog,
                         solver: Solver | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sampled, written, grounded, difficulty-filtered and degraded questions (images saved
    under cfg.out/images) and the counts of every stage."""
    out = Path(cfg.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    paths, pstats = sample_paths(graph, math.ceil(cfg.n_questions * cfg.oversample), cfg.paths)
    drops: dict[str, int] = {}
    records: list[dict[str, Any]] = []
    scorer = _scorer(cfg)
    for p in paths:
        if len(records) >= cfg.n_questions:
            break
        try:
            g = ground_anchor(graph.node(p.anchor), catalog, scorer, cfg.grounding_threshold, cfg.views,
                              random.Random(f"view:{cfg.seed}:{p.key()}"))
            draft = await write_question(graph, p, cfg.rewrite, anchor_ref=g.phrase)
        except (Rejected, Ungrounded) as e:
            drops[e.reason] = drops.get(e.reason, 0) + 1
            continue
        records.append(_record(len(records), graph, draft, g, catalog))
    images = [catalog.load(r["image"]) for r in records]
    if solver is not None:
        diffs = await difficulty_filter(records, images, solver)
    else:
        diffs = [Difficulty(kept=True) for _ in records]
    kept, kept_images = [], []
    for r, img, d in zip(records, images, diffs):
        r["difficulty"] = {"filter": cfg.difficulty, "answers": d.answers, "solved_by": d.solved_by}
        if d.kept:
            kept.append(r)
            kept_images.append(img)
        else:
            key = f"too_easy_{d.solved_by}"
            drops[key] = drops.get(key, 0) + 1
    rng = random.Random(f"degrade:{cfg.seed}")
    clean = [i for i, r in enumerate(kept) if r["degradation"] == "none" and r["grounding"]["view"] == "page"]
    for i, kind in pick_degraded(clean, cfg.degrade_rate, rng).items():
        kept_images[i] = degrade(kept_images[i], kind, rng)
        r = kept[i]
        r.update(degradation=kind, fix_tool=FIX_TOOL[kind], kind=f"{r['kind']}-{kind}-added")
        r["hops"] = [{"action": FIX_HOP[kind]}] + r["hops"]
    for new_id, (r, img) in enumerate(zip(kept, kept_images)):  # dense ids after the filter
        r["id"], r["image_file"] = f"syn-{new_id:04d}", f"images/syn-{new_id:04d}.png"
        img.save(out / r["image_file"], format="PNG")
    stats = {"paths": asdict(pstats), "drops": drops, "written": len(records), "kept": len(kept),
             "degraded_added": sum(r["kind"].endswith("-added") for r in kept),
             "degraded_native": sum(r["degradation"] != "none" and not r["kind"].endswith("-added") for r in kept),
             "llm_steps": sum(s["source"] == "llm" for r in kept for s in r["steps"]),
             "template_steps": sum(s["source"] != "llm" for r in kept for s in r["steps"])}
    return kept, stats


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows),
                    encoding="utf-8")


async def run_pipeline(cfg: SynthConfig, solver: Solver | None = None) -> dict[str, Any]:
    """Run everything (see module docstring); returns the report. `solver` overrides
    cfg.difficulty's solver (e.g. a stub, or a human-labelled table)."""
    from spyglass.engine.offline.world import load_world  # noqa: PLC0415
    out = Path(cfg.out)
    if (out / "images").exists():
        shutil.rmtree(out / "images")
    out.mkdir(parents=True, exist_ok=True)
    world = load_world(cfg.world) if cfg.world else None
    graph = build_graph(Path(cfg.world) / "docs.jsonl" if world else cfg.pages, cfg.graph)
    (out / "graph.json").write_text(json.dumps(graph.stats(), indent=1, sort_keys=True) + "\n")
    catalog = ImageCatalog.from_world(world) if world else (
        ImageCatalog.from_dir(cfg.images_dir) if cfg.images_dir else ImageCatalog({}, Path(".")))
    attach_views(graph, catalog, cfg.views)
    closer = None
    if solver is None:
        solver, closer = _solver(cfg, world.root if world else None)
    try:
        records, qstats = await make_questions(cfg, graph, catalog, solver)
    finally:
        if closer is not None:
            await closer.close()
    _write_jsonl(out / "questions.jsonl", records)
    report: dict[str, Any] = {"graph": graph.stats(), "questions": qstats}
    if cfg.trajectories and records:
        report["trajectories"] = await _trajectories(cfg, records, out)
    (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True, default=str) + "\n")
    return report


async def _trajectories(cfg: SynthConfig, records: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    from spyglass.engine.env import build_env  # noqa: PLC0415
    from spyglass.engine.trajectory import write_jsonl  # noqa: PLC0415

    from .trajectories import teacher_rollouts  # noqa: PLC0415
    env = build_env(cfg.teacher.env(cfg.world))
    kept, stats = await teacher_rollouts(records, env, cfg.teacher, out,
                                         sharegpt=out / "trajectories.sharegpt.jsonl")
    write_jsonl(out / "trajectories.jsonl", kept, append=False)
    return stats
