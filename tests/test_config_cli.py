"""The generated CLI: real nested defaults, a description and the choices on every flag, partial
files that change only what they name, flag aliases, and one-line errors (exit 2).

Only configs are parsed here (cli.build_parser / cli.parse_config): no command runs."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

import pytest

from spyglass.engine.config import (
    ConfigError, ConfigParser, add_dataclass_args, config_from_args, field_docs, field_line, flag_specs,
    from_dict, load_config)
from spyglass.trainer import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__)))  # the repository


# ------------------------------------------------------------------------------ toy configs
@dataclass
class Engine:
    """Toy engine section."""

    n: int = 8  # group size
    temp: float = 0.7  # sampling temperature, 100% = 1.0
    #                    continued on an aligned comment line
    # a comment block that describes `kind`
    kind: str = field(default="a", metadata={"choices": ("a", "b")})
    level: Literal["low", "high"] = "low"
    tools: list[str] = field(default_factory=lambda: ["x"], metadata={"choices": ("x", "y")})
    opts: dict[str, int] = field(default_factory=dict, metadata={"help": "free-form options"})
    seed: int = 0
    """an attribute docstring"""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


@dataclass
class Judge:
    """An optional section."""

    url: str = "http://x"  # endpoint
    retries: int = 3  # attempts
    #   after the first (a continuation not aligned under the comment)


@dataclass
class Data:
    path: str = ""  # the data file


@dataclass
class Top:
    """The toy command."""

    FLAG_ALIASES: ClassVar[dict[str, str]] = {"model": "run.model", "data": "data.path", "steps": "run.n"}

    run: Run = field(default_factory=lambda: Run(engine=Engine(n=4, temp=1.0), model="m0"))
    data: Data = field(default_factory=Data)
    judge: Optional[Judge] = None  # off unless set
    steps: int = 3  # optimizer steps


@dataclass
class Run:
    engine: Engine = field(default_factory=Engine)  # the engine
    model: str = "tiny"  # model spec
    n: int = 1  # runs


def _parser(cls: type = Top) -> ConfigParser:
    ap = ConfigParser(prog="toy")
    add_dataclass_args(ap, cls)
    return ap


# ------------------------------------------------------------------------------ descriptions + choices
def test_descriptions_from_comments_metadata_and_docstrings() -> None:
    docs = field_docs(Engine)
    assert docs["n"] == "group size"
    assert docs["temp"] == "sampling temperature, 100% = 1.0 continued on an aligned comment line"
    assert docs["kind"] == "a comment block that describes `kind`"  # not a continuation of temp
    assert docs["opts"] == "free-form options"
    assert docs["seed"] == "an attribute docstring"
    assert "level" not in docs
    assert field_docs(Judge)["retries"] == "attempts after the first (a continuation not aligned under the comment)"
    line = open(__file__, encoding="utf-8").read().splitlines().index("    n: int = 8  # group size") + 1
    assert field_line(Engine, "n") == f"{__file__}:{line}"


def test_help_shows_choices_descriptions_and_top_level_defaults(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--run.engine.n INT group size (default: 4)" in out  # Top's factory, not Engine's 8
    assert "(default: 1.0)" in out and "100% = 1.0" in out
    assert "--run.engine.kind {a,b}" in out and "--run.engine.level {low,high}" in out
    assert "[items: x | y]" in out
    assert "--judge.url STR endpoint (default: 'http://x')" in out  # None section: class defaults
    assert "optional: None unless" in out


def test_choices_are_enforced_on_flags_and_in_files(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["--run.engine.kind", "c"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--run.engine.kind" in err and "'c'" in err
    with pytest.raises(ConfigError, match=r"run.engine.kind: 'c' is not one of \['a', 'b'\]"):
        from_dict(Top, {"run": {"engine": {"kind": "c"}}})
    with pytest.raises(ConfigError, match=r"run.engine.tools\[1\]: 'z' is not one of"):
        from_dict(Top, {"run": {"engine": {"tools": ["x", "z"]}}})
    assert from_dict(Top, {"run": {"engine": {"tools": "x,y", "level": "high"}}}).run.engine.tools == ["x", "y"]


# ------------------------------------------------------------------------------ partial configs
def test_partial_mapping_keeps_the_parent_default_factory(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("run:\n  engine:\n    kind: b\n")
    cfg = load_config(Top, p, overrides=["run.n=5"])
    assert (cfg.run.engine.n, cfg.run.engine.temp, cfg.run.model) == (4, 1.0, "m0")  # Top's factory
    assert (cfg.run.engine.kind, cfg.run.n, cfg.judge) == ("b", 5, None)
    cfg = load_config(Top, None, overrides=["judge.retries=7"])  # a None section is created
    assert cfg.judge == Judge(retries=7)
    ns = _parser().parse_args(["--run.engine.n", "2"])
    cfg = config_from_args(Top, ns, base={"run": {"model": "from-file"}})
    assert (cfg.run.engine.n, cfg.run.engine.temp, cfg.run.model) == (2, 1.0, "from-file")


def test_validation_errors_name_the_path() -> None:
    with pytest.raises(ConfigError, match=r"^run.engine: n must be >= 1, got 0$"):
        from_dict(Top, {"run": {"engine": {"n": 0}}})


# ------------------------------------------------------------------------------ aliases
def test_flag_aliases(capsys) -> None:
    ap = _parser()
    cfg = config_from_args(Top, ap.parse_args(["--model", "M", "--data", "d.jsonl", "--steps", "9"]))
    assert (cfg.run.model, cfg.data.path) == ("M", "d.jsonl")
    assert (cfg.steps, cfg.run.n) == (9, 1)  # `steps` is a real top-level field: no alias
    with pytest.raises(SystemExit):
        ap.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--model STR alias of --run.model" in out and "alias of --run.n" not in out

    @dataclass
    class Bad:
        FLAG_ALIASES: ClassVar[dict[str, str]] = {"m": "run.modle"}
        run: Run = field(default_factory=Run)

    with pytest.raises(ConfigError, match=r"Bad.FLAG_ALIASES: 'm' -> 'run.modle' is not a field path.*run.model"):
        _parser(Bad)


# ------------------------------------------------------------------------------ the real commands
def _help(*argv: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_grpo_help_shows_grpos_own_nested_defaults(capsys) -> None:
    out = _help("grpo", capsys=capsys)
    # GRPOConfig.rollout's default factory, not EngineConfig's (8, 256) or RolloutConfig's
    assert "--rollout.engine.n_samples INT group size (default: 4)" in out
    assert "live trajectories (default: 32)" in out
    assert "(default: 'mixed')" in out and "(default: 'runs/grpo/rollouts.jsonl')" in out
    assert "(default: 0.001)" in out  # update.lr from GRPO's factory
    assert "--config FILE" in out and "--algo.mode" in out


def test_every_flag_of_every_command_has_a_description() -> None:
    missing: list[str] = []
    seen: set[tuple[type, str]] = set()
    for name in dict.fromkeys(v[:2] for v in cli.COMMANDS.values()):
        ap, cfg_cls = cli.build_parser(next(k for k, v in cli.COMMANDS.items() if v[:2] == name))
        for spec in flag_specs(cfg_cls):
            if not spec.help and (spec.owner, spec.field.name) not in seen:
                seen.add((spec.owner, spec.field.name))
                where = os.path.relpath(field_line(spec.owner, spec.field.name), ROOT)
                missing.append(f"{where} {spec.owner.__name__}.{spec.field.name}")
    assert not missing, ("config fields without a description (add a trailing `# comment`):\n  "
                         + "\n  ".join(missing))


def test_partial_yaml_keeps_grpos_rollout_defaults(tmp_path) -> None:
    from spyglass.trainer.grpo import GRPOConfig
    p = tmp_path / "g.yaml"
    p.write_text("rollout:\n  engine:\n    max_turns: 8\n")
    ref = GRPOConfig().rollout
    for cfg in (load_config(GRPOConfig, p), cli.parse_config("grpo", ["--config", str(p)])):
        got = cfg.rollout
        assert got.engine.max_turns == 8
        assert dataclasses.replace(got.engine, max_turns=ref.engine.max_turns) == ref.engine
        assert (got.policy, got.out, got.env) == (ref.policy, ref.out, ref.env)
    cfg = cli.parse_config("grpo", ["--config", str(p), "--rollout.engine.n_samples", "2"])
    assert (cfg.rollout.engine.n_samples, cfg.rollout.engine.max_turns, cfg.rollout.engine.max_live) == (2, 8, 32)


def test_bad_values_exit_2_with_one_line_naming_the_key(tmp_path, capsys) -> None:
    assert cli.main(["rollout", "--engine.max_turns", "x"]) == 2
    err = capsys.readouterr().err
    assert err == "spyglass rollout: engine.max_turns: expected int, got 'x'\n"
    assert cli.main(["grpo", "--rollout.engine.max_turns", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rollout.engine" in err and "max_turns must be >= 1, got 0" in err
    p = tmp_path / "r.yaml"
    p.write_text("engine:\n  max_turns: 0\n")
    assert cli.main(["rollout", "--config", str(p)]) == 2
    assert "engine: max_turns must be >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["rollout", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: cannot read the config file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["rollout", "--engine.max_turn", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--engine.max_turn" in err and "did you mean --engine.max_turns" in err
