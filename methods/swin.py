"""Swin backbones for EsViT, built on timm's ``SwinTransformer``.

EsViT (microsoft/esvit ``models/swin_transformer.py``) trains a Swin whose window layout is fixed at
construction for 224-pixel inputs and that also runs 96-pixel local crops. Three things make our timm
model compute exactly what EsViT's does:

- LayerNorm eps 1e-6 everywhere (``get_cls_model``: ``norm_layer=partial(nn.LayerNorm, eps=1e-6)``),
  where timm's Swin default is 1e-5.
- Window and shift per stage are fixed at construction from the 224-pixel grid (a stage whose grid is
  not larger than the window uses one window of the grid's size and no shift). timm does the same.
- At other input sizes a block pads its (normalised) token map to a multiple of the window **before**
  the cyclic shift and builds the shift mask on the padded map (EsViT ``SwinTransformerBlock.forward``).
  timm 1.0 shifts first and pads after, which attends differently once padding and shift meet: that
  happens on 96-pixel crops (grids 24, 12, 6 with window 7), never on 224-pixel ones. ``forward_tokens``
  below runs timm's own modules in EsViT's order; on inputs that need no padding it equals timm's
  ``forward_features`` (tested), so the exported plain timm model evaluates what was trained.

Both forwards are checked bit for bit against the official module (tests/fixtures/golden/esvit_swin.json),
as is ``last_blocks_features`` (EsViT's linear-probe feature) and the checkpoint key mapping.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Any

import timm
import torch
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, window_partition, window_reverse
from torch import nn
from torch.nn import functional as F

# EsViT experiments/imagenet/swin/swin_{tiny,small,base}_patch4_window{7,14}_224.yaml (MODEL.SPEC).
SWIN_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    # Test sizes: "pico" (two stages) pre-trains on 32x32 images in seconds on a CPU; "nano" has Swin-T's
    # four-stage geometry (224 -> 7x7, 96 -> 3x3) at a fraction of the width (golden tests).
    "pico": dict(embed_dim=32, depths=(2, 2), num_heads=(2, 4)),
    "nano": dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4)),
}
_LABELS = {"tiny": "Swin-T", "small": "Swin-S", "base": "Swin-B", "pico": "Swin-pico", "nano": "Swin-nano"}
_TIMM_NAMES = {"tiny": "swin_tiny_patch4_window7_224", "small": "swin_small_patch4_window7_224",
               "base": "swin_base_patch4_window7_224", "pico": "swin_tiny_patch4_window7_224",
               "nano": "swin_tiny_patch4_window7_224"}
LN_EPS = 1e-6  # EsViT models/swin_transformer.py get_cls_model


@dataclass(frozen=True)
class SwinShape:
    """A Swin architecture as EsViT's yaml names it: size, window, input size, patch size."""

    size: str
    window: int
    img_size: int = 224
    patch_size: int = 4

    def __post_init__(self) -> None:
        if self.size not in SWIN_SIZES:
            raise ValueError(f"unknown Swin size {self.size!r}; choose one of {sorted(SWIN_SIZES)}")

    @property
    def label(self) -> str:
        """Report label, e.g. "Swin-T/7" (window 7), as in the paper tables."""
        label = f"{_LABELS[self.size]}/{self.window}"
        return label if self.img_size == 224 else f"{label}@{self.img_size}"

    @property
    def timm_name(self) -> str:
        return _TIMM_NAMES[self.size]

    @property
    def num_features(self) -> int:
        spec = SWIN_SIZES[self.size]
        return spec["embed_dim"] * 2 ** (len(spec["depths"]) - 1)

    def grid(self, img_size: int | None = None) -> int:
        """Side of the last stage's token grid for a square input (N = grid**2 region features)."""
        side = (img_size or self.img_size) // self.patch_size
        for _ in range(len(SWIN_SIZES[self.size]["depths"]) - 1):
            side = (side + 1) // 2  # PatchMerging pads odd sides
        return side

    def timm_kwargs(self, drop_path: float = 0.0) -> dict[str, Any]:
        """JSON-serialisable kwargs of ``timm.create_model(self.timm_name, ...)`` (export and rebuild)."""
        spec = SWIN_SIZES[self.size]
        return dict(img_size=self.img_size, patch_size=self.patch_size, window_size=self.window,
                    embed_dim=spec["embed_dim"], depths=list(spec["depths"]), num_heads=list(spec["num_heads"]),
                    mlp_ratio=4.0, qkv_bias=True, drop_path_rate=drop_path)


def create_swin(shape: SwinShape, drop_path: float = 0.0) -> SwinTransformer:
    """A headless timm Swin as EsViT builds it (LayerNorm eps 1e-6, no absolute position embedding,
    patch norm, drop-path rising linearly to ``drop_path``). ``strict_img_size=False`` lets the patch
    embedding take local crops; window/shift per stage stay those of ``shape.img_size``."""
    return timm.create_model(shape.timm_name, pretrained=False, num_classes=0, strict_img_size=False,
                             norm_layer=partial(nn.LayerNorm, eps=LN_EPS), **shape.timm_kwargs(drop_path))


# -- EsViT's forward ---------------------------------------------------------------------------------

_MASKS: dict[tuple, torch.Tensor] = {}


