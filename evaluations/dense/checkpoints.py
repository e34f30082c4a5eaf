"""torch ``weights_only`` loading of mmengine checkpoints: the globals they pickle, allow-listed.

mmengine's checkpoints hold, beside tensors, the message hub's ``HistoryBuffer`` logs (numpy arrays and
scalars). Allow-listing exactly these keeps torch's safe unpickler on (no ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``):
any other global in a checkpoint still refuses to load. ``HistoryBuffer.__getstate__`` also pickles its
statistics methods, which unpickle through ``getattr`` (arbitrary attribute access, never allow-listed);
the built-in ones (min, max, current, mean) are defined by the class itself, so they are left out of the
pickled state.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_BUILTIN_STATISTICS = ("min", "max", "current", "mean")


def _history_state(self: Any) -> dict[str, Any]:
    state = dict(self.__dict__)
    custom = {k: v for k, v in self._statistics_methods.items() if k not in _BUILTIN_STATISTICS}
    if custom:  # a project-registered statistic: pickled as mmengine does (and refused by weights_only)
        state["statistics_methods"] = custom
    return state


def mmengine_globals() -> list[Any]:
    from mmengine.logging.history_buffer import HistoryBuffer

    # numpy 2 pickles a dtype as its class (np.dtypes.Float64DType, ...); the buffers hold float and int arrays.
    dtype_classes = [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return [HistoryBuffer, np.ndarray, np.dtype, np._core.multiarray._reconstruct, np._core.multiarray.scalar,
            *dtype_classes]


def allow_mmengine_globals() -> None:
    from mmengine.logging.history_buffer import HistoryBuffer

    HistoryBuffer()  # registers the built-in statistics on the class, which unpickled buffers read
    HistoryBuffer.__getstate__ = _history_state
    torch.serialization.add_safe_globals(mmengine_globals())
