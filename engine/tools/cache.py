"""On-disk tool-result cache: sqlite in WAL mode, keyed by (tool, key), with a TTL per entry.

Stores a successful ToolResult's text, its images (PNG-encoded, length-prefixed in one blob)
and its JSON meta. Several processes (rollout workers) may share one file: sqlite does the
locking, WAL lets readers run beside a writer, and a busy timeout rides out short write locks.
Errors are never cached (a transient failure must be retried next time). Connections open
lazily and are closed around fork() (os.register_at_fork), so a cache object survives a fork.

    cache = ToolCache("/tmp/spyglass-tools.sqlite")
    cache.put("TextSearch", key, result, ttl_s=3600)
    hit = cache.get("TextSearch", key)        # ToolResult or None (missing or expired)
    await cache.aget(...), await cache.aput(...)  # the same, off the event loop
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import sqlite3
import struct
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from PIL import Image

from spyglass.engine.tools.base import ToolResult, encode_png

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    tool TEXT NOT NULL, key TEXT NOT NULL, created REAL NOT NULL, expires REAL NOT NULL,
    text TEXT NOT NULL, images BLOB NOT NULL, meta TEXT NOT NULL,
    PRIMARY KEY (tool, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS results_expires ON results (expires);
"""


def pack_images(images: list[Image.Image]) -> bytes:
    """PNG-encode images into one blob: for each, a 4-byte big-endian length and the PNG."""
    parts = []
    for img in images:
        png = encode_png(img)
        parts.append(struct.pack(">I", len(png)) + png)
    return b"".join(parts)


def unpack_images(blob: bytes) -> list[Image.Image]:
    """Inverse of pack_images; a truncated blob raises ValueError."""
    out, pos = [], 0
    while pos < len(blob):
        if pos + 4 > len(blob):
            raise ValueError(f"image blob truncated at byte {pos} of {len(blob)}")
        (n,) = struct.unpack_from(">I", blob, pos)
        pos += 4
        if pos + n > len(blob):
            raise ValueError(f"image blob truncated: image of {n} bytes at {pos} of {len(blob)}")
        img = Image.open(io.BytesIO(blob[pos:pos + n]))
        img.load()
        out.append(img)
        pos += n
    return out


class ToolCache:
    """A sqlite-backed cache of successful tool results, safe to share across processes."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0) -> None:
        if busy_timeout_s <= 0:
            raise ValueError(f"busy_timeout_s must be > 0, got {busy_timeout_s}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._closed = False
        with self._lock:
            self._conn().executescript(_SCHEMA)
        _LIVE.add(self)

    def _conn(self) -> sqlite3.Connection:
        """The connection, opened lazily (again after a fork; see _close_before_fork)."""
        if self._closed:
            raise ValueError(f"ToolCache {self.path} is closed")
        if self._db is None:
            db = sqlite3.connect(str(self.path), timeout=self.busy_timeout_s,
                                 check_same_thread=False, isolation_level=None)
            db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            self._db = db
        return self._db

    def get(self, tool: str, key: str, *, now: float | None = None) -> ToolResult | None:
        """The cached result for (tool, key), or None when absent or expired."""
        now = time.time() if now is None else now
        with self._lock:
            row = self._conn().execute(
                "SELECT text, images, meta FROM results WHERE tool = ? AND key = ? AND expires > ?",
                (tool, key, now)).fetchone()
        if row is None:
            return None
        text, blob, meta = row
        return ToolResult(text=text, images=unpack_images(blob), meta=json.loads(meta))

    def put(self, tool: str, key: str, result: ToolResult, *, ttl_s: float,
            now: float | None = None) -> None:
        """Store a successful result; errors are refused (they must not be replayed)."""
        if result.error is not None:
            raise ValueError(f"refusing to cache an error result for {tool!r}: {result.error!r}")
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        now = time.time() if now is None else now
        meta = json.dumps(_jsonable(result.meta), sort_keys=True)
        row = (tool, key, now, now + ttl_s, result.text, pack_images(result.images), meta)
        with self._lock:
            self._conn().execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?, ?)", row)

    async def aget(self, tool: str, key: str) -> ToolResult | None:
        return await asyncio.to_thread(self.get, tool, key)

    async def aput(self, tool: str, key: str, result: ToolResult, *, ttl_s: float) -> None:
        await asyncio.to_thread(self.put, tool, key, result, ttl_s=ttl_s)

    def purge_expired(self, *, now: float | None = None) -> int:
        """Delete expired entries; returns how many were removed."""
        now = time.time() if now is None else now
        with self._lock:
            cur = self._conn().execute("DELETE FROM results WHERE expires <= ?", (now,))
        return cur.rowcount

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn().execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
            self._db, self._closed = None, True
        _LIVE.discard(self)

    def __del__(self) -> None:
        # close now: a dropped sqlite3 connection lingers in a reference cycle until a GC
        # pass, which may run in a forked child and clobber the parent's WAL
        db = getattr(self, "_db", None)
        if db is not None:
            try:
                db.close()
            except Exception:
                pass

    def __enter__(self) -> "ToolCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# An sqlite connection must not cross a fork (the child would share the parent's lock state
# and lose writes): every live cache closes its connection just before a fork, holding its
# lock so no operation is mid-way, and both sides reopen lazily afterwards.
_LIVE: "weakref.WeakSet[ToolCache]" = weakref.WeakSet()


def _close_before_fork() -> None:
    for cache in list(_LIVE):
        cache._lock.acquire()
        if cache._db is not None:
            cache._db.close()
            cache._db = None


def _release_after_fork() -> None:
    for cache in list(_LIVE):
        if cache._lock.locked():
            cache._lock.release()


os.register_at_fork(before=_close_before_fork, after_in_parent=_release_after_fork,
                    after_in_child=_release_after_fork)


def _jsonable(meta: dict[str, Any]) -> dict[str, Any]:
    """Keep only JSON-serialisable meta values (others become their repr)."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        try:
            json.dumps(v)
            out[str(k)] = v
        except (TypeError, ValueError):
            out[str(k)] = repr(v)
    return out
