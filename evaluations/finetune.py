"""End-to-end fine-tuning with layer-wise lr decay: the BEiT/MAE recipe (methods.md §0.3), per-paper presets.

The backbone is rebuilt from the export with drop path and trained through the generic loop
(``harness.train.TrainRun``: AdamW, per-iteration warm-up + cosine, clipping, bf16 on GPU, checkpoints,
exact resume, USR2). Parameter groups follow MAE ``util/lr_decay.param_groups_lrd`` (ViT) or SimMIM's
Swin rule (``harness.optim``); augmentation is timm's (``create_transform``: RandomResizedCrop, RandAugment,
colour jitter, random erasing) in the loader workers; Mixup/CutMix with label smoothing and
``SoftTargetCrossEntropy`` are timm's, run in the step from the step's seeded RNG. Optional model EMA
(timm ``ModelEmaV3``). The head reads the feature the method's ``FeatureSpec.finetune`` names: the CLS
token ("cls", BEiT ``--use_cls``) or the mean of the patch tokens through a fresh ``fc_norm`` ("avg",
MAE ``--global_pool``: the backbone's final norm is then dropped).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader

from evaluations.classify import LabelledAugmentDataset, run_to_end, topk_accuracy
from evaluations.features import IMAGENET_MEAN, IMAGENET_STD, eval_transform, image_folder, pool_tokens
from harness.api import EvalInputs, Metrics, register_evaluation
from harness.config import TrainConfig
from harness.data import mix_seed, seed_everything
from harness.errors import UserError
from harness.optim import backbone_layer_rule, param_groups_lrd
from harness.train import TrainRun


@dataclass(frozen=True)
class FinetuneRecipe:
    family: str  # the report's protocol column (reports/data/paper_numbers.csv)
    tag: str  # short name in the protocol tag, e.g. "beit"
    epochs: int
    batch_size: int
    blr: float
    lr_batch_denom: int | None  # lr = blr · batch / denom; None: blr is the lr (not batch-scaled)
    layer_decay: float
    weight_decay: float
    drop_path: float
    warmup_epochs: float
    min_lr: float
    warmup_lr: float
    schedule: str  # "half_cycle" (MAE lr_sched) or "cosine" (BEiT/DINO cosine_scheduler)
    clip_grad: float | None
    mixup: float
    cutmix: float
    smoothing: float
    reprob: float
    randaug: str | None
    color_jitter: float
    source: str
    crop_min: float = 0.08
    hflip: float = 0.5
    paper_recipe: str | None = None  # for CPU presets: the paper preset their deviations are measured from


_AUG = dict(mixup=0.8, cutmix=1.0, smoothing=0.1, reprob=0.25, randaug="rand-m9-mstd0.5-inc1", color_jitter=0.4)
PRESETS: dict[str, FinetuneRecipe] = {
    "mae": FinetuneRecipe(
        family="finetune/mae-lrd", tag="mae", epochs=100, batch_size=1024, blr=5e-4, lr_batch_denom=256,
        layer_decay=0.65, weight_decay=0.05, drop_path=0.1, warmup_epochs=5, min_lr=1e-6, warmup_lr=0.0,
        schedule="half_cycle", clip_grad=None, **_AUG,
        source="facebookresearch/mae FINETUNE.md ViT-B (main_finetune.py, util/lr_decay.py, util/lr_sched.py)"),
    "ibot": FinetuneRecipe(
        family="finetune/beit-lrd", tag="beit", epochs=100, batch_size=1024, blr=4e-3, lr_batch_denom=None,
        layer_decay=0.65, weight_decay=0.05, drop_path=0.2, warmup_epochs=20, min_lr=1e-6, warmup_lr=1e-6,
        schedule="cosine", clip_grad=None, **_AUG,
        source="bytedance/ibot evaluation/README.md ViT-B (100 ep, dp 0.2, ld 0.65) + "
               "evaluation/classification_layer_decay/run.sh (warm-up 20, lr 4e-3 unscaled, --use_cls)"),
    "extrema": FinetuneRecipe(
        family="finetune/beit-lrd", tag="beit", epochs=100, batch_size=1024, blr=5e-4, lr_batch_denom=256,
        layer_decay=0.65, weight_decay=0.05, drop_path=0.2, warmup_epochs=5, min_lr=1e-6, warmup_lr=1e-6,
        schedule="cosine", clip_grad=None, **_AUG,
        source="microsoft/ExtreMA finetune/run_class_finetuning.py + README (lr 5e-4·batch/256, batch 1024)"),
    "ropim": FinetuneRecipe(
        family="finetune/beit-lrd", tag="simmim", epochs=100, batch_size=1024, blr=5e-3, lr_batch_denom=512,
        layer_decay=0.75, weight_decay=0.05, drop_path=0.1, warmup_epochs=5, min_lr=5e-6, warmup_lr=2.5e-7,
        schedule="cosine", clip_grad=5.0, **_AUG,
        source="csiro-robotics/ROPIM configs/vit_base/ropim_finetune__vit_base.yaml (SimMIM main_finetune.py)"),
    # CPU recipe for tests and demos: MAE's optimisation at a few epochs on 32-px digits, with the
    # augmentations that suit 1.4k 8x8 digits (no flips, crops, colour, RandAugment, erasing or mixing:
    # with them a from-scratch ViT learns nothing in a CPU minute; measured: 72 % top-1 without, <50 % with).
    "tiny": FinetuneRecipe(
        family="finetune/mae-lrd", tag="mae", epochs=6, batch_size=32, blr=8e-3, lr_batch_denom=256,
        layer_decay=0.75, weight_decay=0.05, drop_path=0.0, warmup_epochs=1, min_lr=1e-6, warmup_lr=0.0,
        schedule="half_cycle", clip_grad=None, mixup=0.0, cutmix=0.0, smoothing=0.1, reprob=0.0,
        randaug=None, color_jitter=0.0, crop_min=1.0, hflip=0.0, source="CPU test recipe", paper_recipe="mae"),
}
_TUNABLE = ("epochs", "batch_size", "blr", "layer_decay", "weight_decay", "drop_path", "warmup_epochs", "mixup",
            "cutmix", "smoothing", "reprob", "clip_grad", "randaug", "crop_min")


@dataclass(frozen=True)
class FinetuneConfig:
    preset: str = "mae"
    # None: the preset's value.
    epochs: int | None = None
    batch_size: int | None = None
    blr: float | None = None
    layer_decay: float | None = None
    weight_decay: float | None = None
    drop_path: float | None = None
    warmup_epochs: float | None = None
    mixup: float | None = None
    cutmix: float | None = None
    smoothing: float | None = None
    reprob: float | None = None
    clip_grad: float | None = None
    randaug: str | None = None  # timm RandAugment string; "none" turns it off
    crop_min: float | None = None  # RandomResizedCrop's smallest area fraction (recipes: timm's 0.08; 1: none)
    pool: str | None = None  # None: the method's FeatureSpec.finetune
    model_ema: bool = False
    ema_decay: float = 0.9999
    grad_checkpointing: bool = False
    compile: bool = False
    num_workers: int = 4
    ckpt_every_steps: int = 0
    log_every: int = 20
    headline = "top1"

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise UserError("finetune.preset", f"unknown preset {self.preset!r}",
                            f"use one of: {', '.join(PRESETS)}")
        if self.pool not in (None, "cls", "avg"):
            raise UserError("finetune.pool", f"unknown pool {self.pool!r}", "use cls or avg")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise UserError(f"finetune.{name}", f"must be a positive integer, got {v!r}", "fix the value")
        ld = self.layer_decay
        if ld is not None and not 0 < ld <= 1:
            raise UserError("finetune.layer_decay", f"must be in (0, 1], got {ld}", "e.g. 0.65")

    @property
    def recipe(self) -> FinetuneRecipe:
        return PRESETS[self.preset]

    def value(self, name: str) -> Any:
        v = getattr(self, name)
        if name == "randaug" and v == "none":
            return None
        return getattr(self.recipe, name) if v is None else v

    def protocol(self) -> str:
        return self.recipe.family

    def deviations(self) -> dict[str, list]:
        base = PRESETS[self.recipe.paper_recipe or self.preset]
        devs = {k: [getattr(base, k), self.value(k)] for k in _TUNABLE if self.value(k) != getattr(base, k)}
        if self.recipe.paper_recipe:
            devs["preset"] = [self.recipe.paper_recipe, self.preset]
        return devs


class FinetuneNet(nn.Module):
    """Backbone + pooling + head. "avg" on a token model: final norm dropped, fresh ``fc_norm`` after
    the mean (MAE ``--global_pool``); on a Swin feature map, the normed tokens' mean."""

    def __init__(self, backbone: nn.Module, pool: str, num_classes: int) -> None:
        super().__init__()
        self.backbone, self.pool = backbone, pool
        dim = backbone.num_features
        self.fc_norm: nn.Module = nn.Identity()
        if pool == "avg" and hasattr(backbone, "blocks"):
            backbone.norm = nn.Identity()
            self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE main_finetune; BEiT init_scale 0.001 · 0.02
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc_norm(pool_tokens(self.backbone, self.backbone.forward_features(x), self.pool)))


