"""Loading officially released checkpoints of the self-distillation family (DINO, iBOT, EsViT).

Their releases come in two layouts:

- a full training checkpoint: ``{"student": ..., "teacher": ..., "optimizer": ..., "epoch": ...,
  "args": Namespace, "dino_loss": ...}``, where the student was saved through DDP (keys prefixed
  ``module.``) and both networks through ``utils.MultiCropWrapper`` (``backbone.`` / ``head.``);
- a plain backbone state dict (the "backbone only" downloads, e.g. DINO's
  ``dino_deitsmall16_pretrain.pth``), keys as in the method's ``VisionTransformer``.

Files are read with ``harness.checkpoint.load_external`` (weights_only=True). ``backbone_state_dict``
picks the network (teacher by default, as ``eval_knn.py --checkpoint_key teacher``), strips the
wrapper prefixes, drops the projection heads, and ``load_strict`` puts the result into a timm model,
failing with a one-line ``UserError`` that names missing, unexpected or wrongly-shaped keys (the
official ``load_pretrained_weights`` loads with ``strict=False`` and prints).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from harness.errors import UserError

WRAPPER_PREFIXES = ("module.", "backbone.")
HEAD_PREFIXES = ("head.",)
NETWORK_KEYS = ("teacher", "student")


def _strip(key: str, prefixes: Iterable[str]) -> str:
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def backbone_state_dict(checkpoint: Mapping[str, Any], checkpoint_key: str = "teacher",
                        prefixes: Iterable[str] = WRAPPER_PREFIXES,
                        drop: Iterable[str] = HEAD_PREFIXES) -> dict[str, torch.Tensor]:
    """The backbone weights of an official checkpoint, keys as the backbone itself names them.

    ``checkpoint``: a full training checkpoint (its ``checkpoint_key`` entry is used: "teacher" or
    "student") or a plain state dict. Leading ``prefixes`` are stripped repeatedly (``module.backbone.x``
    -> ``x``); keys starting with one of ``drop`` (after stripping) are removed (projection heads).
    """
    if checkpoint_key not in NETWORK_KEYS:
        raise UserError("checkpoint_key", f"unknown network {checkpoint_key!r}", "use 'teacher' or 'student'")
    nets = [k for k in NETWORK_KEYS if k in checkpoint]
    if nets:
        if checkpoint_key not in checkpoint:
            raise UserError("checkpoint_key", f"the checkpoint has no {checkpoint_key!r} entry (it has "
                            f"{', '.join(nets)})", f"use checkpoint_key={nets[0]!r}")
        state = checkpoint[checkpoint_key]
    else:
        state = checkpoint
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError("checkpoint", "not a state dict of tensors (nor a full checkpoint with "
                        f"{'/'.join(NETWORK_KEYS)} entries)", "pass an official release")
    prefixes, drop = tuple(prefixes), tuple(drop)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = _strip(key, prefixes)
        if name.startswith(drop):
            continue
        if name in out:
            raise UserError("checkpoint", f"keys {key!r} and another one both map to {name!r}",
                            "the checkpoint mixes wrapped and unwrapped copies of the backbone")
        out[name] = value
    if not out:
        raise UserError("checkpoint", "no backbone weights left after dropping the head", "pass a backbone checkpoint")
    return out


def _names(keys: Iterable[str], limit: int = 6) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str = "official checkpoint") -> None:
    """Copy ``state`` into ``model``; every key must exist on both sides with the same shape."""
    expected = model.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing backbone keys {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_names(unexpected)}")
    shapes = [k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)]
    if shapes:
        k = sorted(shapes)[0]
        problems.append(f"shape mismatch at {k} (checkpoint {tuple(state[k].shape)}, model "
                        f"{tuple(expected[k].shape)})" + (f" and {len(shapes) - 1} more" if len(shapes) > 1 else ""))
    if problems:
        raise UserError("checkpoint", f"{what} does not fit the {type(model).__name__}: " + "; ".join(problems),
                        "check the preset's architecture (size, patch, image size) against the release")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
