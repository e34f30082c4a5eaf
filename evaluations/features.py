"""Frozen-backbone features for the evaluations: eval transform, ImageFolder data, pooling, extraction."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from harness.data import image_folder  # noqa: F401  (re-exported for evaluations)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOLS = ("cls", "avg", "cls+avg", "avg_norm")

def eval_transform(img_size: int) -> Callable:
    """DINO/MAE evaluation transform: Resize(img_size·256/224, bicubic) → CenterCrop → ImageNet norm."""
    return transforms.Compose(
        [
            transforms.Resize(int(round(img_size * 256 / 224)), interpolation=InterpolationMode.BICUBIC),
            transforms.CenterCrop(img_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def pool_features(model: nn.Module, x: torch.Tensor, pool: str) -> torch.Tensor:
    """One feature vector per image from ``model.forward_features`` (final-norm tokens in timm).

    Token models (B, N, C), prefix tokens first (timm ViT: CLS, then registers): "cls" = token 0,
    "avg" = mean of the patch tokens, "cls+avg" = both concatenated (DINO's order), "avg_norm" = "avg"
    followed by the model's ``fc_norm`` (timm/MAE global-pool models keep their final norm there).
    Feature-map models (timm Swin: NHWC; CNNs: NCHW) have no CLS: "avg" is the mean over positions.
    """
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; choose one of {POOLS}")
    out = model.forward_features(x)
    cls = None
    if out.ndim == 3:
        has_cls = getattr(model, "cls_token", None) is not None
        n_prefix = getattr(model, "num_prefix_tokens", int(has_cls))
        avg = out[:, n_prefix:].mean(dim=1)
        if has_cls:
            cls = out[:, 0]
    elif out.ndim == 4:
        channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"
        avg = out.mean(dim=(1, 2) if channels_last else (2, 3))
    else:
        raise ValueError(f"forward_features of {type(model).__name__} returned shape {tuple(out.shape)}")

    if pool in ("cls", "cls+avg") and cls is None:
        raise ValueError(f"pool {pool!r} needs a CLS token, {type(model).__name__} has none; use 'avg'")
    if pool == "cls":
        return cls
    if pool == "cls+avg":
        return torch.cat([cls, avg], dim=-1)
    if pool == "avg_norm":
        return getattr(model, "fc_norm", nn.Identity())(avg)
    return avg


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    loader: Iterable,
    pool: str,
    device: torch.device | str,
    amp: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (float32) and labels of every batch of ``loader``, both left on ``device``.

    bf16 autocast on CUDA (``amp``); the official DINO script runs fp32, which differs in the last
    digits of the features. Nothing is copied back to the host, so batches queue without syncs.
    """
    device = torch.device(device)
    features, labels = [], []
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            features.append(pool_features(model, images, pool).float())
        labels.append(targets.to(device, non_blocking=True))
    if not features:
        raise ValueError("extract_features: the loader yielded no batches")
    return torch.cat(features), torch.cat(labels)
