"""Dense-transfer recipes: typed, every value with its source, registered by name.

iBOT is the one seed paper that ships its dense configs (bytedance/ibot ``evaluation/``, mmseg 0.12 /
mmdet 2.x era); the values below are read from them and from ``evaluation/README.md``'s commands, which
override them. Paths are relative to that repository. ``tiny`` recipes are CPU test recipes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from harness.errors import UserError

_SEG = "evaluation/semantic_segmentation/configs/"
_DET = "evaluation/object_detection/configs/"
_README = "evaluation/README.md"
TEST = "CPU test recipe (not a paper value)"


@dataclass(frozen=True)
class SegRecipe:
    """UperNet (+ FCN auxiliary head) on ADE20K with an exported ViT/Swin backbone."""

    name: str
    crop_size: int
    iters: int
    batch_size: int  # total over all GPUs
    lr: float
    weight_decay: float
    layer_decay: float
    warmup_iters: int
    drop_path: float
    decode_channels: int  # UPerHead ``channels``; the backbone's width in iBOT's configs
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 1e-6
    poly_power: float = 1.0
    min_lr: float = 0.0
    aux_channels: int = 256
    aux_weight: float = 0.4
    dropout: float = 0.1
    norm: str = "SyncBN"
    resize_scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    test_stride: int = 341
    ms_ratios: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    ms_flip: bool = True
    out_with_norm: bool = True
    val_interval: int = 16000
    checkpoint_interval: int = 4000
    log_interval: int = 50
    num_workers: int = 4
    precision: str = "fp16"
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class DetRecipe:
    """Cascade Mask R-CNN (iBOT) or Mask R-CNN with FPN on COCO, multi-scale training, 1x schedule."""

    name: str
    detector: str  # "cascade_mask_rcnn" | "mask_rcnn"
    epochs: int
    lr_steps: tuple[int, ...]
    batch_size: int  # total over all GPUs
    lr: float
    weight_decay: float
    layer_decay: float
    drop_path: float
    crop_size: tuple[int, int]  # the size the position embedding is resampled to (iBOT ``img_size``)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    train_scales: tuple[tuple[int, int], ...] = tuple((s, 1333) for s in range(480, 801, 32))
    crop_scales: tuple[tuple[int, int], ...] = ((400, 1333), (500, 1333), (600, 1333))
    random_crop: tuple[int, int] = (384, 600)
    multi_scale: bool = True
    test_scale: tuple[int, int] = (1333, 800)
    fpn_channels: int = 256
    head_norm: str = "SyncBN"
    neck_norm: str = "SyncBN"
    giou_weight: float = 10.0
    out_with_norm: bool = True
    rpn_proposals: int = 2000
    test_proposals: int = 1000
    val_interval: int = 1
    log_interval: int = 50
    num_workers: int = 2
    precision: str = "fp16"
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def min_size(self) -> int:
        return min(s[0] for s in self.train_scales) if self.multi_scale else self.test_scale[1]


def cited(cls: type, **values: tuple[Any, str]) -> Any:
    """``cited(SegRecipe, name=("x", "..."), lr=(8e-5, "README"), ...)``: the recipe, with each value's source."""
    plain, sources = {}, {}
    for key, item in values.items():
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], str)):
            raise TypeError(f"recipe value {key!r} must be a (value, source) pair, got {item!r}")
        plain[key], sources[key] = item
    return cls(**plain, sources=sources)


