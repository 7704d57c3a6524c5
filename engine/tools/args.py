"""Argument checking for tools whose schema is a flat JSON object (the text/web/Python tools).

The parser already rejects malformed JSON; this checks what the model put in it against the
tool's schema (required keys, types, bounds, unknown keys) and fills defaults, raising a
bad_args ToolError that names the offending key and value so the model can fix its call.

    from spyglass.engine.tools.args import check_args
    args = check_args("TextSearch", schema, {"query": "eiffel tower"})  # -> with top_k filled
"""
from __future__ import annotations

from typing import Any

from spyglass.engine.tools.base import ErrorKind, ToolError

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list,), "object": (dict,),
}


def _check_value(tool: str, key: str, value: Any, spec: dict[str, Any]) -> Any:
    want = spec.get("type")
    if want is not None:
        ok_types = _TYPES[want]
        # bool is an int subclass in Python, but true is not a number in JSON schema
        if not isinstance(value, ok_types) or (isinstance(value, bool) and want != "boolean"):
            if want == "integer" and isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ToolError(ErrorKind.BAD_ARGS, f"{tool}: argument {key!r} must be of type "
                                f"{want}, got {type(value).__name__} {value!r:.80}", tool)
    if "enum" in spec and value not in spec["enum"]:
        raise ToolError(ErrorKind.BAD_ARGS,
                        f"{tool}: argument {key!r}={value!r:.80} is not one of {spec['enum']}", tool)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = spec.get("minimum"), spec.get("maximum")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ToolError(ErrorKind.BAD_ARGS, f"{tool}: argument {key!r}={value!r} is outside "
                            f"[{lo}, {hi}]", tool)
    if isinstance(value, str):
        lo, hi = spec.get("minLength", 0), spec.get("maxLength")
        if len(value.strip()) < lo:
            raise ToolError(ErrorKind.BAD_ARGS, f"{tool}: argument {key!r} must not be empty", tool)
        if hi is not None and len(value) > hi:
            raise ToolError(ErrorKind.BAD_ARGS, f"{tool}: argument {key!r} is {len(value)} chars "
                            f"long, at most {hi} allowed", tool)
    return value


def check_args(tool: str, schema: dict[str, Any], args: Any) -> dict[str, Any]:
    """Validate `args` against a flat object `schema`; return a copy with defaults filled in."""
    if not isinstance(args, dict):
        raise ToolError(ErrorKind.BAD_ARGS, f"{tool}: arguments must be a JSON object, got "
                        f"{type(args).__name__} {args!r:.80}", tool)
    props: dict[str, Any] = schema.get("properties", {})
    if schema.get("additionalProperties", True) is False:
        unknown = sorted(set(args) - set(props))
        if unknown:
            raise ToolError(ErrorKind.BAD_ARGS, f"{tool}: unknown argument(s) {unknown}; "
                            f"expected {sorted(props)}", tool)
    missing = [k for k in schema.get("required", []) if k not in args]
    if missing:
        raise ToolError(ErrorKind.BAD_ARGS, f"{tool}: missing required argument(s) {missing}", tool)
    out: dict[str, Any] = {}
    for key, spec in props.items():
        if key in args:
            out[key] = _check_value(tool, key, args[key], spec)
        elif "default" in spec:
            out[key] = spec["default"]
    for key in args:
        out.setdefault(key, args[key])
    return out
