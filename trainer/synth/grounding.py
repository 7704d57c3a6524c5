"""Visual grounding of the anchor, and the degradation subset.

Grounding picks the image a question shows for its anchor. Candidates are the images the
anchor's page names (node.images) that can be found: an image id of the world's images.jsonl
(`ImageCatalog.from_world`) or a file under an images directory (`ImageCatalog.from_dir`, for
pages converted from a dump). With an image-text scorer configured, every candidate is scored
against the anchor's title and aliases and the best one at or above the threshold is taken
(none above: the question is dropped); without one, the anchor's own page image is taken.
A world also has other *views* of an entity, usable when asked for: a street scene where it
is one of several boards (the question says "on the leftmost sign"; solving needs a crop) and
a text-free emblem crop (solving needs ImageSearch).
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

from spyglass.engine.offline.world import World

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
        """The node's page images present in the catalog."""
        return [i for i in node.images if i in self.records and view_kind(self.records[i]) == "page"]

    def views(self, node: Node) -> list[tuple[str, str, dict[str, Any] | None]]:
        """(image id, kind, scene region) for every image in the catalog that shows the node:
        its page images, scene boards naming it (a region of a street scene) and emblem crops."""
        out: list[tuple[str, str, dict[str, Any] | None]] = [(i, "page", None) for i in self.candidates(node)]
        for iid in sorted(self.records):
            rec = self.records[iid]
            kind = view_kind(rec)
            if kind == "emblem" and rec.get("entity") == node.id:
                out.append((iid, "emblem", None))
            elif kind == "scene":
                out += [(iid, "scene", r) for r in rec["regions"] if r.get("entity") == node.id]
        return out

    def path(self, image_id: str) -> Path:
        return self.root / self.records[image_id]["file"]

    def load(self, image_id: str) -> Image.Image:
        with Image.open(self.path(image_id)) as im:
            return im.convert("RGB")


def view_kind(rec: dict[str, Any]) -> str:
    """page (an entity's own image), scene (boards of several entities), emblem (a text-free
    crop whose source page image is in the corpus)."""
    if rec.get("source_image"):
        return "emblem"
    if rec.get("entity") is None and len(rec.get("regions") or []) > 1:
        return "scene"
    return "page"


@dataclass
class Grounding:
    image: str  # image id in the catalog
    score: float | None  # the scorer's, or None when not scored
    method: str  # "page" | "view" | the scorer's name
    degradation: str  # the image's own degradation (world records), "none" otherwise
    view: str = "page"  # page | scene | emblem
    region: dict[str, Any] | None = None  # scene: the anchor's board {box, entity, text}
    side: str = ""  # scene: leftmost | middle | rightmost ...

    @property
    def phrase(self) -> str:
        """How the question refers to the anchor through the image."""
        if self.view == "scene":
            return f"on the {self.side} sign in the image"
        if self.view == "emblem":
            return "whose emblem is shown in the image"
        return "shown in the image"


class Ungrounded(Exception):
    """No candidate image for the anchor, or none scores above the threshold."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _side(regions: list[dict[str, Any]], region: dict[str, Any]) -> str:
    xs = sorted(r["box"][0] for r in regions)
    k = xs.index(region["box"][0])
    names = {2: ("left", "right"), 3: ("leftmost", "middle", "rightmost")}.get(len(xs))
    return names[k] if names else f"{k + 1}th from the left"


def ground_anchor(node: Node, catalog: ImageCatalog, scorer: Scorer | None = None,
                  threshold: float = 0.5, views: tuple[str, ...] = ("page",),
                  rng: random.Random | None = None) -> Grounding:
    """The anchor's image (see module docstring); raises Ungrounded with a reason. With a
    scorer, page images are ranked and must reach `threshold`; scene and emblem views (allowed
    by `views`) carry their entity in the catalog and are not scored. With `rng` the view is
    drawn among those left, else the first (best) is taken."""
    cands = [v for v in catalog.views(node) if v[1] in views]
    if not cands:
        raise Ungrounded("no_image")
    pages = [v for v in cands if v[1] == "page"]
    scores: dict[str, float] = {}
    if scorer is not None and pages:
        scores = {i: float(scorer(catalog.load(i), node.names())) for i, _, _ in pages}
        pages = sorted((v for v in pages if scores[v[0]] >= threshold), key=lambda v: (-scores[v[0]], v[0]))
        cands = pages[:1] + [v for v in cands if v[1] != "page"]
        if not cands:
            raise Ungrounded("below_threshold")
    iid, kind, region = rng.choice(cands) if rng is not None else cands[0]
    rec = catalog.records[iid]
    method = getattr(scorer, "name", type(scorer).__name__) if iid in scores else \
        ("page" if kind == "page" else "view")
    return Grounding(iid, scores.get(iid), method, rec.get("degradation", "none"), kind, region,
                     _side(rec["regions"], region) if region is not None else "")


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
