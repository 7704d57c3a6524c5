"""Plugins by dotted path: `pkg.module:attribute`, as slime and verl name custom functions.

A config value with a colon names an object in an importable module (on sys.path, e.g. the
user's own package or a file next to the run). It is imported when the config is built, so a
typo fails at start-up with one line naming the path, not hours into a run:

    RewardConfig(name="my_rewards:exact_match")     # trainer/reward.py: fn(traj) -> float
    EnvConfig(tools=["TextSearch", "my_tools:calculator", "my_tools:TOOLS"])   # engine/env.py

    fn = load_object("my_rewards:exact_match", "reward")   # the attribute (dotted after ':' ok)
    tools = load_tools("my_tools:TOOLS")                   # functions (through tool()) / Tools

Each caller checks the shape it needs and raises PluginError (a ValueError, so the config layer
reports it at the key) naming the path.
Tests: `.venv/bin/python -m pytest -q tests/test_plugins.py`.
"""
from __future__ import annotations

import importlib
import inspect
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .tools.base import Tool

_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


class PluginError(ValueError):
    """A dotted-path plugin cannot be used; the message is one line naming the path."""


def is_plugin_path(value: Any) -> bool:
    """True for a string that names a plugin (has a colon); its form is checked by load_object."""
    return isinstance(value, str) and ":" in value


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def load_object(path: str, what: str) -> Any:
    """The object `pkg.module:attr` (attr may be dotted, `mod:Class.method`). PluginError when the
    path is malformed, the module does not import, or the attribute is missing."""
    if not isinstance(path, str) or not _PATH.match(path):
        raise PluginError(f"{what} {path!r}: not of the form 'pkg.module:attribute'")
    mod_name, attr = path.split(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except Exception as e:  # ImportError, or whatever the module raised while importing
        hint = "; is its folder on PYTHONPATH?" if isinstance(e, ModuleNotFoundError) and \
            e.name == mod_name.split(".")[0] else ""
        raise PluginError(f"{what} {path!r}: cannot import module {mod_name!r} ({_one_line(e)}){hint}") from None
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = mod_name if i == 0 else f"{mod_name}:{'.'.join(attr.split('.')[:i])}"
            raise PluginError(f"{what} {path!r}: {owner!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    return obj


def load_tools(path: str) -> list["Tool"]:
    """The tools `path` names: a function (made a Tool by tools.base.tool), a Tool, or a list or
    tuple of them. PluginError for anything else, an empty list, a function tool() refuses (an
    unannotated parameter, an unsupported type) or two tools of one name."""
    from .tools.base import Tool, tool  # noqa: PLC0415 - tools.base imports PIL

    obj = load_object(path, "tool plugin")
    items = list(obj) if isinstance(obj, (list, tuple)) else [obj]
    if not items:
        raise PluginError(f"tool plugin {path!r}: an empty list")
    out: list[Tool] = []
    for i, x in enumerate(items):
        where = f"tool plugin {path!r}" + (f" item {i}" if isinstance(obj, (list, tuple)) else "")
        if isinstance(x, Tool):
            out.append(x)
        elif callable(x) and not inspect.isclass(x):
            try:
                out.append(tool(x))
            except (TypeError, ValueError) as e:
                raise PluginError(f"{where}: {e}") from None
        else:
            raise PluginError(f"{where}: expected a function, a Tool or a list of them, got "
                              f"{type(x).__name__} {x!r:.80}")
    names = [t.name for t in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PluginError(f"tool plugin {path!r}: more than one tool named {dup}")
    return out
