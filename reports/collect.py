"""Read the folder of result records into a DataFrame, and the cells a matrix expects into another.

The record folder is the only source of truth (see harness/records.py for schema 1); this module
re-states the few field names it needs instead of importing the harness.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from harness.atomic import read_json_state, write_json

SCHEMA_VERSION = 1  # newest record schema this reader understands
RECORD_NAME = "record.json"
# Without these a record cannot be matched to an expected cell, so it is skipped.
_NEEDED = ("schema_version", "cell_id", "stage_id", "stage", "status")
RECORD_COLUMNS = (
    "cell_id", "stage_id", "stage", "status", "method", "preset", "backbone", "epochs", "evaluation",
    "protocol", "headline_metric", "seed", "paper_recipe", "recipe_deviations", "wall_time_s", "gpu_hours",
    "cpu_hours", "hardware", "data_fingerprint", "img_per_s",
    "peak_mem_mb", "num_gpus", "job_id", "error", "created_at", "schema_version", "path",
)
EXPECTED_COLUMNS = (
    "cell_id", "stage_id", "stage", "method", "preset", "backbone", "epochs", "evaluation", "protocol",
    "headline_metric", "seed", "paper_recipe", "recipe_deviations",
)


class RecordWarning(UserWarning):
    """A record file was skipped (unreadable, not a record, or a newer schema)."""


def load_records(out_dir: str | os.PathLike, paths: list[str | os.PathLike] | None = None) -> pd.DataFrame:
    """One row per ``record.json`` under ``out_dir`` (recursively), metrics flattened to ``metric.<name>``.

    ``paths``: read exactly these record files instead (missing ones are skipped quietly): with a run's
    manifest the caller knows where every record is, and walking a big run folder (checkpoints, logs,
    exports) costs more than reading the records.

    Bad files are skipped with a RecordWarning rather than raising: one corrupt record must not hide
    the rest of a benchmark; their paths are in ``df.attrs["damaged"]``. Nested fields (checkpoint,
    packages, data, recipe_deviations, attempts) stay dicts.
    """
    rows, damaged = read_records(out_dir, paths)
    df = pd.DataFrame(rows)
    for col in RECORD_COLUMNS:
        if col not in df.columns:
            df[col] = None
    metric_cols = sorted(c for c in df.columns if c.startswith("metric."))
    rest = [c for c in df.columns if c not in RECORD_COLUMNS and c not in metric_cols]
    df = df[[*RECORD_COLUMNS, *metric_cols, *rest]]
    df.attrs["damaged"] = damaged
    return df


def read_records(out_dir: str | os.PathLike, paths: list[str | os.PathLike] | None = None,
                 fields: tuple[str, ...] | None = None, index: str | os.PathLike | None = None
                 ) -> tuple[list[dict[str, Any]], list[str]]:
    """``load_records`` as plain rows, and the damaged files' paths: what a large report reads, since
    ``comparison_table`` takes rows as well as frames and the frame round trip costs seconds at 10,000.

    ``fields``: keep only these (and every ``metric.*``). ``index``: a cache file of those rows keyed by
    each record's path, size and mtime, so that a report over 10,000 unchanged records opens one file
    (and stats the rest) instead of parsing them all; it is rewritten, atomically, when records change.
    """
    rows = []
    damaged = []
    cached = _load_index(index, fields)
    fresh: dict[str, list] = {}
    candidates = sorted(Path(out_dir).rglob(RECORD_NAME)) if paths is None else [os.fspath(p) for p in paths]
    for path in candidates:
        key = str(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        hit = cached.get(key)
        if hit is not None and hit[0] == st.st_mtime_ns and hit[1] == st.st_size:
            row = hit[2]
        else:
            record = _read(path)
            if record is None:
                damaged.append(key)
                continue
            row = {k: v for k, v in record.items() if k != "metrics" and (fields is None or k in fields)}
            for name, value in (record.get("metrics") or {}).items():
                row[f"metric.{name}"] = value
            row["path"] = key
        fresh[key] = [st.st_mtime_ns, st.st_size, row]
        rows.append(row)
    if index is not None and fresh != cached:
        try:
            write_json(index, {"fields": list(fields or ()), "records": fresh})
        except OSError:
            pass  # a read-only run folder only costs time
    return rows, damaged


def _load_index(index: str | os.PathLike | None, fields: tuple[str, ...] | None) -> dict[str, list]:
    if index is None:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a damaged cache is rebuilt, not news
        data, _ = read_json_state(index)
    if not data or data.get("fields") != list(fields or ()) or not isinstance(data.get("records"), dict):
        return {}
    return data["records"]


def _read(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warnings.warn(f"skipping unreadable record {path}: {e}", RecordWarning, stacklevel=3)
        return None
    if not isinstance(record, dict):
        warnings.warn(f"skipping {path}: not a JSON object", RecordWarning, stacklevel=3)
        return None
    missing = [k for k in _NEEDED if k not in record]
    if missing:
        warnings.warn(f"skipping {path}: missing fields {missing}", RecordWarning, stacklevel=3)
        return None
    version = record["schema_version"]
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        warnings.warn(f"skipping {path}: schema_version {version!r} is newer than {SCHEMA_VERSION}",
                      RecordWarning, stacklevel=3)
        return None
    if not isinstance(record.get("metrics") or {}, dict):
        warnings.warn(f"skipping {path}: metrics is not an object", RecordWarning, stacklevel=3)
        return None
    return record


def expected_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The (cell, stage) pairs a matrix spec expects, one row each, with a ``status`` column.

    ``status`` defaults to "pending"; a caller that knows better (e.g. from the scheduler's queue) sets
    "running" or "failed" per row.
    """
    rows = check_expected(rows)
    return pd.DataFrame(rows, columns=[*EXPECTED_COLUMNS, *_extra_keys(rows)])


def check_expected(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``expected_frame``'s checks on plain rows: every needed field present, ``status`` defaulted."""
    for i, row in enumerate(rows):
        missing = [k for k in EXPECTED_COLUMNS if k not in row]
        if missing:
            raise ValueError(f"expected row {i} misses fields {missing}")
    return [{**row, "status": row.get("status") or "pending"} for row in rows]


def _extra_keys(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for k in row:
            if k not in EXPECTED_COLUMNS:
                seen[k] = None
    return list(seen)