def shifted_window_mask(hp: int, wp: int, window: tuple[int, int], shift: tuple[int, int],
                        device: torch.device) -> torch.Tensor:
    """(num_windows, win_area, win_area) additive mask (0 / -100) of shifted-window attention on a padded
    hp x wp map: the map is cut into 3 x 3 regions at -window and -shift from its bottom/right edge, and
    tokens of different regions never attend to each other (EsViT ``create_attn_mask``)."""
    key = (hp, wp, window, shift, str(device))
    if key not in _MASKS:
        labels = torch.zeros(1, hp, wp, 1, device=device)
        cuts_h = (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None))
        cuts_w = (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None))
        for i, h in enumerate(cuts_h):
            for j, w in enumerate(cuts_w):
                labels[:, h, w, :] = 3 * i + j
        win = window_partition(labels, window).reshape(-1, window[0] * window[1])
        diff = win.unsqueeze(1) - win.unsqueeze(2)
        _MASKS[key] = torch.zeros_like(diff).masked_fill(diff != 0, -100.0)
    return _MASKS[key]


def _block_forward(blk: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """One Swin block on an NHWC map, in EsViT's order: norm -> pad -> shift -> window attention ->
    unshift -> crop -> residual; then the MLP residual."""
    b, h, w, c = x.shape
    wh, ww = blk.window_size
    sh, sw = blk.shift_size
    y = blk.norm1(x)
    y = F.pad(y, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
    hp, wp = y.shape[1:3]
    mask = None
    if sh or sw:
        y = torch.roll(y, shifts=(-sh, -sw), dims=(1, 2))
        mask = shifted_window_mask(hp, wp, (wh, ww), (sh, sw), y.device).to(y.dtype)
    windows = blk.attn(window_partition(y, (wh, ww)).reshape(-1, wh * ww, c), mask=mask)
    y = window_reverse(windows.reshape(-1, wh, ww, c), (wh, ww), hp, wp)
    if sh or sw:
        y = torch.roll(y, shifts=(sh, sw), dims=(1, 2))
    x = x + blk.drop_path1(y[:, :h, :w])
    return x + blk.drop_path2(blk.mlp(blk.norm2(x)))


def forward_tokens(model: SwinTransformer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EsViT ``SwinTransformer.forward_features`` with ``use_dense_prediction``, for one resolution:

    returns (z, regions): regions = final-norm last-stage tokens (B, N, C) in row-major grid order, and
    z = their average (B, C), the view-level feature (and the k-NN / linear feature of EsViT's eval).
    """
    x = model.patch_embed(images)  # (B, H, W, C), patch norm applied
    for stage in model.layers:
        x = stage.downsample(x)  # timm merges at the start of a stage, EsViT at the end of the previous one
        for blk in stage.blocks:
            x = _block_forward(blk, x)
    regions = model.norm(x).flatten(1, 2)
    return regions.mean(dim=1), regions


def stage_maps(model: SwinTransformer, images: torch.Tensor, last: int | None = None) -> list[torch.Tensor]:
    """Each stage's output (B, H, W, C), no final norm, in EsViT's block order (the order of the official
    dense Swin, Swin-Transformer-Object-Detection, too): the feature pyramid of the dense evaluations.
    ``last``: the last stage to run (all by default)."""
    x, maps = model.patch_embed(images), []
    for stage in model.layers[: None if last is None else last + 1]:
        x = stage.downsample(x)
        for blk in stage.blocks:
            x = _block_forward(blk, x)
        maps.append(x)
    return maps


def last_blocks_features(model: SwinTransformer, images: torch.Tensor, n: int = 4) -> torch.Tensor:
    """EsViT's linear-probe feature (``eval_linear.py --n_last_blocks 4`` ->
    ``SwinTransformer.forward_return_n_last_blocks``): the average over positions of each of the last ``n``
    blocks' outputs, concatenated in block order; outputs of last-stage blocks go through the final norm
    first, earlier ones do not. Swin-T: 384 + 384 + 768 + 768 = 2304 features."""
    blocks = sum(len(stage.blocks) for stage in model.layers)
    if not 0 < n <= blocks:
        raise ValueError(f"n must be in [1, {blocks}], got {n}")
    x, index, last, feats = model.patch_embed(images), 0, len(model.layers) - 1, []
    for i, stage in enumerate(model.layers):
        x = stage.downsample(x)
        for blk in stage.blocks:
            x = _block_forward(blk, x)
            if index >= blocks - n:
                feats.append((model.norm(x) if i == last else x).mean(dim=(1, 2)))
            index += 1
    return torch.cat(feats, dim=-1)


# -- EsViT checkpoint keys -> timm keys ---------------------------------------------------------------

_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def esvit_to_timm_key(key: str) -> str:
    """EsViT's Swin puts PatchMerging at the end of stage i (``layers.i.downsample``); timm at the start of
    stage i+1. Every other backbone name is shared (patch_embed.*, layers.i.blocks.j.{norm1, attn.qkv,
    attn.proj, attn.relative_position_bias_table, norm2, mlp.fc1, mlp.fc2}.*, norm.*)."""
    return _DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)


def timm_to_esvit_key(key: str) -> str:
    return _DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)


def relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """The (area, area) index into a relative-position-bias table that Swin stores as a buffer."""
    coords = torch.stack(torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return (rel[..., 0] + window[0] - 1) * (2 * window[1] - 1) + (rel[..., 1] + window[1] - 1)
