"""ExtreMA's CaiT-style ViT (microsoft/ExtreMA ``vits.VisionTransformer``), registered as the timm model
``extrema_vit`` so exports rebuild it with ``timm.create_model`` (``harness.export`` imports this module
by the name the export records).

Patch tokens only, plus a fixed 2-D sin-cos position embedding (no CLS slot, not trained); ``depth``
plain ViT blocks without layer scale; then ``class_attention_layers`` CaiT class-attention blocks in which
a CLS token attends to [CLS, tokens] (layer scale ``init_values``, no drop-path); a final LayerNorm on
[CLS, tokens]. Built from timm's ``Block`` and ``cait.LayerScaleBlockClassAttn``, whose parameter
names are the official ones, so released checkpoints load key for key.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import PatchEmbed, resample_abs_pos_embed
from timm.models import register_model
from timm.models.cait import LayerScaleBlockClassAttn
from timm.models.vision_transformer import Block
from torch import nn

from methods.backbones import init_linear_xavier, sincos_pos_embed_2d

TIMM_NAME = "extrema_vit"


class ClassAttentionViT(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.0,
                 class_attention_layers: int = 2, init_values: float = 0.1, num_classes: int = 0) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        # Not strict about the input size: dense evaluations run other sizes (``forward_intermediates``).
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim, strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        grid = img_size // patch_size
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(embed_dim, grid, cls_token=False), requires_grad=False)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[i], norm_layer=norm)
            for i in range(depth)])
        self.blocks_token = nn.ModuleList([
            LayerScaleBlockClassAttn(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, norm_layer=norm,
                                     init_values=init_values)
            for _ in range(class_attention_layers)])
        self.norm = norm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        # vits.VisionTransformer init: N(0, .02) CLS, xavier patch embedding (as a flat Linear), xavier Linear.
        nn.init.normal_(self.cls_token, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        self.apply(init_linear_xavier)

    def forward_features(self, x: torch.Tensor, keep: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Final-norm [CLS, patch tokens]. ``keep``: per view, the (B, k) indices of the tokens it keeps;
        the views are encoded together, stacked view-major (B * len(keep) rows)."""
        x = self.patch_embed(x) + self.pos_embed
        if keep is not None:
            x = torch.cat([torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])) for idx in keep])
        x = self.blocks(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        for blk in self.blocks_token:
            cls = blk(x, cls)
        return self.norm(torch.cat([cls, x], dim=1))

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Run at ``img_size``: the sin-cos position embedding is resampled to the new patch grid (timm's
        ``resample_abs_pos_embed``, as for any timm ViT), once."""
        old = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=img_size)
        if self.patch_embed.grid_size != old:
            self.pos_embed = nn.Parameter(resample_abs_pos_embed(self.pos_embed, list(self.patch_embed.grid_size),
                                                                 list(old), num_prefix_tokens=0),
                                          requires_grad=False)

    def forward_intermediates(self, x: torch.Tensor, indices: list[int], norm: bool = False, stop_early: bool = True,
                              output_fmt: str = "NCHW", intermediates_only: bool = True) -> list[torch.Tensor]:
        """timm's ``forward_intermediates`` contract for the dense evaluations: the patch tokens after the
        plain blocks ``indices`` (through the final norm when ``norm``) as (B, D, H/p, W/p) maps. The
        class-attention blocks only update [CLS], so they never change these tokens. Inputs of another
        size than ``set_input_size`` resample the position embedding on the fly."""
        if output_fmt != "NCHW" or not intermediates_only:
            raise ValueError("ClassAttentionViT.forward_intermediates returns NCHW intermediates only")
        b, _, h, w = x.shape
        grid = self.patch_embed.dynamic_feat_size((h, w))
        pos = self.pos_embed
        if tuple(grid) != tuple(self.patch_embed.grid_size):
            pos = resample_abs_pos_embed(pos, list(grid), list(self.patch_embed.grid_size), num_prefix_tokens=0)
        x = self.patch_embed(x) + pos
        out = []
        for i, blk in enumerate(self.blocks[: max(indices) + 1] if stop_early else self.blocks):
            x = blk(x)
            if i in indices:
                y = self.norm(x) if norm else x
                out.append(y.transpose(1, 2).reshape(b, -1, grid[0], grid[1]))
        return out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, keep: list[torch.Tensor] | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, keep))


@register_model
def extrema_vit(pretrained: bool = False, **kwargs) -> ClassAttentionViT:
    if pretrained:
        raise ValueError("extrema_vit has no timm weights; load an export or an official checkpoint")
    # timm.create_model adds its own bookkeeping (pretrained_cfg, overlay, cache_dir): not architecture.
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return ClassAttentionViT(**kwargs)
