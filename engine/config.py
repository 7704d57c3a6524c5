"""One config system: typed dataclasses per subsystem, validated on construction, CLI generated.

Every subsystem declares a dataclass whose __post_init__ checks its values and names the
offending one. This module turns nested dicts (YAML/JSON files) into those dataclasses, back
into dicts, and generates argparse flags (`--engine.max_turns 50`) from them, so the CLI is
never written by hand.

    cfg = load_config(RolloutConfig, "run.yaml", overrides=["engine.max_turns=8"])
    add_dataclass_args(parser, RolloutConfig); cfg = config_from_args(RolloutConfig, ns)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is wrong; the message names the key path and the value."""


def check(cond: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless cond: the one-line validator used in __post_init__."""
    if not cond:
        raise ConfigError(msg)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_flow(text: str, path: str) -> Any:
    """A list or mapping given as text (a command-line override): YAML flow style, so JSON
    and the unquoted `[Crop, OCR]` both work; a parse error names the key and the text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: cannot parse {text!r} as a list or mapping ({e.__class__.__name__}: "
                          f"{str(e).splitlines()[0]})") from None


def _coerce(tp: Any, value: Any, path: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    if optional and isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path}: null is not allowed (expected {tp})")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, _path=path)
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}: expected a boolean, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected {tp.__name__}, got boolean {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = _parse_flow(value, path) if value.lstrip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if isinstance(value, str):
            value = _parse_flow(value, path)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], _path: str = "") -> T:
    """Build dataclass `cls` from a nested dict; unknown keys are errors naming them."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = _path or cls.__name__
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    hints = _hints(cls)
    kwargs = {k: _coerce(hints[k], v, f"{_path}.{k}" if _path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{_path}: {e}" if _path else str(e)) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        if d.get(k) is None:  # an optional section left at None is created by its first flag
            d[k] = {}
        d = d[k]
        if not isinstance(d, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    d[keys[-1]] = value


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: list[str] | None = None) -> T:
    """Read a YAML/JSON file (optional) and `key.sub=value` overrides into `cls`."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key.sub=value")
        k, v = ov.split("=", 1)
        _set_path(data, k.strip(), v)  # a string: coerced by the field's type
    return from_dict(cls, data)


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one `--prefix.field` flag per leaf field of `cls` (nested dataclasses recurse)."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        name = f"{prefix}{f.name}"
        if _is_dataclass_type(tp):
            add_dataclass_args(parser, tp, prefix=name + ".")
            continue
        doc = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        parser.add_argument(f"--{name}", dest=f"cfg:{name}", default=argparse.SUPPRESS,
                            metavar=getattr(tp, "__name__", "VALUE").upper(),
                            help=f"{doc} (default: {default!r})".strip())


def config_from_args(cls: type[T], ns: argparse.Namespace, base: dict[str, Any] | None = None) -> T:
    """The dataclass from parsed flags (only those given override `base`)."""
    data: dict[str, Any] = json.loads(json.dumps(base or {}))
    for key, value in vars(ns).items():
        if key.startswith("cfg:"):
            _set_path(data, key[4:], value)
    return from_dict(cls, data)
