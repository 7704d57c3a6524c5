"""The run timeline (engine/timeline.py): rows grouped by prompt, tools coloured by name."""
from pathlib import Path

import pytest

from spyglass.engine.timeline import ENV, GEN, TOOL_COLORS, WAIT, draw_timeline, layout

SPANS = [("b#1", "wait", 0.5, 0.6), ("b#1", "gen", 0.6, 1.0), ("a#0", "gen", 0.2, 0.9),
         ("b#0", "gen", 0.0, 0.4), ("b#0", "tool:OCR", 0.4, 1.5), ("a#1", "gen", 0.3, 0.5),
         ("a#1", "tool:Crop+OCR", 0.5, 0.6), ("a#0", "tool:OCR", 0.9, 1.0), ("c#0", "tool", 2.0, 2.1)]


def test_rows_are_grouped_in_order_of_the_groups_first_span_and_tools_get_colours() -> None:
    rows, colors = layout(SPANS)
    assert rows == ["b#0", "b#1", "a#0", "a#1", "c#0"]
    assert colors["gen"] == GEN and colors["wait"] == WAIT and colors["tool"] == ENV
    assert colors["tool:OCR"] == TOOL_COLORS[0] and colors["tool:Crop+OCR"] == TOOL_COLORS[1]
    assert layout(SPANS, max_rows=2)[0] == ["b#0", "b#1"]


def test_draws_a_png(tmp_path: Path) -> None:
    out = draw_timeline(SPANS, tmp_path / "t.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="record_spans"):
        draw_timeline([], tmp_path / "e.png")