def _ibot_seg(size: str, width: int, lr: tuple[float, str], layer_decay: tuple[float, str]) -> SegRecipe:
    cfg = f"{_SEG}upernet/vit_{size}_512_ade20k_160k.py"
    return cited(
        SegRecipe, name=(f"ibot_vit_{size}", "iBOT ViT-" + size[0].upper() + " UperNet"),
        crop_size=(512, f"{cfg} crop_size"),
        iters=(160_000, f"{_SEG}_base_/schedules/schedule_160k.py runner.max_iters"),
        batch_size=(16, f"{_README} ade20k_seg: " + ("4 GPUs x data.samples_per_gpu=4" if size == "small" else
                                                     "8 GPUs x data.samples_per_gpu=2")),
        lr=lr, weight_decay=(0.05, f"{cfg} optimizer.weight_decay"),
        layer_decay=layer_decay,
        warmup_iters=(1500, f"{cfg} lr_config.warmup_iters"),
        drop_path=(0.1, f"{cfg} model.backbone.drop_path_rate"),
        decode_channels=(width, f"{cfg} model.decode_head.channels"),
        betas=((0.9, 0.999), f"{cfg} optimizer.betas"),
        warmup_ratio=(1e-6, f"{cfg} lr_config.warmup_ratio"),
        poly_power=(1.0, f"{cfg} lr_config.power"), min_lr=(0.0, f"{cfg} lr_config.min_lr"),
        aux_channels=(256, f"{_SEG}_base_/models/upernet.py auxiliary_head.channels"),
        aux_weight=(0.4, f"{_SEG}_base_/models/upernet.py auxiliary_head.loss_decode.loss_weight"),
        dropout=(0.1, f"{_SEG}_base_/models/upernet.py decode_head.dropout_ratio"),
        norm=("SyncBN", f"{_SEG}_base_/models/upernet.py norm_cfg"),
        resize_scale=((2048, 512), f"{_SEG}_base_/datasets/ade20k.py train_pipeline Resize.img_scale"),
        ratio_range=((0.5, 2.0), f"{_SEG}_base_/datasets/ade20k.py train_pipeline Resize.ratio_range"),
        cat_max_ratio=(0.75, f"{_SEG}_base_/datasets/ade20k.py train_pipeline RandomCrop.cat_max_ratio"),
        test_stride=(341, f"{cfg} model.test_cfg.stride"),
        ms_ratios=((0.5, 0.75, 1.0, 1.25, 1.5, 1.75), f"{_SEG}upernet/vit_{size}_512_ade20k_160k_ms.py img_ratios"),
        ms_flip=(True, f"{_SEG}upernet/vit_{size}_512_ade20k_160k_ms.py MultiScaleFlipAug.flip"),
        out_with_norm=(True, f"{_README} ade20k_seg: model.backbone.out_with_norm=true"),
        val_interval=(16_000, "harness choice (iBOT evaluates at 64k: schedule_160k.py evaluation.interval)"),
        checkpoint_interval=(4000, "harness choice (iBOT: 64000, schedule_160k.py checkpoint_config.interval)"),
        log_interval=(50, f"{_SEG}_base_/default_runtime.py log_config.interval"),
        num_workers=(4, f"{_SEG}_base_/datasets/ade20k.py data.workers_per_gpu"),
        precision=("fp16", f"{cfg} optimizer_config.use_fp16 (apex)"),
    )


def _ibot_det(size: str, layer_decay: float, drop_path: float, per_gpu: int, detector: str) -> DetRecipe:
    cfg = f"{_DET}cascade_rcnn/vit_{size}_giou_4conv1f_coco_3x.py"
    cmd = f"{_README} coco_det ViT-{size[0].upper()}"
    prefix = "ibot" if detector == "cascade_mask_rcnn" else "mask_rcnn"
    return cited(
        DetRecipe, name=(f"{prefix}_vit_{size}", "registry name"),
        detector=(detector, f"{cfg} model.type CascadeRCNN" if detector == "cascade_mask_rcnn" else
                  "mmdet configs/_base_/models/mask-rcnn_r50_fpn.py heads (CAE/ExtreMA dense protocol), "
                  f"iBOT's backbone and optimizer ({cfg})"),
        epochs=(12, f"{cmd}: runner.max_epochs=12 (1x)"), lr_steps=((8, 11), f"{cmd}: lr_config.step=8,11"),
        batch_size=(8 * per_gpu, f"{cmd}: 8 GPUs x data.samples_per_gpu={per_gpu}"),
        lr=(1e-4, f"{cfg} optimizer.lr"), weight_decay=(0.05, f"{cfg} optimizer.weight_decay"),
        layer_decay=(layer_decay, f"{cmd}: optimizer.paramwise_cfg.layer_decay_rate={layer_decay}"),
        drop_path=(drop_path, f"{cfg} model.backbone.drop_path_rate"),
        crop_size=((800, 1008), f"{_DET}cascade_rcnn/vit_small_giou_4conv1f_coco_3x.py crop_size (img_size)"),
        betas=((0.9, 0.999), f"{cfg} optimizer.betas"),
        warmup_iters=(500, f"{_DET}_base_/schedules/schedule_1x.py lr_config.warmup_iters"),
        warmup_ratio=(0.001, f"{_DET}_base_/schedules/schedule_1x.py lr_config.warmup_ratio"),
        train_scales=(tuple((s, 1333) for s in range(480, 801, 32)), f"{cfg} train_pipeline AutoAugment policy 1"),
        crop_scales=(((400, 1333), (500, 1333), (600, 1333)), f"{cfg} train_pipeline AutoAugment policy 2"),
        random_crop=((384, 600), f"{cfg} train_pipeline RandomCrop.crop_size (absolute_range)"),
        multi_scale=(True, f"{cfg} train_pipeline AutoAugment"),
        test_scale=((1333, 800), f"{_DET}_base_/datasets/coco_instance.py test_pipeline img_scale"),
        fpn_channels=(256, f"{_DET}_base_/models/cascade_mask_rcnn_vit_fpn.py neck.out_channels"),
        head_norm=("SyncBN", f"{cfg} roi_head.bbox_head[*].norm_cfg"),
        neck_norm=("SyncBN", "evaluation/object_detection/mmcv_custom/register_backbone.py fpn1 SyncBatchNorm"),
        giou_weight=(10.0, f"{cfg} roi_head.bbox_head[*].loss_bbox GIoULoss.loss_weight"),
        out_with_norm=(False, "evaluation/object_detection/mmcv_custom/register_backbone.py out_with_norm "
                       "default (coco_det command does not set it)"),
        rpn_proposals=(2000, f"{_DET}_base_/models/cascade_mask_rcnn_vit_fpn.py train_cfg.rpn_proposal.max_per_img"),
        test_proposals=(1000, f"{_DET}_base_/models/cascade_mask_rcnn_vit_fpn.py test_cfg.rpn.max_per_img"),
        val_interval=(1, "harness choice (iBOT: evaluation after every epoch, mmdet default)"),
        log_interval=(50, f"{_DET}_base_/default_runtime.py log_config.interval"),
        num_workers=(2, f"{_DET}_base_/datasets/coco_instance.py data.workers_per_gpu"),
        precision=("fp16", f"{cfg} optimizer_config.use_fp16 (apex)"),
    )


