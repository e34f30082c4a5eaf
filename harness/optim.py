"""Optimisers and parameter groups the generic loop can run beyond AdamW: LARS, SGD, layer-wise lr decay.

Each parameter group may carry ``lr_scale`` (the loop sets ``lr = schedule · lr_scale`` every step) and
``apply_wd`` (whether the weight-decay schedule reaches it). Layer decay is the rule of MAE
``util/lr_decay.param_groups_lrd`` (BEiT's ``get_layer_id_for_vit``); the Swin rule is SimMIM's Swin
fine-tuning rule (``optimizer.get_swin_layer``), mapped onto timm's stage layout. Swin weight decay follows
SimMIM too: timm's ``no_weight_decay()`` lists the relative position bias tables, as SimMIM's keywords do
(iBOT's BEiT-based fine-tune decays them).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from harness.errors import UserError

OPTIMIZERS = ("adamw", "sgd", "lars")


class LARS(torch.optim.Optimizer):
    """LARS as in MAE ``util/lars.py`` (from MoCo v3): for tensors with more than one dimension the
    update ``g + wd·p`` is rescaled by ``trust · ‖p‖ / ‖update‖`` (1 when either norm is 0); 1-D tensors
    (biases, norms) get neither decay nor scaling. Then heavy-ball momentum, ``p -= lr · mu``."""

    def __init__(self, params: Iterable, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # noqa: D102
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    p_norm, u_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(p_norm)
                    q = torch.where(p_norm > 0, torch.where(u_norm > 0, g["trust_coefficient"] * p_norm / u_norm,
                                                            one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss


def build_optimizer(name: str, groups: list[dict[str, Any]], lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, momentum: float = 0.9,
                    device: torch.device | None = None) -> torch.optim.Optimizer:
    """The loop's optimiser by name; fused AdamW/SGD kernels on CUDA."""
    fused = device is not None and device.type == "cuda"
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused)
    if name == "lars":
        return LARS(groups, lr=lr, weight_decay=weight_decay, momentum=momentum)
    raise UserError("optimizer", f"unknown optimizer {name!r}", f"choose one of: {', '.join(OPTIMIZERS)}")


# -- layer-wise lr decay ----------------------------------------------------------------------------

_VIT_EMBED = ("cls_token", "pos_embed", "patch_embed", "reg_token", "dist_token", "mask_token")


def vit_layer_id(name: str, num_layers: int) -> int:
    """MAE ``get_layer_id_for_vit``: embeddings 0, ``blocks.i`` i+1, everything else ``num_layers``."""
    if name.split(".")[0] in _VIT_EMBED:
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


_SWIN_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
_SWIN_DOWN = re.compile(r"^layers\.(\d+)\.downsample\.")


def swin_layer_id(name: str, depths: tuple[int, ...]) -> int:
    """Swin layer ids of SimMIM ``optimizer.get_swin_layer`` (iBOT's ``get_num_layer_for_swin`` agrees) on
    timm names: patch embedding and mask token 0; block j of stage i ``sum(depths[:i]) + j + 1``; the patch
    merging that ends official stage i-1 (timm: the downsample at the start of stage i) ``sum(depths[:i])``,
    the id of that stage's last block; the rest (final norm, head, and, as in both official rules, an
    absolute position embedding) ``sum(depths) + 1``."""
    if name.startswith("patch_embed") or name == "mask_token":
        return 0
    m = _SWIN_BLOCK.match(name)
    if m:
        stage, block = int(m.group(1)), int(m.group(2))
        return sum(depths[:stage]) + block + 1
    m = _SWIN_DOWN.match(name)
    if m:
        return sum(depths[: int(m.group(1))])
    return sum(depths) + 1


def backbone_layer_rule(backbone: nn.Module) -> tuple[Callable[[str], int], int]:
    """(name -> layer id, number of layers) for a timm ViT or Swin backbone."""
    if hasattr(backbone, "layers") and hasattr(backbone.layers[0], "blocks"):
        depths = tuple(len(stage.blocks) for stage in backbone.layers)
        return (lambda n: swin_layer_id(n, depths)), sum(depths) + 1
    depth = len(backbone.blocks)
    return (lambda n: vit_layer_id(n, depth + 1)), depth + 1


def param_groups_lrd(model: nn.Module, weight_decay: float, no_weight_decay: set[str], layer_decay: float,
                     layer_id: Callable[[str], int], num_layers: int, prefix: str = "") -> list[dict[str, Any]]:
    """MAE ``param_groups_lrd``: one group per (layer, decay / no decay); 1-D tensors and
    ``no_weight_decay`` names get none; ``lr_scale = layer_decay ** (num_layers - layer_id)``.
    ``prefix`` (e.g. "backbone.") is stripped from names before the layer rule is applied; parameters
    outside it (a head) sit at the top layer."""
    scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        inner = name[len(prefix):] if name.startswith(prefix) else None
        no_decay = p.ndim == 1 or (inner or name) in no_weight_decay
        lid = layer_id(inner) if inner is not None else num_layers
        key = f"layer_{lid}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr_scale": scales[lid],
                           "weight_decay": 0.0 if no_decay else weight_decay, "apply_wd": not no_decay}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())
