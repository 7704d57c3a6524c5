"""Crop, Sharpen, SuperResolution, PerspectiveCorrect on world images and on bad inputs."""
from __future__ import annotations

import asyncio
import io
import json

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from spyglass.engine.tools.base import ToolContext, get_tool
from spyglass.engine.tools.executor import ToolExecutor
from spyglass.engine.tools.imgutil import publish
from spyglass.engine.tools.visual import (VisualConfig, laplacian_variance, register_visual_tools,
                                          visual_tools)
from spyglass.engine.offline.world import ensure_world

TOOLS = {t.name: t for t in visual_tools()}


def call(name: str, args: dict, ctx: ToolContext, tools=TOOLS):
    """Tool.fn then publication into ctx, as ToolExecutor does for each caller."""
    return publish(ctx, asyncio.run(tools[name].fn(args, ctx)))


def ctx_of(*imgs: Image.Image) -> ToolContext:
    return ToolContext(images=list(imgs))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ensure_world(tmp_path_factory.getbasetemp() / "world-v1")


def _first(world, degradation: str) -> dict:
    return next(r for r in world.images if r["split"] == "corpus" and r["degradation"] == degradation)


def _grad(w: int = 64, h: int = 40) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.arange(w)[None, :] * 3 % 256
    a[..., 1] = np.arange(h)[:, None] * 5 % 256
    return Image.fromarray(a)


# ------------------------------------------------------------------------------------------ Crop

def test_crop_pixel_box_is_exact_and_published():
    img = _grad()
    ctx = ctx_of(img)
    r = call("Crop", {"image": "img_1", "box": [10, 5, 30, 25]}, ctx)
    assert r.ok and len(r.images) == 1 and r.images[0].size == (20, 20)
    assert np.array_equal(np.asarray(r.images[0]), np.asarray(img)[5:25, 10:30])
    assert len(ctx.images) == 2 and ctx.images[1] is r.images[0]
    assert r.meta["image_refs"] == ["img_2"] and "img_2: crop [10, 5, 30, 25]" in r.text


def test_crop_norm1000_several_boxes_and_clipping():
    ctx = ctx_of(_grad(640, 420))
    r = call("Crop", {"image": "img_1", "coords": "norm1000",
                      "box": [[0, 0, 500, 500], [500, 500, 1000, 1000], [900, 900, 1200, 1100]]}, ctx)
    assert r.ok, r.error
    assert [im.size for im in r.images] == [(320, 210), (320, 210), (64, 42)]
    assert r.meta["image_refs"] == ["img_2", "img_3", "img_4"]
    assert r.meta["boxes"][2] == (576, 378, 640, 420)  # clipped to the image


def test_crop_upscales_small_crops_to_min_side():
    r = call("Crop", {"image": "img_1", "box": [0, 0, 20, 10], "min_side": 100}, ctx_of(_grad()))
    assert r.ok and r.images[0].size == (200, 100) and "upscaled" in r.text
    cfg_tools = {t.name: t for t in visual_tools(VisualConfig(crop_min_side=50))}
    r = call("Crop", {"image": "img_1", "box": [0, 0, 10, 10]}, ctx_of(_grad()), cfg_tools)
    assert r.images[0].size == (50, 50)


@pytest.mark.parametrize("args,needle", [
    ({"box": [30, 5, 10, 25]}, "empty or inverted"),
    ({"box": [10, 10, 10, 20]}, "empty or inverted"),
    ({"box": [100, 100, 200, 200]}, "outside the image"),
    ({"box": [-50, 0, -1, 10]}, "outside the image"),
    ({"box": [1, 2, 3]}, "box must be"),
    ({"box": "0,0,5,5"}, "box must be"),
    ({"box": [0, 0, 5, float("nan")]}, "box must be"),
    ({"box": [[0, 0, 5, 5]] * 9}, "at most 8"),
    ({"box": [0, 0, 5, 5], "coords": "percent"}, "coords='percent'"),
    ({"box": [0, 0, 5, 5], "zoom": 2}, "unknown argument"),
    ({"box": [0, 0, 5, 5], "min_side": -1}, "min_side=-1"),
])
def test_crop_bad_boxes_are_bad_args_naming_box_and_size(args, needle):
    r = call("Crop", {"image": "img_1", **args}, ctx_of(_grad()))
    assert not r.ok and r.error.kind.value == "bad_args" and needle in r.error.message
    if "box" in needle or "outside" in needle or "inverted" in needle:
        assert "64x40" in r.error.message or "box must be" in r.error.message


@settings(max_examples=60, deadline=None)
@given(w=st.integers(1, 50), h=st.integers(1, 50),
       box=st.lists(st.floats(-80, 80, allow_nan=False), min_size=4, max_size=4),
       coords=st.sampled_from(["pixel", "norm1000"]))
