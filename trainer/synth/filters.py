"""The difficulty filter: drop questions a model answers with no tools, or with one image search.

A solver is an async callable (record, image, mode) -> answer text or None, for the modes
"no_tools" and "one_image_search"; a question is dropped when, in some mode, the solver's
answer matches the reference or an alias (trainer/judges.normalize_answer: NFKC, casefold,
punctuation and articles removed). Modes run in order and stop at the first solve. Solvers:

  LLMSolver     any OpenAI-compatible chat endpoint (engine/tools/llm.py), the image sent as
                a data URL; in one_image_search mode the ImageSearch tool's result for the
                image is given to it first.
  EngineSolver  the teacher's backend through the engine with the model sampling: one turn and
                no tools, or up to three turns with ImageSearch allowed once.
  any callable  e.g. a stub in tests, or a human-labelled table.

    results = await difficulty_filter(records, images, LLMSolver(llm_cfg, search_fn))
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from PIL import Image

from spyglass.engine.tools.base import Tool, ToolContext, ToolError
from spyglass.engine.tools.llm import LLMConfig, chat
from spyglass.trainer.judges import normalize_answer

MODES = ("no_tools", "one_image_search")
Solver = Callable[[dict[str, Any], Image.Image, str], Awaitable[str | None]]
ImageSearchFn = Callable[[Image.Image], Awaitable[str]]


def is_correct(answer: str | None, rec: dict[str, Any]) -> bool:
    """Normalised exact match of `answer` against rec["answer"] and rec["aliases"]."""
    if not answer:
        return False
    refs = {normalize_answer(str(r)) for r in [rec["answer"], *rec.get("aliases", [])]}
    return normalize_answer(answer) in refs - {""}


@dataclass
class Difficulty:
    kept: bool
    answers: dict[str, str | None] = field(default_factory=dict)
    solved_by: str | None = None


async def difficulty_filter(records: list[dict[str, Any]], images: list[Image.Image], solver: Solver,
                            modes: tuple[str, ...] = MODES, concurrency: int = 4) -> list[Difficulty]:
    """One Difficulty per record (kept = no mode solved it)."""
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"difficulty modes must be in {MODES}, got {bad}")
    if len(records) != len(images):
        raise ValueError(f"difficulty_filter: {len(records)} records but {len(images)} images")
    sem = asyncio.Semaphore(max(1, concurrency))

    async def one(rec: dict[str, Any], img: Image.Image) -> Difficulty:
        d = Difficulty(kept=True)
        async with sem:
            for m in modes:
                d.answers[m] = await solver(rec, img, m)
                if is_correct(d.answers[m], rec):
                    d.kept, d.solved_by = False, m
                    break
        return d

    return list(await asyncio.gather(*(one(r, i) for r, i in zip(records, images))))


def _data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def extract_answer(reply: str) -> str:
    """The text inside <answer>...</answer>, else the reply without think blocks."""
    m = re.search(r"<answer>(.*?)</answer>", reply, flags=re.DOTALL)
    text = m.group(1) if m else re.sub(r"<think>.*?</think>", "", reply, flags=re.DOTALL)
    return " ".join(text.split())


def tool_image_search(tool: Tool, top_k: int = 3) -> ImageSearchFn:
    """An ImageSearchFn over an ImageSearch Tool (its observation text, or its error)."""
    async def search(img: Image.Image) -> str:
        try:
            res = await tool.fn({"image": "img_1", "top_k": top_k}, ToolContext(images=[img]))
        except ToolError as e:
            return f"Error ({e.kind.value}): {e.message}"
        return res.text if res.ok else f"Error ({res.error.kind.value}): {res.error.message}"
    return search


class LLMSolver:
    """A solver over an OpenAI-compatible chat endpoint (see module docstring)."""

    def __init__(self, llm: LLMConfig, image_search: ImageSearchFn | None = None) -> None:
        self.llm, self.image_search = llm, image_search

    async def __call__(self, rec: dict[str, Any], img: Image.Image, mode: str) -> str | None:
        text = f"{rec['question']}\nAnswer with the answer only, inside <answer></answer>."
        if mode == "one_image_search":
            if self.image_search is None:
                raise ValueError("LLMSolver: mode one_image_search needs an image_search function")
            text = f"A reverse image search for the image returned:\n{await self.image_search(img)}\n\n{text}"
        content = [{"type": "image_url", "image_url": {"url": _data_url(img)}},
                   {"type": "text", "text": text}]
        try:
            reply = await chat(self.llm, [{"role": "user", "content": content}], tool="difficulty")  # type: ignore[list-item]
        except ToolError:
            return None  # no verdict: the question is not shown to be easy
        return extract_answer(reply)


class EngineSolver:
    """The teacher's backend as the solver, through the engine, the model sampling."""

    def __init__(self, teacher: Any, image_search: Tool | None = None) -> None:
        from .trajectories import build_teacher  # noqa: PLC0415
        self.teacher, self.search = teacher, image_search
        self.codec, self.backends = build_teacher(teacher)
        self._n = 0
        self.turns = 0  # engine turns run so far (all questions, all modes)

    async def __call__(self, rec: dict[str, Any], img: Image.Image, mode: str) -> str | None:
        from spyglass.engine.rollout import make_engine  # noqa: PLC0415
        from spyglass.engine.scheduler import EngineConfig, Prompt, ToolOutcome  # noqa: PLC0415
        if mode == "one_image_search" and self.search is None:
            raise ValueError("EngineSolver: mode one_image_search needs the ImageSearch tool")
        schemas = [self.search.schema()] if mode == "one_image_search" else []
        used: set[str] = set()

        async def runner(calls: list[dict[str, Any]], traj: Any) -> list[Any]:
            outs = []
            for c in calls:
                if not schemas or c["name"] != "ImageSearch" or traj.id in used:
                    outs.append(ToolOutcome(f"Error (bad_args): tool {c['name']!r} is not available "
                                            "here", error_kind="bad_args"))
                    continue
                used.add(traj.id)
                args = json.loads(c["arguments"])
                res = await self.search.fn(args, ToolContext(images=traj.images()))
                outs.append(ToolOutcome(res.text) if res.ok else
                            ToolOutcome(f"Error: {res.error.message}", error_kind=res.error.kind.value))
            return outs

        t = self.teacher.rollout.engine
        cfg = EngineConfig(n_samples=1, max_turns=1 if mode == "no_tools" else 3,
                           max_tokens_per_turn=t.max_tokens_per_turn, temperature=t.temperature, seed=t.seed)
        engine = make_engine(cfg, self.backends, self.codec, runner, schemas)
        self._n += 1
        prompt = Prompt(f"{rec['id']}-{mode}-{self._n}", rec["question"], images=[img])
        groups = [g async for g in engine.run([prompt])]
        self.turns += engine.stats.turns
        return groups[0][0].answer if groups and groups[0] else None

    async def close(self) -> None:
        for b in self.backends:
            await b.close()
