"""Visual tools: Crop, Sharpen, SuperResolution, PerspectiveCorrect (OpenCV + Pillow).

    from spyglass.engine.tools.visual import VisualConfig, visual_tools, register_visual_tools
    register_visual_tools(VisualConfig(default_coords="norm1000"))   # adds the four to base's registry

Nothing registers at import: `visual_tools(cfg)` builds the Tool objects, `register_visual_tools`
puts them in the registry. Every tool takes `image` as an img_N reference (Tool.image_args) and
runs its work in a worker thread (a batch runs in one thread hop). Output images come back in
ToolResult.images with captions in meta["captions"], unpublished: ToolExecutor (or
imgutil.publish for direct callers) appends them to the caller's context and names them in the
observation ("img_3: crop [..] of img_1, 240x180"), so results stay cacheable. Bad input (unknown
ref, empty or > max_input_pixels image, bad box/number) is a bad_args result naming the value;
an undecodable image or a crash inside OpenCV is a fatal result. Nothing raises.

Tools (arguments; defaults come from VisualConfig):
  Crop(image, box, coords="pixel"|"norm1000", min_side)  box = [x1,y1,x2,y2] or a list of boxes;
      norm1000 is the 0..1000 relative grid of Qwen-VL / Vision-DeepResearch. Boxes partly
      outside are clipped; empty/inverted/outside boxes are errors. Crops whose shorter side is
      under min_side are upscaled (Lanczos) to it. One new image per box.
  Sharpen(image, amount=1.5, sigma=1.0)  unsharp mask (1+a)*I - a*G_sigma*I.
  SuperResolution(image, scale=2)  OpenCV dnn_superres (EDSR/ESPCN/FSRCNN/LapSRN .pb at
      VisualConfig.sr_model_path, needs opencv-contrib) when present and the scale matches the
      model; otherwise the classical upscaler: Lanczos-4 resize, then an edge-aware unsharp mask
      (detail boosted in proportion to local gradient strength, flat regions left alone, so noise
      is not amplified). The observation says which ran and why. Output capped at
      max_output_pixels (the scale is reduced to fit, and the observation says so).
  PerspectiveCorrect(image)  Canny -> dilate -> contours -> the largest convex quadrilateral
      (approxPolyDP) covering >= persp_min_area_frac of the image -> four-point warp. When none
      is found it says so in a normal (non-error) observation.
"""
from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from .base import Tool, ToolContext, ToolResult, register
from .imgutil import (bad, check_keys, checked_image, get_enum, get_int, get_number,
                      make_async, parse_boxes, to_rgb_array)

COORDS = ("pixel", "norm1000")
_SR_NAME = re.compile(r"(edsr|espcn|fsrcnn|lapsrn)[_-]?x(\d)", re.IGNORECASE)


