"""The `spyglass` CLI: generated flags, config files, errors that name the value."""
import pytest

from spyglass.trainer.cli import COMMANDS, main


def _rc(argv: list[str]) -> int:
    """main's exit status: returned (a bad value) or raised by argparse (a bad flag or choice)."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def test_usage_lists_every_command(capsys) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(f"spyglass {name}" in out for name in COMMANDS)
    assert main(["no-such-command"]) == 2


def test_flags_are_generated_and_bad_values_named(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["grpo", "--help"])
    assert "--algo.mode" in capsys.readouterr().out
    assert _rc(["grpo", "--algo.mode", "bogus"]) == 2  # one line on stderr, no traceback
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "algo.mode" in err and "'bogus'" in err
    assert _rc(["rollout", "--engine.max_turns", "x"]) == 2
    assert capsys.readouterr().err == "spyglass rollout: engine.max_turns: expected int, got 'x'\n"


def test_config_file_then_flags(tmp_path, capsys) -> None:
    cfg = tmp_path / "r.yaml"
    cfg.write_text("engine:\n  max_turns: 0\n")
    assert _rc(["rollout", "--config", str(cfg)]) == 2
    assert "max_turns must be >= 1, got 0" in capsys.readouterr().err


def test_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys) -> None:
    bad = tmp_path / "d.jsonl"
    bad.write_text("{bad\n")
    assert main(["rollout", "--data", str(bad), "--policy", "sample", "--out", str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spyglass rollout: no usable records in") and ":1: invalid JSON" in err[0]
    assert main(["rollout", "--model", "acme/not-cached", "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "not in the local Hugging Face cache" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        main(["rollout", "--model", "acme/not-cached", "--out", str(tmp_path / "r.jsonl"), "--debug"])
