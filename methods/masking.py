"""Patch masks for masked image modeling: BEiT/iBOT block-wise masks and random masks.

Follows bytedance/ibot ``loader.py`` (``ImageFolderMask.get_pred_ratio`` / ``__getitem__``), itself
after BEiT's ``masking_generator.py``. Masks are drawn in the data-loader worker from the global
Python ``random`` (and numpy's legacy global RNG for ``rand``), in exactly the official order of
calls, so the harness's per-(seed, epoch, index) seeding makes them deterministic and resumable, and
a seeded draw reproduces the official mask bit for bit (tests/fixtures/golden/ibot_masks.json).

Per crop: (1) the prediction ratio — with a list of ratios, each entry with a variance > 0 is
replaced by U(r - v, r + v), then one entry is chosen uniformly (``random.choice``); a single ratio
is drawn only if its variance is > 0. (2) ``block``: blocks of random area in [(min(H, W) // 3)², budget]
and log-uniform aspect ratio in (0.3, 1/0.3) are placed at random until ratio·H·W cells are masked,
with up to 10 attempts per block and a stop when no attempt adds a cell; ``rand``: exactly
int(ratio·H·W) cells, shuffled with ``np.random.shuffle``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

MASK_SHAPES = ("block", "rand")


class BlockMaskGenerator:
    """Boolean (H, W) masks (True = masked patch) with iBOT's per-crop prediction ratio.

    ``pred_ratio``/``pred_ratio_var``: one value each, or lists of equal length (the iBOT recipe
    ``[0, 0.3]`` / ``[0, 0.2]``: half the crops unmasked, the others U(0.1, 0.5)).
    """

    ATTEMPTS = 10

    def __init__(self, pred_ratio: float | Sequence[float] = 0.3, pred_ratio_var: float | Sequence[float] = 0.0,
                 pred_aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3), pred_shape: str = "block") -> None:
        if pred_shape not in MASK_SHAPES:
            raise ValueError(f"pred_shape must be one of {MASK_SHAPES}, got {pred_shape!r}")
        # The official constructor: a one-element list is a scalar (no random.choice draw), and a
        # scalar variance next to a list of ratios applies to each of them.
        ratio = _unwrap(pred_ratio)
        var = _unwrap(pred_ratio_var)
        if isinstance(ratio, list) and not isinstance(var, list):
            var = [var] * len(ratio)
        if isinstance(ratio, list) != isinstance(var, list) or (isinstance(ratio, list) and len(ratio) != len(var)):
            raise ValueError(f"pred_ratio_var {pred_ratio_var!r} does not match pred_ratio {pred_ratio!r}")
        for r, v in zip(ratio if isinstance(ratio, list) else [ratio], var if isinstance(var, list) else [var],
                        strict=True):
            if not (0.0 <= v <= r and r + v <= 1.0):
                raise ValueError(f"need 0 <= var <= ratio and ratio + var <= 1, got ratio {r}, var {v}")
        self.pred_ratio, self.pred_ratio_var = ratio, var
        self.log_aspect_ratio = (math.log(pred_aspect_ratio[0]), math.log(pred_aspect_ratio[1]))
        self.pred_shape = pred_shape

    def draw_ratio(self) -> float:
        """``get_pred_ratio``: the fraction of patches to mask in the next crop."""
        if isinstance(self.pred_ratio, list):
            candidates = [random.uniform(r - v, r + v) if v > 0 else r
                          for r, v in zip(self.pred_ratio, self.pred_ratio_var, strict=True)]
            return random.choice(candidates)
        if self.pred_ratio_var > 0:
            return random.uniform(self.pred_ratio - self.pred_ratio_var, self.pred_ratio + self.pred_ratio_var)
        return self.pred_ratio

    def __call__(self, height: int, width: int, ratio: float | None = None) -> tuple[np.ndarray, float]:
        """One mask of ``height`` x ``width`` patches; ``ratio`` None draws it (``draw_ratio``).

        Returns (mask, ratio)."""
        if ratio is None:
            ratio = self.draw_ratio()
        budget = ratio * height * width
        if self.pred_shape == "block":
            return block_mask(height, width, budget, self.log_aspect_ratio, self.ATTEMPTS), ratio
        return rand_mask(height, width, budget), ratio


def block_mask(height: int, width: int, budget: float, log_aspect_ratio: tuple[float, float],
               attempts: int = 10, placed: list[dict[str, float]] | None = None) -> np.ndarray:
    """BEiT block-wise masking until ``budget`` cells are masked (never more than floor(budget)).

    ``placed``, if given, receives one record per applied block (for tests and plots)."""
    mask = np.zeros((height, width), dtype=bool)
    min_area = (min(height, width) // 3) ** 2  # lower end of the area draw, not a hard minimum
    count = 0
    while count < budget:
        remaining = budget - count
        added = 0
        for _ in range(attempts):
            area = random.uniform(min_area, remaining)  # remaining < min_area is allowed (reversed bounds)
            aspect = math.exp(random.uniform(*log_aspect_ratio))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top = random.randint(0, height - h)
                left = random.randint(0, width - w)
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= remaining:
                    block[...] = True
                    added += new
                    if placed is not None:
                        placed.append(dict(area=area, aspect=aspect, top=top, left=left, h=h, w=w, new=new,
                                           remaining=remaining, min_area=min_area))
            if added > 0:
                break
        if added == 0:
            break
        count += added
    return mask


def rand_mask(height: int, width: int, budget: float) -> np.ndarray:
    """Exactly int(budget) masked cells at random positions (numpy's global RNG, as official)."""
    n = int(budget)
    flat = np.hstack([np.zeros(height * width - n), np.ones(n)]).astype(bool)
    np.random.shuffle(flat)
    return flat.reshape(height, width)


class MaskedMultiCrop:
    """Picklable transform: multi-crop views, then one mask per global crop (iBOT ``ImageFolderMask``).

    ``crops(img)`` returns [global1, global2, local...]; this returns (crops, masks) with masks a
    list of (H/p, W/p) bool tensors for the ``n_global`` global crops. Masks are drawn after all crops
    (the official order). The official loader also draws (unused) masks for the local crops; the
    harness reseeds every sample's RNGs, so skipping them changes nothing else.
    Before ``pred_start_epoch`` the ratio is 0 without any ``random`` draw (official ``get_pred_ratio``);
    the loader tells the epoch through ``set_epoch``.
    """

    def __init__(self, crops: Callable[[Any], list[torch.Tensor]], generator: BlockMaskGenerator,
                 patch_size: int, n_global: int = 2, pred_start_epoch: int = 0) -> None:
        self.crops, self.generator, self.patch_size = crops, generator, patch_size
        self.n_global, self.pred_start_epoch = n_global, pred_start_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, img: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        views = self.crops(img)
        ratio = 0.0 if self.epoch < self.pred_start_epoch else None
        masks = []
        for view in views[:self.n_global]:
            mask, _ = self.generator(view.shape[-2] // self.patch_size, view.shape[-1] // self.patch_size, ratio)
            masks.append(torch.from_numpy(mask))
        return views, masks


def _unwrap(value: float | Sequence[float]) -> float | list[float]:
    if isinstance(value, (list, tuple)):
        values = [float(v) for v in value]
        return values[0] if len(values) == 1 else values
    return float(value)
