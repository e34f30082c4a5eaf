"""Linear probes on the frozen exported backbone, three tagged protocols (methods.md §0.2):

- ``dino``   facebookresearch/dino ``eval_linear.py``: ``LinearClassifier`` (N(0, 0.01) weight, zero bias),
  SGD momentum 0.9, wd 0, lr 0.001·batch/256, CosineAnnealingLR per epoch, 100 epochs, batch 1024,
  RandomResizedCrop + flip. The lr is swept the dinov2 way (``dinov2/eval/linear.py``): one head per lr
  over the same forward pass, the best picked on a held-out part of train; the chosen lr is recorded.
- ``mae``    facebookresearch/mae ``main_linprobe.py``: BatchNorm1d(affine=False, eps=1e-6) + Linear
  (trunc-normal 0.01), LARS (``util/lars.py``) wd 0, blr 0.1, batch 16384, 90 epochs, warm-up 10,
  per-iteration half-cycle cosine (``util/lr_sched.py``), bicubic RandomResizedCrop + flip.
- ``mocov3`` microsoft/ExtreMA ``main_lincls.py`` (MoCo v3's): BN(affine=False, synced) + Linear
  (N(0, 0.01)), SGD momentum 0.9, wd 0, blr 0.1, batch 4096, 90 epochs, warm-up 10, cosine.

``mode: cached`` trains on features extracted once through the eval transform (no augmentation): fast,
and shared with k-NN through the feature cache, but a recipe deviation, which the report lists.
Training runs through the generic loop (``harness.train.TrainRun``): checkpoints, exact resume, USR2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from evaluations.classify import (
    FeatureDataset,
    LabelledAugmentDataset,
    heldout_split,
    run_to_end,
    subset_folder,
    topk_accuracy,
)
from evaluations.features import IMAGENET_MEAN, IMAGENET_STD, cached_features, image_folder, spec_features
from harness.api import EvalInputs, Metrics, register_evaluation
from harness.config import TrainConfig
from harness.data import mix_seed, seed_everything
from harness.errors import UserError
from harness.train import TrainRun


@dataclass(frozen=True)
class LinearRecipe:
    family: str  # the protocol column of the report (reports/data/paper_numbers.csv)
    batchnorm: bool  # BatchNorm1d(affine=False) before the linear layer
    bn_eps: float
    init: str  # "normal": N(0, 0.01); "trunc_normal": trunc_normal(std 0.01)
    optimizer: str
    blrs: tuple[float, ...]  # base lrs (lr = blr · batch/256); several = a sweep over heads
    batch_size: int
    epochs: int
    warmup_epochs: float
    schedule: str
    interpolation: str  # RandomResizedCrop interpolation
    source: str


RECIPES: dict[str, LinearRecipe] = {
    "dino": LinearRecipe(
        family="linear/dino", batchnorm=False, bn_eps=1e-5, init="normal", optimizer="sgd",
        # DINO's default 0.001 inside a dinov2-style sweep grid (dinov2 eval/linear.py sweeps 1e-5..0.1).
        blrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1), batch_size=1024, epochs=100, warmup_epochs=0,
        schedule="epoch_cosine", interpolation="bilinear",
        source="facebookresearch/dino eval_linear.py (LinearClassifier, SGD 0.9, wd 0, CosineAnnealingLR, "
               "100 ep, batch 1024); lr sweep as dinov2/eval/linear.py"),
    "mae": LinearRecipe(
        family="linear/mae-lars", batchnorm=True, bn_eps=1e-6, init="trunc_normal", optimizer="lars",
        blrs=(0.1,), batch_size=16384, epochs=90, warmup_epochs=10, schedule="half_cycle",
        interpolation="bicubic",
        source="facebookresearch/mae main_linprobe.py + util/lars.py + util/lr_sched.py; FINETUNE.md "
               "(blr 0.1, batch 16384, 90 ep, warm-up 10)"),
    "mocov3": LinearRecipe(
        family="linear/mocov3", batchnorm=True, bn_eps=1e-5, init="normal", optimizer="sgd",
        blrs=(0.1,), batch_size=4096, epochs=90, warmup_epochs=10, schedule="half_cycle",
        interpolation="bilinear",
        source="microsoft/ExtreMA main_lincls.py (MoCo v3 style: SyncBN(affine=False)+Linear, SGD 0.9, wd 0, "
               "lr 0.1·batch/256, batch 4096, 90 ep, warm-up 10, cosine)"),
}
MODES = ("full", "cached")


@dataclass(frozen=True)
class LinearConfig:
    recipe: str = "dino"
    mode: str = "full"  # "full": the recipe's augmentations on the fly; "cached": features once, no aug
    epochs: int | None = None  # None: the recipe's
    batch_size: int | None = None
    blrs: tuple[float, ...] | None = None  # base lrs to sweep; None: the recipe's
    warmup_epochs: float | None = None  # None: the recipe's, scaled with epochs when those are shortened
    heldout_fraction: float = 0.1  # of each train class, to pick the best lr when sweeping
    extract_batch_size: int = 256  # feature extraction (does not change the result)
    num_workers: int = 4
    ckpt_every_steps: int = 0
    log_every: int = 20
    headline = "top1"

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise UserError("linear.recipe", f"unknown recipe {self.recipe!r}", f"use one of: {', '.join(RECIPES)}")
        if self.mode not in MODES:
            raise UserError("linear.mode", f"unknown mode {self.mode!r}", f"use one of: {', '.join(MODES)}")
        if self.blrs is not None:
            object.__setattr__(self, "blrs", tuple(float(b) for b in self.blrs))
            if not self.blrs or any(b <= 0 for b in self.blrs):
                raise UserError("linear.blrs", f"must be positive numbers, got {list(self.blrs)}",
                                "e.g. blrs: [0.001, 0.01]")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise UserError(f"linear.{name}", f"must be a positive integer, got {value!r}", "fix the value")
        if not 0 < self.heldout_fraction < 1:
            raise UserError("linear.heldout_fraction", f"must be in (0, 1), got {self.heldout_fraction}",
                            "e.g. 0.1")

    @property
    def r(self) -> LinearRecipe:
        return RECIPES[self.recipe]

    def protocol(self) -> str:
        return self.r.family

    def resolved(self) -> dict[str, Any]:
        r = self.r
        epochs = self.epochs or r.epochs
        warmup = self.warmup_epochs if self.warmup_epochs is not None else r.warmup_epochs * epochs / r.epochs
        return {"epochs": epochs, "batch_size": self.batch_size or r.batch_size, "blrs": self.blrs or r.blrs,
                "warmup_epochs": warmup}

    def deviations(self) -> dict[str, list]:
        """Settings that differ from the recipe (the report's deviation column)."""
        r, ours = self.r, self.resolved()
        paper = {"epochs": r.epochs, "batch_size": r.batch_size, "blrs": r.blrs, "warmup_epochs": r.warmup_epochs}
        devs = {k: [paper[k], list(v) if isinstance(v, tuple) else v] for k, v in ours.items()
                if (list(v) if isinstance(v, tuple) else v) != (list(paper[k]) if isinstance(paper[k], tuple)
                                                                  else paper[k])}
        if self.mode != "full":
            devs["mode"] = ["full", self.mode]
        return devs


@dataclass(frozen=True)
class LinearMAEConfig(LinearConfig):
    recipe: str = "mae"


@dataclass(frozen=True)
class LinearMoCoV3Config(LinearConfig):
    recipe: str = "mocov3"


def make_head(dim: int, num_classes: int, recipe: LinearRecipe) -> nn.Module:
    linear = nn.Linear(dim, num_classes)
    if recipe.init == "normal":
        nn.init.normal_(linear.weight, mean=0.0, std=0.01)  # DINO LinearClassifier, MoCo v3 main_lincls
    else:
        nn.init.trunc_normal_(linear.weight, std=0.01)  # MAE main_linprobe (timm trunc_normal_, ±2 absolute)
    nn.init.zeros_(linear.bias)
    if not recipe.batchnorm:
        return linear
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=recipe.bn_eps), linear)


