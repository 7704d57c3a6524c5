"""Benchmark: the image tools (Crop, Sharpen, SuperResolution, PerspectiveCorrect, OCR,
ImageSearch) in calls/s, alone and batched, on offline-world images.

  alone    calls awaited one after another through Tool.fn (one worker-thread hop each)
  batched  the same calls handed to Tool.batch_fn in batches of --batch (one thread hop per
           batch; OCR's batch also spreads over its engine pool, --ocr-workers engines)
Each row is a `Case` (tool, a call maker, how many calls); a new tool adds rows by appending a
builder to CASE_BUILDERS, or another script imports `run_cases`. Prints a table, then one JSON
line with the device and git commit.

    .venv/bin/python benchmarks/bench_image_tools.py [--calls 40] [--batch 8] [--ocr-workers 2]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from spyglass.engine.tools.base import Tool, ToolContext
from spyglass.engine.tools.image_search import ImageSearchConfig, image_search_tools
from spyglass.engine.tools.ocr import OCRConfig, ocr_tools
from spyglass.engine.tools.visual import visual_tools
from spyglass.engine.offline.world import World, ensure_world
from spyglass.engine.metrics import device_name as device, git_commit as commit  # noqa: E402


@dataclass
class Case:
    """One benchmark row: `make(i)` builds the i-th call (fresh context, so images published by
    earlier calls never pile up); `scale` multiplies --calls for cheap tools."""

    name: str
    tool: Tool
    make: Callable[[int], tuple[dict[str, Any], ToolContext]]
    scale: float = 1.0


def _pick(world: World, degradation: str, k: int = 4) -> list[dict[str, Any]]:
    return [r for r in world.images if r["split"] == "corpus" and r["degradation"] == degradation][:k]


def image_cases(world: World, ocr_workers: int) -> list[Case]:
    vt = {t.name: t for t in visual_tools()}
    imgs = {d: [world.load_image(r["id"]) for r in _pick(world, d)]
            for d in ("none", "perspective", "blur", "lowres")}
    recs = _pick(world, "none")

    def ctx_maker(pool: list, args: Callable[[int], dict[str, Any]]):
        return lambda i: (args(i), ToolContext(images=[pool[i % len(pool)]]))

    def crop_args(i: int) -> dict[str, Any]:
        x1, y1, x2, y2 = recs[i % len(recs)]["regions"][0]["box"]
        return {"image": "img_1", "box": [x1, y1, (x1 + x2) // 2, y2]}

    search = image_search_tools(ImageSearchConfig(corpus_dir=str(world.root)))[0]
    crops = [world.load_image(r["id"]).crop(tuple(crop_args(i)["box"])) for i, r in enumerate(recs)]
    return [
        Case("Crop 640x420 -> half board", vt["Crop"], ctx_maker(imgs["none"], crop_args), 10),
        Case("Sharpen 640x420", vt["Sharpen"], ctx_maker(imgs["blur"], lambda i: {"image": "img_1"}), 4),
        Case("SuperResolution x3 213x140", vt["SuperResolution"],
             ctx_maker(imgs["lowres"], lambda i: {"image": "img_1", "scale": 3}), 2),
        Case("PerspectiveCorrect 640x420", vt["PerspectiveCorrect"],
             ctx_maker(imgs["perspective"], lambda i: {"image": "img_1"}), 2),
        Case(f"OCR 640x420 sign (rapidocr, {ocr_workers} eng)", ocr_tools(OCRConfig(workers=ocr_workers))[0],
             ctx_maker(imgs["none"], lambda i: {"image": "img_1"}), 0.5),
        Case("ImageSearch local, crop query", search,
             ctx_maker(crops, lambda i: {"image": "img_1"}), 0.5),
    ]


CASE_BUILDERS: list[Callable[[World, argparse.Namespace], list[Case]]] = [
    lambda world, a: image_cases(world, a.ocr_workers),
]


def _rate(case: Case, n: int, batch: int) -> tuple[float, float]:
    """(calls/s alone, calls/s batched), each the median of 3 runs after a warm-up."""
    calls = [case.make(i) for i in range(n)]

    async def alone() -> None:
        for a, c in calls:
            r = await case.tool.fn(a, c)
            assert r.ok, r.error

    async def batched() -> None:
        for i in range(0, n, batch):
            chunk = calls[i:i + batch]
            if case.tool.batch_fn is not None:
                res = await case.tool.batch_fn(chunk)
            else:
                res = await asyncio.gather(*(case.tool.fn(a, c) for a, c in chunk))
            assert all(r.ok for r in res)

    def timed(fn) -> float:
        async def go() -> list[float]:
            await case.tool.fn(*calls[0])  # warm-up: loads models / builds indexes
            out = []
            for _ in range(3):
                t0 = time.perf_counter()
                await fn()
                out.append(time.perf_counter() - t0)
            return out
        return n / statistics.median(asyncio.run(go()))

    return timed(alone), timed(batched)


def run_cases(cases: list[Case], calls: int, batch: int) -> list[dict[str, Any]]:
    rows = []
    for c in cases:
        n = max(batch, int(calls * c.scale))
        a, b = _rate(c, n, batch)
        rows.append({"tool": c.tool.name, "case": c.name, "calls": n, "alone_per_s": round(a, 2),
                     "batched_per_s": round(b, 2), "speedup": round(b / a, 2)})
    return rows






def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=40, help="calls per row (times the row's scale)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ocr-workers", type=int, default=2)
    p.add_argument("--world", default=None, help="world dir (default: a fresh one in a temp dir)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        world = ensure_world(a.world or Path(d) / "world-v1")
        cases = [c for build in CASE_BUILDERS for c in build(world, a)]
        rows = run_cases(cases, a.calls, a.batch)
    print(f"{'tool / case':<44} {'calls':>6} {'alone/s':>9} {f'batch{a.batch}/s':>9} {'x':>5}")
    print("-" * 77)
    for r in rows:
        print(f"{r['case']:<44} {r['calls']:>6} {r['alone_per_s']:>9.1f} {r['batched_per_s']:>9.1f} "
              f"{r['speedup']:>5.2f}")
    print(json.dumps({"benchmark": "image_tools", "device": device(), "commit": commit(),
                      "batch": a.batch, "ocr_workers": a.ocr_workers, "rows": rows}))


if __name__ == "__main__":
    main()
