"""A picture of a finished run: one row per trajectory, rows grouped by prompt (group), with
generation, the wait for a generation slot, and each tool call coloured by the tools it ran.

Spans are (trajectory id, kind, t0, t1) as the engine records them (`Engine(record_spans=True)`):
kind "gen", "wait" (queued for a generation slot or in the server's queue) or "tool:<names>"
("tool:Crop+OCR"; plain "tool" for an environment step). A trajectory id is "<group>#<sample>".
Groups are separated by lines and labelled on the left; every span is drawn at least one pixel
wide, so short waits stay visible at the default size.

    draw_timeline(engine.stats.spans, "timeline.png", max_rows=200)
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

GEN, WAIT, OTHER, ENV = "#1f77b4", "#d62728", "#7f7f7f", "#444444"
TOOL_COLORS = ["#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#aec7e8"]
WIDTH_IN, DPI = 12, 100


def _group(tid: str) -> str:
    return tid.rsplit("#", 1)[0]


def layout(spans: Sequence[tuple[str, str, float, float]], max_rows: int = 200
           ) -> tuple[list[str], dict[str, str]]:
    """The rows (trajectory ids: groups in order of their first span, samples in id order) and
    the colour of every span kind (tool sets by how often they ran)."""
    first: dict[str, float] = {}
    for tid, _, t0, _ in spans:
        first[tid] = min(first.get(tid, t0), t0)
    group_start: dict[str, float] = {}
    for tid, t0 in first.items():
        g = _group(tid)
        group_start[g] = min(group_start.get(g, t0), t0)
    rows = sorted(first, key=lambda tid: (group_start[_group(tid)], _group(tid), tid))[:max_rows]
    tools = Counter(k[5:] for _, k, _, _ in spans if k.startswith("tool:"))
    colors = {"gen": GEN, "wait": WAIT}
    for i, (name, _) in enumerate(tools.most_common()):
        colors[f"tool:{name}"] = TOOL_COLORS[i] if i < len(TOOL_COLORS) else OTHER
    colors["tool"] = ENV
    return rows, colors


def draw_timeline(spans: Sequence[tuple[str, str, float, float]], path: str | Path,
                  max_rows: int = 200, title: str = "") -> Path:
    """Write a PNG of the spans; groups in order of their first span, samples in id order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not spans:
        raise ValueError("no spans to draw: run the engine with record_spans=True")
    t_min = min(s[2] for s in spans)
    t_max = max(s[3] for s in spans)
    rows, colors = layout(spans, max_rows)
    index = {tid: i for i, tid in enumerate(rows)}
    tools = Counter(k[5:] for _, k, _, _ in spans if k.startswith("tool:"))
    # at least one pixel: the plot is about 0.85 of the figure's width
    min_w = (t_max - t_min) / (WIDTH_IN * DPI * 0.85) if t_max > t_min else 1e-6
    bars: dict[str, list[list[tuple[float, float]]]] = {}
    for tid, kind, t0, t1 in spans:
        if tid in index:
            k = kind if kind in colors else ("tool" if kind.startswith("tool") else kind)
            per_row = bars.setdefault(k, [[] for _ in rows])
            per_row[index[tid]].append((t0 - t_min, max(t1 - t0, min_w)))
    fig, ax = plt.subplots(figsize=(WIDTH_IN, max(3.0, 0.06 * len(rows) + 1.8)))
    for kind in ["gen", "wait"] + [k for k in colors if k.startswith("tool")]:  # tools on top
        for i, b in enumerate(bars.get(kind, [])):
            if b:
                ax.broken_barh(b, (i - 0.4, 0.8), facecolors=colors.get(kind, OTHER), linewidth=0)
    # group boundaries and labels
    ticks, labels, start = [], [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or _group(rows[i]) != _group(rows[start]):
            if i < len(rows):
                ax.axhline(i - 0.5, color="black", linewidth=0.6)
            ticks.append((start + i - 1) / 2)
            labels.append(_group(rows[start])[:18])
            start = i
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels, fontsize=7 if len(ticks) > 20 else 9)
    ax.set_ylim(-1, len(rows))
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first span")
    ax.set_ylabel(f"group (trajectories: first {len(rows)})")
    handles = [Patch(color=GEN, label="generating"), Patch(color=WAIT, label="waiting for a generation slot")]
    named = tools.most_common(len(TOOL_COLORS))
    handles += [Patch(color=colors[f"tool:{n}"], label=f"tool: {n}") for n, _ in named]
    if len(tools) > len(named):
        handles.append(Patch(color=OTHER, label=f"{len(tools) - len(named)} other tool sets"))
    if "tool" in bars:
        handles.append(Patch(color=ENV, label="environment step"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
