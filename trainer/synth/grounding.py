"""Visual grounding of the anchor, and the degradation subset.

Grounding picks the image a question shows for its anchor. Candidates are the images the
anchor's page names (node.images) that can be found: an image id of the world's images.jsonl
(`ImageCatalog.from_world`) or a file under an images directory (`ImageCatalog.from_dir`, for
pages converted from a dump). With an image-text scorer configured, every candidate is scored
against the anchor's title and aliases and the best one at or above the threshold is taken
(none above: the question is dropped); without one, the anchor's own page image is taken.
Scorers are callables (image, texts) -> score in [0, 1]; `OCRScorer` is the offline one: it
reads the image with the OCR tool's engine (PP-OCR via rapidocr) and scores the best fuzzy
match of a name inside the read text. Any CLIP-style model can be plugged in the same way.

The degradation subset: a fraction (default 10%, at least one when the rate is > 0) of the
questions whose image is clean get a degraded copy (Gaussian blur, 3x downsampling, or a perspective warp), paired with the tool
that undoes it (Sharpen, SuperResolution, PerspectiveCorrect) as the expected fix.

    cat = ImageCatalog.from_world(world)
    g = ground_anchor(graph.node("org-003"), cat, scorer=None)      # the page image
    img = degrade(cat.load(g.image), "blur", random.Random(0))
"""
from __future__ import annotations

import difflib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
from PIL import Image, ImageFilter

from spyglass.engine.world import World

from .graph import Node

DEGRADATIONS = ("blur", "lowres", "perspective")
FIX_TOOL = {"blur": "Sharpen", "lowres": "SuperResolution", "perspective": "PerspectiveCorrect"}
FIX_HOP = {"blur": "sharpen", "lowres": "super_resolution", "perspective": "perspective"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")

Scorer = Callable[[Image.Image, list[str]], float]


@dataclass
class ImageCatalog:
    """Where candidate images live: records by id (world) or files in a directory (dump)."""

    records: dict[str, dict[str, Any]]
    root: Path

    @classmethod
    def from_world(cls, world: World) -> "ImageCatalog":
        return cls({r["id"]: r for r in world.images}, world.root)

    @classmethod
    def from_dir(cls, root: str | Path) -> "ImageCatalog":
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"images directory {root} does not exist")
        recs = {p.name: {"id": p.name, "file": p.name, "degradation": "none", "text": []}
                for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        return cls(recs, root)

    def candidates(self, node: Node) -> list[str]:
        return [i for i in node.images if i in self.records]

    def path(self, image_id: str) -> Path:
        return self.root / self.records[image_id]["file"]

    def load(self, image_id: str) -> Image.Image:
        with Image.open(self.path(image_id)) as im:
            return im.convert("RGB")


@dataclass
class Grounding:
    image: str  # image id in the catalog
    score: float | None  # the scorer's, or None for the page image
    method: str  # "page" | the scorer's name
    degradation: str  # the image's own degradation (world records), "none" otherwise


class Ungrounded(Exception):
    """No candidate image for the anchor, or none scores above the threshold."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def ground_anchor(node: Node, catalog: ImageCatalog, scorer: Scorer | None = None,
                  threshold: float = 0.5) -> Grounding:
    """The anchor's image (see module docstring); raises Ungrounded with a reason."""
    cands = catalog.candidates(node)
    if not cands:
        raise Ungrounded("no_image")
    if scorer is None:
        rec = catalog.records[cands[0]]
        return Grounding(cands[0], None, "page", rec.get("degradation", "none"))
    scored = sorted(((scorer(catalog.load(c), node.names()), c) for c in cands), key=lambda t: (-t[0], t[1]))
    best, cid = scored[0]
    if best < threshold:
        raise Ungrounded("below_threshold")
    return Grounding(cid, float(best), getattr(scorer, "name", type(scorer).__name__),
                     catalog.records[cid].get("degradation", "none"))


def fuzzy_contains(text: str, name: str) -> float:
    """Best similarity in [0, 1] of `name` to any equally long window of `text` (casefolded)."""
    t, n = " ".join(text.casefold().split()), " ".join(name.casefold().split())
    if not n or not t:
        return 0.0
    if n in t:
        return 1.0
    best = 0.0
    for s in range(0, max(1, len(t) - len(n) + 1)):
        best = max(best, difflib.SequenceMatcher(None, n, t[s:s + len(n)]).ratio())
    return best


class OCRScorer:
    """Image-text score from OCR: the best fuzzy match of any name in the text read."""

    name = "ocr"

    def __init__(self, cfg: Any = None) -> None:
        from spyglass.engine.tools.ocr import OCRConfig, engine_pool  # noqa: PLC0415
        self.pool = engine_pool(cfg or OCRConfig())

    def read(self, image: Image.Image) -> str:
        _, blocks = self.pool.read(np.asarray(image.convert("RGB")))
        return " ".join(b[1] for b in blocks)

    def __call__(self, image: Image.Image, texts: list[str]) -> float:
        read = self.read(image)
        return max((fuzzy_contains(read, t) for t in texts), default=0.0)


# ------------------------------------------------------------------------------ degradation

def degrade(img: Image.Image, kind: str, rng: random.Random) -> Image.Image:
    """A degraded copy: blur (Gaussian, radius 2.2-2.8), lowres (1/3 size, box filter), or
    perspective (the image warped onto a trapezoid on a grey background, tilted 8-16 deg)."""
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(2.2, 2.8)))
    if kind == "lowres":
        w, h = img.size
        return img.resize((max(1, w // 3), max(1, h // 3)), Image.Resampling.BOX)
    if kind == "perspective":
        rgb = np.asarray(img.convert("RGB"))
        h, w = rgb.shape[:2]
        far = rng.uniform(0.3, 0.4) * h / 2  # the far side's inset, top and bottom
        mx, my = 0.08 * w, 0.08 * h
        if rng.random() < 0.5:  # near side left
            dst = [[mx, my], [w - mx, my + far], [w - mx, h - my - far], [mx, h - my]]
        else:
            dst = [[mx, my + far], [w - mx, my], [w - mx, h - my], [mx, h - my - far]]
        ang = np.deg2rad(rng.uniform(8, 16) * (1 if rng.random() < 0.5 else -1))
        c = np.array([w / 2, h / 2])
        rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
        quad = (np.array(dst) - c) @ rot.T * 0.85 + c  # [4, 2] TL, TR, BR, BL
        src = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], np.float32)
        m = cv2.getPerspectiveTransform(src, quad.astype(np.float32))
        out = cv2.warpPerspective(rgb, m, (w, h), flags=cv2.INTER_CUBIC,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=(128, 128, 128))
        return Image.fromarray(out)
    raise ValueError(f"unknown degradation {kind!r}; choose one of {DEGRADATIONS}")


def pick_degraded(n_clean: list[int], rate: float, rng: random.Random) -> dict[int, str]:
    """Which of the clean questions (indices) get a degradation, and which: round(rate * n)
    of them, drawn with `rng`, the kinds cycling blur / lowres / perspective."""
    if not 0 <= rate <= 1:
        raise ValueError(f"degradation rate must be in [0, 1], got {rate!r}")
    k = round(rate * len(n_clean))
    if rate > 0 and n_clean and k == 0:
        k = 1
    chosen = sorted(rng.sample(list(n_clean), k))
    return {q: DEGRADATIONS[j % len(DEGRADATIONS)] for j, q in enumerate(chosen)}