SEG_RECIPES: dict[str, SegRecipe] = {
    "ibot_vit_small": _ibot_seg("small", 384, (3e-5, f"{_README} ade20k_seg ViT-S: optimizer.lr=3e-5"),
                                (0.9, f"{_SEG}upernet/vit_small_512_ade20k_160k.py paramwise_cfg.layer_decay_rate")),
    "ibot_vit_base": _ibot_seg("base", 768, (8e-5, f"{_README} ade20k_seg ViT-B: optimizer.lr=8e-5"),
                               (0.65, f"{_SEG}upernet/vit_base_512_ade20k_160k.py paramwise_cfg.layer_decay_rate")),
    "tiny": cited(
        SegRecipe, name=("tiny", TEST), crop_size=(64, TEST), iters=(40, TEST), batch_size=(4, TEST),
        lr=(1e-3, TEST), weight_decay=(0.05, TEST), layer_decay=(0.65, TEST), warmup_iters=(5, TEST),
        drop_path=(0.0, TEST), decode_channels=(32, TEST), aux_channels=(16, TEST), norm=("BN", TEST),
        resize_scale=((256, 64), TEST), ratio_range=((0.75, 1.5), TEST), test_stride=(43, TEST),
        ms_ratios=((0.75, 1.0, 1.25), TEST), val_interval=(40, TEST), checkpoint_interval=(20, TEST),
        log_interval=(10, TEST), num_workers=(0, TEST), precision=("fp32", TEST)),
}

DET_RECIPES: dict[str, DetRecipe] = {
    "ibot_vit_small": _ibot_det("small", 0.8, 0.1, 4, "cascade_mask_rcnn"),
    "ibot_vit_base": _ibot_det("base", 0.75, 0.2, 2, "cascade_mask_rcnn"),
    "mask_rcnn_vit_small": _ibot_det("small", 0.8, 0.1, 4, "mask_rcnn"),
    "mask_rcnn_vit_base": _ibot_det("base", 0.75, 0.2, 2, "mask_rcnn"),
    "tiny": cited(
        DetRecipe, name=("tiny", TEST), detector=("mask_rcnn", TEST), epochs=(8, TEST), lr_steps=((6,), TEST),
        batch_size=(4, TEST), lr=(1e-3, TEST), weight_decay=(0.05, TEST), layer_decay=(0.75, TEST),
        drop_path=(0.0, TEST), crop_size=((64, 64), TEST), warmup_iters=(5, TEST),
        train_scales=(((64, 64),), TEST), multi_scale=(False, TEST), test_scale=((64, 64), TEST),
        fpn_channels=(32, TEST), head_norm=("BN", TEST), neck_norm=("BN", TEST), rpn_proposals=(200, TEST),
        test_proposals=(100, TEST), val_interval=(8, TEST), log_interval=(10, TEST), num_workers=(0, TEST),
        precision=("fp32", TEST)),
}


DET_RECIPES["tiny_cascade"] = dataclasses.replace(DET_RECIPES["tiny"], name="tiny_cascade",
                                                  detector="cascade_mask_rcnn")


def _lookup(table: dict[str, Any], name: str, field_name: str) -> Any:
    if name not in table:
        raise UserError(field_name, f"unknown recipe {name!r}", f"choose one of: {', '.join(sorted(table))}")
    return table[name]


def seg_recipe(name: str, **overrides: Any) -> SegRecipe:
    """A registered segmentation recipe, with ``overrides`` (unknown keys are one-line errors)."""
    return _override(_lookup(SEG_RECIPES, name, "recipe"), overrides)


def det_recipe(name: str, **overrides: Any) -> DetRecipe:
    return _override(_lookup(DET_RECIPES, name, "recipe"), overrides)


def _override(recipe: Any, overrides: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(recipe)} - {"name", "sources"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(unknown[0], f"not a setting of the {recipe.name!r} recipe",
                        f"choose from: {', '.join(sorted(known))}")
    return dataclasses.replace(recipe, **overrides) if overrides else recipe
