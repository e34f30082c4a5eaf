"""The BEiT-style ViT and linear pixel decoder that SimMIM and ROPIM share (microsoft/SimMIM
``models/vision_transformer.py`` + ``models/simmim.py``; csiro-robotics/ROPIM ``models/ropim.py``).

The encoder is timm's ``beit`` family: q/v biases, layer scale (``init_values``), one relative position
bias shared by all blocks (``use_shared_rel_pos_bias``), no absolute position embedding, a final
LayerNorm on every token (``global_pool="token"`` keeps timm's ``norm``; "avg" would move it to
``fc_norm``). Its state dict keys are the official encoder's, minus the (deterministic)
``relative_position_index`` buffer, so official checkpoints load with the prefixes stripped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import timm
import torch
from torch import nn

from harness.api import ExportedBackbone, FeatureSpec
from methods.backbones import VIT_SIZES, ViTShape
from methods.official import backbone_state_dict, load_strict

BEIT_TIMM_NAME = "beit_base_patch16_224"


def beit_kwargs(shape: ViTShape, layer_scale: float | None, drop_path: float) -> dict[str, Any]:
    """timm ``Beit`` kwargs of the SimMIM/ROPIM pre-training configs (``MODEL.VIT``: USE_APE False,
    USE_RPB False, USE_SHARED_RPB True, INIT_VALUES 0.1, QKV_BIAS True, MLP_RATIO 4, LN eps 1e-6)."""
    return dict(img_size=shape.img_size, patch_size=shape.patch_size, mlp_ratio=4.0, qkv_bias=True,
                init_values=layer_scale, use_abs_pos_emb=False, use_rel_pos_bias=False,
                use_shared_rel_pos_bias=True, global_pool="token", drop_path_rate=drop_path,
                **VIT_SIZES[shape.size])


def create_beit(kwargs: dict[str, Any]) -> nn.Module:
    return timm.create_model(BEIT_TIMM_NAME, pretrained=False, num_classes=0, **kwargs)


def encode_patch_map(beit: nn.Module, imgs: torch.Tensor,
                     token_transform: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``VisionTransformerFor{SimMIM,ROPIM}.forward``: patch tokens -> ``token_transform`` (mask tokens for
    SimMIM, the random projection for ROPIM) -> [CLS] + blocks with the shared relative position bias ->
    final norm -> patch tokens as a (B, D, H/p, W/p) map for the pixel decoder."""
    x = token_transform(beit.patch_embed(imgs))
    x = torch.cat([beit.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    if beit.pos_embed is not None:
        x = x + beit.pos_embed
    x = beit.pos_drop(x)
    rel_pos_bias = beit.rel_pos_bias() if beit.rel_pos_bias is not None else None
    for blk in beit.blocks:
        x = blk(x, shared_rel_pos_bias=rel_pos_bias)
    x = beit.norm(x)[:, 1:]
    b, length, d = x.shape
    side = int(length ** 0.5)
    return x.transpose(1, 2).reshape(b, d, side, side)


class PixelDecoder(nn.Sequential):
    """SimMIM's linear decoder: a 1x1 convolution to stride^2 * 3 channels, then PixelShuffle(stride)."""

    def __init__(self, dim: int, stride: int) -> None:
        super().__init__(nn.Conv2d(dim, stride**2 * 3, kernel_size=1), nn.PixelShuffle(stride))


def beit_export(kwargs: dict[str, Any], state: Mapping[str, torch.Tensor], label: str) -> ExportedBackbone:
    # Fine-tuning (SimMIM/ROPIM main_finetune.py, BEiT code): relative position bias, mean pooling.
    # Probes mean-pool the patch tokens too (SimMIM's and BEiT's linear probing): no loss ever reaches the
    # final [CLS] output of these encoders (the decoder reads patch tokens only).
    return ExportedBackbone(
        timm_name=BEIT_TIMM_NAME,
        timm_kwargs=dict(kwargs) | {"drop_path_rate": 0.0},
        state_dict={k: v.detach().clone() for k, v in state.items()},
        feature_spec=FeatureSpec(knn="avg", linear="avg", linear_n_last_blocks=1, finetune="avg"),
        label=label,
    )


def import_beit_encoder(checkpoint: Mapping[str, Any], kwargs: dict[str, Any], label: str, what: str,
                        drop: tuple[str, ...]) -> ExportedBackbone:
    """SimMIM/ROPIM ``save_checkpoint``: ``{"model": SimMIM|ROPIM state dict, ...}`` with the encoder under
    ``encoder.`` and the decoder under ``decoder.``; a bare encoder state dict is accepted too.
    ``relative_position_index`` is a fixed buffer (timm rebuilds it), so it is dropped, not compared."""
    state = backbone_state_dict(checkpoint.get("model", checkpoint), "teacher", prefixes=("module.", "encoder."),
                                drop=("decoder.", *drop))
    state = {k: v for k, v in state.items() if not k.endswith("relative_position_index")}
    model = create_beit(kwargs)
    load_strict(model, state, what)
    return beit_export(kwargs, model.state_dict(), label)
