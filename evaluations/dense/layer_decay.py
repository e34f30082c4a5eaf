"""Layer-wise lr decay for OpenMMLab runs, by the fine-tuning evaluation's rule (``harness.optim``).

``LayerDecayOptimWrapperConstructor`` (registered by ``openmmlab.prepare()``) builds the optimizer over
``harness.optim.param_groups_lrd`` of the model: MAE's ViT rule (BEiT/iBOT ``get_num_layer_for_vit`` gives
the same scales: layer_decay ** (depth + 1 - layer id)) or SimMIM's Swin rule, applied to the adapter's
``encoder``; necks and heads sit at the top layer (scale 1). Each group's lr is base lr x its scale;
mmengine's parameter schedulers then scale every group by the same factor.
"""

from __future__ import annotations

from typing import Any

from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPERS, OPTIMIZERS
from torch import nn

from harness.errors import UserError
from harness.optim import backbone_layer_rule, param_groups_lrd

ENCODER_PREFIX = "backbone.encoder."


def layer_decay_groups(model: nn.Module, base_lr: float, weight_decay: float, layer_decay: float
                       ) -> list[dict[str, Any]]:
    """param_groups_lrd of a segmentor/detector whose backbone is a dense adapter, with lr = base_lr x scale."""
    encoder = getattr(getattr(model, "backbone", None), "encoder", None)
    if encoder is None:
        raise UserError("optim_wrapper", f"layer decay needs an ExportedBackbone model, got {type(model).__name__}",
                        "use the ExportedBackbone adapter or drop the layer-decay constructor")
    layer_id, num_layers = backbone_layer_rule(encoder)
    skip = set(getattr(encoder, "no_weight_decay", set)())
    groups = param_groups_lrd(model, weight_decay, skip, layer_decay, layer_id, num_layers, prefix=ENCODER_PREFIX)
    for g in groups:
        g["lr"] = base_lr * g["lr_scale"]
    return groups


class LayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """``optim_wrapper=dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=..., weight_decay=...),
    constructor="LayerDecayOptimWrapperConstructor", paramwise_cfg=dict(layer_decay=0.65))``."""

    def __call__(self, model: nn.Module):
        if hasattr(model, "module"):
            model = model.module
        layer_decay = self.paramwise_cfg.get("layer_decay")
        if layer_decay is None:
            raise UserError("paramwise_cfg.layer_decay", "missing", "give the layer decay rate, e.g. 0.65")
        optimizer_cfg = dict(self.optimizer_cfg)
        optimizer_cfg["params"] = layer_decay_groups(model, self.base_lr, self.base_wd or 0.0, float(layer_decay))
        optimizer = OPTIMIZERS.build(optimizer_cfg)
        wrapper_cfg = dict(self.optim_wrapper_cfg)
        wrapper_cfg.setdefault("type", "OptimWrapper")
        return OPTIM_WRAPPERS.build(wrapper_cfg, default_args=dict(optimizer=optimizer))
