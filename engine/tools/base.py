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

ToolResult (with ToolError and ErrorKind) is the trajectory's record (engine/trajectory.py): the
same type goes from the tool through the runner into the observation.

A tool from a plain function (sync or async): `tool` reads the schema from the type hints and
the description from the docstring (first paragraph; per-argument text from a Google-style
`Args:` section). Arguments are checked against that schema before the function runs (a wrong
call is bad_args, told to the model); a sync function runs in a worker thread.

    @tool
    def lookup(city: str, unit: Literal["C", "F"] = "C") -> str:
        '''The current temperature of a city.

        Args:
            city: the city's English name.
            unit: Celsius or Fahrenheit.
        '''
        return f"{city}: 21 {unit}"
    # lookup is a Tool named "lookup"; `@tool(name="Weather", timeout_s=10)` renames / sets limits

Types: str, int, float, bool, list[T], dict, Optional[T], Literal[...] (an enum), PIL.Image.Image
(or a list of them: the model names images img_N, the function receives the images); a
parameter annotated ToolContext receives the call's context and is not in the schema. Returns:
str (the text), an image or a list of images (new images, named img_N for the model), a
ToolResult as is, anything else JSON-encoded. A raised ToolError keeps its kind, a TimeoutError
is transient, any other exception fatal (raise ToolError(ErrorKind.BAD_ARGS, ...) to tell the
model its call was wrong).
"""
from __future__ import annotations

import asyncio
import hashlib
import inspect
import io
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Literal, Union

from PIL import Image

# the result type is the trajectory's record: one type from the tool to the observation
from ..trajectory import ErrorKind, ToolError, ToolResult  # noqa: F401 - the tool contract's names

_IMG_REF = re.compile(r"^img_(\d+)$")


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


# ------------------------------------------------------------------- tools from plain functions
_SCALARS: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}
_SUPPORTED = ("str, int, float, bool, list[T], dict, Optional[T], Literal[...], PIL.Image.Image, "
              "ToolContext")
_LIMITS = ("timeout_s", "max_concurrency", "retries", "cacheable", "cache_ttl_s")
_SECTION = re.compile(r"^(Args|Arguments|Returns?|Raises|Yields?|Examples?|Notes?|Attributes|"
                      r"See Also|Warnings?|Todo)\s*:\s*$")
_ARG_LINE = re.compile(r"^\*{0,2}([A-Za-z_]\w*)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_IMAGE_DOC = {"one": "an image of the conversation by name: img_1 (the question's image), img_2, ...",
              "list": "images of the conversation by name (img_1, img_2, ...)"}


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None,
         description: str | None = None, **limits: Any) -> Any:
    """A Tool from a plain sync or async function: `@tool`, `@tool(name="X", timeout_s=10)` or
    `tool(fn)` (see the module docstring). `limits` are Tool's timeout_s, max_concurrency,
    retries, cacheable, cache_ttl_s. An unannotated parameter or an unsupported type raises a
    TypeError naming it, here, not when the model first calls the tool."""
    unknown = sorted(set(limits) - set(_LIMITS))
    if unknown:
        raise TypeError(f"tool(): unknown option(s) {unknown}; known: name, description, {', '.join(_LIMITS)}")
    if fn is None:
        return lambda f: _function_tool(f, name, description, limits)
    return _function_tool(fn, name, description, limits)


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(first paragraph, {argument: its text from the Google-style `Args:` section})."""
    lines = inspect.cleandoc(doc).splitlines() if doc else []
    summary: list[str] = []
    for line in lines:
        if not line.strip() or _SECTION.match(line.strip()):
            break
        summary.append(line.strip())
    args: dict[str, str] = {}
    start = next((i for i, ln in enumerate(lines) if ln.strip() in ("Args:", "Arguments:")), None)
    if start is not None:
        base = _indent(lines[start])
        entry, cur = None, None
        for line in lines[start + 1:]:
            if not line.strip():
                continue
            ind = _indent(line)
            if ind <= base:
                break
            m = _ARG_LINE.match(line.strip())
            if m and (entry is None or ind <= entry):
                entry, cur = ind, m.group(1)
                args[cur] = m.group(2).strip()
            elif cur is not None:
                args[cur] = f"{args[cur]} {line.strip()}".strip()
    return " ".join(summary), args


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _schema_of(tp: Any, where: str) -> dict[str, Any]:
    """The JSON schema of one annotation (see _SUPPORTED); TypeError naming `where` otherwise."""
    origin, targs = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        rest = [a for a in targs if a is not type(None)]
        if len(rest) != 1 or len(targs) != 2:
            raise TypeError(f"{where}: unsupported type {tp!r} (a Union other than Optional[T]); "
                            f"supported: {_SUPPORTED}")
        spec = _schema_of(rest[0], where)
        spec["type"] = [*([spec["type"]] if isinstance(spec["type"], str) else spec["type"]), "null"]
        if "enum" in spec and None not in spec["enum"]:
            spec["enum"] = [*spec["enum"], None]
        return spec
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    if tp is list or origin is list:
        return {"type": "array", **({"items": _schema_of(targs[0], f"{where} (its items)")} if targs else {})}
    if tp is dict or origin is dict:
        if targs and targs[0] is not str:
            raise TypeError(f"{where}: unsupported type {tp!r}: JSON object keys are str")
        return {"type": "object"}
    if origin is Literal:
        values = [v for v in targs if v is not None]
        kinds = {_literal_kind(v, tp, where) for v in values}
        kind = "number" if kinds == {"integer", "number"} else kinds.pop() if len(kinds) == 1 else None
        if kind is None:
            raise TypeError(f"{where}: Literal {tp!r} mixes value types {sorted(kinds)}")
        return {"type": kind if None not in targs else [kind, "null"], "enum": list(targs)}
    if tp is Image.Image:
        return {"type": "string"}
    raise TypeError(f"{where}: unsupported type {tp!r}; supported: {_SUPPORTED}")