class LinearProbe(nn.Module):
    """Heads (one per lr) over one frozen feature pass; the loss is their sum, so each head's gradient
    is its own. ``featurize`` (frozen backbone → features) is not a submodule: checkpoints hold heads only."""

    def __init__(self, featurize, dim: int, num_classes: int, recipe: LinearRecipe, lrs: tuple[float, ...]) -> None:
        super().__init__()
        self.featurize = featurize
        self.heads = nn.ModuleList(make_head(dim, num_classes, recipe) for _ in lrs)
        self.lrs = lrs

    def logits(self, feats: torch.Tensor) -> list[torch.Tensor]:
        return [h(feats) for h in self.heads]

    def training_step(self, batch: Any, state: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        if self.featurize is not None:
            with torch.no_grad():
                x = self.featurize(x)
        losses = [F.cross_entropy(out.float(), y) for out in self.logits(x.float())]
        return {"loss": torch.stack(losses).sum()}

    def forward(self, batch: Any, state: Any) -> dict[str, torch.Tensor]:
        return self.training_step(batch, state)

    def after_step(self, state: Any) -> None:
        pass

    def on_before_optimizer_step(self, state: Any) -> None:
        pass

    def param_groups(self) -> list[dict[str, Any]]:
        # The loop's schedule runs at base 1; each head's group scales it to that head's lr. wd is 0 in
        # every recipe; LARS itself leaves 1-D tensors (bias) unscaled.
        return [{"params": list(h.parameters()), "lr_scale": lr, "apply_wd": False, "weight_decay": 0.0}
                for h, lr in zip(self.heads, self.lrs, strict=True)]


def train_transform(img_size: int, interpolation: str):
    interp = InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR
    return transforms.Compose([transforms.RandomResizedCrop(img_size, interpolation=interp),
                               transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@torch.no_grad()
def _scores(probe: LinearProbe, feats: torch.Tensor, labels: torch.Tensor) -> list[tuple[float, float]]:
    probe.eval()
    return [tuple(topk_accuracy(out.float(), labels)) for out in probe.logits(feats)]


def run_probe(inputs: EvalInputs, cfg: LinearConfig, train_indices: torch.Tensor | None = None,
              label: str = "linear") -> Metrics:
    """Train the probe (optionally on ``train_indices`` of train/ only: low-shot), pick the lr, score val."""
    r, res = cfg.r, cfg.resolved()
    spec = inputs.feature_spec
    pool, n_last = spec.linear, spec.linear_n_last_blocks
    tr_feats, tr_labels, tr_info = cached_features(inputs, "train", pool, n_last, cfg.extract_batch_size)
    va_feats, va_labels, _ = cached_features(inputs, "val", pool, n_last, cfg.extract_batch_size)
    pool_idx = torch.arange(len(tr_labels)) if train_indices is None else train_indices.cpu()
    lrs = tuple(b * res["batch_size"] / 256 for b in res["blrs"])
    sweep = len(lrs) > 1
    if sweep:
        fit_rel, held_rel = heldout_split(tr_labels.cpu()[pool_idx], cfg.heldout_fraction, mix_seed(inputs.seed, 7))
        fit_idx, held_idx = pool_idx[fit_rel], pool_idx[held_rel]
    else:
        fit_idx, held_idx = pool_idx, None
    num_classes = len(image_folder(inputs.data_root, "val").classes)
    seed_everything(mix_seed(inputs.seed, 0x11EA))  # same head init on every rank and every restart
    if cfg.mode == "cached":
        dataset = FeatureDataset(tr_feats[fit_idx.to(tr_feats.device)], tr_labels[fit_idx.to(tr_labels.device)])
        featurize, workers = None, 0
    else:
        folder = subset_folder(image_folder(inputs.data_root, "train"), fit_idx.tolist())
        dataset = LabelledAugmentDataset(folder, train_transform(inputs.img_size, r.interpolation), inputs.seed)
        backbone = inputs.backbone

        def featurize(x: torch.Tensor) -> torch.Tensor:
            return spec_features(backbone, x, pool, n_last)

        workers = cfg.num_workers
    probe = LinearProbe(featurize, tr_feats.shape[1], num_classes, r, lrs).to(inputs.device)
    if r.family == "linear/mocov3" and inputs.dist is not None and inputs.dist.world_size > 1:
        probe.heads = nn.SyncBatchNorm.convert_sync_batchnorm(probe.heads)
    train = TrainConfig(epochs=res["epochs"], batch_size=res["batch_size"], blr=1.0,
                        lr_batch_denom=res["batch_size"], warmup_epochs=res["warmup_epochs"],
                        lr_schedule=r.schedule, weight_decay=0.0, num_workers=workers,
                        ckpt_every_steps=cfg.ckpt_every_steps, log_every=cfg.log_every)
    run = TrainRun(inputs.spec, inputs.dist, train, probe, dataset, optimizer=r.optimizer, momentum=0.9, desc=label)
    result = run_to_end(inputs, run)
    if sweep:
        held = _scores(probe, tr_feats[held_idx.to(tr_feats.device)], tr_labels[held_idx.to(tr_labels.device)])
        best = max(range(len(lrs)), key=lambda i: (held[i][0], -i))
    else:
        held, best = None, 0
    val = _scores(probe, va_feats, va_labels)
    blr = res["blrs"][best]
    tag = f"{label}:{cfg.recipe}@lr{lrs[best]:.3g},n{n_last}" + (",cached" if cfg.mode == "cached" else "")
    extra = {
        "recipe": cfg.recipe, "recipe_source": r.source, "mode": cfg.mode, "pool": pool, "n_last_blocks": n_last,
        "chosen_lr": lrs[best], "chosen_blr": blr, "epochs": res["epochs"], "batch_size": res["batch_size"],
        "sweep": {f"{lr:.4g}": {"heldout_top1": h[0], "val_top1": v[0]}
                  for lr, h, v in zip(lrs, held or [(None, None)] * len(lrs), val, strict=True)} if sweep else None,
        "n_train": len(fit_idx), "n_heldout": 0 if held_idx is None else len(held_idx), "n_val": len(va_labels),
        "feature_dim": tr_feats.shape[1], "feature_cache": tr_info["cache"], "final_train_loss":
        result["final"].get("loss"), "img_per_s": result["img_per_s"], "resumed_from_step": result["resumed_from_step"],
        "config": dataclasses.asdict(cfg),
    }
    return Metrics(values={"top1": val[best][0], "top5": val[best][1]}, protocol=cfg.protocol(), headline="top1",
                   extra=extra, tag=tag)


@register_evaluation("linear", LinearConfig)
def run(inputs: EvalInputs, cfg: LinearConfig) -> Metrics:
    return run_probe(inputs, cfg)


@register_evaluation("linear_mae", LinearMAEConfig, resources="linear")
def run_mae(inputs: EvalInputs, cfg: LinearConfig) -> Metrics:
    return run_probe(inputs, cfg)


@register_evaluation("linear_mocov3", LinearMoCoV3Config, resources="linear")
def run_mocov3(inputs: EvalInputs, cfg: LinearConfig) -> Metrics:
    return run_probe(inputs, cfg)
