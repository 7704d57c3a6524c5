"""ImageSearch: reverse image search over a local image corpus, or a Serper-style lens API.

    from spyglass.engine.tools.image_search import ImageSearchConfig, image_search_tools
    register_image_search_tools(ImageSearchConfig(corpus_dir="/path/to/world"))

Local backend (default). The corpus is a directory with an images.jsonl index in the format
engine/offline/world.py writes (id, file, entity, title, page, split; only split "corpus" rows, or rows
without a split, are indexed); corpus_dir=None means the default offline world (ensure_world()).
The index, built once on first use, holds for each image:
  * perceptual hashes (imagehash pHash and dHash, 64 bits): find near-duplicates, rescaled or
    recompressed copies; a hit is a Hamming distance <= hash_max_distance;
  * ORB keypoints and binary descriptors: find crops and partial views, which defeat a global
    hash. A query's descriptors vote (nearest neighbour over all corpus descriptors) for
    candidate images; the top `verify_top` candidates are verified by a 2-NN ratio test and a
    RANSAC homography; a hit has >= min_inliers inliers;
  * optionally an image embedding (cosine >= embedding_min_cosine) from an ImageEmbedder: an
    ONNX image encoder at `embedding_model` run with onnxruntime, or any object passed as
    ImageSearchIndex(embedder=...). With use_embedding=True and no model the tool fails with
    an error saying what to configure (no encoder ships offline).
Results: the matched images' entities, titles and pages (corpus:// urls), best first, with
the evidence (inliers / hash distance / cosine). No match is a normal observation.

Web backend (backend="web"): POSTs {"url": <public image url>, "gl", "hl"} with header
X-API-KEY=$SERPER_API_KEY to web_endpoint (https://google.serper.dev/lens) over aiohttp and
reads the "organic" (or "visual_matches") list: title, link, source. A lens API needs a public
URL: the image's info["url"] if it carries one, else it is uploaded to web_upload_url (an
endpoint that takes a POSTed PNG and answers with its URL); neither is a clear error. HTTP 429
and 5xx, timeouts and connection errors are transient; 401/403 and other 4xx are fatal.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import imagehash
import numpy as np
from PIL import Image

from .base import ErrorKind, Tool, ToolContext, ToolError, ToolResult, register
from .imgutil import (check_keys, checked_image, get_enum, get_int, make_async, parse_boxes,
                      to_rgb_array)

log = logging.getLogger(__name__)
BACKENDS = ("local", "web")
COORDS = ("pixel", "norm1000")
MATCH_ROWS = 1 << 17  # descriptor rows per matcher block (OpenCV's limit for one train matrix: 2**18 - 1)


@dataclass
class ImageSearchConfig:
    """ImageSearch backend, matching thresholds and limits (validated)."""

    backend: str = "local"
    corpus_dir: str | None = None         # None: the default offline world (ensure_world())
    default_top_k: int = 5
    max_top_k: int = 20
    max_input_pixels: int = 40_000_000
    hash_max_distance: int = 8            # of 64 bits, both pHash and dHash
    orb_features: int = 1500
    feature_side: int = 800               # images are resized so the longer side is <= this
    feature_min_side: int = 160           # ... and small queries upscaled to this shorter side
    ratio: float = 0.75                   # Lowe's ratio test
    min_inliers: int = 12
    verify_top: int = 12                  # candidates verified geometrically per query
    vote_features: int = 500              # strongest query descriptors used for the vote
    use_embedding: bool = False
    embedding_model: str | None = None    # ONNX image encoder: input [N, 3, S, S] float32
    embedding_input_size: int = 224
    embedding_min_cosine: float = 0.85
    web_endpoint: str = "https://google.serper.dev/lens"
    web_api_key_env: str = "SERPER_API_KEY"
    web_upload_url: str | None = None
    web_timeout_s: float = 20.0
    web_gl: str = "us"
    web_hl: str = "en"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"ImageSearchConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if not 1 <= self.max_top_k <= 100:
            raise ValueError(f"ImageSearchConfig.max_top_k must be in [1, 100], got {self.max_top_k!r}")
        if not 1 <= self.default_top_k <= self.max_top_k:
            raise ValueError(f"ImageSearchConfig.default_top_k must be in [1, max_top_k="
                             f"{self.max_top_k}], got {self.default_top_k!r}")
        if not 1 <= self.max_input_pixels <= 10**9:
            raise ValueError(f"ImageSearchConfig.max_input_pixels must be in [1, 1e9], got "
                             f"{self.max_input_pixels!r}")
        if not 0 <= self.hash_max_distance <= 32:
            raise ValueError(f"ImageSearchConfig.hash_max_distance must be in [0, 32], got "
                             f"{self.hash_max_distance!r}")
        if not 50 <= self.orb_features <= 20_000:
            raise ValueError(f"ImageSearchConfig.orb_features must be in [50, 20000], got "
                             f"{self.orb_features!r}")
        if not 64 <= self.feature_min_side <= self.feature_side <= 4096:
            raise ValueError("ImageSearchConfig needs 64 <= feature_min_side <= feature_side <= "
                             f"4096, got {self.feature_min_side!r}, {self.feature_side!r}")
        if not 0.3 <= self.ratio < 1:
            raise ValueError(f"ImageSearchConfig.ratio must be in [0.3, 1), got {self.ratio!r}")
        if not 4 <= self.min_inliers <= 1000:
            raise ValueError(f"ImageSearchConfig.min_inliers must be in [4, 1000], got {self.min_inliers!r}")
        if not 16 <= self.vote_features <= 20_000:
            raise ValueError(f"ImageSearchConfig.vote_features must be in [16, 20000], got "
                             f"{self.vote_features!r}")
        if not 1 <= self.verify_top <= 10_000:
            raise ValueError(f"ImageSearchConfig.verify_top must be in [1, 10000], got {self.verify_top!r}")
        if not 16 <= self.embedding_input_size <= 1024:
            raise ValueError(f"ImageSearchConfig.embedding_input_size must be in [16, 1024], got "
                             f"{self.embedding_input_size!r}")
        if not -1 <= self.embedding_min_cosine <= 1:
            raise ValueError(f"ImageSearchConfig.embedding_min_cosine must be in [-1, 1], got "
                             f"{self.embedding_min_cosine!r}")
        if not self.web_endpoint.startswith(("http://", "https://")):
            raise ValueError(f"ImageSearchConfig.web_endpoint must be an http(s) URL, got "
                             f"{self.web_endpoint!r}")
        if self.web_upload_url is not None and not self.web_upload_url.startswith(("http://", "https://")):
            raise ValueError(f"ImageSearchConfig.web_upload_url must be an http(s) URL, got "
                             f"{self.web_upload_url!r}")
        if not 0 < self.web_timeout_s <= 600:
            raise ValueError(f"ImageSearchConfig.web_timeout_s must be in (0, 600], got "
                             f"{self.web_timeout_s!r}")


# ------------------------------------------------------------------------------------ embedders

class ImageEmbedder(Protocol):
    """Anything that maps images to L2-comparable vectors: embed(images) -> float32 [N, D]."""

    def embed(self, images: list[Image.Image]) -> np.ndarray: ...


class OnnxImageEmbedder:
    """An ONNX image encoder (e.g. a CLIP/SigLIP vision tower exported by the user) run with
    onnxruntime: RGB resized to size x size, ImageNet mean/std, NCHW float32 in, [N, D] out."""

    MEAN = np.array([0.485, 0.456, 0.406], np.float32)
    STD = np.array([0.229, 0.224, 0.225], np.float32)

    def __init__(self, path: str, size: int) -> None:
        if not Path(path).is_file():
            raise ToolError(ErrorKind.FATAL, f"ImageSearch: embedding model {path!r} does not "
                            "exist (ImageSearchConfig.embedding_model)", "ImageSearch")
        import onnxruntime as ort
        self.sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.input = self.sess.get_inputs()[0].name
        self.size = size

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        batch = np.stack([(np.asarray(im.convert("RGB").resize((self.size, self.size),
                                                              Image.Resampling.BICUBIC),
                                      np.float32) / 255.0 - self.MEAN) / self.STD
                          for im in images]).transpose(0, 3, 1, 2)  # [N, 3, S, S]
        out = self.sess.run(None, {self.input: batch})[0]
        return np.asarray(out, np.float32).reshape(len(images), -1)  # [N, D]


def _normalise(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------- index

@dataclass
class _Entry:
    meta: dict[str, Any]
    phash: imagehash.ImageHash
    dhash: imagehash.ImageHash
    kp: np.ndarray          # [K, 2] float32 keypoint coordinates
    desc: np.ndarray | None  # [K, 32] uint8 ORB descriptors


def _plausible(hom: np.ndarray, qkp: np.ndarray) -> bool:
    """A homography [3, 3] that maps the query's keypoint hull to a convex, non-mirrored,
    not absurdly scaled quadrilateral (random matches give degenerate ones)."""
    x1, y1 = qkp.min(axis=0)
    x2, y2 = qkp.max(axis=0)
    if x2 - x1 < 2 or y2 - y1 < 2:
        return False
    quad = np.float32([[x1, y1], [x2, y1], [x2, y2], [x1, y2]]).reshape(-1, 1, 2)
    out = cv2.perspectiveTransform(quad, hom).reshape(4, 2)
    if not np.isfinite(out).all() or not cv2.isContourConvex(out.astype(np.float32)):
        return False
    ratio = abs(cv2.contourArea(out)) / ((x2 - x1) * (y2 - y1))
    return 1 / 64 <= ratio <= 64 and float(np.linalg.det(hom[:2, :2])) > 0


class ImageSearchIndex:
    """Perceptual hashes + ORB features (+ optional embeddings) of a set of images."""

    def __init__(self, cfg: ImageSearchConfig | None = None,
                 embedder: ImageEmbedder | None = None) -> None:
        self.cfg = cfg or ImageSearchConfig()
        self.embedder = embedder
        self.entries: list[_Entry] = []
        self.skipped: list[tuple[str, str]] = []  # (file, reason) of unreadable corpus images
        self._orb = cv2.ORB_create(nfeatures=self.cfg.orb_features)
        self._orb_lock = threading.Lock()
        self._emb: np.ndarray | None = None  # [N, D] normalised
        self._stack: tuple[list[np.ndarray], np.ndarray, np.ndarray] | None = None  # blocks, owner ids, block starts

    def __len__(self) -> int:
        return len(self.entries)

    def features(self, img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
        """ORB keypoints [K, 2] and descriptors [K, 32] of a normalised grey copy."""
        gray = cv2.cvtColor(to_rgb_array(img), cv2.COLOR_RGB2GRAY)
        h, w = gray.shape
        s = min(self.cfg.feature_side / max(h, w), 1.0)
        if min(h, w) * s < self.cfg.feature_min_side:
            s = min(self.cfg.feature_min_side / min(h, w), 4.0)
        if abs(s - 1.0) > 1e-3:
            gray = cv2.resize(gray, (max(1, round(w * s)), max(1, round(h * s))),
                              interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
        with self._orb_lock:
            kps, desc = self._orb.detectAndCompute(gray, None)
        if desc is None or not kps:
            return np.zeros((0, 2), np.float32), None
        order = np.argsort([-k.response for k in kps], kind="stable")  # strongest first
        pts = np.array([kps[i].pt for i in order], np.float32).reshape(-1, 2)
        return pts, desc[order]

    def add(self, img: Image.Image, meta: dict[str, Any]) -> None:
        rgb = Image.fromarray(to_rgb_array(img))
        kp, desc = self.features(rgb)
        self.entries.append(_Entry(meta, imagehash.phash(rgb), imagehash.dhash(rgb), kp, desc))
        self._stack = None
        if self.embedder is not None:
            e = _normalise(np.asarray(self.embedder.embed([rgb]), np.float32))
            self._emb = e if self._emb is None else np.vstack([self._emb, e])

    @classmethod
    def from_dir(cls, root: str | Path, cfg: ImageSearchConfig | None = None,
                 embedder: ImageEmbedder | None = None) -> "ImageSearchIndex":
        """Index the corpus rows of root/images.jsonl; unreadable files are skipped (logged)."""
        root = Path(root)
        index_file = root / "images.jsonl"
        if not index_file.is_file():
            raise FileNotFoundError(f"image corpus {root} has no images.jsonl")
        idx = cls(cfg, embedder)
        for line in index_file.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("split", "corpus") != "corpus":
                continue
            path = root / row["file"]
            try:
                with Image.open(path) as im:
                    im.load()
                    idx.add(im, row)
            except Exception as e:  # corrupt/missing file: keep the rest of the corpus usable
                idx.skipped.append((str(path), f"{type(e).__name__}: {e}"))
                log.warning("ImageSearch: skipping %s: %s", path, e)
        return idx

    def _candidates(self, desc: np.ndarray) -> list[int]:
        """Entries ranked by nearest-neighbour votes of the query descriptors. The corpus's
        descriptors are matched as a collection of blocks of at most MATCH_ROWS rows (OpenCV's
        matchers index a train matrix's rows below 2**18, so one matrix of a large corpus fails)."""
        if self._stack is None:
            parts = [(e.desc, np.full(len(e.desc), i)) for i, e in enumerate(self.entries)
                     if e.desc is not None and len(e.desc) >= 2]
            if not parts:
                return []
            alld, owner = np.vstack([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
            blocks = [alld[i: i + MATCH_ROWS] for i in range(0, len(alld), MATCH_ROWS)]
            start = np.arange(len(blocks)) * MATCH_ROWS  # the first row of each block
            self._stack = (blocks, owner, start)
        blocks, owner, start = self._stack
        matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
        matcher.add(blocks)
        matches = matcher.match(desc[: self.cfg.vote_features])
        votes = np.bincount([owner[start[m.imgIdx] + m.trainIdx] for m in matches if m.distance <= 64],
                            minlength=len(self.entries))
        order = [int(i) for i in np.argsort(-votes, kind="stable") if votes[i] > 0]
        return order[: self.cfg.verify_top]

    def _inliers(self, qkp: np.ndarray, qdesc: np.ndarray, e: _Entry) -> int:
        if e.desc is None or len(e.desc) < 2 or len(qdesc) < 2:
            return 0
        pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(qdesc, e.desc, k=2)
        good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < self.cfg.ratio * p[1].distance]
        if len(good) < 4:
            return 0
        src = qkp[[m.queryIdx for m in good]]
        dst = e.kp[[m.trainIdx for m in good]]
        hom, mask = cv2.findHomography(src, dst, cv2.RANSAC, 6.0)
        if hom is None or mask is None or not _plausible(hom, qkp):
            return 0
        return int(mask.sum())

    def search(self, img: Image.Image, top_k: int) -> list[dict[str, Any]]:
        """Matches (best first): meta fields + score, inliers, hash_distance, cosine, evidence."""
        cfg = self.cfg
        if cfg.use_embedding and self.embedder is None:
            raise ToolError(ErrorKind.FATAL, "ImageSearch: use_embedding is set but no image "
                            "embedding model is configured: set ImageSearchConfig.embedding_model "
                            "to an ONNX image encoder, or pass ImageSearchIndex(embedder=...)",
                            "ImageSearch")
        rgb = Image.fromarray(to_rgb_array(img))
        ph, dh = imagehash.phash(rgb), imagehash.dhash(rgb)
        qkp, qdesc = self.features(rgb)
        cos = None
        if self.embedder is not None and self._emb is not None:
            q = _normalise(np.asarray(self.embedder.embed([rgb]), np.float32))  # [1, D]
            cos = (self._emb @ q[0]).astype(np.float64)  # [N]
        inliers = {}
        if qdesc is not None and len(qdesc) >= 2:
            inliers = {i: self._inliers(qkp, qdesc, self.entries[i]) for i in self._candidates(qdesc)}
        hits = []
        for i, e in enumerate(self.entries):
            hd = max(ph - e.phash, dh - e.dhash)
            n_in = inliers.get(i, 0)
            c = float(cos[i]) if cos is not None else None
            ev, score = [], 0.0
            if n_in >= cfg.min_inliers:
                ev.append(f"{n_in} feature inliers")
                score = max(score, 0.5 + 0.5 * min(1.0, n_in / (4 * cfg.min_inliers)))
            if hd <= cfg.hash_max_distance:
                ev.append(f"hash distance {hd}/64")
                score = max(score, 1.0 - hd / 64)
            if c is not None and c >= cfg.embedding_min_cosine:
                ev.append(f"embedding cosine {c:.3f}")
                score = max(score, 0.5 * (1 + c) * 0.99)
            if ev:
                hits.append({**e.meta, "score": round(score, 4), "inliers": n_in,
                             "hash_distance": int(hd), "cosine": c, "evidence": ev})
        hits.sort(key=lambda h: (-h["score"], -h["inliers"], h["hash_distance"]))
        return hits[:top_k]


# ------------------------------------------------------------------------------------ web lens

async def web_lens(img: Image.Image, cfg: ImageSearchConfig, top_k: int) -> list[dict[str, Any]]:
    """Serper-style lens search; raises ToolError (transient/fatal) on failure."""
    import aiohttp

    name = "ImageSearch"
    key = os.environ.get(cfg.web_api_key_env, "")
    if not key:
        raise ToolError(ErrorKind.FATAL, f"{name}: the web backend needs an API key in the "
                        f"environment variable {cfg.web_api_key_env}", name)
    timeout = aiohttp.ClientTimeout(total=cfg.web_timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            url = img.info.get("url") if isinstance(img.info.get("url"), str) else None
            if not url:
                if not cfg.web_upload_url:
                    raise ToolError(ErrorKind.FATAL, f"{name}: a lens API needs a public URL for "
                                    "the image; it has none and ImageSearchConfig.web_upload_url "
                                    "is not set", name)
                buf = io.BytesIO()
                Image.fromarray(to_rgb_array(img)).save(buf, format="PNG")
                form = aiohttp.FormData()
                form.add_field("file", buf.getvalue(), filename="image.png", content_type="image/png")
                async with http.post(cfg.web_upload_url, data=form) as r:
                    body = await r.text()
                    _check_status(r.status, body, "image upload")
                    url = body.strip()
            payload = {"url": url, "gl": cfg.web_gl, "hl": cfg.web_hl}
            async with http.post(cfg.web_endpoint, json=payload,
                                 headers={"X-API-KEY": key}) as r:
                body = await r.text()
                _check_status(r.status, body, "lens API")
    except ToolError:
        raise
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        raise ToolError(ErrorKind.TRANSIENT, f"{name}: web request failed: "
                        f"{type(e).__name__}: {e}", name) from None
    try:
        data = json.loads(body)
        rows = data.get("organic") or data.get("visual_matches") or data.get("visualMatches") or []
    except (ValueError, AttributeError):
        raise ToolError(ErrorKind.TRANSIENT, f"{name}: lens API answered non-JSON: {body[:200]!r}",
                        name) from None
    return [{"title": str(r.get("title", "")), "page": str(r.get("link", "")),
             "source": str(r.get("source", "")), "image_url": r.get("imageUrl")}
            for r in rows[:top_k] if isinstance(r, dict)]


def _check_status(status: int, body: str, what: str) -> None:
    if status == 429 or status >= 500:
        raise ToolError(ErrorKind.TRANSIENT, f"ImageSearch: {what} answered HTTP {status}: "
                        f"{body[:200]!r}", "ImageSearch")
    if status in (401, 403):
        raise ToolError(ErrorKind.FATAL, f"ImageSearch: {what} rejected the API key (HTTP "
                        f"{status})", "ImageSearch")
    if status >= 400:
        raise ToolError(ErrorKind.FATAL, f"ImageSearch: {what} answered HTTP {status}: "
                        f"{body[:200]!r}", "ImageSearch")


# ----------------------------------------------------------------------------------------- tool

def _query_image(args: dict[str, Any], ctx: ToolContext, cfg: ImageSearchConfig) -> tuple[Image.Image, str, int]:
    name = "ImageSearch"
    check_keys(args, ("image", "top_k", "box", "coords"), ("image",), name)
    ref = args["image"]
    img = checked_image(ctx, ref, cfg.max_input_pixels, name)
    top_k = get_int(args, "top_k", cfg.default_top_k, 1, cfg.max_top_k, name)
    if args.get("box") is not None:
        coords = get_enum(args, "coords", "pixel", COORDS, name)
        (box,) = parse_boxes(args["box"], coords, img.size, ref, name, 1)
        img, ref = img.crop(box), f"{ref} region {list(box)}"
    return img, ref, top_k


def _format_local(ref: str, hits: list[dict[str, Any]], n: int) -> str:
    if not hits:
        return (f"ImageSearch (local corpus of {n} images) for {ref}: no match (no image shares "
                "enough local features or a near-identical perceptual hash).")
    out = [f"ImageSearch (local corpus of {n} images) for {ref}: {len(hits)} match(es), best first:"]
    for i, h in enumerate(hits, 1):
        out.append(f"{i}. {h.get('title') or '(untitled)'} — page {h.get('page') or 'none'} "
                   f"(entity {h.get('entity')}, corpus image {h.get('id')}; score {h['score']:.2f}: "
                   f"{', '.join(h['evidence'])})")
    return "\n".join(out)


def image_search_tools(cfg: ImageSearchConfig | None = None,
                       index: ImageSearchIndex | None = None) -> list[Tool]:
    """Build the ImageSearch tool. The local index is `index`, or built on first use from
    cfg.corpus_dir (or the default world), once, under a lock."""
    cfg = cfg or ImageSearchConfig()
    lock = threading.Lock()
    state: dict[str, ImageSearchIndex] = {} if index is None else {"index": index}

    def get_index() -> ImageSearchIndex:
        with lock:
            if "index" not in state:
                embedder = (OnnxImageEmbedder(cfg.embedding_model, cfg.embedding_input_size)
                            if cfg.embedding_model else None)
                root = cfg.corpus_dir
                if root is None:
                    from ..offline.world import ensure_world
                    root = str(ensure_world().root)
                state["index"] = ImageSearchIndex.from_dir(root, cfg, embedder)
            return state["index"]

    def local_core(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        img, ref, top_k = _query_image(args, ctx, cfg)
        idx = get_index()
        hits = idx.search(img, top_k)
        return ToolResult(text=_format_local(ref, hits, len(idx)),
                          meta={"backend": "local", "matches": hits})

    if cfg.backend == "local":
        fn, batch_fn = make_async(local_core, "ImageSearch")
    else:
        async def fn(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
            try:
                img, ref, top_k = _query_image(args, ctx, cfg)
                rows = await web_lens(img, cfg, top_k)
            except ToolError as e:
                return ToolResult(error=ToolError(e.kind, e.message, "ImageSearch"))
            except Exception as e:
                return ToolResult.fail(ErrorKind.FATAL, f"ImageSearch failed: {type(e).__name__}: {e}",
                                       "ImageSearch")
            lines = [f"{i}. {r['title']} — {r['page']} ({r['source']})" for i, r in enumerate(rows, 1)]
            text = (f"ImageSearch (web lens) for {ref}: {len(rows)} result(s)" +
                    (":\n" + "\n".join(lines) if rows else "."))
            return ToolResult(text=text, meta={"backend": "web", "matches": rows})

        async def batch_fn(calls: list[tuple[dict[str, Any], ToolContext]]) -> list[ToolResult]:
            return list(await asyncio.gather(*(fn(a, c) for a, c in calls)))

    params = {"type": "object", "additionalProperties": False, "required": ["image"],
              "properties": {
                  "image": {"type": "string", "description": "image reference, e.g. 'img_1'"},
                  "top_k": {"type": "integer", "minimum": 1, "maximum": cfg.max_top_k,
                            "default": cfg.default_top_k},
                  "box": {"type": "array", "items": {"type": "number"}, "minItems": 4,
                          "maxItems": 4, "description": "optional region [x1, y1, x2, y2] to search with"},
                  "coords": {"type": "string", "enum": list(COORDS), "default": "pixel"}}}
    return [Tool(name="ImageSearch", description=(
        "Reverse image search: find where an image (or a crop of it) appears and which entity, "
        "title and page it belongs to."), parameters=params, fn=fn, batch_fn=batch_fn,
        image_args=("image",), timeout_s=60.0, max_concurrency=4,
        retries=2 if cfg.backend == "web" else 0)]


def register_image_search_tools(cfg: ImageSearchConfig | None = None,
                                index: ImageSearchIndex | None = None, *,
                                replace: bool = False) -> list[Tool]:
    """Build the ImageSearch tool and add it to the global registry."""
    return [register(t, replace=replace) for t in image_search_tools(cfg, index)]
