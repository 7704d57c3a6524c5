"""The .pyi stub of spyglass.engine._core matches the compiled module, name for name."""
import ast
import inspect
from pathlib import Path

import spyglass.engine._core as core

STUB = Path(__file__).resolve().parents[1] / "engine" / "_core.pyi"


def _public(name: str) -> bool:
    return not name.startswith("_")


def _stub_names() -> tuple[set[str], dict[str, set[str]]]:
    tree = ast.parse(STUB.read_text())
    top: set[str] = set()
    classes: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            top.add(node.name)
            classes[node.name] = {n.name for n in node.body
                                  if isinstance(n, (ast.FunctionDef, ast.AnnAssign)) and
                                  _public(getattr(n, "name", ""))}
            classes[node.name] |= {n.target.id for n in node.body
                                   if isinstance(n, ast.AnnAssign) and _public(n.target.id)}
        elif isinstance(node, ast.AnnAssign):
            top.add(node.target.id)
        elif isinstance(node, ast.FunctionDef):
            top.add(node.name)
    return {n for n in top if _public(n)}, classes


def test_module_names_match_stub() -> None:
    top, _ = _stub_names()
    assert top == {n for n in dir(core) if _public(n)}


def test_class_members_match_stub() -> None:
    _, classes = _stub_names()
    for name, members in classes.items():
        cls = getattr(core, name)
        assert inspect.isclass(cls), name
        compiled = {n for n in vars(cls) if _public(n)}
        assert members == compiled, (name, members ^ compiled)


def test_stub_properties_are_properties() -> None:
    tree = ast.parse(STUB.read_text())
    for node in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        for fn in (n for n in node.body if isinstance(n, ast.FunctionDef)):
            is_prop = any(isinstance(d, ast.Name) and d.id == "property" for d in fn.decorator_list)
            attr = vars(getattr(core, node.name)).get(fn.name)
            if attr is None:
                continue
            assert inspect.isdatadescriptor(attr) == is_prop, (node.name, fn.name)
