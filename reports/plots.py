"""A bar chart of ours vs the paper (and vs the random-init floor), one panel per protocol that has either."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.atomic import write_atomic
from reports.tables import parse_ours, parse_paper


def plot_gaps(df: pd.DataFrame, path: str | os.PathLike) -> Path | None:
    """Draw ``comparison_table``'s rows as ours (± std) vs paper bars, with a "random init" bar (ours − margin)
    where the row has a floor; None (no file) if nothing to draw.

    Uses a bare Agg ``Figure`` rather than pyplot so that plotting never touches global backend state.
    """
    panels = []
    for col in df.columns:
        if not col.endswith(" paper"):
            continue
        label = col[: -len(" paper")]
        bars = []
        for _, row in df.iterrows():
            ours = parse_ours(row[f"{label} ours"])
            paper = parse_paper(row[col])
            margin = _number(row.get(f"{label} margin"))
            floor = ours[0] - margin if ours is not None and margin is not None else None
            if ours is None or (paper is None and floor is None):
                continue
            name = f"{row['method']} {row['preset']}\n{row['backbone']} {row['epochs']}ep"
            bars.append((name, ours[0], ours[1] or 0.0, paper, floor))
        if bars:
            panels.append((label, bars))
    if not panels:
        return None
    width = max(4.0, 1.6 * max(len(bars) for _, bars in panels))
    fig = Figure(figsize=(width, 3.2 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (label, bars) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        x = range(len(bars))
        ours, spread = [b[1] for b in bars], [b[2] for b in bars]
        ax.bar([j - 0.27 for j in x], ours, 0.27, yerr=spread, label="ours", capsize=3)
        ax.bar([j for j in x], [math.nan if b[3] is None else b[3] for b in bars], 0.27, label="paper")
        if any(b[4] is not None for b in bars):
            ax.bar([j + 0.27 for j in x], [math.nan if b[4] is None else b[4] for b in bars], 0.27,
                   label="random init", color="0.6")
        ax.set_xticks(list(x), [b[0] for b in bars], fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", dpi=120)
    data = buf.getvalue()
    return write_atomic(path, lambda f: f.write(data))


def _number(text: str | None) -> float | None:
    try:
        return float(text)  # a margin cell: "+12.34"; "", "—" and a missing column are no number
    except (TypeError, ValueError):
        return None
