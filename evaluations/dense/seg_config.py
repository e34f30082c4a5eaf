"""The mmengine config of UperNet on ADE20K over an exported backbone (mmseg 1.x names).

iBOT's mmseg 0.x pipeline in mmseg 1.x terms: Resize(img_scale, ratio_range) -> RandomResize,
Normalize/Pad -> SegDataPreProcessor, apex fp16 -> bf16 AmpOptimWrapper on GPU; the mmcv-1.x ``poly``
policy with linear warm-up (factor applied on top of the poly curve from iteration 0) -> LinearLR and
PolyLR over the same iterations, which mmengine chains multiplicatively.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from evaluations.dense.adapters import backbone_levels
from evaluations.dense.openmmlab import BACKBONE
from evaluations.dense.recipes import SegRecipe
from evaluations.dense.runtime import optim_wrapper, runtime, warmup

# ImageNet mean/std in 0-255 BGR-loaded, RGB-converted pixels (iBOT _base_/datasets/ade20k.py img_norm_cfg).
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
NUM_CLASSES = 150  # ADE20K SceneParsing (reduce_zero_label: 0 = other -> ignored)


def _dataset(data_root: str, split: str, pipeline: list[dict]) -> dict[str, Any]:
    sub = "training" if split == "train" else "validation"
    return dict(type="ADE20KDataset", data_root=data_root, reduce_zero_label=True, pipeline=pipeline,
                data_prefix=dict(img_path=f"images/{sub}", seg_map_path=f"annotations/{sub}"))


def segmentation_config(export_dir: str | Path, data_root: str | Path, recipe: SegRecipe, work_dir: str | Path,
                        seed: int, world_size: int = 1, amp: bool | None = None,
                        max_iters: int | None = None) -> dict[str, Any]:
    """An mmengine config dict for ``Runner.from_cfg`` (after ``openmmlab.prepare()``).

    ``world_size`` splits ``recipe.batch_size`` over processes; ``amp`` defaults to "on a GPU";
    ``max_iters`` shortens the run without changing the schedule's shape (smoke tests)."""
    if recipe.batch_size % world_size:
        raise ValueError(f"batch size {recipe.batch_size} does not split over {world_size} processes")
    amp = torch.cuda.is_available() if amp is None else amp
    crop = (recipe.crop_size, recipe.crop_size)
    levels = backbone_levels(export_dir, recipe.crop_size)
    data_root = str(data_root)
    iters = recipe.iters if max_iters is None else max_iters
    train_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", reduce_zero_label=True),
        dict(type="RandomResize", scale=recipe.resize_scale, ratio_range=recipe.ratio_range, keep_ratio=True),
        dict(type="RandomCrop", crop_size=crop, cat_max_ratio=recipe.cat_max_ratio),
        dict(type="RandomFlip", prob=0.5),
        dict(type="PhotoMetricDistortion"),
        dict(type="PackSegInputs"),
    ]
    test_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=recipe.resize_scale, keep_ratio=True),
        dict(type="LoadAnnotations", reduce_zero_label=True),
        dict(type="PackSegInputs"),
    ]
    tta_pipeline = [
        dict(type="LoadImageFromFile", backend_args=None),
        dict(type="TestTimeAug", transforms=[
            [dict(type="Resize", scale_factor=r, keep_ratio=True) for r in recipe.ms_ratios],
            [dict(type="RandomFlip", prob=0.0, direction="horizontal"),
             dict(type="RandomFlip", prob=1.0, direction="horizontal")] if recipe.ms_flip else
            [dict(type="RandomFlip", prob=0.0, direction="horizontal")],
            [dict(type="LoadAnnotations", reduce_zero_label=True)],
            [dict(type="PackSegInputs")],
        ]),
    ]
    norm_cfg = dict(type=recipe.norm, requires_grad=True)
    n = len(levels.channels)
    model = dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=MEAN, std=STD, bgr_to_rgb=True, pad_val=0,
                               seg_pad_val=255, size=crop),
        backbone=dict(type=BACKBONE, export_dir=str(export_dir), img_size=recipe.crop_size,
                      out_with_norm=recipe.out_with_norm, norm=recipe.norm, drop_path_rate=recipe.drop_path),
        decode_head=dict(type="UPerHead", in_channels=levels.channels, in_index=list(range(n)),
                         pool_scales=(1, 2, 3, 6), channels=recipe.decode_channels, dropout_ratio=recipe.dropout,
                         num_classes=NUM_CLASSES, norm_cfg=norm_cfg, align_corners=False,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
        auxiliary_head=dict(type="FCNHead", in_channels=levels.channels[min(2, n - 1)], in_index=min(2, n - 1),
                            channels=recipe.aux_channels, num_convs=1, concat_input=False,
                            dropout_ratio=recipe.dropout, num_classes=NUM_CLASSES, norm_cfg=norm_cfg,
                            align_corners=False,
                            loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False,
                                             loss_weight=recipe.aux_weight)),
        train_cfg=dict(),
        test_cfg=dict(mode="slide", crop_size=crop, stride=(recipe.test_stride, recipe.test_stride)),
    )
    per_gpu = recipe.batch_size // world_size
    loader = dict(num_workers=recipe.num_workers, persistent_workers=recipe.num_workers > 0)
    evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])
    cfg = dict(
        model=model,
        train_dataloader=dict(batch_size=per_gpu, sampler=dict(type="InfiniteSampler", shuffle=True),
                              dataset=_dataset(data_root, "train", train_pipeline), **loader),
        val_dataloader=dict(batch_size=1, sampler=dict(type="DefaultSampler", shuffle=False),
                            dataset=_dataset(data_root, "val", test_pipeline), **loader),
        val_evaluator=evaluator,
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=min(recipe.val_interval, iters)),
        optim_wrapper=optim_wrapper(recipe.lr, recipe.weight_decay, recipe.betas, recipe.layer_decay, amp),
        param_scheduler=[
            warmup(recipe.warmup_ratio, recipe.warmup_iters),
            dict(type="PolyLR", power=recipe.poly_power, eta_min=recipe.min_lr, by_epoch=False, begin=0,
                 end=recipe.iters),
        ],
        tta_model=dict(type="SegTTAModel"),
        tta_pipeline=tta_pipeline,
        **runtime(str(work_dir), seed, "mmseg", recipe.log_interval, recipe.checkpoint_interval, False,
                  "SegLocalVisualizer"),
    )
    cfg["test_dataloader"], cfg["test_evaluator"] = cfg["val_dataloader"], evaluator
    return cfg


def multiscale_test_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The same run tested multi-scale + flip (mmseg ``tools/test.py --tta``): the TTA pipeline on the test
    set and ``SegTTAModel`` around the model, which averages the per-scale predictions."""
    out = dict(cfg)
    loader = dict(cfg["test_dataloader"])
    loader["dataset"] = dict(loader["dataset"], pipeline=cfg["tta_pipeline"])
    out["test_dataloader"] = loader
    out["model"] = dict(cfg["tta_model"], module=cfg["model"])
    return out
