"""Image rendering for the offline world (engine/offline/world.py): sign boards with an entity's emblem
and text lines drawn in matplotlib's DejaVu fonts, composed on a patterned wall, then degraded
(perspective warp, Gaussian blur, low resolution); street scenes with three small boards; and
text-free emblem crops for reverse image search. Deterministic given the numpy Generator and
the entity ids. Not run directly; `python -m spyglass.engine.offline.world --out DIR` drives it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import cv2
import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
_STYLES = {  # board fill, text colour, border colour
    "shop": ((28, 40, 62), (246, 236, 200), (200, 170, 90)),
    "road": ((16, 110, 60), (250, 250, 250), (250, 250, 250)),
    "label": ((250, 248, 240), (30, 30, 30), (60, 60, 60)),
    "banner": ((150, 24, 30), (255, 240, 220), (240, 200, 60)),
    "plaque": ((96, 64, 30), (250, 228, 170), (60, 40, 20)),
    "scene": ((240, 236, 220), (20, 20, 30), (40, 40, 40)),
}
_WALLS = [(120, 110, 104), (86, 96, 112), (130, 120, 90), (70, 86, 80), (150, 140, 132)]


def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    path = FONT_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"font {path} is missing (matplotlib ships it in mpl-data)")
    return ImageFont.truetype(str(path), size)


def _fit_font(text: str, max_w: int, size: int, bold: bool) -> ImageFont.FreeTypeFont:
    while size > 8:
        f = font(size, bold)
        if f.getbbox(text)[2] <= max_w:
            return f
        size -= 1
    return font(8, bold)


def entity_seed(entity_id: str, world_seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{world_seed}:{entity_id}".encode()).digest()[:8], "little")


def emblem(entity_id: str, world_seed: int, size: int) -> Image.Image:
    """A text-free procedural logo (polygons, rings, bars) unique to the entity; size x size."""
    r = np.random.default_rng(entity_seed(entity_id, world_seed))
    s = 4 * 64  # drawn at a fixed 256 px then resized, so every scale shows the same design
    img = Image.new("RGB", (s, s), tuple(int(v) for v in r.integers(200, 256, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(int(r.integers(9, 14))):
        col = tuple(int(v) for v in r.integers(0, 200, 3))
        kind = int(r.integers(0, 4))
        x, y = (int(v) for v in r.integers(20, s - 20, 2))
        rad = int(r.integers(16, 60))
        if kind == 0:  # sharp star / polygon
            k = int(r.integers(3, 8))
            ang = np.sort(r.uniform(0, 2 * np.pi, 2 * k))
            radii = np.where(np.arange(2 * k) % 2 == 0, rad, rad * r.uniform(0.3, 0.7))
            d.polygon([(x + q * np.cos(a), y + q * np.sin(a)) for a, q in zip(ang, radii)], fill=col)
        elif kind == 1:  # ring
            d.ellipse([x - rad, y - rad, x + rad, y + rad], outline=col, width=int(r.integers(6, 14)))
        elif kind == 2:  # bar
            d.rectangle([x - rad, y - rad // 3, x + rad, y + rad // 3], fill=col)
        else:
            x2, y2 = (int(v) for v in r.integers(0, s, 2))
            d.line([x, y, x2, y2], fill=col, width=int(r.integers(5, 12)))
    d.rectangle([0, 0, s - 1, s - 1], outline=(20, 20, 20), width=6)
    return img.resize((size, size), Image.Resampling.LANCZOS)


class RenderKit:
    """Draws the world's images; `rng` drives layout, colours and degradation strengths."""

    def __init__(self, rng: np.random.Generator, width: int, height: int, world_seed: int = 0) -> None:
        self.rng, self.w, self.h, self.seed = rng, width, height, world_seed

    # --------------------------------------------------------------------------- pieces
    def wall(self) -> Image.Image:
        """A brick wall whose courses and joints are irregular and unique to each image, so
        that walls do not match each other geometrically (a false lead for ImageSearch)."""
        r = self.rng
        base = _WALLS[int(r.integers(0, len(_WALLS)))]
        img = Image.new("RGB", (self.w, self.h), base)
        d = ImageDraw.Draw(img)
        mortar = tuple(max(0, c - 30) for c in base)
        y = 0
        while y < self.h:
            bh = int(r.integers(18, 36))
            d.line([0, y, self.w, y], fill=mortar, width=2)
            x = -int(r.integers(0, 60))
            while x < self.w:
                x += int(r.integers(30, 90))
                d.line([x, y, x, y + bh], fill=mortar, width=2)
            y += bh
        return img

    def board(self, style: str, lines: list[str], entity_id: str | None,
              size: tuple[int, int]) -> Image.Image:
        """A sign board: border, optional emblem at left, text lines centred at right."""
        fill, ink, border = _STYLES[style]
        bw, bh = size
        img = Image.new("RGB", (bw, bh), fill)
        d = ImageDraw.Draw(img)
        d.rectangle([0, 0, bw - 1, bh - 1], outline=border, width=max(3, bh // 40))
        x0 = bh // 10
        if entity_id is not None:
            es = bh - 2 * (bh // 8)
            img.paste(emblem(entity_id, self.seed, es), (bh // 8, bh // 8))
            x0 = bh // 8 + es + bh // 10
        avail = bw - x0 - bh // 10
        sizes = [int(bh * 0.24)] + [int(bh * 0.15)] * (len(lines) - 1)
        fonts = [_fit_font(t, avail, s, i == 0) for i, (t, s) in enumerate(zip(lines, sizes))]
        heights = [f.getbbox(t)[3] for f, t in zip(fonts, lines)]
        gap = bh // 12
        y = (bh - sum(heights) - gap * (len(lines) - 1)) // 2
        for f, t, th in zip(fonts, lines, heights):
            tw = f.getbbox(t)[2]
            d.text((x0 + (avail - tw) // 2, y), t, font=f, fill=ink)
            y += th + gap
        return img

    def _paste_warped(self, canvas: Image.Image, board: Image.Image,
                      quad: np.ndarray) -> Image.Image:
        """Warp `board` onto `canvas` so its corners land on quad [4, 2] (TL, TR, BR, BL)."""
        bw, bh = board.size
        src = np.array([[0, 0], [bw - 1, 0], [bw - 1, bh - 1], [0, bh - 1]], np.float32)
        m = cv2.getPerspectiveTransform(src, quad.astype(np.float32))
        warped = cv2.warpPerspective(np.asarray(board), m, (self.w, self.h), flags=cv2.INTER_CUBIC)
        mask = cv2.warpPerspective(np.full((bh, bw), 255, np.uint8), m, (self.w, self.h),
                                   flags=cv2.INTER_LINEAR)
        out = Image.composite(Image.fromarray(warped), canvas, Image.fromarray(mask))
        return out

    # --------------------------------------------------------------------------- images
    def sign_image(self, style: str, lines: list[str], entity_id: str,
                   degradation: str) -> tuple[Image.Image, list[dict[str, Any]]]:
        r = self.rng
        canvas = self.wall()
        bw, bh = int(self.w * r.uniform(0.72, 0.82)), int(self.h * r.uniform(0.42, 0.5))
        board = self.board(style, lines, entity_id, (bw, bh))
        if degradation == "perspective":
            cx, cy = self.w / 2 + r.uniform(-20, 20), self.h / 2 + r.uniform(-15, 15)
            hw, hh = bw / 2 * 1.05, bh / 2
            shrink = r.uniform(0.3, 0.4)  # far side height relative to the near side
            lift = r.uniform(-0.3, 0.3) * bh
            near_left = bool(r.integers(0, 2))
            l, rr = (1.0, shrink) if near_left else (shrink, 1.0)
            quad = np.array([[cx - hw, cy - hh * l + lift * (not near_left)],
                             [cx + hw, cy - hh * rr + lift * near_left],
                             [cx + hw, cy + hh * rr + lift * near_left],
                             [cx - hw, cy + hh * l + lift * (not near_left)]])
            ang = np.deg2rad(r.uniform(8, 16) * (1 if r.integers(0, 2) else -1))
            rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
            quad = (quad - [cx, cy]) @ rot.T + [cx, cy]
            lo, hi = quad.min(axis=0), quad.max(axis=0)  # shrink to fit inside the canvas
            fit = min(1.0, (self.w - 10) / (hi[0] - lo[0]), (self.h - 10) / (hi[1] - lo[1]))
            quad = (quad - [cx, cy]) * fit + [cx, cy]
            quad -= np.minimum(0, quad.min(axis=0) - 5) + np.maximum(0, quad.max(axis=0) - [self.w - 6, self.h - 6])
            img = self._paste_warped(canvas, board, quad)
            x1, y1 = quad.min(axis=0)
            x2, y2 = quad.max(axis=0)
            box = [int(x1), int(y1), int(np.ceil(x2)), int(np.ceil(y2))]
        else:
            x = int(r.integers(10, self.w - bw - 10))
            y = int(r.integers(10, self.h - bh - 10))
            canvas.paste(board, (x, y))
            img, box = canvas, [x, y, x + bw, y + bh]
        if degradation == "blur":
            img = img.filter(ImageFilter.GaussianBlur(radius=float(r.uniform(2.2, 2.8))))
        elif degradation == "lowres":
            f = 3
            img = img.resize((self.w // f, self.h // f), Image.Resampling.BOX)
            box = [v // f for v in box]
        return img, [{"box": box, "entity": entity_id, "text": lines}]

    def scene_image(self, boards: list[tuple[str, list[str]]]) -> tuple[Image.Image, list[dict[str, Any]]]:
        """Boards side by side on a facade, small enough that reading them needs a crop."""
        r = self.rng
        canvas = self.wall()
        d = ImageDraw.Draw(canvas)
        d.rectangle([0, int(self.h * 0.75), self.w, self.h], fill=(60, 60, 64))  # pavement
        n = len(boards)
        slot = self.w // n
        regions = []
        for i, (eid, lines) in enumerate(boards):
            bw, bh = int(slot * 0.86), int(self.h * 0.13)
            b = self.board("scene", lines, None, (bw, bh))
            x = i * slot + (slot - bw) // 2
            y = int(self.h * r.uniform(0.18, 0.5))
            canvas.paste(b, (x, y))
            regions.append({"box": [x, y, x + bw, y + bh], "entity": eid, "text": lines})
        return canvas, regions

    def emblem_query(self, entity_id: str, scale: float) -> Image.Image:
        """The entity's emblem alone (no text), rescaled, on a margin, slightly soft."""
        s = max(48, int(round(150 * scale)))
        e = emblem(entity_id, self.seed, s)
        m = s // 6
        canvas = Image.new("RGB", (s + 2 * m, s + 2 * m), (235, 235, 235))
        canvas.paste(e, (m, m))
        return canvas.filter(ImageFilter.GaussianBlur(radius=0.6))
