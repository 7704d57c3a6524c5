"""One config system: typed dataclasses per subsystem, validated on construction, CLI generated.

Every subsystem declares a dataclass whose __post_init__ checks its values and names the
offending one. This module turns nested dicts (YAML/JSON files) into those dataclasses, back
into dicts, and generates argparse flags (`--engine.max_turns 50`) from them, so the CLI is
never written by hand.

    cfg = load_config(RolloutConfig, "run.yaml", overrides=["engine.max_turns=8"])
    ap = ConfigParser(); add_dataclass_args(ap, RolloutConfig); cfg = config_from_args(RolloutConfig, ap.parse_args())

What a config class declares, and the CLI shows:
  * a field's description: `field(metadata={"help": ...})`, else its trailing `# comment`
    (continued by the comment-only lines right below whose text is indented past `# `, e.g.
    aligned under it), else an attribute docstring, else a comment block right above it;
  * a field's allowed values: `Literal[...]`, or `field(..., metadata={"choices": (...)})`
    (for a list field, the values of its items); they become argparse `choices` and are checked
    by `from_dict` with the key and the value in the message;
  * short flags: `FLAG_ALIASES: ClassVar[dict[str, str]] = {"model": "rollout.model"}` on the
    top-level class (`--model` sets `rollout.model`; a real top-level leaf field of that name
    wins; a section name, which has no flag of its own, does not block `--data` -> data.path).

Defaults shown and used are the top-level class's: a partial mapping (file, `--x.y` flags)
changes only what it names, on top of the parent field's default instance (so GRPOConfig's
`rollout` default_factory values survive `rollout: {engine: {max_turns: 8}}`); a mapping given
for an Optional section that defaults to None builds it from its class defaults.

Why hand-written: measured against tyro 1.0.17 and simple-parsing 0.1.9 on GRPOConfig, neither
keeps the flag spelling (tyro drops `--rollout.backend_options` (dict[str, Any]) entirely, turns
the Optional `reward.judge.llm` section into a subcommand, rejects `--colocate yes` and
`--rollout.env.tools [Crop,OCR]`, attaches continuation comments to the next field and prints
validation errors as a multi-line box; simple-parsing shortens paths to `--n_samples`).
"""
from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import difflib
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Iterator, NamedTuple, TypeVar

import yaml

T = TypeVar("T")
_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A config value is wrong; the message names the key path and the value."""


def check(cond: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless cond: the one-line validator used in __post_init__."""
    if not cond:
        raise ConfigError(msg)


# ------------------------------------------------------------------------------ types
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


def _field_default(f: dataclasses.Field) -> Any:
    """The field's default value (a fresh one from its factory), or MISSING."""
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return _MISSING


def field_choices(f: dataclasses.Field, tp: Any) -> tuple[tuple[Any, ...] | None, bool]:
    """(allowed values, per_item): from metadata["choices"], else Literal[...] (also as the
    item type of a list/tuple field); per_item is True when they constrain a list's items."""
    tp, _ = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    per_item = origin in (list, tuple)
    if "choices" in f.metadata:
        return tuple(f.metadata["choices"]), per_item
    inner = (typing.get_args(tp) or (Any,))[0] if per_item else tp
    if typing.get_origin(inner) is typing.Literal:
        return typing.get_args(inner), per_item
    return None, False


