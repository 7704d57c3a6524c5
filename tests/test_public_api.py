"""spyglass.engine's public surface: every name in __all__ imports (lazily: the package import
pulls in neither torch nor PIL), and the embedding example of its docstring runs as written."""
import importlib
import subprocess
import sys
import textwrap

import pytest

import spyglass.engine as engine


def test_every_public_name_imports_and_is_the_defining_modules_object() -> None:
    assert engine.__all__ == sorted(set(engine.__all__))
    for name in engine.__all__:
        obj = getattr(engine, name)
        home = importlib.import_module(f"spyglass.engine.{engine._EXPORTS[name]}")
        assert obj is getattr(home, name), name
    ns: dict = {}
    exec(f"from spyglass.engine import {', '.join(engine.__all__)}", ns)
    assert set(engine.__all__) <= set(ns) and set(engine.__all__) <= set(dir(engine))
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        engine.Nope  # noqa: B018
    with pytest.raises(ImportError):
        exec("from spyglass.engine import Nope", {})


def test_the_names_the_embedding_issue_asks_for_are_public() -> None:
    asked = {"Engine", "EngineConfig", "Prompt", "Trajectory", "Segment", "SegmentKind", "Status", "Tool",
             "tool", "ToolResult", "ToolContext", "make_turn_parser", "ToolCallParser", "load_model",
             "LoadConfig", "LoadedModel", "HFCodec", "DataConfig", "load_dataset", "RolloutConfig",
             "build_engine", "make_engine", "make_backends", "backend_config", "make_backend", "HFBackend"}
    assert asked <= set(engine.__all__)


def test_importing_the_package_is_cheap() -> None:
    code = ("import sys, spyglass.engine; "
            "print(sorted(m for m in ('torch', 'transformers', 'PIL', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_docstring_example_runs(capsys) -> None:
    lines = engine.__doc__.splitlines()
    start, end = lines.index("    import asyncio"), lines.index("    asyncio.run(main())")
    code = textwrap.dedent("\n".join(lines[start:end + 1]))
    exec(compile(code, "spyglass.engine docstring", "exec"), {"__name__": "example"})
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["q1#0", "q1#1"]  # one group of two, as it finished
    for line in out:
        _, status, n_ids, n_masked, _ = line.split(maxsplit=4)
        assert status in ("answered", "truncated", "fatal", "interrupted") and 0 < int(n_masked) < int(n_ids)
