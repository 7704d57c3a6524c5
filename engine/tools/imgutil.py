"""Shared plumbing for the image tools (visual, OCR, image search): checked arguments, checked
images, box parsing, image publication and exception guarding.

Every check raises ToolError(bad_args | fatal) with the offending value in the message; the
`guard` wrapper turns anything that escapes a tool core into a fatal ToolResult, so no
exception ever leaves a tool. Not a tool itself; imported by visual.py, ocr.py, image_search.py.

Image publication: a tool core returns its new images in ToolResult.images and one caption per
image in meta["captions"], unpublished. The caller publishes them into *its* trajectory's
context with `publish` (on the event loop): ToolExecutor does this per caller, so cached and
coalesced image results name the right img_N everywhere; code that calls Tool.fn directly calls
`publish(ctx, result)` itself. `publish` appends the images to ctx.images, writes
"img_N: caption" lines into the text and records the names in meta["image_refs"].
"""
from __future__ import annotations

import asyncio
import math
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from .base import ErrorKind, ToolContext, ToolError, ToolResult

Core = Callable[[dict[str, Any], ToolContext], ToolResult]


def bad(message: str, tool: str = "") -> ToolError:
    return ToolError(ErrorKind.BAD_ARGS, message, tool)


def check_keys(args: Any, allowed: Sequence[str], required: Sequence[str], tool: str) -> None:
    """Arguments must be an object with only `allowed` keys and all `required` keys."""
    if not isinstance(args, dict):
        raise bad(f"{tool}: arguments must be a JSON object, got {type(args).__name__}", tool)
    extra = sorted(set(args) - set(allowed))
    if extra:
        raise bad(f"{tool}: unknown argument(s) {extra}; expected {list(allowed)}", tool)
    missing = [k for k in required if k not in args]
    if missing:
        raise bad(f"{tool}: missing required argument(s) {missing}", tool)


def get_number(args: dict[str, Any], key: str, default: float, lo: float, hi: float,
               tool: str, *, lo_open: bool = False) -> float:
    """A finite number in [lo, hi] (or (lo, hi] when lo_open); bools are not numbers."""
    v = args.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(f"{tool}: {key} must be a finite number, got {v!r}", tool)
    if v > hi or v < lo or (lo_open and v == lo):
        span = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise bad(f"{tool}: {key}={v!r} is outside {span}", tool)
    return float(v)


def get_int(args: dict[str, Any], key: str, default: int, lo: int, hi: int, tool: str) -> int:
    v = args.get(key, default)
    if v is None:
        v = default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"{tool}: {key} must be an integer, got {v!r}", tool)
    if not lo <= v <= hi:
        raise bad(f"{tool}: {key}={v!r} is outside [{lo}, {hi}]", tool)
    return v


def get_enum(args: dict[str, Any], key: str, default: str, choices: Sequence[str],
             tool: str) -> str:
    v = args.get(key, default)
    if v is None:
        v = default
    if v not in choices:
        raise bad(f"{tool}: {key}={v!r} is not one of {list(choices)}", tool)
    return str(v)


