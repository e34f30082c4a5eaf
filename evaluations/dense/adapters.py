"""Exported backbones as multi-level feature pyramids for UperNet (mmseg) and FPN detectors (mmdet).

Plain torch modules (no OpenMMLab import here); ``openmmlab.prepare()`` registers ``build_backbone`` in
mmseg's and mmdet's model registries as ``ExportedBackbone``.

- ViT family (timm ``VisionTransformer`` with or without [cls], timm ``Beit`` with its shared relative
  position bias, ExtreMA's ``ClassAttentionViT``): the tokens of four blocks, 4/6/8/12 of 12 scaled to the
  depth (iBOT/BEiT ``out_indices=[3, 5, 7, 11]``), read through the model's ``forward_intermediates``,
  with the final norm on each (iBOT ``model.backbone.out_with_norm=true``), then per level a neck to
  strides 4/8/16/32: transposed convolutions (BN + GELU between two), identity or max-pooling, as iBOT's
  ``fpn1..fpn4`` (evaluation/semantic_segmentation/mmcv_custom/register_backbone.py) for patch 16 and 8.
- Swin (EsViT): the output of every stage, in EsViT's / the official dense Swin's pad-then-shift order
  (``methods.swin.stage_maps``), each through a fresh LayerNorm (Swin-Transformer-Object-Detection
  ``norm{i}``); the windows stay the pre-training ones at the crop size.

Position embeddings and relative position biases are resampled to the crop size once, by timm's
``set_input_size``; a ViT also takes other sizes (detection batches), resampling on the fly.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import resize_rel_pos_bias_table
from timm.models.beit import Beit, gen_relative_position_index
from torch import nn

from harness.errors import UserError
from harness.export import META, load_export

TARGET_STRIDES = (4, 8, 16, 32)
_BLOCK_FRACTIONS = (4, 6, 8, 12)  # iBOT/BEiT out_indices [3, 5, 7, 11] of 12 blocks


def default_out_indices(depth: int) -> tuple[int, ...]:
    """Blocks 4/6/8/12 of a 12-block ViT, scaled to ``depth`` (ViT-L: 8/12/16/24, BEiT's [7, 11, 15, 23])."""
    if depth < len(_BLOCK_FRACTIONS):
        raise UserError("backbone", f"a ViT of depth {depth} has fewer blocks than the {len(_BLOCK_FRACTIONS)} "
                        "levels the dense heads read", "pre-train a ViT with at least 4 blocks")
    return tuple(max(round(depth * f / 12), 1) - 1 for f in _BLOCK_FRACTIONS)


def _norm2d(norm: str, channels: int) -> nn.Module:
    if norm == "SyncBN":
        return nn.SyncBatchNorm(channels)
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    raise UserError("norm", f"unknown neck norm {norm!r}", "choose SyncBN or BN")


def rescale_neck(dim: int, patch: int, stride: int, norm: str) -> nn.Module:
    """From stride ``patch`` to ``stride``: k transposed 2x2 convolutions (BN + GELU between them), identity,
    or a max-pool. iBOT patch 16: 4 = deconv-BN-GELU-deconv, 8 = deconv, 16 = identity, 32 = max-pool 2."""
    if stride == patch:
        return nn.Identity()
    if stride > patch:
        return nn.MaxPool2d(kernel_size=stride // patch, stride=stride // patch)
    layers: list[nn.Module] = []
    for i in range(int(math.log2(patch // stride))):
        if i:
            layers += [_norm2d(norm, dim), nn.GELU()]
        layers.append(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def _read_meta(export_dir: str | Path) -> dict[str, Any]:
    path = Path(export_dir) / META
    if not path.exists():
        raise UserError("checkpoint", f"no exported backbone in {str(export_dir)!r}",
                        "run (or re-run) the pre-training stage that writes it")
    return json.loads(path.read_text())


def _as_pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _check_crop(crop: tuple[int, int], step: int, what: str) -> None:
    if crop[0] < step or crop[1] < step or crop[0] % step or crop[1] % step:
        raise UserError("crop_size", f"{crop[0]}x{crop[1]} is not a positive multiple of the {what} ({step})",
                        f"use a crop size divisible by {step}")


class ViTPyramid(nn.Module):
    """A plain-token ViT as four feature maps at strides 4/8/16/32 (or ``strides``)."""

    def __init__(self, encoder: nn.Module, img_size: tuple[int, int] | None, out_indices: tuple[int, ...] | None,
                 out_with_norm: bool, strides: tuple[int, ...], norm: str) -> None:
        super().__init__()
        if not hasattr(encoder, "forward_intermediates") or not hasattr(encoder, "blocks"):
            raise UserError("backbone", f"{type(encoder).__name__} has no block outputs the dense adapter can read",
                            "export a timm ViT, BEiT or Swin")
        patch = encoder.patch_embed.patch_size[0]
        if img_size is not None:
            _check_crop(img_size, patch, "patch size")
            encoder.set_input_size(img_size=img_size)
        if isinstance(encoder, Beit):
            encoder.patch_embed.strict_img_size = False  # other sizes: see _beit_levels
        depth = len(encoder.blocks)
        self.out_indices = tuple(out_indices) if out_indices is not None else default_out_indices(depth)
        if any(not 0 <= i < depth for i in self.out_indices):
            raise UserError("out_indices", f"{list(self.out_indices)} outside the {depth} blocks",
                            f"use block indices in [0, {depth - 1}]")
        if len(strides) != len(self.out_indices):
            raise UserError("strides", f"{len(strides)} strides for {len(self.out_indices)} levels",
                            "give one stride per level")
        for s in strides:
            if s != patch and (max(s, patch) % min(s, patch) or (s < patch and (patch // s) & (patch // s - 1))):
                raise UserError("strides", f"stride {s} cannot be reached from patch size {patch} by 2x "
                                "up-sampling or pooling", "use strides that are patch size times a power of 2")
        self.encoder = encoder
        self.out_with_norm = out_with_norm
        # Nothing after the last level reaches a loss; unused parameters would stall DDP.
        for name in ("blocks_token", "fc_norm", "head", "head_drop"):
            if isinstance(getattr(encoder, name, None), nn.Module):
                setattr(encoder, name, nn.Identity())
        if hasattr(encoder, "blocks_token"):  # ExtreMA: [cls] enters only the class-attention blocks
            encoder.cls_token.requires_grad_(False)
        if not out_with_norm:
            encoder.norm = nn.Identity()
        dim = encoder.embed_dim
        self.necks = nn.ModuleList(rescale_neck(dim, patch, s, norm) for s in strides)
        self.out_channels = [dim] * len(strides)
        self.strides = tuple(strides)

    def levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The chosen blocks' patch tokens as (B, D, H/p, W/p) maps, before the necks."""
        grid = self.encoder.patch_embed.dynamic_feat_size(x.shape[-2:])
        if isinstance(self.encoder, Beit) and tuple(grid) != tuple(self.encoder.patch_embed.grid_size):
            return self._beit_levels(x, tuple(grid))
        return self.encoder.forward_intermediates(x, indices=list(self.out_indices), norm=self.out_with_norm,
                                                  stop_early=True, output_fmt="NCHW", intermediates_only=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(neck(f) for neck, f in zip(self.necks, self.levels(x), strict=True))

    def _beit_levels(self, x: torch.Tensor, grid: tuple[int, int]) -> list[torch.Tensor]:
        """timm's Beit runs at one input size; another (a detection batch) gets the shared relative position
        bias resampled to its grid on the fly, as ``RelativePositionBias.set_window_size`` does once."""
        enc = self.encoder
        if enc.rel_pos_bias is None or enc.pos_embed is not None:
            raise UserError("backbone", f"this BEiT (per-block relative bias or absolute position embedding) runs "
                            f"at {tuple(enc.patch_embed.img_size)} only, got an input of {tuple(x.shape[-2:])}",
                            "pad inputs to the crop size (BatchFixedSizePad)")
        table = enc.rel_pos_bias.relative_position_bias_table
        area = grid[0] * grid[1]
        table = resize_rel_pos_bias_table(table, new_window_size=grid, old_window_size=enc.rel_pos_bias.window_size,
                                          new_bias_shape=((2 * grid[0] - 1) * (2 * grid[1] - 1) + 3, table.shape[1]))
        index = gen_relative_position_index(grid, device=x.device)
        bias = table[index.view(-1)].view(area + 1, area + 1, -1).permute(2, 0, 1).contiguous()
        tokens = enc.patch_embed(x)
        tokens = enc.pos_drop(torch.cat([enc.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1))
        out = []
        for i, blk in enumerate(enc.blocks[: max(self.out_indices) + 1]):
            tokens = blk(tokens, shared_rel_pos_bias=bias)
            if i in self.out_indices:
                y = enc.norm(tokens) if self.out_with_norm else tokens
                out.append(y[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, *grid))
        return out


class SwinPyramid(nn.Module):
    """A Swin's stage outputs (strides 4, 8, 16, 32 for four stages), each through a fresh LayerNorm."""

    def __init__(self, encoder: nn.Module, img_size: tuple[int, int] | None, window: int,
                 out_indices: tuple[int, ...] | None) -> None:
        super().__init__()
        patch = encoder.patch_embed.patch_size[0]
        num_stages = len(encoder.layers)
        if img_size is not None:
            _check_crop(img_size, patch * 2 ** (num_stages - 1), "patch size x the stages' down-sampling")
            encoder.set_input_size(img_size=img_size, window_size=window)
        self.out_indices = tuple(out_indices) if out_indices is not None else tuple(range(num_stages))
        if any(not 0 <= i < num_stages for i in self.out_indices):
            raise UserError("out_indices", f"{list(self.out_indices)} outside the {num_stages} Swin stages",
                            f"use stage indices in [0, {num_stages - 1}]")
        encoder.norm = nn.Identity()  # replaced by the per-level norms
        encoder.head = nn.Identity()
        self.encoder = encoder
        dims = [int(encoder.layers[i].blocks[0].norm1.normalized_shape[0]) for i in self.out_indices]
        self.out_norms = nn.ModuleList(nn.LayerNorm(d) for d in dims)
        self.out_channels = dims
        self.strides = tuple(patch * 2 ** i for i in self.out_indices)

    def levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The chosen stages' outputs as (B, C, H, W) maps, before the per-level norms."""
        from methods.swin import stage_maps

        maps = stage_maps(self.encoder, x, last=max(self.out_indices))
        return [maps[i].permute(0, 3, 1, 2) for i in self.out_indices]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from methods.swin import stage_maps

        maps = stage_maps(self.encoder, x, last=max(self.out_indices))
        return tuple(norm(maps[i]).permute(0, 3, 1, 2).contiguous()
                     for norm, i in zip(self.out_norms, self.out_indices, strict=True))


def _is_swin(model: nn.Module) -> bool:
    return hasattr(model, "layers") and hasattr(model.layers[0], "blocks")


def build_backbone(export_dir: str, img_size: int | list[int] | tuple[int, int] | None = None,
                   out_indices: list[int] | None = None, out_with_norm: bool = True,
                   strides: list[int] | tuple[int, ...] = TARGET_STRIDES, norm: str = "SyncBN",
                   drop_path_rate: float = 0.0) -> nn.Module:
    """The pyramid for an export folder (``harness.export``): ``img_size`` is the training crop the position
    embedding / relative position bias are resampled to (None: the pre-training size)."""
    meta = _read_meta(export_dir)
    crop = _as_pair(img_size) if img_size is not None else None
    overrides: dict[str, Any] = {"drop_path_rate": drop_path_rate}
    entry = timm.models.model_entrypoint(meta["timm_name"]).__module__ if timm.models.is_model(
        meta["timm_name"]) else ""
    if entry == "timm.models.vision_transformer":
        overrides["dynamic_img_size"] = True  # detection batches vary in size: resample per input
    elif entry == "timm.models.swin_transformer":
        overrides["strict_img_size"] = False
    encoder, _, _ = load_export(export_dir, **overrides)
    return pyramid(encoder, meta["timm_kwargs"], crop, out_indices, out_with_norm, strides, norm)


def pyramid(encoder: nn.Module, timm_kwargs: dict[str, Any], crop: tuple[int, int] | None,
            out_indices: list[int] | tuple[int, ...] | None = None, out_with_norm: bool = True,
            strides: list[int] | tuple[int, ...] = TARGET_STRIDES, norm: str = "SyncBN") -> nn.Module:
    """The pyramid over a built encoder (also on the meta device, where building it checks the crop)."""
    indices = tuple(out_indices) if out_indices is not None else None
    if _is_swin(encoder):
        return SwinPyramid(encoder, crop, timm_kwargs.get("window_size", 7), indices)
    return ViTPyramid(encoder, crop, indices, out_with_norm, tuple(strides), norm)


@dataclass(frozen=True)
class Levels:
    channels: list[int]
    strides: tuple[int, ...]


def backbone_levels(export_dir: str | Path, img_size: int | tuple[int, int] | None = None, **kwargs: Any) -> Levels:
    """Channels and strides of the pyramid an export gives at ``img_size``; building it checks the export, the
    crop size and the levels before any training starts (one-line errors)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*meta parameter.*")  # loading weights into meta tensors
        pyramid = build_backbone(str(export_dir), img_size, norm="BN", **kwargs)
    return Levels(list(pyramid.out_channels), pyramid.strides)
