"""Backbones are timm models; this module only names the shapes the presets use."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import timm
import torch
from torch import nn
from torch.nn import functional as F

# timm's ViT kwargs per named size (patch/img size are set by the method config).
VIT_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    # CPU-test sizes: too small for any paper, big enough to learn the tiny sets.
    "pico": dict(embed_dim=64, depth=4, num_heads=4),
}
_LABELS = {"tiny": "ViT-Ti", "small": "ViT-S", "base": "ViT-B", "large": "ViT-L", "pico": "ViT-pico"}


@dataclass(frozen=True)
class ViTShape:
    size: str
    img_size: int
    patch_size: int
    drop_path: float = 0.0

    def timm_kwargs(self) -> dict:
        return dict(img_size=self.img_size, patch_size=self.patch_size, mlp_ratio=4.0, qkv_bias=True,
                    drop_path_rate=self.drop_path, **VIT_SIZES[self.size])

    @property
    def label(self) -> str:
        label = f"{_LABELS[self.size]}/{self.patch_size}"
        return label if self.img_size == 224 else f"{label}@{self.img_size}"

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


def create_vit(shape: ViTShape, **extra) -> timm.models.VisionTransformer:
    """A headless timm ViT (LayerNorm eps 1e-6, CLS token, fused attention via SDPA)."""
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0,
                             **{**shape.timm_kwargs(), **extra})


def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding as in MAE: the first half of the channels encodes the
    column (w) coordinate, the second half the row (h); a zero row is prepended for the CLS slot."""
    assert dim % 4 == 0, "sin-cos position embedding needs a channel count divisible by 4"
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                             indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def one_d(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(cols), one_d(rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


def init_linear_xavier(module: nn.Module) -> None:
    """MAE/ExtreMA ``_init_weights``: xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """DINO ``VisionTransformer.interpolate_pos_encoding``: bicubic resize of the patch position
    embeddings to a (grid_h, grid_w) grid, with DINO's scale factor (grid + 0.1) / old_grid (their fix
    for floating-point rounding, dino issue #8) rather than a target size; the CLS slot is kept."""
    n = pos_embed.shape[1] - 1
    if grid_h * grid_w == n and grid_h == grid_w:
        return pos_embed
    side, dim = int(math.sqrt(n)), pos_embed.shape[-1]
    patch = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side), mode="bicubic")
    if patch.shape[-2:] != (grid_h, grid_w):
        raise RuntimeError(f"position embedding resized to {tuple(patch.shape[-2:])}, expected {(grid_h, grid_w)}")
    return torch.cat([pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
