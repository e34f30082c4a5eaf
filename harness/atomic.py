"""Atomic writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write through ``write(fileobj)`` into a temp file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; records must be readable by other users
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    data = (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
    return write_atomic(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda f: f.write(text.encode()))


class DamagedFileWarning(UserWarning):
    """A state file (record, ledger, progress, manifest) could not be read and was skipped."""


def read_json_state(path: str | os.PathLike, kind: type = dict) -> tuple[Any, str | None]:
    """Read a JSON state file without ever raising on its content.

    Returns ``(value, None)`` for a good file, ``(None, None)`` for a missing one and ``(None, problem)``
    for a damaged one (truncated, garbage, wrong top-level type), after a DamagedFileWarning naming the
    file: one torn file must not take a whole report, status or launch down.
    """
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = f"{type(e).__name__}: {e}"
    else:
        if isinstance(value, kind):
            return value, None
        problem = f"not a JSON {kind.__name__}"
    warnings.warn(f"skipping damaged {path}: {problem}", DamagedFileWarning, stacklevel=2)
    return None, problem