# ------------------------------------------------------------------------------ dict -> dataclass
def _parse_flow(text: str, path: str) -> Any:
    """A list or mapping given as text (a command-line override): YAML flow style, so JSON
    and the unquoted `[Crop, OCR]` both work; a parse error names the key and the text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: cannot parse {text!r} as a list or mapping ({e.__class__.__name__}: "
                          f"{str(e).splitlines()[0]})") from None


def _coerce_scalar(tp: Any, value: Any, path: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}: expected a boolean, got {value!r}")
    if isinstance(value, bool):
        raise ConfigError(f"{path}: expected {tp.__name__}, got boolean {value!r}")
    try:
        out = tp(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}") from None
    if tp is int and isinstance(value, float) and value != out:
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    return out


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
    if tp in (bool, int, float):
        return _coerce_scalar(tp, value, path)
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
        for allowed in typing.get_args(tp):  # a flag's text matches by its spelling ("1" -> 1)
            if value == allowed or (isinstance(value, str) and not isinstance(allowed, str) and value == str(allowed)):
                return allowed
        raise ConfigError(f"{path}: {value!r} is not one of {list(typing.get_args(tp))}")
    return value


def _check_choices(f: dataclasses.Field, tp: Any, value: Any, path: str) -> None:
    if "choices" not in f.metadata or value is None:
        return  # Literal types are checked by _coerce
    choices, per_item = field_choices(f, tp)
    for i, v in enumerate(value if per_item else [value]):
        if v not in choices:  # type: ignore[operator]
            where = f"{path}[{i}]" if per_item else path
            raise ConfigError(f"{where}: {v!r} is not one of {list(choices)}")  # type: ignore[arg-type]


def from_dict(cls: type[T], data: dict[str, Any], _path: str = "", _base: Any = None) -> T:
    """Build dataclass `cls` from a nested dict; unknown keys are errors naming them.

    A nested section given as a mapping is merged onto the parent field's default instance
    (or, inside such a section, onto the corresponding part of it): keys not named keep their
    defaults. A ValueError from __post_init__ becomes a ConfigError prefixed with the path."""
    where = _path or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        path = f"{_path}.{name}" if _path else name
        if name not in data:
            if _base is not None:
                kwargs[name] = copy.deepcopy(getattr(_base, name))
            elif f.default is _MISSING and f.default_factory is _MISSING:  # type: ignore[misc]
                raise ConfigError(f"{where}: missing required key {name!r}")
            continue
        value, (tp, _) = data[name], _unwrap_optional(hints[name])
        if _is_dataclass_type(tp) and isinstance(value, dict):
            base = getattr(_base, name) if _base is not None else _field_default(f)
            kwargs[name] = from_dict(tp, value, path, _base=base if isinstance(base, tp) else None)
        else:
            kwargs[name] = _coerce(hints[name], value, path)
            _check_choices(f, hints[name], kwargs[name], path)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(_at(_path, cls, str(e))) from None
    except ValueError as e:  # the project's validators raise ValueError too
        raise ConfigError(_at(_path, cls, str(e))) from e


def _at(path: str, cls: type, msg: str) -> str:
    """A validator's message placed at `path`: "AlgoConfig.mode ..." -> "algo.mode ..."."""
    if not path:
        return msg
    own = f"{cls.__name__}."
    return f"{path}.{msg[len(own):]}" if msg.startswith(own) else f"{path}: {msg}"


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        if d.get(k) is None:  # a section not named yet (or an optional one left at None)
            d[k] = {}
        d = d[k]
        if not isinstance(d, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    d[keys[-1]] = value


def read_config(path: str | Path) -> dict[str, Any]:
    """The nested dict in a YAML/JSON file; a missing file or bad YAML is a ConfigError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def load_config(cls: type[T], path: str | Path | None = None,
                overrides: list[str] | None = None) -> T:
    """Read a YAML/JSON file (optional) and `key.sub=value` overrides into `cls`: each changes
    only what it names, the rest keeps `cls()`'s defaults (nested default factories included)."""
    data: dict[str, Any] = read_config(path) if path is not None else {}
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key.sub=value")
        k, v = ov.split("=", 1)
        _set_path(data, k.strip(), v)  # a string: coerced by the field's type
    return from_dict(cls, data)


# ------------------------------------------------------------------------------ field descriptions
def _comment_text(tok: tuple[int, str]) -> tuple[int, str]:
    """(column where the comment's text starts, the text) of a (column, '#  text') token."""
    col, s = tok
    text = s.lstrip("#").strip()
    return col + len(s) - len(s.lstrip("#").lstrip()), text


@functools.lru_cache(maxsize=None)
def _own_field_docs(cls: type) -> dict[str, tuple[str, int]]:
    """name -> (description or "", absolute line) for the fields written in `cls`'s source."""
    try:
        lines, first = inspect.getsourcelines(cls)
        src = textwrap.dedent("".join(lines))
        tree = ast.parse(src)
        comments = {t.start[0]: (t.start[1], t.string)
                    for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return {}
    src_lines = src.splitlines()
    only = {ln for ln in comments if src_lines[ln - 1].lstrip().startswith("#")}
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef)).body
    docs: dict[str, tuple[str, int]] = {}
    used: set[int] = set()
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        end = node.end_lineno or node.lineno
        parts: list[str] = []
        trailing = next((comments[ln] for ln in (end, node.lineno) if ln in comments and ln not in only), None)
        if trailing is not None:  # the trailing comment and its continuation lines
            parts.append(_comment_text(trailing)[1])
            ln = end + 1
            while ln in only and _comment_text(comments[ln])[0] > node.col_offset + 2:  # indented text
                parts.append(_comment_text(comments[ln])[1])
                used.add(ln)
                ln += 1
        nxt = body[i + 1] if i + 1 < len(body) else None
        if not parts and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                and isinstance(nxt.value.value, str):  # an attribute docstring
            parts.append(nxt.value.value)
        if not parts:  # a comment block right above the field
            ln = node.lineno - 1
            while ln in only and ln not in used:
                parts.insert(0, _comment_text(comments[ln])[1])
                ln -= 1
        docs[node.target.id] = (" ".join(" ".join(parts).split()), first + node.lineno - 1)
    return docs


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """name -> one-line description of every field of dataclass `cls` that has one (see the
    module docstring for where descriptions come from; metadata["help"] is taken first)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update({k: v for k, (v, _) in _own_field_docs(klass).items() if v})
    for f in dataclasses.fields(cls):
        if f.metadata.get("help"):
            docs[f.name] = " ".join(str(f.metadata["help"]).split())
    return docs


def field_line(cls: type, name: str) -> str:
    """`file:line` of field `name` in the class of `cls`'s MRO that declares it."""
    for klass in cls.__mro__:
        got = _own_field_docs(klass).get(name) if dataclasses.is_dataclass(klass) else None
        if got is not None:
            return f"{inspect.getsourcefile(klass)}:{got[1]}"
    return f"{cls.__qualname__}.{name}"


