"""The config system: nested dataclasses from dicts, files, overrides and generated flags."""
import argparse
from dataclasses import dataclass, field

import pytest

from spyglass.engine.config import (
    ConfigError, add_dataclass_args, check, config_from_args, from_dict, load_config, to_dict)


@dataclass
class Inner:
    k: int = 3
    name: str = "x"
    rate: float | None = None

    def __post_init__(self) -> None:
        check(self.k >= 1, f"k must be >= 1, got {self.k}")


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    flags: list[str] = field(default_factory=list)
    enabled: bool = False


def test_from_dict_and_errors() -> None:
    cfg = from_dict(Outer, {"inner": {"k": 5, "rate": "0.5"}, "enabled": "true", "flags": "a,b"})
    assert cfg.inner.k == 5 and cfg.inner.rate == 0.5 and cfg.enabled and cfg.flags == ["a", "b"]
    assert to_dict(cfg)["inner"]["name"] == "x"
    with pytest.raises(ConfigError, match=r"inner.*unknown key\(s\) \['kk'\]"):
        from_dict(Outer, {"inner": {"kk": 1}})
    with pytest.raises(ConfigError, match=r"inner: k must be >= 1, got 0"):
        from_dict(Outer, {"inner": {"k": 0}})
    with pytest.raises(ConfigError, match=r"inner.k: expected int, got 'abc'"):
        from_dict(Outer, {"inner": {"k": "abc"}})
    with pytest.raises(ConfigError, match=r"expected an integer, got 2.5"):
        from_dict(Outer, {"inner": {"k": 2.5}})
    assert from_dict(Outer, {"inner": {"rate": "none"}}).inner.rate is None


def test_file_and_overrides(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n  k: 7\nenabled: true\n")
    cfg = load_config(Outer, p, overrides=["inner.name=hello", "inner.k=9"])
    assert (cfg.inner.k, cfg.inner.name, cfg.enabled) == (9, "hello", True)
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(Outer, None, overrides=["inner.k"])


def test_generated_cli() -> None:
    ap = argparse.ArgumentParser()
    add_dataclass_args(ap, Outer)
    ns = ap.parse_args(["--inner.k", "4", "--enabled", "yes"])
    cfg = config_from_args(Outer, ns, base={"inner": {"name": "from-file"}})
    assert (cfg.inner.k, cfg.inner.name, cfg.enabled) == (4, "from-file", True)
    assert "--inner.rate" in ap.format_help()


def test_list_overrides_in_json_or_flow_style_and_bad_ones_named() -> None:
    assert from_dict(Outer, {"flags": '["Crop", "OCR"]'}).flags == ["Crop", "OCR"]
    assert from_dict(Outer, {"flags": "[Crop, OCR]"}).flags == ["Crop", "OCR"]
    with pytest.raises(ConfigError, match=r"flags: cannot parse '\[Crop, OCR' as a list"):
        from_dict(Outer, {"flags": "[Crop, OCR"})
    with pytest.raises(ConfigError, match=r"flags: expected a list, got \{'a': 1\}"):
        from_dict(Outer, {"flags": {"a": 1}})
