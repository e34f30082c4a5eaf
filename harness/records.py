"""Result records: one JSON file per (cell, stage), written atomically, schema-versioned.

The folder of records is the only source of truth for reports. Fields (schema 1):

    schema_version, cell_id, stage_id, stage ("pretrain" | evaluation name), status ("done" | "failed"),
    method, preset, backbone, epochs, evaluation (None for pretrain), protocol, metrics {name: value},
    headline_metric, seed, data, paper_recipe, recipe_deviations {setting: [paper, ours]},
    checkpoint {path, step, sha256}, wall_time_s, gpu_hours, num_gpus, peak_mem_mb, peak_mem_kind,
    img_per_s, git_commit, code {hash, commit, dirty, plugins, snapshot}, packages {name: version}, job_id,
    resumed_from_step, error, created_at
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.atomic import write_json

SCHEMA_VERSION = 1
RECORD_NAME = "record.json"

REQUIRED = (
    "schema_version", "cell_id", "stage_id", "stage", "status", "method", "preset", "backbone", "epochs",
    "evaluation", "protocol", "metrics", "seed",
)


def write_record(stage_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    record = {"schema_version": SCHEMA_VERSION, "created_at": datetime.now(UTC).isoformat(), **record}
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise ValueError(f"record misses fields {missing}")
    return write_json(Path(stage_dir) / RECORD_NAME, record)


def read_record(stage_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(stage_dir) / RECORD_NAME
    if not path.exists():
        return None
    with open(path) as f:
        return json.load(f)


def is_done(stage_dir: str | os.PathLike) -> bool:
    rec = read_record(stage_dir)
    return rec is not None and rec.get("status") == "done"
