"""OCR on rendered world signs (rapidocr, PP-OCR ONNX), reading order, backends, bad input.

OCR costs ~0.2-1 s per image on one core: these tests make about eight OCR calls in all.
"""
from __future__ import annotations

import asyncio
import difflib

import pytest
from PIL import Image

from spyglass.engine.tools.base import ToolContext
from spyglass.engine.tools.imgutil import publish
from spyglass.engine.tools.ocr import Block, OCRConfig, ocr_tools, reading_order
from spyglass.engine.tools.visual import visual_tools
from spyglass.engine.offline.world import ensure_world

OCR = ocr_tools()[0]
VISUAL = {t.name: t for t in visual_tools()}


def run(tool, args, ctx):
    return asyncio.run(tool.fn(args, ctx))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ensure_world(tmp_path_factory.getbasetemp() / "world-v1")


def _norm(s: str) -> str:
    return " ".join(s.split()).lower()


def test_reading_order_groups_lines_top_to_bottom_left_to_right():
    blocks = [Block("world", 0.9, (120, 12, 200, 40)), Block("below", 0.9, (10, 60, 90, 90)),
              Block("hello", 0.9, (10, 10, 100, 38)), Block("right", 0.9, (150, 62, 220, 88))]
    lines = reading_order(blocks)
    assert [[b.text for b in line] for line in lines] == [["hello", "world"], ["below", "right"]]
    assert reading_order([]) == []


def test_ocr_reads_the_rendered_sign_text(world):
    rec = next(r for r in world.images if r["split"] == "corpus" and r["degradation"] == "none")
    img = world.load_image(rec["id"])
    r = run(OCR, {"image": "img_1"}, ToolContext(images=[img]))
    assert r.ok, r.error
    assert [_norm(t) for t in r.meta["lines"]] == [_norm(t) for t in rec["text"]]
    x1, y1, x2, y2 = rec["regions"][0]["box"]
    for b in r.meta["blocks"]:
        bx1, by1, bx2, by2 = b["box"]
        assert x1 - 4 <= bx1 < bx2 <= x2 + 4 and y1 - 4 <= by1 < by2 <= y2 + 4
    assert rec["text"][0] in r.text and "rapidocr" in r.text and "[1] (" in r.text


def test_ocr_box_reads_only_that_sign_and_batch_matches(world):
    scene = next(r for r in world.images if r["id"].startswith("scene-"))
    img = world.load_image(scene["id"])
    ctx = ToolContext(images=[img])
    calls = [({"image": "img_1", "box": reg["box"]}, ctx) for reg in scene["regions"][:2]]
    tool = ocr_tools(OCRConfig(workers=2))[0]
    results = asyncio.run(tool.batch_fn(calls))
    for reg, r in zip(scene["regions"], results):
        assert r.ok, r.error
        assert _norm(" ".join(r.meta["lines"])) == _norm(reg["text"][0])
        x1, y1, x2, y2 = reg["box"]
        for b in r.meta["blocks"]:  # boxes come back in full-image coordinates
            assert x1 <= b["box"][0] and b["box"][2] <= x2 and y1 <= b["box"][1] and b["box"][3] <= y2


def test_perspective_correction_improves_ocr(world):
    """On warped signs, OCR of the raw image merges/misreads lines; after PerspectiveCorrect the
    lines come back separated and (nearly) exact."""
    recs = [r for r in world.images if r["degradation"] == "perspective"][:2]

    def score(lines: list[str], want: list[str]) -> float:
        exact = sum(_norm(a) == _norm(b) for a, b in zip(lines, want)) / len(want)
        sim = difflib.SequenceMatcher(None, _norm("\n".join(lines)), _norm("\n".join(want))).ratio()
        return exact + sim

    before, after = [], []
    for rec in recs:
        ctx = ToolContext(images=[world.load_image(rec["id"])])
        raw = run(OCR, {"image": "img_1"}, ctx)
        fixed = publish(ctx, run(VISUAL["PerspectiveCorrect"], {"image": "img_1"}, ctx))
        assert fixed.meta["found"] and fixed.meta["image_refs"] == ["img_2"]
        corrected = run(OCR, {"image": "img_2"}, ctx)
        before.append(score(raw.meta["lines"], rec["text"]))
        after.append(score(corrected.meta["lines"], rec["text"]))
        assert len(corrected.meta["lines"]) == len(rec["text"])  # lines separated again
        assert after[-1] > 1.4, (corrected.meta["lines"], rec["text"])
    assert sum(after) > sum(before), (before, after)


def test_blank_image_has_no_text_and_bad_inputs_are_errors():
    r = run(OCR, {"image": "img_1"}, ToolContext(images=[Image.new("RGB", (200, 80), "white")]))
    assert r.ok and "no text found" in r.text and r.meta["blocks"] == []
    ctx = ToolContext(images=[Image.new("RGB", (50, 40))])
    r = run(OCR, {"image": "img_1", "box": [60, 0, 70, 10]}, ctx)
    assert r.error.kind.value == "bad_args" and "50x40" in r.error.message
    r = run(OCR, {"image": "img_4"}, ctx)
    assert r.error.kind.value == "bad_args" and "img_4" in r.error.message
    r = run(OCR, {"image": "img_1"}, ToolContext(images=[Image.new("RGB", (0, 5))]))
    assert r.error.kind.value == "bad_args" and "0x5" in r.error.message
    r = run(OCR, {"image": "img_1", "lang": "en"}, ctx)
    assert r.error.kind.value == "bad_args" and "lang" in r.error.message


def test_paddleocr_backend_without_models_is_a_clear_fatal_error(tmp_path):
    tool = ocr_tools(OCRConfig(backend="paddleocr"))[0]
    r = run(tool, {"image": "img_1"}, ToolContext(images=[Image.new("RGB", (60, 30), "white")]))
    assert r.error.kind.value == "fatal" and "paddle_det_model_dir" in r.error.message
    cfg = OCRConfig(backend="paddleocr", paddle_det_model_dir=str(tmp_path),
                    paddle_rec_model_dir=str(tmp_path))
    r = run(ocr_tools(cfg)[0], {"image": "img_1"}, ToolContext(images=[Image.new("RGB", (60, 30))]))
    try:
        import paddleocr  # noqa: F401
    except ImportError:
        assert r.error.kind.value == "fatal" and "pip install paddleocr" in r.error.message


@pytest.mark.parametrize("kw,needle", [({"backend": "tesseract"}, "tesseract"),
                                       ({"workers": 0}, "workers"),
                                       ({"det_limit_type": "avg"}, "avg"),
                                       ({"min_score": 1.5}, "1.5")])
def test_config_validation(kw, needle):
    with pytest.raises(ValueError, match=needle):
        OCRConfig(**kw)
