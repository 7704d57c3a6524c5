"""The tool contract: what a tool is, what it returns, how its failures are classified.

A tool is a plain async function chosen by name (DESIGN style 4) plus an OpenAI-style JSON
schema. It receives its parsed arguments and a ToolContext (the trajectory's active visual
context and scratch space) and returns a ToolResult: text and/or images, or a typed error.

Failure classes (read by the fatal-step detector and the retry policy):
  bad_args  -- the model's call is wrong (unknown image ref, box outside the image, bad type):
               the model is told, no retry, counts as a tool-execution error for the cascade.
  transient -- the world failed (timeout, HTTP 5xx, rate limit): retried with backoff; if it
               still fails it is reported like a fatal one.
  fatal     -- the tool could not run at all (crash, sandbox killed, resource cap).

Images in a trajectory are referred to as img_1, img_2, ... in order of appearance (img_1 is the
question's image). A tool returns new images unpublished in ToolResult.images (captions in
meta["captions"]); the executor names them per caller (imgutil.publish), so a cached or coalesced
result names the right img_N in every trajectory.

    from spyglass.engine.tools.base import Tool, ToolResult, ToolContext, register, get_tool
"""
from __future__ import annotations

import enum
import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from PIL import Image

_IMG_REF = re.compile(r"^img_(\d+)$")


class ErrorKind(str, enum.Enum):
    """How a tool failure is treated: see the module docstring."""

    BAD_ARGS = "bad_args"
    TRANSIENT = "transient"
    FATAL = "fatal"


class ToolError(Exception):
    """A classified tool failure; its message is shown to the model as the observation."""

    def __init__(self, kind: ErrorKind | str, message: str, tool: str = "") -> None:
        super().__init__(message)
        self.kind = ErrorKind(kind)
        self.message = message
        self.tool = tool

    def __repr__(self) -> str:
        return f"ToolError({self.kind.value}, {self.tool!r}, {self.message!r})"


@dataclass
class ToolResult:
    """What a tool call produced: text and/or new images, or an error (never both)."""

    text: str = ""
    images: list[Image.Image] = field(default_factory=list)
    error: ToolError | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. which backend ran, cache hit

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def fail(cls, kind: ErrorKind | str, message: str, tool: str = "") -> "ToolResult":
        return cls(error=ToolError(kind, message, tool))


def image_digest(img: Image.Image) -> str:
    """A content hash of an image (mode, size and pixels), used in coalescing and cache keys."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.mode}:{img.size[0]}x{img.size[1]}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


@dataclass
class ToolContext:
    """Per-trajectory state a tool may read: the active visual context and a scratch dir."""

    images: list[Image.Image] = field(default_factory=list)  # images[0] is img_1
    scratch_dir: Path | None = None
    trajectory_id: str = ""

    def resolve_image(self, ref: str) -> Image.Image:
        """Return the image named `ref` (img_N); a bad reference is a bad_args ToolError."""
        m = _IMG_REF.match(ref.strip()) if isinstance(ref, str) else None
        if m is None:
            raise ToolError(ErrorKind.BAD_ARGS, f"image reference {ref!r} is not of the form img_N")
        n = int(m.group(1))
        if not 1 <= n <= len(self.images):
            have = f"img_1..img_{len(self.images)}" if self.images else "no images"
            raise ToolError(ErrorKind.BAD_ARGS, f"unknown image {ref!r}: the context has {have}")
        return self.images[n - 1]

    def image_key(self, ref: str) -> str:
        """Content digest of the image named `ref`: identical pixels give identical keys."""
        return image_digest(self.resolve_image(ref))


ToolFn = Callable[[dict[str, Any], ToolContext], Awaitable[ToolResult]]
BatchToolFn = Callable[[list[tuple[dict[str, Any], ToolContext]]], Awaitable[list[ToolResult]]]


@dataclass(frozen=True)
class Tool:
    """A named tool: schema, async implementation, optional batched implementation, limits."""

    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    fn: ToolFn
    batch_fn: BatchToolFn | None = None
    image_args: tuple[str, ...] = ()  # argument names holding img_N refs (keyed by content)
    timeout_s: float = 30.0
    max_concurrency: int = 8
    retries: int = 2
    cacheable: bool = True
    cache_ttl_s: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", self.name):
            raise ValueError(f"tool name {self.name!r} must be an identifier of at most 64 chars")
        if self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON schema of type object")
        if self.timeout_s <= 0 or self.max_concurrency < 1 or self.retries < 0:
            raise ValueError(
                f"tool {self.name!r}: bad limits timeout_s={self.timeout_s} "
                f"max_concurrency={self.max_concurrency} retries={self.retries}")

    def schema(self) -> dict[str, Any]:
        """The OpenAI-style function schema shown to the model and given to the parser."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": self.parameters}}


_REGISTRY: dict[str, Tool] = {}


def register(tool: Tool, *, replace: bool = False) -> Tool:
    """Add a tool to the global registry (by name)."""
    if tool.name in _REGISTRY and not replace:
        raise ValueError(f"tool {tool.name!r} is already registered")
    _REGISTRY[tool.name] = tool
    return tool


def get_tool(name: str) -> Tool:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown tool {name!r}; registered: {sorted(_REGISTRY)}") from None


def registered_tools() -> dict[str, Tool]:
    return dict(_REGISTRY)


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
