"""The comparison table: ours (mean ± std over seeds) vs the paper, per (method, preset, backbone, epochs).

Expected cells drive the table, not records: a cell the matrix expects always has a row, and a stage
without a finished record shows "— (<status>)" instead of vanishing from the report.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from harness.atomic import write_text
from reports.datasets import describe, describe_known, identify, load_datasets
from reports.verdict import legend, verdict

GROUP = ("method", "preset", "backbone", "epochs")
MISSING = "—"
# Shown for a stage without a done record, worst first: a failure needs a person, a queue does not.
_STATUS_ORDER = ("damaged", "failed", "pretrain damaged", "pretrain failed", "pretrain collapsed", "no metric",
                 "running", "pending", "not launched")
BUILD_STAGES = ("pretrain", "init")  # a cell's backbone: pre-training (or import), or a floor's init export
FLOOR_LABEL = "random init"
_OURS = re.compile(r"^(-?\d+\.\d+)(?: ± (\d+\.\d+))? \(n=(\d+)\)$")
OTHER_DATA, DATA_UNKNOWN = "other data", "data unknown"
# Record fields the table reads (besides metric.*); the rest stays in the frame for other uses.
RECORD_FIELDS = ("cell_id", "stage_id", "stage", "status", "created_at", "headline_metric", "gpu_hours", "cpu_hours",
                "wall_time_s", "img_per_s", "hardware", "data_fingerprint", "code", "floor_of", "health", "collapse")


def comparison_table(expected: pd.DataFrame | list[dict[str, Any]], records: pd.DataFrame | list[dict[str, Any]],
                     paper: pd.DataFrame, tolerance: float = 0.0,
                     confidence: float = 0.95, datasets: dict[str, Any] | None = None) -> pd.DataFrame:
    """One row per (method, preset, backbone, epochs) of ``expected``; see the module docstring.

    First ``key`` (R1, R2, ...: the anchor of the row's footnotes). For each (evaluation, protocol) among
    the expected evaluation stages: ``<protocol> ours``, ``<protocol> paper`` (with the paper's own seed
    spread where it gives one), ``<protocol> source`` (footnote id of the paper number), ``<protocol> Δ`` and
    ``<protocol> verdict`` (reports/verdict.py; empty where a row does not expect that protocol). A paper
    number joins only when the run's recorded data fingerprints identify the paper's datasets
    (reports/datasets.py); other data is a deviation and gets no Δ. Then ``deviations`` (full text),
    ``seeds`` (seeds with every stage done / expected seeds), ``GPU-h`` / ``CPU-h`` / ``wall`` (summed over
    every attempt of every matched record, failed ones included: they cost the same) and ``img/s`` (mean ±
    std over done pre-training records, per hardware). Records are matched on (cell_id, stage_id).

    ``df.attrs`` holds ``legend`` (the verdict's rule) and ``footnotes`` ({"paper": {id: text}}), which
    ``to_markdown`` prints under the table.
    """
    datasets = load_datasets() if datasets is None else datasets
    by_stage = _records_by_stage(records)
    # Keyed by protocol family, not evaluation name: linear, linear_mae and linear_mocov3 are all "linear"
    # in the paper table, told apart by their protocol (linear/dino, linear/mae-lars, linear/mocov3).
    papers = {tuple(r[k] for k in ("method", "backbone", "epochs", "protocol", "metric")): r
              for r in paper.to_dict("records")}
    expected = expected.to_dict("records") if isinstance(expected, pd.DataFrame) else expected
    rows = [_with_record(r, by_stage) for r in expected]
    _mark_blocked(rows)
    _label_floors(rows)
    protocols = _protocols(rows)
    groups = _groups(rows)
    floors = _floor_groups(groups)
    with_floor = bool(floors)
    with_health = any(isinstance((r["record"] or {}).get("health"), dict) for r in rows if r["stage"] == "pretrain")
    notes: dict[str, str] = {}
    out = []
    for i, (key, group) in enumerate(groups.items(), start=1):
        line: dict[str, Any] = {"key": f"R{i}", **dict(zip(GROUP, key, strict=True))}
        data_devs: list[str] = []
        is_floor = _is_floor(group)
        for (evaluation, protocol, metric), label in protocols.items():
            cells = [r for r in group if r["evaluation"] == evaluation and r["protocol"] == protocol]
            if metric is not None:
                cells = [_for_metric(c, metric) for c in cells]
            ctx = _Join(key, evaluation, protocol, {} if is_floor else papers, datasets, notes, tolerance, confidence)
            line.update(_protocol_columns(label, cells, group, ctx, data_devs))
            if with_floor:
                floor_cells = [r for r in floors.get(key, []) if r["evaluation"] == evaluation
                               and r["protocol"] == protocol]
                if metric is not None:
                    floor_cells = [_for_metric(c, metric) for c in floor_cells]
                line[f"{label} margin"] = "" if is_floor else _margin(cells, floor_cells)
        line.update(_cost_columns(group, data_devs))
        if with_health:
            line["health"] = "" if is_floor else _health(group)
        out.append(line)
    extra = ("margin",) if with_floor else ()
    per_protocol = [f"{label} {c}" for label in protocols.values() for c in ("ours", *extra, "paper", "source", "Δ",
                                                                              "verdict")]
    columns = ["key", *GROUP, *per_protocol, *(["health"] if with_health else []), "deviations", "seeds", "GPU-h",
               "CPU-h", "img/s", "wall"]
    df = pd.DataFrame(out, columns=columns)
    df.attrs["legend"] = legend(tolerance, confidence)
    df.attrs["footnotes"] = {"paper": notes}
    return df


def _records_by_stage(records: pd.DataFrame | list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    # If a stage has several records (copied folders, a rerun beside a failure), trust a done one, newest.
    best: dict[tuple[str, str], dict[str, Any]] = {}
    if isinstance(records, pd.DataFrame):
        records = records[[c for c in records.columns if c in RECORD_FIELDS or c.startswith("metric.")]]
        records = records.to_dict("records")
    for rec in records:
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
        row["state"] = "done" if row["value"] is not None or row["stage"] in BUILD_STAGES else "no metric"
    elif rec is not None and rec.get("status") == "failed":
        row["state"] = "failed"  # a record's failure beats what the queue or the ledger last said
    elif row.get("status") not in (None, "pending", "done"):
        # The caller knows (e.g. from the queue) what the records cannot; "done" needs a record, though.
        row["state"] = row["status"]
    else:
        row["state"] = rec.get("status") if rec is not None else "pending"
    fp = (rec or {}).get("data_fingerprint") or row.get("data_fingerprint")
    row["data_fingerprint"] = fp if isinstance(fp, dict) else None
    return row


def _mark_blocked(rows: list[dict[str, Any]]) -> None:
    """An evaluation that never ran because its pre-training failed shows "pretrain failed" ("pretrain
    collapsed" when the run stopped on a collapse, health.stop_on_collapse)."""
    pre = {r["cell_id"]: r for r in rows if r["stage"] in BUILD_STAGES}
    for r in rows:
        parent = pre.get(r["cell_id"])
        if r["stage"] not in BUILD_STAGES and r["record"] is None and parent and parent["state"] in ("failed",
                                                                                                       "damaged"):
            collapsed = parent["state"] == "failed" and (parent["record"] or {}).get("collapse")
            r["state"] = "pretrain collapsed" if collapsed else f"pretrain {parent['state']}"


def _label_floors(rows: list[dict[str, Any]]) -> None:
    """A random-init floor's rows: their own table row, "<preset> (random init)" at 0 epochs."""
    for r in rows:
        floor = r.get("floor_of") if _has(r, "floor_of") else (r["record"] or {}).get("floor_of")
        r["floor_of"] = floor if isinstance(floor, str) else None
        if r["floor_of"]:
            r["preset"] = f"{r['preset']} ({FLOOR_LABEL})"
            r["epochs"] = 0


def _is_floor(group: list[dict[str, Any]]) -> bool:
    return any(r.get("floor_of") for r in group)


def _floor_groups(groups: dict[tuple, list[dict[str, Any]]]) -> dict[tuple, list[dict[str, Any]]]:
    """Trained row key -> the rows of its floor, and ``groups`` reordered so each floor row follows it."""
    owner = {r["cell_id"]: key for key, group in groups.items() for r in group if not r.get("floor_of")}
    floors: dict[tuple, list[dict[str, Any]]] = {}
    placed: dict[tuple, list[tuple]] = {}
    for key, group in groups.items():
        trained = next((owner[r["floor_of"]] for r in group if r.get("floor_of") in owner), None)
        if trained is not None:
            floors.setdefault(trained, []).extend(group)
            placed.setdefault(trained, []).append(key)
    if placed:
        floor_keys = {f for fs in placed.values() for f in fs}
        items = {x: groups[x] for k in groups if k not in floor_keys for x in (k, *placed.get(k, []))}
        groups.clear()
        groups.update(items)
    return floors


def _margin(cells: list[dict[str, Any]], floor_cells: list[dict[str, Any]]) -> str:
    """Ours − random init, seed means of the headline (the learning margin); "—" until both have values."""
    ours = [c["value"] for c in cells if c["state"] == "done" and c["value"] is not None]
    floor = [c["value"] for c in floor_cells if c["state"] == "done" and c["value"] is not None]
    if not cells:
        return ""
    if not ours or not floor:
        return MISSING
    text = f"{statistics.fmean(ours) - statistics.fmean(floor):+.2f}"
    return "+0.00" if text == "-0.00" else text


def _health(group: list[dict[str, Any]]) -> str:
    """"ok", or the collapsed seeds: "collapsed: s0 teacher_entropy_ratio 0.999 at epoch 3"."""
    pres = [r for r in group if r["stage"] == "pretrain" and isinstance((r["record"] or {}).get("health"), dict)]
    if not pres:
        return MISSING
    bad = [(r["seed"], r["record"]["collapse"]) for r in pres if isinstance(r["record"]["collapse"], dict)]
    if not bad:
        return "ok"
    return "collapsed: " + "; ".join(f"s{seed} {c.get('metric')} {c.get('value', float('nan')):.3g} at epoch "
                                     f"{c.get('epoch')}" for seed, c in bad)


def _protocols(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str | None], str]:
    """(evaluation, protocol, metric) -> column label, in order of first appearance; the tag is the label.
    ``metric`` is None for the headline; an evaluation's other ``report_metrics`` (COCO's mask AP beside the
    box AP) follow it as "<tag> <metric>"."""
    evals = [r for r in rows if r["stage"] not in BUILD_STAGES]
    pairs = list(dict.fromkeys((r["evaluation"], r["protocol"]) for r in evals))
    tags = [p for _, p in pairs]
    out: dict[tuple[str, str, str | None], str] = {}
    for e, p in pairs:
        # Two evaluations sharing a tag would share columns: prefix the evaluation name only then.
        label = p if p and tags.count(p) == 1 else f"{e} {p}"
        out[(e, p, None)] = label
        mine = [r for r in evals if (r["evaluation"], r["protocol"]) == (e, p)]
        extra = dict.fromkeys(m for r in mine for m in (r.get("report_metrics") or ()) if m != r["headline_metric"])
        out.update({(e, p, m): f"{label} {m}" for m in extra})
    return out


def _for_metric(row: dict[str, Any], metric: str) -> dict[str, Any]:
    """An expected row read for another of its record's metrics than the headline."""
    rec = row["record"]
    value = _num(rec.get(f"metric.{metric}")) if rec is not None and rec.get("status") == "done" else None
    state = "no metric" if row["state"] == "done" and value is None else row["state"]
    return {**row, "headline_metric": metric, "value": value, "state": state}


def _groups(rows: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in GROUP), []).append(r)
    return groups


@dataclass(frozen=True)
class _Join:
    """What one protocol cell of a row is compared against, and under which rule."""

    key: tuple
    evaluation: str
    protocol: str
    papers: dict[tuple, dict[str, Any]]
    datasets: dict[str, Any]
    notes: dict[str, str]  # footnote id -> paper source, shared across the table
    tolerance: float
    confidence: float


def _protocol_columns(label: str, cells: list[dict[str, Any]], group: list[dict[str, Any]], ctx: _Join,
                      data_devs: list[str]) -> dict[str, str]:
    cols = [f"{label} {c}" for c in ("ours", "paper", "source", "Δ", "verdict")]
    if not cells:
        return dict.fromkeys(cols, "")
    values = [c["value"] for c in cells if c["state"] == "done" and c["value"] is not None]
    metric = next((c["headline_metric"] for c in cells if c["headline_metric"]), None)
    method, _, backbone, epochs = ctx.key
    ref = ctx.papers.get((method, backbone, epochs, ctx.protocol, metric))
    n = len(values)
    mean = statistics.fmean(values) if n else None
    std = statistics.stdev(values) if n >= 2 else None  # sample std: seeds are a sample of runs
    if n == 0:
        ours = f"{MISSING} ({_worst_state(cells)})"
    elif n == 1:
        ours = f"{mean:.2f} (n=1)"
    else:
        ours = f"{mean:.2f} ± {std:.2f} (n={n})"
    paper_text, source, delta, verdict_text = MISSING, "", MISSING, MISSING
    if ref is not None:
        match, devs = _data_match(cells, group, ref, ctx.datasets)
        data_devs += [d for d in devs if d not in data_devs]
        if match is False:
            verdict_text = OTHER_DATA
        else:
            paper_text, source = _fmt_paper(ref), _paper_note(ref, ctx.notes)
            if mean is not None and match is None:
                verdict_text = DATA_UNKNOWN
            elif mean is not None:
                d = mean - float(ref["value"])
                delta = f"{d:+.2f}"
                delta = "+0.00" if delta == "-0.00" else delta  # a rounding sign is noise, not a direction
                verdict_text = verdict(values, float(ref["value"]), ref.get("seed_values"), ctx.tolerance,
                                       ctx.confidence).label
    return dict(zip(cols, (ours, paper_text, source, delta, verdict_text), strict=True))


def _data_match(cells: list[dict[str, Any]], group: list[dict[str, Any]], ref: dict[str, Any],
                datasets: dict[str, Any]) -> tuple[bool | None, list[str]]:
    """Were these evaluation cells (and their pre-trainings) run on the paper's datasets?

    True when every fingerprint identifies the paper's dataset, False when one identifies something else
    (with the deviation texts), None when some stage has no fingerprint (records from before they existed,
    or a stage that has not started and no manifest fingerprint).
    """
    cell_ids = {c["cell_id"] for c in cells}
    # Released weights were pre-trained by the paper's authors on the paper's data: only the evaluation counts.
    pres = [r for r in group if r["stage"] == "pretrain" and r["cell_id"] in cell_ids
            and not str(r.get("preset") or "").endswith("(official weights)")]
    checks = [(p, ref["pretrain_data"], "data") for p in pres] + \
             [(c, ref["eval_data"], f"{c['stage']}:data") for c in cells]
    unknown, devs = False, []
    for row, wanted, name in checks:
        fp = row["data_fingerprint"]
        if fp is None:
            unknown = True
            continue
        seen = identify(fp, datasets)
        if seen != wanted:
            text = f"{describe(fp)} (paper: {describe_known(wanted, datasets)})"
            if not any(d.endswith(f" {text}") for d in devs):  # an evaluation on the same data says nothing new
                devs.append(f"{name} {text}")
    if devs:
        return False, devs
    return (None if unknown else True), []


def _paper_note(ref: dict[str, Any], notes: dict[str, str]) -> str:
    text = f"{ref['source']}" + ("" if ref.get("verified") else " — UNVERIFIED: not read in the source itself")
    if ref.get("note"):
        text += f" ({ref['note']})"
    for ident, existing in notes.items():
        if existing == text:
            return ident
    ident = f"p{len(notes) + 1}"
    notes[ident] = text
    return ident


def _worst_state(cells: list[dict[str, Any]]) -> str:
    states = {c["state"] for c in cells if c["state"] != "done"}
    for s in _STATUS_ORDER:
        if s in states:
            return s
    return sorted(states)[0] if states else "pending"


def _cost_columns(group: list[dict[str, Any]], data_devs: list[str]) -> dict[str, str]:
    recs = [r["record"] for r in group if r["record"] is not None]
    gpu_h = [v for v in (_num(r.get("gpu_hours")) for r in recs) if v is not None]
    cpu_h = [v for v in (_num(r.get("cpu_hours")) for r in recs) if v is not None]
    wall = [v for v in (_num(r.get("wall_time_s")) for r in recs) if v is not None]
    seed_done: dict[Any, bool] = {}
    for r in group:
        seed_done[r["seed"]] = seed_done.get(r["seed"], True) and r["state"] == "done"
    seeds, done = list(seed_done), [s for s, ok in seed_done.items() if ok]
    return {
        "deviations": _deviations(group, data_devs),
        "seeds": f"{len(done)}/{len(seeds)}",
        "GPU-h": f"{sum(gpu_h):.3f}" if gpu_h else MISSING,
        "CPU-h": f"{sum(cpu_h):.3f}" if cpu_h else MISSING,
        "img/s": _speed(recs),
        "wall": _human_time(sum(wall)) if wall else MISSING,
    }


def _speed(recs: list[dict[str, Any]]) -> str:
    """img/s of done pre-trainings, mean ± std per hardware: speeds on different machines do not mix."""
    by_hw: dict[str, list[float]] = {}
    for r in recs:
        v = _num(r.get("img_per_s"))
        if r.get("stage") == "pretrain" and r.get("status") == "done" and v is not None:
            hw = r.get("hardware")
            by_hw.setdefault(hw if isinstance(hw, str) else "", []).append(v)
    parts = []
    for hw, vs in by_hw.items():
        text = f"{statistics.fmean(vs):.1f}" + (f" ± {statistics.stdev(vs):.1f}" if len(vs) > 1 else "")
        parts.append(f"{text} (n={len(vs)}{', ' + hw if hw else ''})")
    return "; ".join(parts) or MISSING


def _deviations(group: list[dict[str, Any]], data_devs: list[str] = ()) -> str:
    """Settings that differ from the paper recipe: "batch_size 4096→64, epochs 1600→2", sorted by key.

    Pre-training deviations are printed bare; an evaluation stage's own deviations (not already listed
    for pre-training) are prefixed with the stage name, since "epochs" means something else there.
    """
    base: dict[str, str] = {}
    staged: dict[str, str] = {}
    seen: set[str] = set()  # the seeds of a row share their deviations: format each distinct set once
    for r in sorted(group, key=lambda r: r["stage"] not in BUILD_STAGES):
        key = json.dumps([r["stage"], r.get("recipe_deviations")], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        for name, change in (r.get("recipe_deviations") or {}).items():
            text = _fmt_change(change)
            if r["stage"] in BUILD_STAGES:
                base[name] = text
            elif base.get(name) != text:
                staged[f"{r['stage']}:{name}"] = text
    parts = [*data_devs, *(f"{k} {base[k]}" for k in sorted(base)), *(f"{k} {staged[k]}" for k in sorted(staged))]
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


def _fmt_paper(ref: dict[str, Any]) -> str:
    """"83.6", plus the paper's own spread where it gives seeds: "83.6 (83.57 ± 0.09, n=4)"."""
    text = _fmt_number(float(ref["value"]))
    seeds = ref.get("seed_values") or []
    if len(seeds) >= 2:
        text += f" ({statistics.fmean(seeds):.2f} ± {statistics.stdev(seeds):.2f}, n={len(seeds)})"
    return text


def _fmt_number(v: float) -> str:
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


def _has(row: dict[str, Any] | None, key: str) -> bool:
    """``row`` has ``key`` (a record frame fills a field some records lack with NaN: that is not having it)."""
    return row is not None and key in row and not _isnan(row[key])


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def parse_ours(text: str) -> tuple[float, float | None, int] | None:
    """(mean, std, n) back from an ``ours`` cell; None for a missing or empty cell."""
    m = _OURS.match(text or "")
    if m is None:
        return None
    return float(m.group(1)), (float(m.group(2)) if m.group(2) else None), int(m.group(3))


def parse_paper(text: str) -> float | None:
    """The paper's number back from a ``paper`` cell ("83.6 (83.57 ± 0.09, n=4)" -> 83.6); None if absent."""
    m = re.match(r"^(-?\d+(?:\.\d+)?)", text or "")
    return float(m.group(1)) if m else None


def to_markdown(df: pd.DataFrame) -> str:
    """The table, then its legend and footnotes: each row's deviations under its key, each paper number's
    source (marked when unverified). Long text stays out of the cells so the table stays readable."""
    notes = (df.attrs.get("footnotes") or {}).get("paper", {})
    shown = df.copy()
    for col in [c for c in df.columns if c.endswith(" source")]:
        paper = col[: -len(" source")] + " paper"
        shown[paper] = [f"{p} [{ref}{_unverified(notes.get(ref))}]" if ref else p
                        for p, ref in zip(df[paper], df[col], strict=True)]
        shown = shown.drop(columns=col)
    if "deviations" in shown.columns:
        shown["deviations"] = ["none" if d == "none" else f"see {k}" for k, d in zip(df["key"], df["deviations"],
                                                                                     strict=True)]
    # disable_numparse: tabulate would otherwise print the paper's "84.0" as "84".
    parts = [shown.to_markdown(index=False, disable_numparse=True)]
    if df.attrs.get("legend"):
        parts.append(f"Legend: {df.attrs['legend']}")
    devs = [f"- {k}: {d}" for k, d in zip(df["key"], df["deviations"], strict=True) if d != "none"] \
        if "deviations" in df.columns else []
    if devs:
        parts.append("Deviations from the paper recipe:\n" + "\n".join(devs))
    used = {ref for col in df.columns if col.endswith(" source") for ref in df[col] if ref}
    if used:
        parts.append("Paper numbers:\n" + "\n".join(f"- [{ref}] {notes.get(ref, '?')}" for ref in sorted(
            used, key=lambda r: int(r[1:]))))
    return "\n\n".join(parts)


def _unverified(note: str | None) -> str:
    return ", unverified" if note and "UNVERIFIED" in note else ""


REPORT_MARK = "<!-- ssl-repro report of spec {name!r} -->"


def write_report(df: pd.DataFrame, out_dir: str | os.PathLike, name: str | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.csv`` under ``out_dir``, each atomically.

    With ``name`` (the spec's), report.md starts with a mark naming it, and an existing report.md marked
    for another spec is never overwritten (ValueError): ``--out`` pointing at another run's folder must
    not destroy that run's report.
    """
    out = Path(out_dir)
    md_text = to_markdown(df) + "\n"
    if name is not None:
        owner = report_owner(out / "report.md")
        if owner not in (None, name):
            raise ValueError(f"{out / 'report.md'} is the report of spec {owner!r}, not {name!r}")
        md_text = REPORT_MARK.format(name=name) + "\n\n" + md_text
    md = write_text(out / "report.md", md_text)
    csv = write_text(out / "report.csv", df.to_csv(index=False))
    return md, csv


def with_code_column(table: pd.DataFrame, expected: pd.DataFrame | list[dict[str, Any]],
                     records: pd.DataFrame | list[dict[str, Any]]) -> pd.DataFrame:
    """``table`` plus a ``code`` column: the code hash(es) of each row's finished records, so results
    computed by other code than a relaunch's stand out (records before code hashes: "unknown")."""
    by_stage = _records_by_stage(records)
    expected_rows = expected.to_dict("records") if isinstance(expected, pd.DataFrame) else expected
    rows = [_with_record(r, by_stage) for r in expected_rows]
    codes = {key: ", ".join(dict.fromkeys(_code_label(r["record"]) for r in group
                                          if r["record"] is not None and r["record"].get("status") == "done"))
             or MISSING for key, group in _groups(rows).items()}
    out = table.copy()
    out["code"] = [codes.get(tuple(row[k] for k in GROUP), MISSING) for row in table.to_dict("records")]
    return out


def _code_label(record: dict[str, Any]) -> str:
    code = record.get("code")
    if not isinstance(code, dict) or not code.get("hash"):
        return "unknown"
    return str(code["hash"]) + ("+dirty" if code.get("dirty") else "")


def report_owner(path: Path) -> str | None:
    """The spec name in an existing report's mark; None when there is no report or no mark."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
    except OSError:
        return None
    m = re.match(r"^<!-- ssl-repro report of spec '(.*)' -->$", first.strip())
    return m.group(1) if m else None
