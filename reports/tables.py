"""The comparison table: ours (mean ± std over seeds) vs the paper, per (method, preset, backbone, epochs).

Expected cells drive the table, not records: a cell the matrix expects always has a row, and a stage
without a finished record shows "— (<status>)" instead of vanishing from the report.
"""

from __future__ import annotations

import math
import os
import re
import statistics
from pathlib import Path
from typing import Any

import pandas as pd

from harness.atomic import write_text

GROUP = ("method", "preset", "backbone", "epochs")
MISSING = "—"
# Shown for a stage without a done record, worst first: a failure needs a person, a queue does not.
_STATUS_ORDER = ("failed", "no metric", "running", "pending")
_OURS = re.compile(r"^(-?\d+\.\d+)(?: ± (\d+\.\d+))? \(n=(\d+)\)$")


def comparison_table(expected: pd.DataFrame, records: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, preset, backbone, epochs) of ``expected``; see the module docstring.

    For each (evaluation, protocol) among the expected evaluation stages: ``<protocol> ours``,
    ``<protocol> paper``, ``<protocol> Δ`` and ``<protocol> verdict`` (empty where a row does not expect
    that protocol); then ``deviations``, ``seeds`` (seeds with every stage done / expected seeds),
    ``GPU-h`` and ``wall`` (summed over every matched record, failed ones included: they cost the same)
    and ``img/s`` (mean over done pre-training records). Records are matched on (cell_id, stage_id).
    """
    by_stage = _records_by_stage(records)
    # Keyed by protocol family, not evaluation name: linear, linear_mae and linear_mocov3 are all "linear"
    # in the paper table, told apart by their protocol (linear/dino, linear/mae-lars, linear/mocov3).
    paper_values = {tuple(r[k] for k in ("method", "backbone", "epochs", "protocol", "metric")):
                    float(r["value"]) for r in paper.to_dict("records")}
    rows = [_with_record(r, by_stage) for r in expected.to_dict("records")]
    protocols = _protocols(rows)
    out = []
    for key, group in _groups(rows).items():
        line: dict[str, Any] = dict(zip(GROUP, key, strict=True))
        for (evaluation, protocol), label in protocols.items():
            cells = [r for r in group if r["evaluation"] == evaluation and r["protocol"] == protocol]
            line.update(_protocol_columns(label, cells, key, evaluation, protocol, paper_values))
        line.update(_cost_columns(group))
        out.append(line)
    per_protocol = [f"{label} {c}" for label in protocols.values() for c in ("ours", "paper", "Δ", "verdict")]
    columns = [*GROUP, *per_protocol, "deviations", "seeds", "GPU-h", "img/s", "wall"]
    return pd.DataFrame(out, columns=columns)


def _records_by_stage(records: pd.DataFrame) -> dict[tuple[str, str], dict[str, Any]]:
    # If a stage has several records (copied folders, a rerun beside a failure), trust a done one, newest.
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in records.to_dict("records"):
        key = (rec["cell_id"], rec["stage_id"])
        rank = (rec.get("status") == "done", str(rec.get("created_at") or ""))
        old = best.get(key)
        if old is None or rank >= (old.get("status") == "done", str(old.get("created_at") or "")):
            best[key] = rec
    return best


def _with_record(row: dict[str, Any], by_stage: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    """The expected row plus what its record says: ``value`` (headline, done only) and ``state``."""
    row = {k: (None if _isnan(v) else v) for k, v in row.items()}
    rec = by_stage.get((row["cell_id"], row["stage_id"]))
    row["record"] = rec
    headline = row.get("headline_metric") or (rec or {}).get("headline_metric")
    row["headline_metric"] = headline
    row["value"] = None
    if rec is not None and rec.get("status") == "done":
        row["value"] = _num(rec.get(f"metric.{headline}")) if headline else None
        row["state"] = "done" if row["value"] is not None or row["stage"] == "pretrain" else "no metric"
    elif row.get("status") not in (None, "pending", "done"):
        # The caller knows (e.g. from the queue) what the records cannot; "done" needs a record, though.
        row["state"] = row["status"]
    else:
        row["state"] = rec.get("status") if rec is not None else "pending"
    return row


def _protocols(rows: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(evaluation, protocol) -> column label, in order of first appearance; the tag is the label."""
    pairs = list(dict.fromkeys((r["evaluation"], r["protocol"]) for r in rows if r["stage"] != "pretrain"))
    tags = [p for _, p in pairs]
    # Two evaluations sharing a tag would share columns: prefix the evaluation name only then.
    return {(e, p): (p if p and tags.count(p) == 1 else f"{e} {p}") for e, p in pairs}


def _groups(rows: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in GROUP), []).append(r)
    return groups


