"""A picture of a finished run: one row per trajectory, generation / tool / waiting spans.

    draw_timeline(engine.stats.spans, "timeline.png", max_rows=200)
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

COLORS = {"gen": "#1f77b4", "tool": "#ff7f0e", "wait": "#d3d3d3"}


def draw_timeline(spans: Sequence[tuple[str, str, float, float]], path: str | Path,
                  max_rows: int = 200, title: str = "") -> Path:
    """Write a PNG of (trajectory, kind, t0, t1) spans; rows ordered by start time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not spans:
        raise ValueError("no spans to draw: run the engine with record_spans=True")
    t_min = min(s[2] for s in spans)
    first: dict[str, float] = {}
    for tid, _, t0, _ in spans:
        first[tid] = min(first.get(tid, t0), t0)
    rows = sorted(first, key=first.__getitem__)[:max_rows]
    index = {tid: i for i, tid in enumerate(rows)}
    by_kind: dict[str, list[list[tuple[float, float]]]] = {
        k: [[] for _ in rows] for k in COLORS}
    for tid, kind, t0, t1 in spans:
        if tid in index and kind in by_kind:
            by_kind[kind][index[tid]].append((t0 - t_min, max(t1 - t0, 1e-6)))
    fig, ax = plt.subplots(figsize=(12, max(3.0, 0.04 * len(rows) + 1.5)))
    for kind, per_row in by_kind.items():
        for i, bars in enumerate(per_row):
            if bars:
                ax.broken_barh(bars, (i - 0.4, 0.8), facecolors=COLORS[kind], linewidth=0)
    ax.set_ylim(-1, len(rows))
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first span")
    ax.set_ylabel(f"trajectory (first {len(rows)})")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items()], loc="upper right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
