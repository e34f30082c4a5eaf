"""Training checkpoints: everything an exact resume needs, written atomically, read with weights_only."""

from __future__ import annotations

import argparse
import hashlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.atomic import write_atomic
from harness.errors import UserError

FORMAT = "ssl-repro-ckpt/1"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_tuplify(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(i) for i in x) if isinstance(x, (list, tuple)) else x


def save(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    state = {"format": FORMAT, **state}
    return write_atomic(path, lambda f: torch.save(state, f))


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Our own checkpoints hold only tensors and plain Python values, so weights_only=True suffices."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, or holding non-allow-listed objects
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError("checkpoint", f"{str(path)!r} is unreadable ({first[:120]})",
                        "delete it to restart the stage, or restore it from a copy") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError("checkpoint", f"{str(path)!r} is not an ssl-repro checkpoint ({FORMAT})",
                        "point to a checkpoint written by 'repro'") from None
    return state


def load_external(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint from outside (an official release): ``torch.load(weights_only=True)``. Official full
    checkpoints also pickle their ``argparse.Namespace`` of arguments, allow-listed for this call only."""
    path = Path(path)
    if not path.is_file():
        raise UserError("checkpoint", f"{str(path)!r} does not exist", "pass the path of a released checkpoint")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling problem is the file's
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError("checkpoint", f"{path} cannot be read with weights_only=True ({first[:160]})",
                        "pass an official release (state dict or full checkpoint)") from None
    if not isinstance(obj, dict):
        raise UserError("checkpoint", f"{path} holds a {type(obj).__name__}, not a state dict",
                        "pass an official release (state dict or full checkpoint)")
    return obj


def sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

