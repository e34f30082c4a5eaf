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
    rows = []
    damaged = []
    candidates = sorted(Path(out_dir).rglob(RECORD_NAME)) if paths is None else [Path(p) for p in paths]
    for path in candidates:
        record = _read(path)
        if record is None:
            if path.exists():
                damaged.append(str(path))
            continue
        row = {k: v for k, v in record.items() if k != "metrics"}
        for name, value in (record.get("metrics") or {}).items():
            row[f"metric.{name}"] = value
        row["path"] = str(path)
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in RECORD_COLUMNS:
        if col not in df.columns:
            df[col] = None
    metric_cols = sorted(c for c in df.columns if c.startswith("metric."))
    rest = [c for c in df.columns if c not in RECORD_COLUMNS and c not in metric_cols]
    df = df[[*RECORD_COLUMNS, *metric_cols, *rest]]
    df.attrs["damaged"] = damaged
    return df


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
    for i, row in enumerate(rows):
        missing = [k for k in EXPECTED_COLUMNS if k not in row]
        if missing:
            raise ValueError(f"expected row {i} misses fields {missing}")
    df = pd.DataFrame(rows, columns=[*EXPECTED_COLUMNS, *_extra_keys(rows)])
    if "status" not in df.columns:
        df["status"] = "pending"
    df["status"] = df["status"].fillna("pending")
    return df


def _extra_keys(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for k in row:
            if k not in EXPECTED_COLUMNS:
                seen[k] = None
    return list(seen)
