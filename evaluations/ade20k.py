"""ADE20K semantic segmentation: UperNet (+ FCN auxiliary head) over the exported backbone, trained and scored by
mmsegmentation (its ``ADE20KDataset``, ``IoUMetric`` and mmengine's Runner) inside the stage
(``evaluations.mmstage``). Recipes (iBOT's ``ibot_vit_small`` / ``ibot_vit_base``, the CPU ``tiny``) and the
config are ``evaluations.dense``'s; every recipe value can be overridden here.

Data: an ``ADEChallengeData2016`` root (``images/{training,validation}``, ``annotations/{training,validation}``),
given as ``data: {ade20k: PATH}`` in the spec. Record: mIoU, mAcc, aAcc (percent; single-scale, slide inference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evaluations import mmstage
from harness.api import EvalInputs, Metrics, register_evaluation

PAPER_RECIPE = "ibot_vit_base"
# Recipe settings a spec may override (None: the recipe's value).
_TUNABLE = ("iters", "batch_size", "lr", "layer_decay", "weight_decay", "drop_path", "crop_size", "warmup_iters",
            "num_workers", "log_interval", "checkpoint_interval", "val_interval")


@dataclass(frozen=True)
class ADE20KConfig(mmstage.RecipeSettings):
    recipe: str = PAPER_RECIPE  # evaluations.dense.recipes.SEG_RECIPES: ibot_vit_small, ibot_vit_base, tiny
    iters: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    layer_decay: float | None = None
    weight_decay: float | None = None
    drop_path: float | None = None
    crop_size: int | None = None
    warmup_iters: int | None = None
    num_workers: int | None = None
    log_interval: int | None = None
    checkpoint_interval: int | None = None
    val_interval: int | None = None
    headline = "mIoU"
    report_metrics = ("mIoU",)
    evaluation, kind, tunable = "ade20k", "seg", _TUNABLE

    def protocol(self) -> str:
        return "ade20k/upernet-160k-ss"  # iBOT Tab. 6: UperNet, 160k iterations, 512 crop, single-scale

    def deviations(self) -> dict[str, list]:
        return self.recipe_deviations(PAPER_RECIPE)


def check_data(root: str, cfg: ADE20KConfig) -> None:
    mmstage.check_layout(root, "ade20k")


def check_backbone(exported: Any, cfg: ADE20KConfig) -> None:
    mmstage.check_backbone(exported, cfg.resolved().crop_size)


@register_evaluation("ade20k", ADE20KConfig, check_data=check_data, check_backbone=check_backbone)
def run(inputs: EvalInputs, cfg: ADE20KConfig) -> Metrics:
    from evaluations.dense.seg_config import segmentation_config

    recipe, result = mmstage.run_recipe(inputs, cfg, segmentation_config)
    values = {k: result.metrics[k] for k in ("mIoU", "mAcc", "aAcc") if k in result.metrics}
    if "mIoU" not in values:
        raise RuntimeError(f"mmseg's IoUMetric returned no mIoU (got {sorted(result.metrics)})")
    tag = f"ade20k:upernet@{recipe.name},{recipe.iters}it,crop{recipe.crop_size},ss"
    return Metrics(values=values, protocol=cfg.protocol(), headline="mIoU",
                   extra=mmstage.record_extra(recipe, result, cfg), tag=tag)
