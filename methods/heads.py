"""Projection heads shared by the self-distillation methods (DINO, iBOT, EsViT)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm


def _trunc_normal_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DINOHead(nn.Module):
    """DINO ``vision_transformer.DINOHead``: MLP (GELU; BatchNorm after each hidden Linear with ``use_bn``) ->
    bottleneck -> L2-normalise -> weight-normalised prototypes. With ``norm_last_layer`` the prototype norms stay
    fixed at 1.

    The last layer is created after the MLP's truncated-normal init, as in the official code, so it
    keeps PyTorch's default Linear init.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True, use_bn: bool = False) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            for d_in in [in_dim] + [hidden_dim] * (nlayers - 2):
                layers += [nn.Linear(d_in, hidden_dim), *([nn.BatchNorm1d(hidden_dim)] if use_bn else []), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(_trunc_normal_init)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


def cancel_last_layer_grads(module: nn.Module, epoch: int, freeze_epochs: int) -> None:
    """DINO ``utils.cancel_gradients_last_layer``: no prototype updates during the first epochs."""
    if epoch >= freeze_epochs:
        return
    for name, p in module.named_parameters():
        if "last_layer" in name:
            p.grad = None
