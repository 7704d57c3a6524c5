"""Visual grounding of the anchor (page image, scorer ranking + threshold, OCR scorer) and the
degradation subset paired with the tools that undo it."""
from __future__ import annotations

import asyncio
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spyglass.engine.tools.base import ToolContext
from spyglass.engine.tools.visual import laplacian_variance, visual_tools
from spyglass.engine.offline.world import WorldConfig, generate_world
from spyglass.trainer.synth.graph import build_graph
from spyglass.trainer.synth.grounding import (FIX_TOOL, ImageCatalog, OCRScorer, Ungrounded, degrade,
                                              fuzzy_contains, ground_anchor, pick_degraded)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("w"), WorldConfig(
        n_people=8, n_places=8, n_orgs=8, n_products=6, n_events=6, n_sign_images=8, n_scenes=2,
        n_emblem_queries=2))


def test_page_grounding_on_the_world(world) -> None:
    g = build_graph(world.root / "docs.jsonl")
    cat = ImageCatalog.from_world(world)
    shown = [n for n in g.nodes.values() if n.images]
    assert len(shown) == 8
    for n in shown:
        gr = ground_anchor(n, cat)
        rec = world.image_record(gr.image)
        assert gr.method == "page" and gr.score is None and rec["entity"] == n.id
        assert gr.degradation == rec["degradation"]
    with pytest.raises(Ungrounded, match="no_image"):
        ground_anchor(next(n for n in g.nodes.values() if not n.images), cat)


def test_scene_and_emblem_views(world) -> None:
    g = build_graph(world.root / "docs.jsonl")
    cat = ImageCatalog.from_world(world)
    scene = next(r for r in world.images if r["id"].startswith("scene-"))
    for k, side in enumerate(("leftmost", "middle", "rightmost")):
        reg = scene["regions"][k]
        node = g.node(reg["entity"])
        with pytest.raises(Ungrounded, match="no_image"):  # not on a page image, scenes not allowed
            ground_anchor(node, cat)
        gr = ground_anchor(node, cat, views=("page", "scene"))
        assert (gr.image, gr.view, gr.region, gr.side) == (scene["id"], "scene", reg, side)
        assert gr.phrase == f"on the {side} sign in the image" and gr.method == "view"
    em = next(r for r in world.images if r["id"].startswith("emblem-"))
    node = g.node(em["entity"])
    assert ground_anchor(node, cat).view == "page"
    gr = ground_anchor(node, cat, views=("emblem",))
    assert (gr.image, gr.view, gr.phrase) == (em["id"], "emblem", "whose emblem is shown in the image")
    both = {ground_anchor(node, cat, views=("page", "emblem"), rng=random.Random(s)).view for s in range(20)}
    assert both == {"page", "emblem"}  # drawn among the allowed views


def test_scorer_ranks_candidates_with_threshold(tmp_path: Path) -> None:
    Image.new("RGB", (32, 32), (250, 250, 250)).save(tmp_path / "bright.png")
    Image.new("RGB", (32, 32), (40, 40, 40)).save(tmp_path / "dark.png")
    cat = ImageCatalog.from_dir(tmp_path)
    node = build_graph([{"title": "A", "images": ["dark.png", "bright.png", "missing.jpg"]}]).node("A")
    assert cat.candidates(node) == ["dark.png", "bright.png"]
    seen = []

    def brightness(img: Image.Image, texts: list[str]) -> float:
        seen.append(texts)
        return float(np.asarray(img.convert("L")).mean()) / 255

    gr = ground_anchor(node, cat, brightness, threshold=0.5)
    assert gr.image == "bright.png" and gr.score == pytest.approx(250 / 255) and gr.method == "function"
    assert seen[0] == ["A"]
    with pytest.raises(Ungrounded, match="below_threshold"):
        ground_anchor(node, cat, brightness, threshold=0.99)


def test_ocr_scorer_reads_the_sign(world) -> None:
    rec = next(r for r in world.images if r["split"] == "corpus" and r["degradation"] == "none")
    title = world.doc(rec["entity"])["title"]
    s = OCRScorer()
    img = world.load_image(rec["id"])
    assert s(img, [title]) >= 0.9
    assert s(img, ["Qqqqxz Wwwvvv"]) < 0.5
    assert fuzzy_contains("welcome to port kelda", "Port Kelda") == 1.0
    assert fuzzy_contains("welcome to p0rt kelda", "Port Kelda") == pytest.approx(0.9)


def test_degradations_and_their_fixes(world) -> None:
    rec = next(r for r in world.images if r["split"] == "corpus" and r["degradation"] == "none")
    img = world.load_image(rec["id"])
    tools = {t.name: t for t in visual_tools()}

    def fix(kind: str, d: Image.Image):
        res = asyncio.run(tools[FIX_TOOL[kind]].fn({"image": "img_1"}, ToolContext(images=[d])))
        assert res.ok, res.error
        return res

    blurred = degrade(img, "blur", random.Random(0))
    assert laplacian_variance(blurred) < laplacian_variance(img) / 20
    assert laplacian_variance(fix("blur", blurred).images[0]) > laplacian_variance(blurred)
    small = degrade(img, "lowres", random.Random(0))
    assert small.size == (img.size[0] // 3, img.size[1] // 3)
    assert fix("lowres", small).images[0].size == (2 * small.size[0], 2 * small.size[1])
    tilted = degrade(img, "perspective", random.Random(0))
    assert tilted.size == img.size and tilted.getpixel((0, 0)) == (128, 128, 128)
    res = fix("perspective", tilted)
    assert res.text.startswith("Found a quadrilateral") and len(res.images) == 1
    with pytest.raises(ValueError, match="unknown degradation 'fog'"):
        degrade(img, "fog", random.Random(0))


def test_pick_degraded() -> None:
    chosen = pick_degraded(list(range(0, 60, 2)), 0.1, random.Random(0))
    assert len(chosen) == 3 and set(chosen.values()) == {"blur", "lowres", "perspective"}
    assert all(i % 2 == 0 for i in chosen)
    assert chosen == pick_degraded(list(range(0, 60, 2)), 0.1, random.Random(0))
    assert len(pick_degraded([1, 2, 3], 0.1, random.Random(0))) == 1  # at least one when rate > 0
    assert pick_degraded([1, 2, 3], 0.0, random.Random(0)) == {}
    with pytest.raises(ValueError, match="rate must be in \\[0, 1\\], got 1.5"):
        pick_degraded([1], 1.5, random.Random(0))
