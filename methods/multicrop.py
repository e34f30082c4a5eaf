"""Run a backbone over multi-crop views, one forward per resolution (DINO ``MultiCropWrapper``)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def forward_per_resolution(fn: Callable[[torch.Tensor], torch.Tensor], crops: list[torch.Tensor]
                           ) -> list[torch.Tensor]:
    """Concatenate consecutive crops of equal size, call ``fn`` once per group, split back per crop.

    Returns one output per crop, in input order (batch of each crop on dim 0)."""
    outputs: list[torch.Tensor] = []
    start = 0
    while start < len(crops):
        end = start
        while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
            end += 1
        out = fn(torch.cat(crops[start:end]))
        outputs.extend(out.chunk(end - start))
        start = end
    return outputs
