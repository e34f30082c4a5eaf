"""What state each (cell, stage) is in: from records, the launch ledger, SLURM and progress files.

Works on a ``harness.manifest.Run`` (plain rows), so it never imports torch or the method plugins. Only
``status`` asks SLURM, and then once for the whole matrix (one ``sacct`` over every job id, through
submitit's watcher), never once per stage. A damaged record, ledger or progress file is skipped with a
warning naming it; its stage shows as "damaged".
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from harness.atomic import read_json_state
from harness.manifest import Run, run_from_matrix
from harness.records import PROGRESS_NAME, inspect_record

STALE_S = 600  # a progress file older than this no longer means "running"
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
                 "DEADLINE"}
BLOCKED = "BLOCKED"  # pseudo-state: pending on a dependency that can never be met (squeue's reason)
BROKEN = ("failed", "damaged")  # a pre-training in one of these states blocks its evaluations
BUILD_STAGES = ("pretrain", "init")  # the stage that makes a cell's backbone (harness.matrix.PRETRAIN, INIT)


def stage_key(stage: dict[str, Any]) -> str:
    return f"{stage['cell_id']}/{stage['stage']}"


def ledger_entries(out: Path) -> dict[str, dict[str, Any]]:
    """stage key -> {job_id, executor, folder} (harness.launch.Ledger's file); {} when missing or damaged."""
    return read_json_state(Path(out) / "launch" / "ledger.json")[0] or {}


def slurm_states(entries: dict[str, dict[str, Any]]) -> dict[str, str]:
    """stage key -> SLURM state of its job, from one ``sacct`` call for all of them."""
    slurm = {k: str(e["job_id"]) for k, e in entries.items() if isinstance(e, dict) and e.get("executor") == "slurm"}
    if not slurm:
        return {}
    from submitit.slurm.slurm import SlurmInfoWatcher

    watcher = SlurmInfoWatcher()
    for job_id in slurm.values():
        watcher.register_job(job_id)
    watcher.update()  # an unreachable sacct logs a warning and leaves every state UNKNOWN
    states = {k: watcher.get_state(j, mode="cache").split()[0] for k, j in slurm.items()}
    # sacct may not list a freshly pending job yet (UNKNOWN); squeue knows it, and why it waits.
    waiting = {k: slurm[k] for k, s in states.items() if s in {"PENDING", "UNKNOWN"}}
    blocked = blocked_jobs(list(waiting.values()))
    return {k: BLOCKED if waiting.get(k) in blocked else s for k, s in states.items()}


def blocked_jobs(job_ids: list[str]) -> set[str]:
    """Jobs (of ``job_ids``) pending on a dependency that can never be met, from one ``squeue`` call."""
    if not job_ids:
        return set()
    try:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %r"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    wanted = set(job_ids)
    return {job for job, _, reason in (line.partition(" ") for line in out.stdout.splitlines())
            if job in wanted and "DependencyNeverSatisfied" in reason}


def stage_status(stage: dict[str, Any], entries: dict[str, dict[str, Any]], slurm: dict[str, str]) -> dict[str, Any]:
    key = stage_key(stage)
    entry = entries.get(key) if isinstance(entries.get(key), dict) else {}
    out = {"state": "not launched", "job_id": entry.get("job_id"), "progress": None, "error": None}
    rec, damage = inspect_record(stage["stage_dir"])
    prog, prog_damage = read_json_state(os.path.join(stage["stage_dir"], PROGRESS_NAME))
    fresh = False
    if prog_damage:
        out["progress"] = f"damaged {PROGRESS_NAME}"
    elif prog is not None:
        out["progress"] = f"{prog.get('step')}/{prog.get('total')}"
        fresh = time.time() - float(prog.get("updated_at") or 0) < STALE_S
    if rec is not None and rec.get("health"):
        out["health"] = rec["health"]
        out["collapse"] = rec.get("collapse")
    if rec is not None and rec.get("status") == "done":
        out["state"] = "done"
        return out
    sstate = slurm.get(key)
    if sstate == BLOCKED:
        out["state"] = "blocked"  # its pre-training failed or was cancelled: it would wait forever
        out["error"] = "dependency never satisfied; 'repro launch' cancels and resubmits it"
    elif sstate in ACTIVE_STATES:
        out["state"] = "running" if sstate in {"RUNNING", "COMPLETING"} else "pending"
    elif damage:
        out["state"], out["error"] = "damaged", f"{os.path.join(stage['stage_dir'], 'record.json')}: {damage}"
    elif rec is not None and rec.get("status") == "failed":
        out["state"], out["error"] = "failed", rec.get("error")
    elif sstate in FAILED_STATES:
        out["state"] = sstate.lower()
    elif fresh:
        out["state"] = "running"
    elif entry:
        out["state"] = "pending"
    return out


def _blocked(stage: dict[str, Any], state: str, pretrain_state: dict[str, str]) -> str:
    """An evaluation that never ran because its pre-training failed says so, not "not launched"."""
    pre = pretrain_state.get(stage["cell_id"])
    if stage["stage"] not in BUILD_STAGES and state in ("not launched", "pending") and pre in BROKEN:
        return f"{'init' if stage.get('floor_of') else 'pretrain'} {pre}"
    return state


def status_rows(run: Run | Any, query_slurm: bool = True) -> list[dict[str, Any]]:
    """One row per cell, a column per stage. ``run``: a Run, or an expanded harness.matrix.Matrix."""
    run = run if isinstance(run, Run) else run_from_matrix(run)
    entries = ledger_entries(run.out)
    slurm = slurm_states(entries) if query_slurm else {}
    states = [(s, stage_status(s, entries, slurm)) for s in run.stages]
    pre = {s["cell_id"]: st["state"] for s, st in states if s["stage"] in BUILD_STAGES}
    rows: dict[str, dict[str, Any]] = {}
    for stage, st in states:
        floor = stage.get("floor_of")
        row = rows.setdefault(stage["cell_id"], {"cell": stage["cell_id"], "method": stage["method"],
                                                 "preset": stage["preset"] + (" (random init)" if floor else ""),
                                                 "seed": stage["seed"]})
        text = _blocked(stage, st["state"], pre)
        if st["job_id"]:
            text += f" [{st['job_id']}]"
        if st["progress"] and st["state"] != "done":
            text += f" {st['progress']}"
        if st["error"]:
            text += f": {st['error'][:80]}"
        if stage["stage"] in BUILD_STAGES:  # a floor's init is its cell's pre-training column
            row["pretrain"] = text
            row["health"] = health_text(st["health"], st.get("collapse")) if st.get("health") else ""
        else:
            row[stage["stage"]] = text
    table = list(rows.values())
    if not any(r.get("health") for r in table):  # nothing measured yet (or records from before): no column
        for r in table:
            r.pop("health", None)
    return table


def health_text(health: dict[str, Any], collapse: dict[str, Any] | None) -> str:
    """``rankme 21.3 std·√d 0.81`` (+ ``COLLAPSED: <metric> <value> at epoch <e>``): a pre-training's last
    representation-health values (harness/health.py) in a status cell."""
    short = {"rankme": "rankme", "std_sqrt_d": "std·√d", "teacher_entropy_ratio": "H(t)/logK", "teacher_kl": "KL"}
    text = " ".join(f"{label} {health[k]:.3g}" for k, label in short.items()
                    if isinstance(health.get(k), int | float))
    if collapse:
        text += f" COLLAPSED: {collapse.get('metric')} {collapse.get('value', float('nan')):.3g} at epoch " \
                f"{collapse.get('epoch')}"
    return text


def expected_rows(run: Run | Any, damaged: set[str] | frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """Every stage the run expects, for the report: no SLURM, no record reads (the report has them).

    ``status`` is "damaged" for a stage whose record.json is in ``damaged`` (paths), "pending" for one in
    the ledger (submitted; records say the rest), "not launched" otherwise.
    """
    run = run if isinstance(run, Run) else run_from_matrix(run)
    entries = ledger_entries(run.out)
    rows = []
    for s in run.stages:
        if os.path.join(s["stage_dir"], "record.json") in damaged:
            status = "damaged"
        else:
            status = "pending" if stage_key(s) in entries else "not launched"
        rows.append({**s, "status": status})
    return rows