# ------------------------------------------------------------------------------ flags
class FlagSpec(NamedTuple):
    """One generated flag: a leaf field of the config tree."""

    name: str  # dotted path, the flag without its dashes: "rollout.engine.n_samples"
    owner: type  # the dataclass that declares the field
    field: dataclasses.Field
    type: Any  # the field's type hint (Optional not unwrapped)
    default: Any  # the value in the top-level default instance; MISSING when required
    help: str  # "" when the field has no description
    choices: tuple[Any, ...] | None
    per_item: bool  # the choices constrain a list's items


class SectionSpec(NamedTuple):
    """A nested dataclass section: its flags share the prefix `name.`."""

    name: str
    cls: type
    optional: bool  # Optional[...] = None: off unless a flag or the file names it


def _default_instance(cls: type) -> Any:
    try:
        return cls()
    except (TypeError, ValueError):  # required fields, or defaults that need the environment
        return None


def walk_config(cls: type, inst: Any = _MISSING, prefix: str = "") -> Iterator[FlagSpec | SectionSpec]:
    """Every leaf field (FlagSpec) and nested section (SectionSpec, before its fields) of
    dataclass `cls`, depth first, with defaults read from `inst` (by default `cls()`; a section
    that is None there shows its class defaults)."""
    if inst is _MISSING:
        inst = _default_instance(cls)
    hints, docs = _hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        name = f"{prefix}{f.name}"
        value = getattr(inst, f.name) if inst is not None else _field_default(f)
        if _is_dataclass_type(tp):
            yield SectionSpec(name, tp, optional and value is None)
            yield from walk_config(tp, value if isinstance(value, tp) else None, name + ".")
            continue
        choices, per_item = field_choices(f, hints[f.name])
        yield FlagSpec(name, cls, f, hints[f.name], value, docs.get(f.name, ""), choices, per_item)