@dataclass
class VisualConfig:
    """Limits and defaults of the visual tools (validated on construction)."""

    max_input_pixels: int = 40_000_000     # larger inputs are bad_args
    max_output_pixels: int = 16_000_000    # cap on any produced image
    default_coords: str = "pixel"          # Crop's coords when the call gives none
    max_boxes: int = 8                     # boxes per Crop call
    crop_min_side: int = 0                 # default upscale target for small crops (0 = off)
    sharpen_amount: float = 1.5
    sharpen_sigma: float = 1.0
    sr_default_scale: float = 2.0
    sr_max_scale: float = 4.0
    sr_model_path: str | None = None       # e.g. ".../FSRCNN_x2.pb" (opencv-contrib only)
    sr_edge_amount: float = 1.2            # strength of the classical edge-aware sharpening
    persp_min_area_frac: float = 0.05      # smallest quadrilateral, as a fraction of the image
    persp_canny_low: int = 50
    persp_canny_high: int = 150

    def __post_init__(self) -> None:
        if not 1 <= self.max_input_pixels <= 10**9:
            raise ValueError(f"max_input_pixels must be in [1, 1e9], got {self.max_input_pixels!r}")
        if not 1 <= self.max_output_pixels <= 10**9:
            raise ValueError(f"max_output_pixels must be in [1, 1e9], got {self.max_output_pixels!r}")
        if self.default_coords not in COORDS:
            raise ValueError(f"default_coords must be one of {COORDS}, got {self.default_coords!r}")
        if not 1 <= self.max_boxes <= 64:
            raise ValueError(f"max_boxes must be in [1, 64], got {self.max_boxes!r}")
        if not 0 <= self.crop_min_side <= 4096:
            raise ValueError(f"crop_min_side must be in [0, 4096], got {self.crop_min_side!r}")
        if not 0 <= self.sharpen_amount <= 10:
            raise ValueError(f"sharpen_amount must be in [0, 10], got {self.sharpen_amount!r}")
        if not 0 < self.sharpen_sigma <= 20:
            raise ValueError(f"sharpen_sigma must be in (0, 20], got {self.sharpen_sigma!r}")
        if not 1 < self.sr_max_scale <= 8:
            raise ValueError(f"sr_max_scale must be in (1, 8], got {self.sr_max_scale!r}")
        if not 1 < self.sr_default_scale <= self.sr_max_scale:
            raise ValueError(f"sr_default_scale must be in (1, sr_max_scale={self.sr_max_scale}],"
                             f" got {self.sr_default_scale!r}")
        if self.sr_model_path is not None and not _SR_NAME.search(Path(self.sr_model_path).name):
            raise ValueError(f"sr_model_path {self.sr_model_path!r}: file name must name the model "
                             "and scale, like EDSR_x4.pb, ESPCN_x2.pb, FSRCNN_x3.pb, LapSRN_x8.pb")
        if not 0 <= self.sr_edge_amount <= 5:
            raise ValueError(f"sr_edge_amount must be in [0, 5], got {self.sr_edge_amount!r}")
        if not 0 < self.persp_min_area_frac < 1:
            raise ValueError(f"persp_min_area_frac must be in (0, 1), got {self.persp_min_area_frac!r}")
        if not 0 <= self.persp_canny_low < self.persp_canny_high <= 1000:
            raise ValueError(f"persp_canny_low/high must satisfy 0 <= low < high <= 1000, got "
                             f"{self.persp_canny_low!r}/{self.persp_canny_high!r}")


def laplacian_variance(img: Image.Image | np.ndarray) -> float:
    """Sharpness measure: variance of the Laplacian of the grey image (higher = sharper)."""
    a = to_rgb_array(img) if isinstance(img, Image.Image) else img
    gray = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY) if a.ndim == 3 else a
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


# ---------------------------------------------------------------------------------------- Crop

