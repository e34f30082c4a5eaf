"""Result records: one JSON file per (cell, stage), written atomically, schema-versioned.

The folder of records is the only source of truth for reports. Fields (schema 1):

    schema_version, cell_id, stage_id, stage ("pretrain" | evaluation name), status ("done" | "failed"),
    method, preset, backbone, epochs, evaluation (None for pretrain), protocol, metrics {name: value},
    headline_metric, seed, data, paper_recipe, recipe_deviations {setting: [paper, ours]},
    checkpoint {path, step, sha256}, wall_time_s, gpu_hours, num_gpus, peak_mem_mb, peak_mem_kind,
    img_per_s, git_commit, code {hash, commit, dirty, plugins, snapshot}, packages {name: version}, job_id,
    resumed_from_step, error, created_at

Added without a schema bump (readers ignore what they do not know): data_fingerprint (harness/dataset_id.py);
attempts [{attempt, start, end, wall_s, status, host, job_id, device, num_gpus, gpu_model, cpu_model,
cpu_cores, python, torch, cuda}], cpu_hours, hardware, last_attempt_wall_s. With attempts, wall_time_s,
gpu_hours and cpu_hours are sums over every attempt of the stage (failed, preempted and interrupted ones too).
"""

from __future__ import annotations

import os
import platform
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.atomic import read_json_state, write_json

SCHEMA_VERSION = 1
RECORD_NAME = "record.json"
ATTEMPTS_NAME = "attempts.json"
PROGRESS_NAME = "progress.json"

REQUIRED = (
    "schema_version", "cell_id", "stage_id", "stage", "status", "method", "preset", "backbone", "epochs",
    "evaluation", "protocol", "metrics", "seed",
)


def write_record(stage_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    record = {"schema_version": SCHEMA_VERSION, "created_at": datetime.now(UTC).isoformat(), **record}
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise ValueError(f"record misses fields {missing}")
    record.update(close_attempt(stage_dir, record["status"]))
    return write_json(Path(stage_dir) / RECORD_NAME, record)


def inspect_record(stage_dir: str | os.PathLike) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None), (None, None) when there is none, or (None, problem) when record.json is damaged."""
    return read_json_state(os.path.join(stage_dir, RECORD_NAME))  # not pathlib: status calls this 10,000 times


def read_record(stage_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The stage's record; None when missing or damaged (a damaged one warns, naming the file)."""
    return inspect_record(stage_dir)[0]


def is_done(stage_dir: str | os.PathLike) -> bool:
    rec = read_record(stage_dir)
    return rec is not None and rec.get("status") == "done"


# --- attempts: every try of a stage, so that costs add up over failures, preemptions and resumes ---------


def hardware_info(device_type: str, world_size: int) -> dict[str, Any]:
    """Where this attempt runs: host, CPU/GPU model, core count, Python/torch/CUDA versions."""
    import torch  # only stages call this, and they have torch loaded already

    cuda = device_type == "cuda"
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", "1") or 1)
    return {
        "host": socket.gethostname(), "device": device_type, "num_gpus": world_size if cuda else 0,
        "gpu_model": torch.cuda.get_device_name() if cuda else None, "cpu_model": _cpu_model(),
        # cores this process may use (its SLURM allocation or affinity), times the nodes of the job
        "cpu_cores": len(os.sched_getaffinity(0)) * nodes, "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        # CPU float reductions split by thread: the same run on another thread count differs in the last bits
        "torch_threads": torch.get_num_threads(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_attempts(stage_dir: str | os.PathLike) -> list[dict[str, Any]]:
    attempts, _ = read_json_state(Path(stage_dir) / ATTEMPTS_NAME, list)
    return attempts or []


def begin_attempt(stage_dir: str | os.PathLike, info: dict[str, Any], job_id: str | None = None) -> dict[str, Any]:
    """Append a running attempt. An earlier attempt still marked running died without a word (SIGKILL,
    node failure): close it as "interrupted", ending at its last sign of life (the progress file)."""
    stage_dir = Path(stage_dir)
    attempts = read_attempts(stage_dir)
    for a in attempts:
        if a.get("status") == "running":
            _close(a, "interrupted", _last_heartbeat(stage_dir, a))
    attempt = {"attempt": len(attempts) + 1, "start": time.time(), "end": None, "wall_s": None,
               "status": "running", "job_id": job_id, "pid": os.getpid(), **info}
    attempts.append(attempt)
    write_json(stage_dir / ATTEMPTS_NAME, attempts)
    return attempt


def end_attempt(stage_dir: str | os.PathLike, status: str) -> list[dict[str, Any]]:
    """Close this process's running attempt (e.g. "preempted"); returns every attempt."""
    attempts = read_attempts(stage_dir)
    mine = [a for a in attempts if a.get("status") == "running" and a.get("pid") == os.getpid()
            and a.get("host") == socket.gethostname()]
    if mine:
        _close(mine[-1], status, time.time())
        write_json(Path(stage_dir) / ATTEMPTS_NAME, attempts)
    return attempts


def close_attempt(stage_dir: str | os.PathLike, status: str) -> dict[str, Any]:
    """Record fields for a stage's attempts (empty when none were kept): the list and its summed costs."""
    attempts = end_attempt(stage_dir, status)
    if not attempts:
        return {}
    closed = [a for a in attempts if a.get("wall_s") is not None]
    last = closed[-1] if closed else attempts[-1]
    return {"attempts": attempts, **attempt_costs(attempts), "hardware": hardware_label(last),
            "last_attempt_wall_s": last.get("wall_s")}


def attempt_costs(attempts: list[dict[str, Any]]) -> dict[str, float]:
    """Wall time, GPU-hours (GPUs x wall) and CPU-hours (cores x wall, CPU attempts only), summed."""
    wall = gpu = cpu = 0.0
    for a in attempts:
        w = float(a.get("wall_s") or 0.0)
        wall += w
        if a.get("device") == "cuda":
            gpu += w * int(a.get("num_gpus") or 0) / 3600
        else:
            cpu += w * int(a.get("cpu_cores") or 0) / 3600
    return {"wall_time_s": wall, "gpu_hours": gpu, "cpu_hours": cpu}


def hardware_label(attempt: dict[str, Any]) -> str:
    if attempt.get("device") == "cuda":
        return f"{attempt.get('num_gpus')}x {attempt.get('gpu_model')}"
    return f"CPU {attempt.get('cpu_model')} ({attempt.get('cpu_cores')} cores)"


def _close(attempt: dict[str, Any], status: str, end: float) -> None:
    attempt["end"] = max(end, attempt["start"])
    attempt["wall_s"] = attempt["end"] - attempt["start"]
    attempt["status"] = status


def _last_heartbeat(stage_dir: Path, attempt: dict[str, Any]) -> float:
    try:
        return (stage_dir / PROGRESS_NAME).stat().st_mtime
    except OSError:
        return attempt["start"]  # no sign of life at all: count no time rather than invent some
