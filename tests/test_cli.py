"""The `spyglass` CLI: generated flags, config files, errors that name the value."""
import pytest

from spyglass.trainer.cli import COMMANDS, main


def test_usage_lists_every_command(capsys) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(f"spyglass {name}" in out for name in COMMANDS)
    assert main(["no-such-command"]) == 2


def test_flags_are_generated_and_bad_values_named(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["grpo", "--help"])
    assert "--algo.mode" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"AlgoConfig.mode must be one of .* got 'bogus'"):
        main(["grpo", "--algo.mode", "bogus"])
    with pytest.raises(ValueError, match=r"engine.max_turns: expected int, got 'x'"):
        main(["rollout", "--engine.max_turns", "x"])


def test_config_file_then_flags(tmp_path) -> None:
    cfg = tmp_path / "r.yaml"
    cfg.write_text("engine:\n  max_turns: 0\n")
    with pytest.raises(ValueError, match="max_turns must be >= 1, got 0"):
        main(["rollout", "--config", str(cfg)])
