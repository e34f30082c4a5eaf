"""What state each (cell, stage) is in: from records, the launch ledger, SLURM and progress files."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from harness.launch import ACTIVE_STATES, Ledger, dependency_blocked, job_state
from harness.matrix import Matrix, StageSpec
from harness.records import read_record

STALE_S = 600  # a progress file older than this no longer means "running"


def stage_status(stage: StageSpec, ledger: Ledger, query_slurm: bool = True) -> dict[str, Any]:
    rec = read_record(stage.stage_dir)
    entry = ledger.entries.get(stage.key, {})
    out = {"state": "not launched", "job_id": entry.get("job_id"), "progress": None, "error": None}
    prog_path = Path(stage.stage_dir) / "progress.json"
    if prog_path.exists():
        prog = json.loads(prog_path.read_text())
        out["progress"] = f"{prog['step']}/{prog['total']}"
        fresh = time.time() - prog.get("updated_at", 0) < STALE_S
    else:
        fresh = False
    if rec is not None and rec.get("status") == "done":
        out["state"] = "done"
        return out
    slurm = ledger.slurm_job(stage.key) if query_slurm else None
    sstate = job_state(slurm) if slurm is not None else None
    if sstate in {"PENDING", "UNKNOWN"} and dependency_blocked(slurm.job_id):
        out["state"] = "blocked"  # its pre-training failed or was cancelled: it would wait forever
        out["error"] = "dependency never satisfied; 'repro launch' cancels and resubmits it"
    elif sstate in ACTIVE_STATES:
        out["state"] = "running" if sstate in {"RUNNING", "COMPLETING"} else "pending"
    elif rec is not None and rec.get("status") == "failed":
        out["state"], out["error"] = "failed", rec.get("error")
    elif sstate in {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
                    "DEADLINE"}:
        out["state"] = sstate.lower()
    elif fresh:
        out["state"] = "running"
    elif entry:
        out["state"] = "pending"
    return out


def status_rows(matrix: Matrix, query_slurm: bool = True) -> list[dict[str, Any]]:
    ledger = Ledger(matrix.out)
    rows = []
    for cell in matrix.cells:
        p = cell.pretrain
        row = {"cell": p.cell_id, "method": p.method, "preset": p.preset_label, "seed": p.seed}
        for stage in cell.stages:
            st = stage_status(stage, ledger, query_slurm)
            text = st["state"]
            if st["job_id"]:
                text += f" [{st['job_id']}]"
            if st["progress"] and st["state"] != "done":
                text += f" {st['progress']}"
            if st["error"]:
                text += f": {st['error'][:80]}"
            row[stage.stage] = text
        rows.append(row)
    return rows


def expected_rows(matrix: Matrix) -> list[dict[str, Any]]:
    """Every stage the matrix expects, with its state, for the report (which knows no harness)."""
    ledger = Ledger(matrix.out)
    keys = ("cell_id", "stage_id", "stage", "method", "preset", "backbone", "epochs", "seed", "paper_recipe",
            "recipe_deviations", "protocol", "headline_metric")
    return [{**{k: getattr(s, k) for k in keys}, "preset": s.preset_label,
             "evaluation": None if s.stage == "pretrain" else s.stage,
             "status": stage_status(s, ledger)["state"]} for s in matrix.stages()]