def test_crop_never_raises_and_stays_in_bounds(w, h, box, coords):
    if coords == "norm1000":
        box = [v * 15 for v in box]
    ctx = ctx_of(Image.new("RGB", (w, h)))
    r = call("Crop", {"image": "img_1", "box": box, "coords": coords}, ctx)
    if r.ok:
        x1, y1, x2, y2 = r.meta["boxes"][0]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h and r.images[0].size == (x2 - x1, y2 - y1)
    else:
        assert r.error.kind.value == "bad_args" and f"{w}x{h}" in r.error.message


# ---------------------------------------------------------------------------------- bad images

def _truncated_png() -> Image.Image:
    buf = io.BytesIO()
    _grad(200, 200).save(buf, format="PNG")
    return Image.open(io.BytesIO(buf.getvalue()[:300]))  # lazily opened, cannot decode


@pytest.mark.parametrize("name,args", [("Crop", {"box": [0, 0, 5, 5]}), ("Sharpen", {}),
                                       ("SuperResolution", {}), ("PerspectiveCorrect", {})])
def test_bad_images_give_errors_not_exceptions(name, args):
    r = call(name, {"image": "img_1", **args}, ctx_of(_truncated_png()))
    assert r.error.kind.value == "fatal" and "img_1" in r.error.message and "decoded" in r.error.message
    r = call(name, {"image": "img_1", **args}, ctx_of(Image.new("RGB", (0, 0))))
    assert r.error.kind.value == "bad_args" and "empty (0x0)" in r.error.message
    r = call(name, {"image": "img_3", **args}, ctx_of(_grad()))
    assert r.error.kind.value == "bad_args" and "'img_3'" in r.error.message
    r = call(name, {"image": 7, **args}, ctx_of(_grad()))
    assert r.error.kind.value == "bad_args" and "7" in r.error.message
    r = call(name, {"image": "img_1", **args}, ToolContext(images=["not an image"]))
    assert r.error.kind.value == "fatal"


def test_huge_image_over_default_cap_is_bad_args():
    big = Image.new("L", (7000, 6000))  # 42 MP > 40 MP
    r = call("Sharpen", {"image": "img_1"}, ctx_of(big))
    assert r.error.kind.value == "bad_args" and "7000x6000" in r.error.message and "40.0 MP" in r.error.message


# --------------------------------------------------------------------------------------- Sharpen

def test_sharpen_increases_laplacian_variance_on_blurred_world_image(world):
    rec = _first(world, "blur")
    img = world.load_image(rec["id"])
    r = call("Sharpen", {"image": "img_1"}, ctx_of(img))
    assert r.ok and r.images[0].size == img.size and "amount=1.5" in r.text
    assert laplacian_variance(r.images[0]) > 1.5 * laplacian_variance(img)
    r0 = call("Sharpen", {"image": "img_1", "amount": 0}, ctx_of(img))
    assert np.array_equal(np.asarray(r0.images[0]), np.asarray(img))


def test_sharpen_is_the_unsharp_mask_formula():
    img = _grad(50, 30)
    r = call("Sharpen", {"image": "img_1", "amount": 0.7, "sigma": 2.0}, ctx_of(img))
    f = np.asarray(img, np.float64)
    k = cv2.getGaussianKernel(int(2 * round(4 * 2.0) + 1), 2.0)  # separable 1-D Gaussian
    blur = cv2.sepFilter2D(f, -1, k, k, borderType=cv2.BORDER_REFLECT_101)
    want = np.clip(1.7 * f - 0.7 * blur, 0, 255)
    assert np.abs(np.asarray(r.images[0], np.float64) - want).max() <= 1.01
    bad = call("Sharpen", {"image": "img_1", "sigma": 0}, ctx_of(img))
    assert bad.error.kind.value == "bad_args" and "sigma=0" in bad.error.message


# ------------------------------------------------------------------------------- SuperResolution

def test_super_resolution_is_sharper_than_plain_resizing(world):
    rec = _first(world, "lowres")
    img = world.load_image(rec["id"])
    r = call("SuperResolution", {"image": "img_1", "scale": 3}, ctx_of(img))
    assert r.ok and r.images[0].size == (img.size[0] * 3, img.size[1] * 3)
    assert "classical Lanczos" in r.text
    a = np.asarray(img)
    size = r.images[0].size
    for interp in (cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_LANCZOS4):
        plain = cv2.resize(a, size, interpolation=interp)
        assert laplacian_variance(r.images[0]) > 1.5 * laplacian_variance(plain)


def test_super_resolution_reports_missing_learned_model_and_caps_output(tmp_path):
    model = tmp_path / "FSRCNN_x2.pb"
    tools = {t.name: t for t in visual_tools(VisualConfig(sr_model_path=str(model),
                                                          max_output_pixels=10_000))}
    r = call("SuperResolution", {"image": "img_1", "scale": 4}, ctx_of(_grad(40, 25)), tools)
    assert r.ok and "learned model not used" in r.text
    assert ("dnn_superres is absent" in r.text) or ("does not exist" in r.text)
    w, h = r.images[0].size
    assert w * h <= 10_000 and "scale reduced from 4" in r.text
    r = call("SuperResolution", {"image": "img_1"}, ctx_of(_grad(100, 100)), tools)
    assert r.error.kind.value == "bad_args" and "output cap" in r.error.message
    r = call("SuperResolution", {"image": "img_1", "scale": 9}, ctx_of(_grad()))
    assert r.error.kind.value == "bad_args" and "scale=9" in r.error.message