def flag_specs(cls: type) -> list[FlagSpec]:
    """The leaf fields of `cls` as flags, defaults from `cls()`."""
    return [s for s in walk_config(cls) if isinstance(s, FlagSpec)]


class ConfigParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, `prog: message` (exit 2), no usage dump;
    an unknown flag gets the nearest known ones."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        if message.startswith("unrecognized arguments:"):
            known = [o for o in self._option_string_actions if o.startswith("--") and o != "--help"]
            near = [m for a in message.split(":", 1)[1].split() if a.startswith("--")
                    for m in difflib.get_close_matches(a.split("=")[0], known, n=2)]
            message += f" (did you mean {' or '.join(dict.fromkeys(near))}?)" if near else ""
        self.exit(2, f"{self.prog}: {message}\n")


def _metavar(tp: Any) -> str:
    tp, _ = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return "LIST"
    if origin is dict:
        return "MAPPING"
    return getattr(tp, "__name__", "VALUE").upper()


def _flag_help(spec: FlagSpec) -> str:
    text = spec.help
    if spec.choices is not None and spec.per_item:
        text += f" [items: {' | '.join(map(str, spec.choices))}]"
    text += " (required)" if spec.default is _MISSING else f" (default: {spec.default!r})"
    return text.strip().replace("%", "%%")  # argparse %-formats help strings


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "",
                       groups: bool = True) -> None:
    """Add one `--prefix.field` flag per leaf field of `cls` (nested dataclasses recurse): its
    description, its choices, and its default as the top-level `cls()` has it; one help group
    per section; plus `cls.FLAG_ALIASES` (see the module docstring)."""
    sections: dict[str, Any] = {"": parser}  # top-level fields go with --help, --config
    targets: dict[str, FlagSpec] = {}
    for spec in walk_config(cls, prefix=prefix):
        if isinstance(spec, SectionSpec):
            if groups:
                doc = (spec.cls.__doc__ or "").strip().split("\n")[0]
                note = " (optional: None unless a flag or the file sets one of its fields)" if spec.optional else ""
                sections[spec.name] = parser.add_argument_group(spec.name, (doc + note).strip() or None)
            continue
        group = sections.get(spec.name.rpartition(".")[0], parser) if groups else parser
        choices = None
        if spec.choices is not None and not spec.per_item:
            choices = [str(c) for c in spec.choices] + (["none"] if _unwrap_optional(spec.type)[1] else [])
        group.add_argument(f"--{spec.name}", dest=f"cfg:{spec.name}", default=argparse.SUPPRESS,
                           choices=choices, metavar=None if choices else _metavar(spec.type), help=_flag_help(spec))
        targets[spec.name] = spec
    if prefix:
        return
    own = {name for name in targets if "." not in name}  # top-level leaf flags (a section has none)
    for alias, target in (getattr(cls, "FLAG_ALIASES", None) or {}).items():
        if target not in targets:
            raise ConfigError(f"{cls.__name__}.FLAG_ALIASES: {alias!r} -> {target!r} is not a field path; "
                              f"close: {difflib.get_close_matches(target, list(targets), n=3)}")
        if alias in own or f"--{alias}" in parser._option_string_actions:
            continue  # a real top-level field (or an existing flag) of that name wins
        act = parser._option_string_actions[f"--{target}"]
        sections.get("", parser).add_argument(f"--{alias}", dest=f"cfg:{target}", default=argparse.SUPPRESS,
                                              choices=act.choices, metavar=act.metavar,
                                              help=f"alias of --{target}")


def config_from_args(cls: type[T], ns: argparse.Namespace, base: dict[str, Any] | None = None) -> T:
    """The dataclass from parsed flags: `base` (e.g. a file's dict), then the flags given, each
    changing only what it names (the rest keeps `cls()`'s defaults)."""
    data: dict[str, Any] = copy.deepcopy(base or {})
    for key, value in vars(ns).items():
        if key.startswith("cfg:"):
            _set_path(data, key[4:], value)
    return from_dict(cls, data)
