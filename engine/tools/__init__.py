"""spyglass.engine.tools: the tool environment (visual, OCR, search, web, Python)."""
