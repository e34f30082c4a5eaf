"""The mmengine config of (Cascade) Mask R-CNN + FPN on COCO over an exported backbone (mmdet 3.x names).

iBOT's mmdet 2.x config in mmdet 3.x terms: ``AutoAugment`` policies -> ``RandomChoice`` of transform lists,
``Resize(img_scale=[...], multiscale_mode="value")`` -> ``RandomChoiceResize``, Normalize/Pad ->
``DetDataPreprocessor(pad_size_divisor=32)``, step policy with linear warm-up -> LinearLR + MultiStepLR,
apex fp16 -> bf16 AmpOptimWrapper on GPU. The bbox heads are iBOT's 4conv1fc heads with GIoU loss.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from evaluations.dense.adapters import backbone_levels
from evaluations.dense.openmmlab import BACKBONE
from evaluations.dense.recipes import DetRecipe
from evaluations.dense.runtime import optim_wrapper, runtime, warmup
from evaluations.dense.seg_config import MEAN, STD
from harness.errors import UserError

NUM_OUTS = 5  # FPN levels (strides 4..64 from a ViT), anchor strides as iBOT's
# Cascade R-CNN's three stages (iBOT _base_/models/cascade_mask_rcnn_vit_fpn.py): IoU thresholds, box stds.
_CASCADE = ((0.5, (0.1, 0.1, 0.2, 0.2)), (0.6, (0.05, 0.05, 0.1, 0.1)), (0.7, (0.033, 0.033, 0.067, 0.067)))


def coco_classes(ann_file: Path) -> tuple[str, ...]:
    """Category names in id order, read from the annotation file (80 on COCO)."""
    try:
        cats = json.loads(ann_file.read_text())["categories"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError("data", f"{ann_file} is not a readable COCO annotation file ({e})",
                        "give a COCO-layout folder: annotations/instances_{train,val}2017.json") from None
    return tuple(c["name"] for c in sorted(cats, key=lambda c: c["id"]))


def _bbox_head(recipe: DetRecipe, num_classes: int, stds: tuple[float, ...]) -> dict[str, Any]:
    return dict(type="ConvFCBBoxHead", num_shared_convs=4, num_shared_fcs=1, in_channels=recipe.fpn_channels,
                conv_out_channels=recipe.fpn_channels, fc_out_channels=1024, roi_feat_size=7,
                num_classes=num_classes, reg_class_agnostic=False, reg_decoded_bbox=True,
                bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=list(stds)),
                norm_cfg=dict(type=recipe.head_norm, requires_grad=True),
                loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                loss_bbox=dict(type="GIoULoss", loss_weight=recipe.giou_weight))


def _rcnn_train(iou: float) -> dict[str, Any]:
    return dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=iou, neg_iou_thr=iou, min_pos_iou=iou,
                              match_low_quality=False, ignore_iof_thr=-1),
                sampler=dict(type="RandomSampler", num=512, pos_fraction=0.25, neg_pos_ub=-1,
                             add_gt_as_proposals=True),
                mask_size=28, pos_weight=-1, debug=False)


def _model(export_dir: str, recipe: DetRecipe, num_classes: int, in_channels: list[int],
           in_strides: tuple[int, ...]) -> dict[str, Any]:
    fpn = recipe.fpn_channels
    strides = list(in_strides) + [in_strides[-1] * 2 ** k for k in range(1, NUM_OUTS - len(in_strides) + 1)]
    roi = dict(type="SingleRoIExtractor", out_channels=fpn, featmap_strides=strides[:4])
    mask_head = dict(type="FCNMaskHead", num_convs=4, in_channels=fpn, conv_out_channels=fpn,
                     num_classes=num_classes,
                     loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0))
    cascade = recipe.detector == "cascade_mask_rcnn"
    if cascade:
        roi_head = dict(type="CascadeRoIHead", num_stages=3, stage_loss_weights=[1, 0.5, 0.25],
                        bbox_head=[_bbox_head(recipe, num_classes, stds) for _, stds in _CASCADE])
        rcnn_train: Any = [_rcnn_train(iou) for iou, _ in _CASCADE]
    elif recipe.detector == "mask_rcnn":
        roi_head = dict(type="StandardRoIHead", bbox_head=_bbox_head(recipe, num_classes, _CASCADE[0][1]))
        rcnn_train = _rcnn_train(0.5)
    else:
        raise UserError("detector", f"unknown detector {recipe.detector!r}", "choose cascade_mask_rcnn or mask_rcnn")
    roi_head |= dict(bbox_roi_extractor=roi | dict(roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0)),
                     mask_roi_extractor=roi | dict(roi_layer=dict(type="RoIAlign", output_size=14,
                                                                  sampling_ratio=0)),
                     mask_head=mask_head)
    nms = dict(type="nms", iou_threshold=0.7)
    return dict(
        type="CascadeRCNN" if cascade else "MaskRCNN",
        data_preprocessor=dict(type="DetDataPreprocessor", mean=MEAN, std=STD, bgr_to_rgb=True, pad_mask=True,
                               pad_size_divisor=32),
        backbone=dict(type=BACKBONE, export_dir=export_dir, img_size=list(recipe.crop_size),
                      out_with_norm=recipe.out_with_norm, norm=recipe.neck_norm, drop_path_rate=recipe.drop_path),
        neck=dict(type="FPN", in_channels=in_channels, out_channels=fpn, num_outs=NUM_OUTS),
        rpn_head=dict(type="RPNHead", in_channels=fpn, feat_channels=fpn,
                      anchor_generator=dict(type="AnchorGenerator", scales=[8], ratios=[0.5, 1.0, 2.0],
                                            strides=strides[:NUM_OUTS]),
                      bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
                      loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
                      loss_bbox=dict(type="SmoothL1Loss", beta=1.0 / 9.0, loss_weight=1.0)),
        roi_head=roi_head,
        train_cfg=dict(
            rpn=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                                   match_low_quality=True, ignore_iof_thr=-1),
                     sampler=dict(type="RandomSampler", num=256, pos_fraction=0.5, neg_pos_ub=-1,
                                  add_gt_as_proposals=False),
                     allowed_border=0, pos_weight=-1, debug=False),
            rpn_proposal=dict(nms_pre=recipe.rpn_proposals, max_per_img=recipe.rpn_proposals, nms=nms,
                              min_bbox_size=0),
            rcnn=rcnn_train),
        test_cfg=dict(
            rpn=dict(nms_pre=recipe.test_proposals, max_per_img=recipe.test_proposals, nms=nms, min_bbox_size=0),
            rcnn=dict(score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100,
                      mask_thr_binary=0.5)),
    )


def _train_pipeline(recipe: DetRecipe) -> list[dict[str, Any]]:
    scales = [tuple(s) for s in recipe.train_scales]
    if recipe.multi_scale:
        resize: dict[str, Any] = dict(type="RandomChoice", transforms=[
            [dict(type="RandomChoiceResize", scales=scales, keep_ratio=True)],
            [dict(type="RandomChoiceResize", scales=[tuple(s) for s in recipe.crop_scales], keep_ratio=True),
             dict(type="RandomCrop", crop_type="absolute_range", crop_size=tuple(recipe.random_crop),
                  allow_negative_crop=True),
             dict(type="RandomChoiceResize", scales=scales, keep_ratio=True)],
        ])
    else:
        resize = dict(type="Resize", scale=scales[0], keep_ratio=True)
    return [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
            dict(type="RandomFlip", prob=0.5), resize, dict(type="PackDetInputs")]


def detection_config(export_dir: str | Path, data_root: str | Path, recipe: DetRecipe, work_dir: str | Path,
                     seed: int, world_size: int = 1, amp: bool | None = None,
                     max_epochs: int | None = None) -> dict[str, Any]:
    """An mmengine config dict for ``Runner.from_cfg`` (after ``openmmlab.prepare()``), COCO 2017 layout:
    ``annotations/instances_{train,val}2017.json`` and ``{train,val}2017/`` under ``data_root``."""
    if recipe.batch_size % world_size:
        raise ValueError(f"batch size {recipe.batch_size} does not split over {world_size} processes")
    amp = torch.cuda.is_available() if amp is None else amp
    root = Path(data_root)
    classes = coco_classes(root / "annotations" / "instances_train2017.json")
    levels = backbone_levels(export_dir, tuple(recipe.crop_size))
    epochs = recipe.epochs if max_epochs is None else max_epochs
    test_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=tuple(recipe.test_scale), keep_ratio=True),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
    ]

    def dataset(split: str, pipeline: list[dict], train: bool) -> dict[str, Any]:
        return dict(type="CocoDataset", data_root=str(root), metainfo=dict(classes=classes),
                    ann_file=f"annotations/instances_{split}2017.json", data_prefix=dict(img=f"{split}2017/"),
                    filter_cfg=dict(filter_empty_gt=True, min_size=32) if train else None,
                    test_mode=not train, pipeline=pipeline)

    loader = dict(num_workers=recipe.num_workers, persistent_workers=recipe.num_workers > 0)
    evaluator = dict(type="CocoMetric", ann_file=str(root / "annotations" / "instances_val2017.json"),
                     metric=["bbox", "segm"], format_only=False)
    cfg = dict(
        model=_model(str(export_dir), recipe, len(classes), levels.channels, levels.strides),
        train_dataloader=dict(batch_size=recipe.batch_size // world_size,
                              sampler=dict(type="DefaultSampler", shuffle=True),
                              batch_sampler=dict(type="AspectRatioBatchSampler"),
                              dataset=dataset("train", _train_pipeline(recipe), True), **loader),
        val_dataloader=dict(batch_size=1, drop_last=False, sampler=dict(type="DefaultSampler", shuffle=False),
                            dataset=dataset("val", test_pipeline, False), **loader),
        val_evaluator=evaluator,
        train_cfg=dict(type="EpochBasedTrainLoop", max_epochs=epochs, val_interval=min(recipe.val_interval, epochs)),
        optim_wrapper=optim_wrapper(recipe.lr, recipe.weight_decay, recipe.betas, recipe.layer_decay, amp),
        param_scheduler=[
            warmup(recipe.warmup_ratio, recipe.warmup_iters),
            dict(type="MultiStepLR", begin=0, end=recipe.epochs, by_epoch=True, milestones=list(recipe.lr_steps),
                 gamma=0.1),
        ],
        **runtime(str(work_dir), seed, "mmdet", recipe.log_interval, 1, True, "DetLocalVisualizer"),
    )
    cfg["test_dataloader"], cfg["test_evaluator"] = cfg["val_dataloader"], evaluator
    return cfg
