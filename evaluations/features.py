"""Frozen-backbone features for the evaluations: eval transform, ImageFolder data, pooling, extraction."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from harness.atomic import write_atomic
from harness.data import image_folder

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
    return pool_tokens(model, out, pool)


def pool_tokens(model: nn.Module, out: torch.Tensor, pool: str) -> torch.Tensor:
    """``pool_features`` on an already computed ``forward_features`` output (B, N, C), (B, H, W, C) or
    (B, C, H, W); an output that is already one vector per image (B, C) is returned as it is."""
    if out.ndim == 2:
        return out
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


def spec_features(model: nn.Module, x: torch.Tensor, pool: str, n_last_blocks: int = 1) -> torch.Tensor:
    """The feature a ``FeatureSpec`` entry names: ``pool`` of the last block, or with ``n_last_blocks`` > 1
    the protocol of DINO/iBOT ``eval_linear.py``: the final-norm CLS of each of the last n blocks
    concatenated ("cls"), plus the last block's mean patch token ("cls+avg"); for Swin, EsViT's
    average-pooled last-n-block outputs (``methods.swin.last_blocks_features``)."""
    if n_last_blocks <= 1:
        return pool_features(model, x, pool)
    if hasattr(model, "layers") and hasattr(model, "patch_embed") and not hasattr(model, "blocks"):
        from methods.swin import last_blocks_features  # timm Swin

        return last_blocks_features(model, x, n_last_blocks)
    # timm ViT: the last n blocks' tokens, each through the final norm (DINO get_intermediate_layers).
    inter = model.forward_intermediates(x, indices=n_last_blocks, norm=True, return_prefix_tokens=True,
                                        output_fmt="NLC", intermediates_only=True)
    if pool not in ("cls", "cls+avg") or not inter or inter[0][1].shape[1] == 0:
        raise ValueError(f"n_last_blocks={n_last_blocks} needs pool 'cls' or 'cls+avg' on a model with a "
                         f"CLS token, got pool {pool!r} on {type(model).__name__}")
    feats = [prefix[:, 0] for _, prefix in inter]
    if pool == "cls+avg":
        feats.append(inter[-1][0].mean(dim=1))
    return torch.cat(feats, dim=-1)


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    loader: Iterable,
    pool: str,
    device: torch.device | str,
    amp: bool = True,
    n_last_blocks: int = 1,
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
            features.append(spec_features(model, images, pool, n_last_blocks).float())
        labels.append(targets.to(device, non_blocking=True))
    if not features:
        raise ValueError("extract_features: the loader yielded no batches")
    return torch.cat(features), torch.cat(labels)


def feature_cache_key(export_sha256: str, data_root: str | Path, split: str, transform: str, pool: str,
                      n_last_blocks: int) -> str:
    """What a cached feature file depends on: (export, dataset, split, transform, pooling)."""
    blob = json.dumps({"export": export_sha256, "data": str(Path(data_root).resolve()), "split": split,
                       "transform": transform, "pool": pool, "n": n_last_blocks}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_features(inputs: Any, split: str, pool: str, n_last_blocks: int = 1, batch_size: int = 256
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Features of ``split`` through the eval transform, from ``inputs.cache_dir`` when an earlier
    evaluation of the same export (k-NN, a cached linear probe) already made them. Rank 0 extracts and
    writes atomically; the other ranks wait and read. Returns (features, labels, info) on the device."""
    transform_name = f"eval{inputs.img_size}"
    key = feature_cache_key(inputs.export_sha256, inputs.data_root, split, transform_name, pool, n_last_blocks)
    dataset = image_folder(inputs.data_root, split, eval_transform(inputs.img_size))
    path = Path(inputs.cache_dir) / f"{split}-{key}.pt" if inputs.cache_dir else None
    main = inputs.dist is None or inputs.dist.is_main
    info = {"cache": str(path) if path else None, "cache_hit": bool(path and path.exists()), "n": len(dataset)}
    if path is not None and not path.exists() and main:
        t0 = time.perf_counter()
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=inputs.num_workers,
                            pin_memory=inputs.device.type == "cuda")
        feats, labels = extract_features(inputs.backbone, loader, pool, inputs.device, n_last_blocks=n_last_blocks)
        info["extract_img_per_s"] = len(dataset) / max(time.perf_counter() - t0, 1e-9)
        blob = {"features": feats.cpu(), "labels": labels.cpu(), "classes": dataset.classes, "key": key}
        write_atomic(path, lambda f: torch.save(blob, f))
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
    if path is None:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=inputs.num_workers)
        feats, labels = extract_features(inputs.backbone, loader, pool, inputs.device, n_last_blocks=n_last_blocks)
        return feats, labels, info
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if len(blob["labels"]) != len(dataset) or blob["classes"] != dataset.classes:
        raise ValueError(f"feature cache {path} does not match {inputs.data_root}/{split}; delete it")
    return blob["features"].to(inputs.device), blob["labels"].to(inputs.device), info
