"""spyglass.engine: the asynchronous rollout engine."""