def _crop_core(cfg: VisualConfig):
    name = "Crop"

    def core(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        check_keys(args, ("image", "box", "coords", "min_side"), ("image", "box"), name)
        ref = args["image"]
        img = checked_image(ctx, ref, cfg.max_input_pixels, name)
        coords = get_enum(args, "coords", cfg.default_coords, COORDS, name)
        min_side = get_int(args, "min_side", cfg.crop_min_side, 0, 4096, name)
        boxes = parse_boxes(args["box"], coords, img.size, ref, name, cfg.max_boxes)
        out, caps = [], []
        for box in boxes:
            c = img.crop(box)
            if c.mode not in ("RGB", "L"):
                c = Image.fromarray(to_rgb_array(c))
            w, h = c.size
            cap = f"crop {list(box)} (pixels) of {ref}, {w}x{h}"
            s = min_side / min(w, h) if min_side else 1.0
            s = min(s, math.sqrt(cfg.max_output_pixels / (w * h)))
            if s > 1.0:
                nw, nh = max(1, round(w * s)), max(1, round(h * s))
                c = c.resize((nw, nh), Image.Resampling.LANCZOS)
                cap += f", upscaled x{s:.2f} to {nw}x{nh}"
            out.append(c)
            caps.append(cap)
        text = f"Cropped {len(out)} region(s) from {ref} ({img.size[0]}x{img.size[1]}):"
        return ToolResult(text=text, images=out, meta={"captions": caps, "boxes": boxes})

    return core


# ------------------------------------------------------------------------------------- Sharpen

def unsharp_mask(rgb: np.ndarray, amount: float, sigma: float) -> np.ndarray:
    """(1+a)*I - a*G_sigma*I on uint8 [H, W, 3] -> uint8 [H, W, 3] (clipped)."""
    blur = cv2.GaussianBlur(rgb, (0, 0), sigmaX=sigma, sigmaY=sigma)
    return cv2.addWeighted(rgb, 1.0 + amount, blur, -amount, 0.0)  # saturating, rounded


def _sharpen_core(cfg: VisualConfig):
    name = "Sharpen"

    def core(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        check_keys(args, ("image", "amount", "sigma"), ("image",), name)
        ref = args["image"]
        img = checked_image(ctx, ref, cfg.max_input_pixels, name)
        amount = get_number(args, "amount", cfg.sharpen_amount, 0.0, 10.0, name)
        sigma = get_number(args, "sigma", cfg.sharpen_sigma, 0.0, 20.0, name, lo_open=True)
        out = Image.fromarray(unsharp_mask(to_rgb_array(img), amount, sigma))
        cap = f"{ref} sharpened (unsharp mask, amount={amount:g}, sigma={sigma:g}), {out.size[0]}x{out.size[1]}"
        return ToolResult(text="Sharpened:", images=[out], meta={"captions": [cap]})

    return core


# ----------------------------------------------------------------------------- SuperResolution

def classical_upscale(rgb: np.ndarray, scale: float, edge_amount: float) -> np.ndarray:
    """Lanczos-4 resize, then unsharp detail weighted by normalised gradient strength.

    rgb: uint8 [H, W, 3] -> uint8 [round(H*scale), round(W*scale), 3].
    """
    h, w = rgb.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    up = cv2.resize(rgb, size, interpolation=cv2.INTER_LANCZOS4).astype(np.float32)
    sigma = max(1.0, 0.5 * scale)
    blur = cv2.GaussianBlur(up, (0, 0), sigmaX=sigma, sigmaY=sigma)
    gray = cv2.cvtColor(blur, cv2.COLOR_RGB2GRAY)
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    mag = cv2.magnitude(gx, gy)  # [H', W']
    ref = float(np.percentile(mag, 95)) if mag.size else 0.0
    weight = np.clip(mag / ref, 0.0, 1.0) if ref > 1e-6 else np.zeros_like(mag)
    weight = cv2.GaussianBlur(weight, (0, 0), sigmaX=sigma)[..., None]  # [H', W', 1]
    out = up + edge_amount * (1.0 + scale / 2) * weight * (up - blur)
    return np.clip(out, 0, 255).round().astype(np.uint8)


class _LearnedSR:
    """OpenCV dnn_superres model loaded once, lazily; upsample calls serialised."""

    def __init__(self, path: str) -> None:
        m = _SR_NAME.search(Path(path).name)
        assert m is not None  # checked by VisualConfig
        self.path, self.algo, self.scale = path, m.group(1).lower(), int(m.group(2))
        self._impl: Any = None
        self._lock = threading.Lock()

    def unavailable(self) -> str | None:
        """Why the learned model cannot run, or None if it can."""
        if not hasattr(cv2, "dnn_superres"):
            return ("cv2.dnn_superres is absent from this OpenCV build (install "
                    "opencv-contrib-python-headless instead of opencv-python-headless)")
        if not Path(self.path).is_file():
            return f"model file {self.path!r} does not exist"
        return None

    def upsample(self, rgb: np.ndarray) -> np.ndarray:
        with self._lock:
            if self._impl is None:
                impl = cv2.dnn_superres.DnnSuperResImpl_create()
                impl.readModel(self.path)
                impl.setModel(self.algo, self.scale)
                self._impl = impl
            bgr = self._impl.upsample(np.ascontiguousarray(rgb[:, :, ::-1]))
        return np.ascontiguousarray(bgr[:, :, ::-1])


def _sr_core(cfg: VisualConfig):
    name = "SuperResolution"
    learned = _LearnedSR(cfg.sr_model_path) if cfg.sr_model_path else None

    def core(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        check_keys(args, ("image", "scale"), ("image",), name)
        ref = args["image"]
        img = checked_image(ctx, ref, cfg.max_input_pixels, name)
        scale = get_number(args, "scale", cfg.sr_default_scale, 1.0, cfg.sr_max_scale, name,
                           lo_open=True)
        w, h = img.size
        cap_scale = math.sqrt(cfg.max_output_pixels / (w * h))
        notes = []
        if scale > cap_scale:
            if cap_scale < 1.05:
                raise bad(f"{name}: {ref} is {w}x{h}; upscaling it at all would exceed the "
                          f"{cfg.max_output_pixels / 1e6:.1f} MP output cap; crop it first", name)
            notes.append(f"scale reduced from {scale:g} to {cap_scale:.2f} to stay under the "
                         f"{cfg.max_output_pixels / 1e6:.1f} MP output cap")
            scale = cap_scale
        rgb = to_rgb_array(img)
        method = None
        if learned is not None:
            why = learned.unavailable()
            if why is None and abs(scale - learned.scale) > 1e-6:
                why = f"the model is x{learned.scale} and x{scale:g} was asked"
            if why is None:
                out, method = learned.upsample(rgb), f"learned {learned.algo.upper()} x{learned.scale}"
            else:
                notes.append(f"learned model not used: {why}")
        if method is None:
            out = classical_upscale(rgb, scale, cfg.sr_edge_amount)
            method = f"classical Lanczos x{scale:.2f} + edge-aware sharpening"
        res = Image.fromarray(out)
        text = f"Super-resolution ({method}) of {ref} ({w}x{h})."
        if notes:
            text += " Note: " + "; ".join(notes) + "."
        cap = f"{ref} upscaled to {res.size[0]}x{res.size[1]} ({method})"
        return ToolResult(text=text, images=[res], meta={"captions": [cap], "method": method})

    return core


# -------------------------------------------------------------------------- PerspectiveCorrect

def order_corners(pts: np.ndarray) -> np.ndarray:
    """4 points [4, 2] -> [4, 2] ordered top-left, top-right, bottom-right, bottom-left."""
    c = pts.mean(axis=0)
    ang = np.arctan2(pts[:, 1] - c[1], pts[:, 0] - c[0])
    p = pts[np.argsort(ang)]  # clockwise in image coordinates, starting anywhere
    start = int(np.argmin(p.sum(axis=1)))  # top-left has the smallest x + y
    return np.roll(p, -start, axis=0).astype(np.float32)


def _hugs_frame(pts: np.ndarray, w: int, h: int) -> bool:
    """Every corner of pts [4, 2] lies within 10% of the image border."""
    mx, my = 0.1 * w, 0.1 * h
    return all(min(x, w - 1 - x) <= mx and min(y, h - 1 - y) <= my for x, y in pts)


def find_quadrilateral(rgb: np.ndarray, cfg: VisualConfig) -> np.ndarray | None:
    """The largest convex 4-gon in the edge map, as ordered corners [4, 2], or None."""
    h, w = rgb.shape[:2]
    gray = cv2.GaussianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), (5, 5), 0)
    edges = cv2.Canny(gray, cfg.persp_canny_low, cfg.persp_canny_high)
    edges = cv2.dilate(edges, np.ones((3, 3), np.uint8), iterations=1)
    contours, _ = cv2.findContours(edges, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    best, best_area = None, cfg.persp_min_area_frac * w * h
    for c in sorted(contours, key=cv2.contourArea, reverse=True)[:50]:
        area = cv2.contourArea(c)
        if area < best_area:
            break
        approx = cv2.approxPolyDP(c, 0.02 * cv2.arcLength(c, True), True)
        if len(approx) != 4 or not cv2.isContourConvex(approx):
            continue
        if area > 0.9 * w * h and _hugs_frame(approx.reshape(4, 2), w, h):
            continue  # the image frame itself (or edge clutter filling it): nothing to correct
        best, best_area = approx.reshape(4, 2).astype(np.float32), area
        break
    return None if best is None else order_corners(best)


def warp_quad(rgb: np.ndarray, quad: np.ndarray, max_pixels: int) -> np.ndarray:
    """Four-point warp of the ordered quad [4, 2] to an upright rectangle."""
    tl, tr, br, bl = quad
    wd = max(np.linalg.norm(tr - tl), np.linalg.norm(br - bl))
    ht = max(np.linalg.norm(bl - tl), np.linalg.norm(br - tr))
    s = min(1.0, math.sqrt(max_pixels / max(1.0, wd * ht)))
    wd, ht = max(1, round(wd * s)), max(1, round(ht * s))
    dst = np.array([[0, 0], [wd - 1, 0], [wd - 1, ht - 1], [0, ht - 1]], np.float32)
    m = cv2.getPerspectiveTransform(quad, dst)
    return cv2.warpPerspective(rgb, m, (wd, ht), flags=cv2.INTER_CUBIC,
                               borderMode=cv2.BORDER_REPLICATE)


def _persp_core(cfg: VisualConfig):
    name = "PerspectiveCorrect"

    def core(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        check_keys(args, ("image",), ("image",), name)
        ref = args["image"]
        img = checked_image(ctx, ref, cfg.max_input_pixels, name)
        rgb = to_rgb_array(img)
        quad = find_quadrilateral(rgb, cfg)
        if quad is None:
            return ToolResult(
                text=f"No quadrilateral found in {ref} ({img.size[0]}x{img.size[1]}): no convex "
                     f"4-sided outline covering at least {cfg.persp_min_area_frac:.0%} of the "
                     "image; nothing to correct. Try Crop on the region of interest first.",
                meta={"found": False})
        out = Image.fromarray(warp_quad(rgb, quad, cfg.max_output_pixels))
        frac = cv2.contourArea(quad) / (img.size[0] * img.size[1])
        corners = [[round(float(x)), round(float(y))] for x, y in quad]
        text = (f"Found a quadrilateral in {ref} with corners {corners} (TL, TR, BR, BL; "
                f"{frac:.0%} of the image) and warped it to an upright rectangle.")
        cap = f"{ref} perspective-corrected, {out.size[0]}x{out.size[1]}"
        return ToolResult(text=text, images=[out],
                          meta={"captions": [cap], "found": True, "corners": corners})

    return core


# -------------------------------------------------------------------------------- tool objects

_IMAGE = {"type": "string", "description": "image reference, e.g. 'img_1'"}
_BOX = {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4}


def visual_tools(cfg: VisualConfig | None = None) -> list[Tool]:
    """Build Crop, Sharpen, SuperResolution and PerspectiveCorrect for `cfg`."""
    cfg = cfg or VisualConfig()
    specs = [
        ("Crop", _crop_core(cfg),
         "Crop one or more regions of an image; each crop becomes a new image. Boxes are "
         f"[x1, y1, x2, y2]; coords 'pixel' (default {cfg.default_coords!r}) or 'norm1000' "
         "(0..1000 relative to width and height). Small crops can be upscaled to min_side.",
         {"image": _IMAGE,
          "box": {"description": "[x1, y1, x2, y2] or a list of such boxes",
                  "anyOf": [_BOX, {"type": "array", "items": _BOX, "minItems": 1,
                                   "maxItems": cfg.max_boxes}]},
          "coords": {"type": "string", "enum": list(COORDS), "default": cfg.default_coords},
          "min_side": {"type": "integer", "minimum": 0, "maximum": 4096,
                       "default": cfg.crop_min_side,
                       "description": "upscale crops whose shorter side is below this (0 = never)"}},
         ["image", "box"]),
        ("Sharpen", _sharpen_core(cfg),
         "Sharpen an image with an unsharp mask (1+amount)*I - amount*blur_sigma(I).",
         {"image": _IMAGE,
          "amount": {"type": "number", "minimum": 0, "maximum": 10, "default": cfg.sharpen_amount},
          "sigma": {"type": "number", "exclusiveMinimum": 0, "maximum": 20,
                    "default": cfg.sharpen_sigma}},
         ["image"]),
        ("SuperResolution", _sr_core(cfg),
         "Upscale an image by `scale` with super-resolution (a learned model when configured, "
         "otherwise Lanczos plus edge-aware sharpening); use it on small or low-resolution text.",
         {"image": _IMAGE,
          "scale": {"type": "number", "exclusiveMinimum": 1, "maximum": cfg.sr_max_scale,
                    "default": cfg.sr_default_scale}},
         ["image"]),
        ("PerspectiveCorrect", _persp_core(cfg),
         "Find the largest four-sided outline (a sign, page or screen seen at an angle) and warp "
         "it to a frontal, upright rectangle.",
         {"image": _IMAGE}, ["image"]),
    ]
    tools = []
    for tname, core, desc, props, required in specs:
        fn, batch_fn = make_async(core, tname)
        tools.append(Tool(name=tname, description=desc,
                          parameters={"type": "object", "properties": props,
                                      "required": required, "additionalProperties": False},
                          fn=fn, batch_fn=batch_fn, image_args=("image",), timeout_s=30.0,
                          max_concurrency=4, retries=0))
    return tools


def register_visual_tools(cfg: VisualConfig | None = None, *, replace: bool = False) -> list[Tool]:
    """Build the visual tools and add them to the global registry."""
    return [register(t, replace=replace) for t in visual_tools(cfg)]