def _literal_kind(v: Any, tp: Any, where: str) -> str:
    kind = _SCALARS.get(type(v))
    if kind is None:
        raise TypeError(f"{where}: Literal {tp!r} holds {v!r}: only str, int, float, bool values")
    return kind


def _image_kind(tp: Any) -> str | None:
    """"one" for Image (or Optional[Image]), "list" for list[Image] (or Optional of it), else None."""
    targs = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        rest = [a for a in targs if a is not type(None)]
        return _image_kind(rest[0]) if len(rest) == 1 else None
    if tp is Image.Image:
        return "one"
    if typing.get_origin(tp) is list and targs and targs[0] is Image.Image:
        return "list"
    return None


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class _Signature:
    """What a function tool needs at call time: its schema, context and image arguments."""

    parameters: dict[str, Any]
    ctx_arg: str | None
    images: dict[str, str]  # argument -> "one" | "list"


def _signature(fn: Callable[..., Any], name: str, arg_docs: dict[str, str]) -> _Signature:
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:  # a string annotation naming something the module does not have
        raise TypeError(f"tool {name!r}: cannot resolve the type hints of {fn!r}: {type(e).__name__}: {e}") from None
    props: dict[str, Any] = {}
    required: list[str] = []
    ctx_arg, images = None, {}
    for p in inspect.signature(fn).parameters.values():
        where = f"tool {name!r}: parameter {p.name!r}"
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise TypeError(f"{where} is {p.kind.description}: a tool's parameters are passed by name")
        if p.name not in hints:
            raise TypeError(f"{where} has no type annotation; annotate it with one of {_SUPPORTED}")
        tp = hints[p.name]
        if tp is ToolContext:
            ctx_arg = p.name
            continue
        spec = _schema_of(tp, where)
        kind = _image_kind(tp)
        if kind is not None:
            images[p.name] = kind
        doc = arg_docs.get(p.name) or (_IMAGE_DOC[kind] if kind else "")
        if doc:
            spec["description"] = doc
        if p.default is p.empty:
            required.append(p.name)
        elif _jsonable(p.default):
            spec["default"] = p.default
        props[p.name] = spec
    params = {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    return _Signature(params, ctx_arg, images)


def _function_tool(fn: Callable[..., Any], name: str | None, description: str | None,
                   limits: dict[str, Any]) -> Tool:
    if isinstance(fn, Tool) or inspect.isclass(fn) or not callable(fn):
        raise TypeError(f"tool() takes a function, got {fn!r}")
    tool_name = name or getattr(fn, "__name__", "")
    if not tool_name:
        raise TypeError(f"tool(): {fn!r} has no __name__; pass name=")
    summary, arg_docs = parse_docstring(inspect.getdoc(fn))
    sig = _signature(fn, tool_name, arg_docs)
    is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))

    async def call(args: dict[str, Any], ctx: ToolContext) -> ToolResult:
        try:
            kwargs = _bind(tool_name, sig, args, ctx)
            out = await fn(**kwargs) if is_async else await asyncio.to_thread(fn, **kwargs)
            if inspect.isawaitable(out):
                out = await out
            return _as_result(tool_name, out)
        except ToolError as e:
            return ToolResult(error=ToolError(e.kind, e.message, e.tool or tool_name))
        except TimeoutError as e:  # asyncio.TimeoutError is TimeoutError (3.11+)
            return ToolResult.fail(ErrorKind.TRANSIENT, f"{tool_name} timed out: {e}".rstrip(": "), tool_name)
        except Exception as e:  # as the executor classifies an uncaught exception: fatal
            return ToolResult.fail(ErrorKind.FATAL, f"{type(e).__name__}: {e}", tool_name)

    return Tool(name=tool_name, description=summary if description is None else description,
                parameters=sig.parameters, fn=call, image_args=tuple(sig.images), **limits)


