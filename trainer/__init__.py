"""spyglass.trainer: GRPO, SFT, evaluation and the CLI."""