# ---------------------------------------------------------------------------- PerspectiveCorrect

def test_perspective_correct_recovers_the_board_shape(world):
    recs = [r for r in world.images if r["degradation"] == "perspective"][:3]
    for rec in recs:
        img = world.load_image(rec["id"])
        r = call("PerspectiveCorrect", {"image": "img_1"}, ctx_of(img))
        assert r.ok and r.meta["found"], rec["id"]
        w, h = r.images[0].size
        assert 2.0 < w / h < 3.6, (rec["id"], w, h)  # boards are ~0.77W x 0.46H of 640x420
        x1, y1, x2, y2 = rec["regions"][0]["box"]
        xs = [c[0] for c in r.meta["corners"]]
        ys = [c[1] for c in r.meta["corners"]]
        qx1, qx2, qy1, qy2 = min(xs), max(xs), min(ys), max(ys)
        inter = max(0, min(x2, qx2) - max(x1, qx1)) * max(0, min(y2, qy2) - max(y1, qy1))
        union = (x2 - x1) * (y2 - y1) + (qx2 - qx1) * (qy2 - qy1) - inter
        assert inter / union > 0.85, (rec["id"], r.meta["corners"], rec["regions"][0]["box"])


def test_perspective_correct_without_quadrilateral_is_a_normal_observation():
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8))
    for img in (noise, Image.new("RGB", (80, 60), (200, 10, 10))):
        r = call("PerspectiveCorrect", {"image": "img_1"}, ctx_of(img))
        assert r.ok and not r.images and "No quadrilateral found" in r.text


# ----------------------------------------------------------------------- batching, registration

def test_batch_fn_runs_calls_in_order_and_publishes_per_context():
    tool = TOOLS["Crop"]
    c1, c2 = ctx_of(_grad()), ctx_of(_grad(), _grad())
    calls = [({"image": "img_1", "box": [0, 0, 4, 4]}, c1), ({"image": "img_2", "box": [0, 0, 9, 9]}, c2),
             ({"image": "img_1", "box": [5, 5, 1, 1]}, c1), ({"image": "img_1", "box": [0, 0, 2, 2]}, c1)]
    res = asyncio.run(tool.batch_fn(calls))
    assert all("image_refs" not in r.meta for r in res)  # unpublished until the caller publishes
    res = [publish(c, r) for (_, c), r in zip(calls, res)]
    assert [r.ok for r in res] == [True, True, False, True]
    assert res[0].meta["image_refs"] == ["img_2"] and res[3].meta["image_refs"] == ["img_3"]
    assert res[1].meta["image_refs"] == ["img_3"] and res[1].images[0].size == (9, 9)


def test_schemas_and_registration():
    tools = register_visual_tools(replace=True)
    assert [t.name for t in tools] == ["Crop", "Sharpen", "SuperResolution", "PerspectiveCorrect"]
    for t in tools:
        assert get_tool(t.name) is t and t.image_args == ("image",) and t.cacheable
        json.dumps(t.schema())
        assert t.parameters["required"][0] == "image"


@pytest.mark.parametrize("kw,needle", [({"max_input_pixels": 0}, "max_input_pixels"),
                                       ({"default_coords": "px"}, "'px'"),
                                       ({"sharpen_sigma": 0.0}, "sharpen_sigma"),
                                       ({"sr_default_scale": 6.0}, "sr_default_scale"),
                                       ({"sr_model_path": "model.pb"}, "EDSR_x4.pb"),
                                       ({"persp_canny_low": 200}, "200/150")])
def test_config_validation(kw, needle):
    with pytest.raises(ValueError, match=needle):
        VisualConfig(**kw)


def test_executor_names_shared_results_per_caller():
    """Identical crops from two trajectories run once; each caller gets its own img_N."""
    ex = ToolExecutor({"Crop": TOOLS["Crop"]})
    img = _grad()
    c1, c2 = ctx_of(img), ctx_of(_grad(10, 10), _grad(12, 12), img)

    async def both():
        args1 = json.dumps({"image": "img_1", "box": [0, 0, 8, 8]})
        args3 = json.dumps({"image": "img_3", "box": [0, 0, 8, 8]})
        return await asyncio.gather(ex.execute("Crop", args1, c1), ex.execute("Crop", args3, c2))
    r1, r2 = asyncio.run(both())
    assert r1.meta["image_refs"] == ["img_2"] and r2.meta["image_refs"] == ["img_4"]
    assert "img_2: crop [0, 0, 8, 8] (pixels) of img_1" in r1.text and "img_4: crop" in r2.text
    assert len(c1.images) == 2 and len(c2.images) == 4