def checked_image(ctx: ToolContext, ref: Any, max_pixels: int, tool: str) -> Image.Image:
    """Resolve `ref` and check the image: not empty, under the pixel cap, decodable."""
    if not isinstance(ref, str):
        raise bad(f"{tool}: image must be a reference like 'img_1', got {ref!r}", tool)
    try:
        img = ctx.resolve_image(ref)
    except ToolError as e:
        raise ToolError(e.kind, f"{tool}: {e.message}", tool) from None
    if not isinstance(img, Image.Image):
        raise ToolError(ErrorKind.FATAL, f"{tool}: {ref} is not an image (a "
                        f"{type(img).__name__} is in the context)", tool)
    w, h = img.size
    if w < 1 or h < 1:
        raise bad(f"{tool}: image {ref} is empty ({w}x{h})", tool)
    if w * h > max_pixels:
        raise bad(f"{tool}: image {ref} is {w}x{h} = {w * h / 1e6:.1f} MP, over the "
                  f"{max_pixels / 1e6:.1f} MP cap; crop it first", tool)
    try:
        img.load()
    except Exception as e:  # truncated/corrupt file behind a lazily opened image
        raise ToolError(ErrorKind.FATAL, f"{tool}: image {ref} ({w}x{h}) could not be "
                        f"decoded: {type(e).__name__}: {e}", tool) from None
    return img


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """PIL image of any mode -> RGB uint8 array [H, W, 3] (alpha composited on white)."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    elif img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img, dtype=np.float64)  # [H, W]
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.astype(np.uint8), "L")
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))  # [H, W, 3]


def _as_box(v: Any) -> list[float] | None:
    if (isinstance(v, (list, tuple)) and len(v) == 4
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            and all(math.isfinite(x) for x in v)):
        return [float(x) for x in v]
    return None


def parse_boxes(value: Any, coords: str, size: tuple[int, int], ref: str, tool: str,
                max_boxes: int) -> list[tuple[int, int, int, int]]:
    """One box [x1,y1,x2,y2] or a list of them -> pixel boxes clipped to the image.

    coords="pixel": pixel coordinates; coords="norm1000": 0..1000 relative to width/height
    (Qwen-VL / Vision-DeepResearch grounding). Fractional edges round outward. A box that is
    inverted, empty, or entirely outside the image is a bad_args error naming it and the size.
    """
    single = _as_box(value)
    if single is not None:
        boxes = [single]
    elif isinstance(value, (list, tuple)) and value and all(_as_box(b) for b in value):
        boxes = [_as_box(b) for b in value]  # type: ignore[misc]
    else:
        raise bad(f"{tool}: box must be [x1, y1, x2, y2] or a list of such boxes, "
                  f"got {value!r}", tool)
    if len(boxes) > max_boxes:
        raise bad(f"{tool}: {len(boxes)} boxes given, at most {max_boxes} per call", tool)
    w, h = size
    out = []
    for b in boxes:
        x1, y1, x2, y2 = b
        if coords == "norm1000":
            x1, x2, y1, y2 = x1 * w / 1000, x2 * w / 1000, y1 * h / 1000, y2 * h / 1000
        where = f"box {[_fmt(v) for v in b]} ({coords}) on image {ref} of size {w}x{h}"
        if x2 <= x1 or y2 <= y1:
            raise bad(f"{tool}: {where} is empty or inverted (need x1 < x2 and y1 < y2)", tool)
        cx1, cy1 = max(0, math.floor(x1)), max(0, math.floor(y1))
        cx2, cy2 = min(w, math.ceil(x2)), min(h, math.ceil(y2))
        if cx2 <= cx1 or cy2 <= cy1:
            raise bad(f"{tool}: {where} lies outside the image", tool)
        out.append((cx1, cy1, cx2, cy2))
    return out


def _fmt(v: float) -> int | float:
    return int(v) if float(v).is_integer() else round(v, 2)


def publish(ctx: ToolContext, res: ToolResult) -> ToolResult:
    """Append res.images to the context, naming them; put 'img_N: caption' lines in the text."""
    if not res.ok or not res.images:
        return res
    captions = res.meta.pop("captions", None) or [""] * len(res.images)
    refs = []
    lines = [res.text] if res.text else []
    for img, cap in zip(res.images, captions):
        ctx.images.append(img)
        ref = f"img_{len(ctx.images)}"
        refs.append(ref)
        lines.append(f"{ref}: {cap}" if cap else ref)
    res.meta["image_refs"] = refs
    res.text = "\n".join(lines)
    return res


def run_guarded(core: Core, args: dict[str, Any], ctx: ToolContext, tool: str) -> ToolResult:
    """Run a sync tool core; ToolErrors become error results, anything else a fatal one."""
    try:
        return core(args, ctx)
    except ToolError as e:
        return ToolResult(error=ToolError(e.kind, e.message, e.tool or tool))
    except MemoryError:
        return ToolResult.fail(ErrorKind.FATAL, f"{tool}: out of memory", tool)
    except Exception as e:  # a crash inside OpenCV/ONNX etc.: the tool could not run
        return ToolResult.fail(ErrorKind.FATAL, f"{tool} failed: {type(e).__name__}: {e}", tool)


def make_async(core: Core, tool: str) -> tuple[Callable, Callable]:
    """(fn, batch_fn) for a sync core: the core runs in a worker thread (one hop per batch).
    Results come back unpublished (see the module docstring)."""

    async def fn(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        return await asyncio.to_thread(run_guarded, core, args, ctx, tool)

    async def batch_fn(calls: list[tuple[dict[str, Any], ToolContext]]) -> list[ToolResult]:
        def work() -> list[ToolResult]:
            return [run_guarded(core, a, c, tool) for a, c in calls]
        return await asyncio.to_thread(work)

    return fn, batch_fn