class Finetuner(nn.Module):
    """The step interface of the generic loop over a ``FinetuneNet`` (+ its EMA)."""

    def __init__(self, net: FinetuneNet, cfg: FinetuneConfig, num_classes: int) -> None:
        super().__init__()
        self.net, self.cfg = net, cfg
        self._compiled = torch.compile(net) if cfg.compile else None  # not a submodule: one copy in checkpoints
        mix, cut, smooth = cfg.value("mixup"), cfg.value("cutmix"), cfg.value("smoothing")
        self.mixup = Mixup(mixup_alpha=mix, cutmix_alpha=cut, label_smoothing=smooth,
                           num_classes=num_classes) if mix > 0 or cut > 0 else None
        if self.mixup is not None:
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif smooth > 0:
            self.criterion = LabelSmoothingCrossEntropy(smooth)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.ema = ModelEmaV3(net, decay=cfg.ema_decay) if cfg.model_ema else None

    def training_step(self, batch: Any, state: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        target = y
        if self.mixup is not None:
            x, target = self.mixup(x, y)
        logits = (self._compiled or self.net)(x).float()
        loss = self.criterion(logits, target)
        hard = target.argmax(dim=1) if target.ndim == 2 else target
        return {"loss": loss, "acc1": (logits.argmax(dim=1) == hard).float().mean() * 100}

    def forward(self, batch: Any, state: Any) -> dict[str, torch.Tensor]:
        return self.training_step(batch, state)

    def on_before_optimizer_step(self, state: Any) -> None:
        pass

    @torch.no_grad()
    def after_step(self, state: Any) -> None:
        if self.ema is not None:
            self.ema.update(self.net, step=state.step)

    def param_groups(self) -> list[dict[str, Any]]:
        layer_id, num_layers = backbone_layer_rule(self.net.backbone)
        skip = set(getattr(self.net.backbone, "no_weight_decay", set)())
        return param_groups_lrd(self.net, self.cfg.value("weight_decay"), skip, self.cfg.value("layer_decay"),
                                layer_id, num_layers, prefix="backbone.")


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, keeping the old Pillow result for 0 bits (every pixel 0): RandAugment's "inc1"
    posterize reaches 0 bits at magnitude 10, which Pillow >= 10 rejects with an error."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def train_transform(img_size: int, r: FinetuneRecipe, reprob: float, randaug: str | None, crop_min: float) -> Any:
    """timm ``create_transform`` as MAE ``util/datasets.build_dataset`` calls it (bicubic, pixel erasing).
    ``crop_min`` 1 means no random crop at all: the eval transform's resize and centre crop."""
    if crop_min >= 1.0:
        return eval_transform(img_size)
    transform = create_transform(img_size, is_training=True, color_jitter=r.color_jitter, auto_augment=randaug,
                                 scale=(crop_min, 1.0), hflip=r.hflip,
                                 interpolation="bicubic", re_prob=reprob, re_mode="pixel", re_count=1,
                                 mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for t in transform.transforms:
        for op in getattr(t, "ops", ()):
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


@torch.no_grad()
def evaluate(net: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    net.eval()
    logits, labels = [], []
    for images, targets in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits.append(net(images.to(device, non_blocking=True)).float())
        labels.append(targets.to(device))
    top1, top5 = topk_accuracy(torch.cat(logits), torch.cat(labels))
    return top1, top5


def build_finetuner(inputs: EvalInputs, cfg: FinetuneConfig, num_classes: int) -> Finetuner:
    pool = cfg.pool or inputs.feature_spec.finetune
    pool = "avg" if pool == "avg_norm" else pool
    seed_everything(mix_seed(inputs.seed, 0xF17E))  # same head init on every rank and every restart
    backbone = inputs.build_backbone(drop_path_rate=cfg.value("drop_path"), trainable=True,
                                     grad_checkpointing=cfg.grad_checkpointing)
    net = FinetuneNet(backbone, pool, num_classes).to(inputs.device)
    if inputs.device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    return Finetuner(net, cfg, num_classes)


def train_config(cfg: FinetuneConfig, num_workers: int) -> TrainConfig:
    r = cfg.recipe
    batch = cfg.value("batch_size")
    return TrainConfig(epochs=cfg.value("epochs"), batch_size=batch, blr=cfg.value("blr"),
                       lr_batch_denom=r.lr_batch_denom or batch, min_lr=r.min_lr,
                       warmup_epochs=cfg.value("warmup_epochs"), warmup_lr=r.warmup_lr, lr_schedule=r.schedule,
                       weight_decay=cfg.value("weight_decay"), clip_grad=cfg.value("clip_grad"),
                       clip_mode="global", num_workers=num_workers, ckpt_every_steps=cfg.ckpt_every_steps,
                       log_every=cfg.log_every)


@register_evaluation("finetune", FinetuneConfig)
def run(inputs: EvalInputs, cfg: FinetuneConfig) -> Metrics:
    r = cfg.recipe
    train_set = image_folder(inputs.data_root, "train")
    val_set = image_folder(inputs.data_root, "val", eval_transform(inputs.img_size))
    if train_set.classes != val_set.classes:
        raise UserError("data.root", f"train/ and val/ of {inputs.data_root} hold different class folders",
                        "give both splits the same class folders")
    num_classes = len(train_set.classes)
    model = build_finetuner(inputs, cfg, num_classes)
    transform = train_transform(inputs.img_size, r, cfg.value("reprob"), cfg.value("randaug"), cfg.value("crop_min"))
    dataset = LabelledAugmentDataset(train_set, transform, inputs.seed)
    run = TrainRun(inputs.spec, inputs.dist, train_config(cfg, cfg.num_workers), model, dataset,
                   optimizer="adamw", desc="finetune")
    result = run_to_end(inputs, run)
    loader = DataLoader(val_set, batch_size=256, shuffle=False, num_workers=cfg.num_workers)
    top1, top5 = evaluate(model.net, loader, inputs.device)
    values = {"top1": top1, "top5": top5}
    if model.ema is not None:
        values["top1_ema"], values["top5_ema"] = evaluate(model.ema.module, loader, inputs.device)
    epochs, ld = cfg.value("epochs"), cfg.value("layer_decay")
    tag = f"finetune:{r.tag}@ld{ld:g},{epochs}ep"
    extra = {"preset": cfg.preset, "recipe_source": r.source, "pool": model.net.pool, "epochs": epochs,
             "lr": run.train.lr, "final_train_loss": result["final"].get("loss"), "img_per_s": result["img_per_s"],
             "resumed_from_step": result["resumed_from_step"], "config": dataclasses.asdict(cfg),
             "n_train": len(train_set), "n_val": len(val_set)}
    return Metrics(values=values, protocol=cfg.protocol(), headline="top1", extra=extra, tag=tag)

