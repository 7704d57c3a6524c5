"""OCR tool: text blocks with boxes in reading order, from PaddleOCR's PP-OCR models.

    from spyglass.engine.tools.ocr import OCRConfig, ocr_tools, register_ocr_tools
    register_ocr_tools(OCRConfig(workers=2))

Backends (OCRConfig.backend):
  rapidocr   (default) `rapidocr` 3.x runs PP-OCR detection/recognition/classification models
             shipped as ONNX inside its wheel, on onnxruntime: fully offline. Each engine is
             loaded once per process, lazily, under a lock; `workers` engines form a pool (one
             onnxruntime session set each, `num_threads` intra-op threads each), so a batch of
             calls runs on up to `workers` threads at once.
  paddleocr  PaddleOCR 3.x itself, imported lazily; needs local inference-model directories
             (paddle_det_model_dir, paddle_rec_model_dir) because PaddleOCR would otherwise
             download them. Missing package or models is a clear fatal error.

OCR(image, box=None, coords="pixel"|"norm1000"): the optional box restricts reading to that
region (block boxes are still given in full-image pixels). Blocks are ordered top-to-bottom by
line (blocks whose vertical centres fall within a line's extent share it), left-to-right inside
a line. The observation lists blocks as `[n] (x1,y1,x2,y2) score  text` and then the lines.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .base import ErrorKind, Tool, ToolContext, ToolError, ToolResult, register
from .imgutil import (check_keys, checked_image, get_enum, make_async, parse_boxes, run_guarded,
                      to_rgb_array)

BACKENDS = ("rapidocr", "paddleocr")
COORDS = ("pixel", "norm1000")


@dataclass
class OCRConfig:
    """OCR backend and limits (validated)."""

    backend: str = "rapidocr"
    workers: int = 1                  # engines in the pool (parallel calls within a batch)
    num_threads: int = 1              # onnxruntime intra-op threads per engine
    det_limit_side_len: int = 960     # detector input: longest side scaled down to this
    det_limit_type: str = "max"       # "max" (cap longest side) or "min" (raise shortest side)
    min_score: float = 0.5            # drop recognised blocks below this confidence
    max_input_pixels: int = 40_000_000
    max_blocks: int = 200             # blocks listed in one observation
    default_coords: str = "pixel"
    paddle_det_model_dir: str | None = None
    paddle_rec_model_dir: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"OCRConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if not 1 <= self.workers <= 64:
            raise ValueError(f"OCRConfig.workers must be in [1, 64], got {self.workers!r}")
        if not 1 <= self.num_threads <= 256:
            raise ValueError(f"OCRConfig.num_threads must be in [1, 256], got {self.num_threads!r}")
        if not 32 <= self.det_limit_side_len <= 8192:
            raise ValueError(f"OCRConfig.det_limit_side_len must be in [32, 8192], got "
                             f"{self.det_limit_side_len!r}")
        if self.det_limit_type not in ("max", "min"):
            raise ValueError(f"OCRConfig.det_limit_type must be 'max' or 'min', got "
                             f"{self.det_limit_type!r}")
        if not 0 <= self.min_score < 1:
            raise ValueError(f"OCRConfig.min_score must be in [0, 1), got {self.min_score!r}")
        if not 1 <= self.max_input_pixels <= 10**9:
            raise ValueError(f"OCRConfig.max_input_pixels must be in [1, 1e9], got "
                             f"{self.max_input_pixels!r}")
        if not 1 <= self.max_blocks <= 10_000:
            raise ValueError(f"OCRConfig.max_blocks must be in [1, 10000], got {self.max_blocks!r}")
        if self.default_coords not in COORDS:
            raise ValueError(f"OCRConfig.default_coords must be one of {COORDS}, got "
                             f"{self.default_coords!r}")


@dataclass
class Block:
    """One recognised text block; box in full-image pixels."""

    text: str
    score: float
    box: tuple[int, int, int, int]

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "score": round(self.score, 4), "box": list(self.box)}


def _poly_box(poly: Any, dx: int, dy: int) -> tuple[int, int, int, int]:
    p = np.asarray(poly, dtype=np.float64).reshape(-1, 2)  # [K, 2]
    x1, y1 = p.min(axis=0)
    x2, y2 = p.max(axis=0)
    return (int(round(x1)) + dx, int(round(y1)) + dy, int(round(x2)) + dx, int(round(y2)) + dy)


def reading_order(blocks: list[Block]) -> list[list[Block]]:
    """Group blocks into lines (top to bottom), each sorted left to right."""
    lines: list[list[Block]] = []
    spans: list[list[float]] = []  # per line [top, bottom]
    for b in sorted(blocks, key=lambda b: ((b.box[1] + b.box[3]) / 2, b.box[0])):
        cy = (b.box[1] + b.box[3]) / 2
        for line, span in zip(lines, spans):
            if span[0] <= cy <= span[1]:
                line.append(b)
                span[0], span[1] = min(span[0], b.box[1]), max(span[1], b.box[3])
                break
        else:
            lines.append([b])
            spans.append([float(b.box[1]), float(b.box[3])])
    order = sorted(range(len(lines)), key=lambda i: spans[i][0])
    return [sorted(lines[i], key=lambda b: b.box[0]) for i in order]


# -------------------------------------------------------------------------------------- engines

class _RapidEngine:
    def __init__(self, cfg: OCRConfig) -> None:
        try:
            from rapidocr import RapidOCR
        except ImportError as e:
            raise ToolError(ErrorKind.FATAL, "OCR backend 'rapidocr' is not installed "
                            f"(pip install rapidocr onnxruntime): {e}", "OCR") from None
        self.impl = RapidOCR(params={
            "Global.log_level": "error", "Global.text_score": cfg.min_score,
            "EngineConfig.onnxruntime.intra_op_num_threads": cfg.num_threads,
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
            "Det.limit_side_len": cfg.det_limit_side_len, "Det.limit_type": cfg.det_limit_type})
        self.name = "rapidocr (PP-OCR ONNX)"

    def read(self, rgb: np.ndarray) -> list[tuple[Any, str, float]]:
        out = self.impl(np.ascontiguousarray(rgb[:, :, ::-1]))  # rapidocr takes BGR arrays
        if out.boxes is None or out.txts is None:
            return []
        return list(zip(out.boxes, out.txts, out.scores))


class _PaddleEngine:
    def __init__(self, cfg: OCRConfig) -> None:
        dirs = {"paddle_det_model_dir": cfg.paddle_det_model_dir,
                "paddle_rec_model_dir": cfg.paddle_rec_model_dir}
        bad_dirs = {k: v for k, v in dirs.items() if not v or not Path(v).is_dir()}
        if bad_dirs:
            raise ToolError(ErrorKind.FATAL, "OCR backend 'paddleocr' needs local PP-OCR "
                            f"inference-model directories; not usable: {bad_dirs} (set "
                            "OCRConfig.paddle_det_model_dir/paddle_rec_model_dir; PaddleOCR "
                            "would otherwise download models, which is not allowed here)", "OCR")
        try:
            from paddleocr import PaddleOCR
        except ImportError as e:
            raise ToolError(ErrorKind.FATAL, "OCR backend 'paddleocr' needs the paddleocr "
                            f"package (pip install paddleocr paddlepaddle): {e}", "OCR") from None
        self.impl = PaddleOCR(text_detection_model_dir=cfg.paddle_det_model_dir,
                              text_recognition_model_dir=cfg.paddle_rec_model_dir,
                              use_doc_orientation_classify=False, use_doc_unwarping=False,
                              use_textline_orientation=False,
                              text_det_limit_side_len=cfg.det_limit_side_len,
                              text_det_limit_type=cfg.det_limit_type,
                              text_rec_score_thresh=cfg.min_score)
        self.name = "paddleocr"

    def read(self, rgb: np.ndarray) -> list[tuple[Any, str, float]]:
        rows = []
        for res in self.impl.predict(np.ascontiguousarray(rgb[:, :, ::-1])):
            rows += list(zip(res["rec_polys"], res["rec_texts"], res["rec_scores"]))
        return rows


class EnginePool:
    """`workers` engines, created lazily (once) and handed out one caller at a time."""

    def __init__(self, cfg: OCRConfig) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self._free: queue.Queue = queue.Queue()
        self._made = 0

    def _make(self) -> Any:
        return (_RapidEngine if self.cfg.backend == "rapidocr" else _PaddleEngine)(self.cfg)

    def acquire(self) -> Any:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._made < self.cfg.workers:
                eng = self._make()  # raises ToolError(fatal) when the backend cannot load
                self._made += 1
                return eng
        return self._free.get()

    def release(self, eng: Any) -> None:
        self._free.put(eng)

    def read(self, rgb: np.ndarray) -> tuple[str, list[tuple[Any, str, float]]]:
        eng = self.acquire()
        try:
            return eng.name, eng.read(rgb)
        finally:
            self.release(eng)


_POOLS: dict[tuple, EnginePool] = {}
_POOLS_LOCK = threading.Lock()


def engine_pool(cfg: OCRConfig) -> EnginePool:
    """The process-wide pool for this backend configuration (models load once per process)."""
    key = (cfg.backend, cfg.workers, cfg.num_threads, cfg.det_limit_side_len,
           cfg.det_limit_type, cfg.min_score, cfg.paddle_det_model_dir, cfg.paddle_rec_model_dir)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = EnginePool(cfg)
        return _POOLS[key]


# ----------------------------------------------------------------------------------------- tool

def _ocr_core(cfg: OCRConfig):
    name = "OCR"
    pool = engine_pool(cfg)

    def core(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        check_keys(args, ("image", "box", "coords"), ("image",), name)
        ref = args["image"]
        img = checked_image(ctx, ref, cfg.max_input_pixels, name)
        coords = get_enum(args, "coords", cfg.default_coords, COORDS, name)
        w, h = img.size
        x1, y1, x2, y2 = 0, 0, w, h
        where = f"{ref} ({w}x{h})"
        if args.get("box") is not None:
            (x1, y1, x2, y2), = parse_boxes(args["box"], coords, img.size, ref, name, 1)
            where = f"{ref} region [{x1}, {y1}, {x2}, {y2}]"
        rgb = to_rgb_array(img if (x1, y1, x2, y2) == (0, 0, w, h) else img.crop((x1, y1, x2, y2)))
        backend, rows = pool.read(rgb)
        blocks = [Block(str(t), float(s), _poly_box(p, x1, y1)) for p, t, s in rows
                  if str(t).strip() and float(s) >= cfg.min_score]
        lines = reading_order(blocks)
        ordered = [b for line in lines for b in line]
        if not ordered:
            return ToolResult(text=f"OCR of {where}: no text found ({backend}).",
                              meta={"backend": backend, "blocks": [], "lines": []})
        shown = ordered[:cfg.max_blocks]
        out = [f"OCR of {where} ({backend}): {len(ordered)} text block(s) in {len(lines)} "
               "line(s), reading order; boxes are (x1,y1,x2,y2) pixels of " + ref + ":"]
        out += [f"[{i}] ({b.box[0]},{b.box[1]},{b.box[2]},{b.box[3]}) {b.score:.2f}  {b.text}"
                for i, b in enumerate(shown, 1)]
        if len(ordered) > len(shown):
            out.append(f"... {len(ordered) - len(shown)} more block(s) not shown")
        line_texts = [" ".join(b.text for b in line) for line in lines]
        out.append("Text:\n" + "\n".join(line_texts))
        return ToolResult(text="\n".join(out), meta={
            "backend": backend, "blocks": [b.as_dict() for b in ordered], "lines": line_texts})

    return core


def ocr_tools(cfg: OCRConfig | None = None) -> list[Tool]:
    """Build the OCR tool for `cfg` (engines load on first call, not here)."""
    cfg = cfg or OCRConfig()
    core = _ocr_core(cfg)
    fn, _ = make_async(core, "OCR")
    pool_threads = cfg.workers

    async def batch_fn(calls: list[tuple[dict[str, Any], ToolContext]]) -> list[ToolResult]:
        import asyncio

        def work() -> list[ToolResult]:
            if pool_threads == 1 or len(calls) == 1:
                return [run_guarded(core, a, c, "OCR") for a, c in calls]
            with ThreadPoolExecutor(min(pool_threads, len(calls))) as ex:
                return list(ex.map(lambda ac: run_guarded(core, ac[0], ac[1], "OCR"), calls))
        return await asyncio.to_thread(work)

    params = {"type": "object", "additionalProperties": False, "required": ["image"],
              "properties": {
                  "image": {"type": "string", "description": "image reference, e.g. 'img_1'"},
                  "box": {"type": "array", "items": {"type": "number"}, "minItems": 4,
                          "maxItems": 4, "description": "optional region [x1, y1, x2, y2] to read"},
                  "coords": {"type": "string", "enum": list(COORDS), "default": cfg.default_coords}}}
    return [Tool(name="OCR", description=(
        "Read the text in an image (or in a box of it): text blocks with their pixel boxes and "
        "confidences, in reading order (top to bottom, left to right)."),
        parameters=params, fn=fn, batch_fn=batch_fn, image_args=("image",), timeout_s=60.0,
        max_concurrency=max(1, cfg.workers), retries=0)]


def register_ocr_tools(cfg: OCRConfig | None = None, *, replace: bool = False) -> list[Tool]:
    """Build the OCR tool and add it to the global registry."""
    return [register(t, replace=replace) for t in ocr_tools(cfg)]
