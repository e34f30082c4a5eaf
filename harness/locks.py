"""One writer per stage and per run folder.

A lock is an advisory ``flock`` on a small file that also names its owner (host, pid, SLURM/submitit
job id), so a refusal can say who holds it. The kernel drops a flock when its process dies, so the
lock of a dead owner on this host is taken over without any clean-up. File systems that do not share
flocks between hosts are covered by the owner record: a live SLURM job of another host keeps its lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.errors import UserError

STAGE_LOCK = ".stage.lock"
LAUNCH_LOCK = "launch.lock"
LAUNCHER_ENV = "SSL_REPRO_LAUNCHER"  # "pid:start time" of the `repro launch` running local jobs


class LockBusy(UserError):
    """Someone else holds the lock (the refusal names them)."""


def _owner(job_id: str | None) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": job_id, "since": time.time()}


def read_owner(path: str | os.PathLike) -> dict[str, Any] | None:
    try:
        owner = json.loads(Path(path).read_text() or "null")
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another process"
    job = f", job {owner['job_id']}" if owner.get("job_id") else ""
    return f"pid {owner.get('pid')} on {owner.get('host')}{job}"


def _slurm_job_active(job_id: str) -> bool:
    """Cheap check (squeue) that a SLURM job still runs; unknown counts as active."""
    if shutil.which("squeue") is None:
        return True
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id).split("_")[0], "-o", "%T"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return True
    return out.returncode == 0 and bool(out.stdout.strip())


def _held_elsewhere(owner: dict[str, Any] | None, job_id: str | None) -> bool:
    """An owner on another host whose flock we cannot see: trust its job's state."""
    if not owner or owner.get("host") == socket.gethostname():
        return False  # same host: the flock we just got proves the owner is gone
    other = owner.get("job_id")
    return bool(other) and other != job_id and _slurm_job_active(other)


@contextmanager
def owner_lock(path: str | os.PathLike, job_id: str | None, what: str, fix: str, wait_s: float = 0.0
               ) -> Iterator[None]:
    """Hold ``path`` exclusively for the body; raise a one-line ``UserError`` when someone else holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockBusy(what, f"busy: held by {describe(read_owner(path))}", fix) from None
                time.sleep(0.5)
            except OSError as e:  # a file system without flock: rely on the owner record alone
                if e.errno not in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                break
        previous = read_owner(path)
        if _held_elsewhere(previous, job_id):
            raise LockBusy(what, f"busy: held by {describe(previous)}", fix)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner(job_id)).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # not unlinked: a waiter may hold the open file and lock it next
    finally:
        os.close(fd)  # releases the flock


def stage_lock(stage_dir: str | os.PathLike, job_id: str | None) -> Any:
    """A stage runs in one process at a time (rank 0 of its job holds this)."""
    return owner_lock(Path(stage_dir) / STAGE_LOCK, job_id, f"stage {stage_dir}",
                      "it is running elsewhere: wait for it or stop that process ('repro status SPEC' shows it)")


def launch_lock(run_dir: str | os.PathLike, wait_s: float) -> Any:
    """One ``repro launch`` submits into a run folder at a time (its ledger is read, then extended)."""
    return owner_lock(Path(run_dir) / "launch" / LAUNCH_LOCK, None, f"run folder {run_dir}",
                      "another 'repro launch' of this matrix is running: wait for it to end "
                      "('repro status SPEC' shows progress) or stop it", wait_s=wait_s)


# -- local jobs end with the `repro launch` that started them -------------------------------------------

def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def launcher_token() -> str:
    return f"{os.getpid()}:{_start_time(os.getpid())}"


def _alive(token: str) -> bool:
    pid_s, _, start = token.partition(":")
    try:
        os.kill(int(pid_s), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return start in ("None", "") or _start_time(int(pid_s)) == start  # a reused pid is another process


def watch_launcher(interrupt: Any, poll_s: float = 1.0) -> threading.Thread | None:
    """In a local job: when the `repro launch` that started it dies (even by SIGKILL), call
    ``interrupt()`` so the trainer stops instead of running on as an orphan that a relaunch duplicates.
    submitit's local controller outlives its launcher on purpose, so this cannot be left to it."""
    token = os.environ.get(LAUNCHER_ENV)
    if not token or os.environ.get("SUBMITIT_EXECUTOR") != "local":
        return None

    def watch() -> None:
        while _alive(token):
            time.sleep(poll_s)
        interrupt()

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    return thread
