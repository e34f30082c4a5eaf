"""COCO object detection and instance segmentation: Cascade Mask R-CNN (iBOT) or Mask R-CNN with an FPN over the
exported backbone, trained and scored by mmdetection (its ``CocoDataset``, ``CocoMetric`` and mmengine's Runner)
inside the stage (``evaluations.mmstage``). Recipes (``ibot_vit_small`` / ``ibot_vit_base``: Cascade, 1x,
multi-scale; ``mask_rcnn_vit_*``; the CPU ``tiny``) and the config are ``evaluations.dense``'s.

Data: a COCO 2017 root (``{train,val}2017/``, ``annotations/instances_{train,val}2017.json``), given as
``data: {coco: PATH}``. Record: box and mask AP with AP50 / AP75 (percent, pycocotools via mmdet's CocoMetric).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evaluations import mmstage
from harness.api import EvalInputs, Metrics, register_evaluation

PAPER_RECIPE = "ibot_vit_base"
_TUNABLE = ("epochs", "batch_size", "lr", "layer_decay", "weight_decay", "drop_path", "crop_size", "num_workers",
            "log_interval", "val_interval")
# mmdet's CocoMetric keys (fractions) -> the record's names (percent), as reports/data/paper_numbers.csv names them.
METRICS = {"coco/bbox_mAP": "AP_box", "coco/bbox_mAP_50": "AP_box50", "coco/bbox_mAP_75": "AP_box75",
           "coco/segm_mAP": "AP_mask", "coco/segm_mAP_50": "AP_mask50", "coco/segm_mAP_75": "AP_mask75"}


@dataclass(frozen=True)
class COCOConfig(mmstage.RecipeSettings):
    recipe: str = PAPER_RECIPE  # evaluations.dense.recipes.DET_RECIPES
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    layer_decay: float | None = None
    weight_decay: float | None = None
    drop_path: float | None = None
    crop_size: tuple[int, int] | None = None
    num_workers: int | None = None
    log_interval: int | None = None
    val_interval: int | None = None
    headline = "AP_box"
    report_metrics = ("AP_box", "AP_mask")
    evaluation, kind, tunable = "coco", "det", _TUNABLE

    def protocol(self) -> str:
        # iBOT Tab. 6: Cascade Mask R-CNN, 1x, multi-scale training; the others' Mask R-CNN (CAE/ExtreMA).
        detector = self.resolved().detector
        return "coco/cascade-mrcnn-1x" if detector == "cascade_mask_rcnn" else "coco/mrcnn-1x"

    def deviations(self) -> dict[str, list]:
        detector = self.resolved().detector
        return self.recipe_deviations(PAPER_RECIPE if detector == "cascade_mask_rcnn" else "mask_rcnn_vit_base")


def check_data(root: str, cfg: COCOConfig) -> None:
    mmstage.check_layout(root, "coco")


def check_backbone(exported: Any, cfg: COCOConfig) -> None:
    mmstage.check_backbone(exported, tuple(cfg.resolved().crop_size))


@register_evaluation("coco", COCOConfig, check_data=check_data, check_backbone=check_backbone)
def run(inputs: EvalInputs, cfg: COCOConfig) -> Metrics:
    from evaluations.dense.det_config import detection_config

    recipe, result = mmstage.run_recipe(inputs, cfg, detection_config)
    # CocoMetric rounds to 3 decimals: 0.14 -> 14.0 AP, not 14.000000000000002
    values = {ours: round(100.0 * result.metrics[theirs], 4) for theirs, ours in METRICS.items()
              if theirs in result.metrics}
    # mmdet's CocoMetric returns nothing when no box scored above the test threshold (it logs "The testing results
    # of the whole dataset is empty"): no detection recalls nothing, so every AP is 0, and the record says why.
    empty = not values
    if empty:
        values = dict.fromkeys(METRICS.values(), 0.0)
    extra = {**mmstage.record_extra(recipe, result, cfg), "coco_metrics": result.metrics, "no_detections": empty}
    return Metrics(values=values, protocol=cfg.protocol(), headline="AP_box", extra=extra,
                   tag=f"coco:{recipe.detector}@{recipe.name},{recipe.epochs}ep")
