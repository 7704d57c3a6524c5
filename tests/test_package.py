"""The package imports under its namespaced names and the C++ core is built."""
import importlib


def test_namespaced_imports() -> None:
    for name in ("spyglass.engine", "spyglass.kernels", "spyglass.trainer", "spyglass.engine._core"):
        assert importlib.import_module(name) is not None