def _bind(name: str, sig: _Signature, args: Any, ctx: ToolContext) -> dict[str, Any]:
    """The function's keyword arguments: `args` checked against the schema, images resolved."""
    if not isinstance(args, dict):
        raise ToolError(ErrorKind.BAD_ARGS, f"{name}: arguments must be a JSON object, got "
                        f"{type(args).__name__} {args!r:.80}", name)
    props = sig.parameters["properties"]
    unknown = sorted(set(args) - set(props))
    if unknown:
        raise ToolError(ErrorKind.BAD_ARGS, f"{name}: unknown argument(s) {unknown}; expected {sorted(props)}", name)
    missing = [k for k in sig.parameters["required"] if k not in args]
    if missing:
        raise ToolError(ErrorKind.BAD_ARGS, f"{name}: missing required argument(s) {missing}", name)
    out = {k: _conform(name, v, props[k], k) for k, v in args.items()}
    for k, kind in sig.images.items():
        if out.get(k) is not None:
            out[k] = [ctx.resolve_image(r) for r in out[k]] if kind == "list" else ctx.resolve_image(out[k])
    if sig.ctx_arg is not None:
        out[sig.ctx_arg] = ctx
    return out


def _conform(name: str, value: Any, spec: dict[str, Any], where: str) -> Any:
    """`value` checked against `spec` (type, enum, items); integral floats become ints."""
    want = spec.get("type", [])
    want = [want] if isinstance(want, str) else want
    if value is None and "null" in want:
        return None
    got = next((t for t in want if _is_json_type(value, t)), None)
    if got is None:
        raise ToolError(ErrorKind.BAD_ARGS, f"{name}: argument {where!r} must be {' or '.join(want)}, "
                        f"got {type(value).__name__} {value!r:.80}", name)
    if got == "integer" and isinstance(value, float):
        value = int(value)
    if "enum" in spec and value not in spec["enum"]:
        raise ToolError(ErrorKind.BAD_ARGS, f"{name}: argument {where!r}={value!r:.80} is not one of "
                        f"{spec['enum']}", name)
    if got == "array" and "items" in spec:
        value = [_conform(name, v, spec["items"], f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _is_json_type(v: Any, t: str) -> bool:
    if isinstance(v, bool):
        return t == "boolean"
    return {"string": isinstance(v, str), "number": isinstance(v, (int, float)),
            "integer": isinstance(v, int) or (isinstance(v, float) and v.is_integer()),
            "array": isinstance(v, list), "object": isinstance(v, dict)}.get(t, False)


def _as_result(name: str, out: Any) -> ToolResult:
    """A function's return value as a ToolResult (see the module docstring)."""
    if isinstance(out, ToolResult):
        return out
    if isinstance(out, str):
        return ToolResult(text=out)
    if isinstance(out, Image.Image):
        return ToolResult(images=[out])
    if isinstance(out, (list, tuple)) and out and all(isinstance(x, Image.Image) for x in out):
        return ToolResult(images=list(out))
    try:
        return ToolResult(text=json.dumps(out, ensure_ascii=False, allow_nan=False))
    except (TypeError, ValueError):
        raise ToolError(ErrorKind.FATAL, f"{name} returned {type(out).__name__}: not a str, an image, "
                        f"a list of images, a ToolResult or a JSON value", name) from None
