"""Fixtures that go through the product's own path: the offline world (a dataset in the
documented record format, plus the corpus its search tools read) and the tiny random-weight
checkpoints (written as standard Hugging Face checkpoint directories and loaded by
`spyglass.engine.loader`, exactly as a downloaded checkpoint is). Nothing in the product
imports from here except to materialise these fixtures."""