def _protocol_columns(label, cells, key, evaluation, protocol, paper_values) -> dict[str, str]:
    cols = [f"{label} {c}" for c in ("ours", "paper", "Δ", "verdict")]
    if not cells:
        return dict.fromkeys(cols, "")
    values = [c["value"] for c in cells if c["state"] == "done" and c["value"] is not None]
    metric = next((c["headline_metric"] for c in cells if c["headline_metric"]), None)
    method, _, backbone, epochs = key
    ref = paper_values.get((method, backbone, epochs, protocol, metric))
    n = len(values)
    mean = statistics.fmean(values) if n else None
    std = statistics.stdev(values) if n >= 2 else None  # sample std: seeds are a sample of runs
    if n == 0:
        ours = f"{MISSING} ({_worst_state(cells)})"
    elif n == 1:
        ours = f"{mean:.2f} (n=1)"
    else:
        ours = f"{mean:.2f} ± {std:.2f} (n={n})"
    delta, verdict = MISSING, MISSING
    if ref is not None and mean is not None:
        d = mean - ref
        delta = f"{d:+.2f}"
        delta = "+0.00" if delta == "-0.00" else delta  # a rounding sign is noise, not a direction
        if std is None:
            verdict = "n<2: no spread"
        else:
            verdict = "within noise" if abs(d) <= 2 * std else "gap"
    return dict(zip(cols, (ours, _fmt_paper(ref), delta, verdict), strict=True))


def _worst_state(cells: list[dict[str, Any]]) -> str:
    states = {c["state"] for c in cells if c["state"] != "done"}
    for s in _STATUS_ORDER:
        if s in states:
            return s
    return sorted(states)[0] if states else "pending"


def _cost_columns(group: list[dict[str, Any]]) -> dict[str, str]:
    recs = [r["record"] for r in group if r["record"] is not None]
    gpu_h = [v for v in (_num(r.get("gpu_hours")) for r in recs) if v is not None]
    wall = [v for v in (_num(r.get("wall_time_s")) for r in recs) if v is not None]
    speed = [v for v in (_num(r.get("img_per_s")) for r in recs
                         if r.get("stage") == "pretrain" and r.get("status") == "done") if v is not None]
    seeds = list(dict.fromkeys(r["seed"] for r in group))
    done = [s for s in seeds if all(r["state"] == "done" for r in group if r["seed"] == s)]
    return {
        "deviations": _deviations(group),
        "seeds": f"{len(done)}/{len(seeds)}",
        "GPU-h": f"{sum(gpu_h):.3f}" if gpu_h else MISSING,
        "img/s": f"{statistics.fmean(speed):.1f}" if speed else MISSING,
        "wall": _human_time(sum(wall)) if wall else MISSING,
    }


def _deviations(group: list[dict[str, Any]]) -> str:
    """Settings that differ from the paper recipe: "batch_size 4096→64, epochs 1600→2", sorted by key.

    Pre-training deviations are printed bare; an evaluation stage's own deviations (not already listed
    for pre-training) are prefixed with the stage name, since "epochs" means something else there.
    """
    base: dict[str, str] = {}
    staged: dict[str, str] = {}
    for r in sorted(group, key=lambda r: r["stage"] != "pretrain"):
        for name, change in (r.get("recipe_deviations") or {}).items():
            text = _fmt_change(change)
            if r["stage"] == "pretrain":
                base[name] = text
            elif base.get(name) != text:
                staged[f"{r['stage']}:{name}"] = text
    parts = [f"{k} {base[k]}" for k in sorted(base)] + [f"{k} {staged[k]}" for k in sorted(staged)]
    text = ", ".join(parts) or "none"
    recipe = next((r.get("paper_recipe") for r in group if r.get("paper_recipe")), None)
    if recipe and recipe != group[0]["preset"]:
        text = f"paper recipe: {recipe}; {text}"
    return text


def _fmt_change(change: Any) -> str:
    if isinstance(change, list | tuple) and len(change) == 2:
        return f"{_fmt_value(change[0])}→{_fmt_value(change[1])}"
    return _fmt_value(change)


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _fmt_paper(v: float | None) -> str:
    if v is None:
        return MISSING
    # Papers print one decimal; keep a second only where the source has one.
    return f"{v:.1f}" if abs(v * 10 - round(v * 10)) < 1e-9 else f"{v:.2f}"


def _human_time(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h {m:02d}m {s:02d}s"
    if m:
        return f"{m}m {s:02d}s"
    return f"{s}s"


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
        return None
    return float(v)


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def parse_ours(text: str) -> tuple[float, float | None, int] | None:
    """(mean, std, n) back from an ``ours`` cell; None for a missing or empty cell."""
    m = _OURS.match(text or "")
    if m is None:
        return None
    return float(m.group(1)), (float(m.group(2)) if m.group(2) else None), int(m.group(3))


def to_markdown(df: pd.DataFrame) -> str:
    # disable_numparse: tabulate would otherwise print the paper's "84.0" as "84".
    return df.to_markdown(index=False, disable_numparse=True)


def write_report(df: pd.DataFrame, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.csv`` under ``out_dir``, each atomically."""
    out = Path(out_dir)
    md = write_text(out / "report.md", to_markdown(df) + "\n")
    csv = write_text(out / "report.csv", df.to_csv(index=False))
    return md, csv
