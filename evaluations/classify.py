"""What the training evaluations (linear probes, fine-tuning, low-shot) share: labelled datasets for the
generic loop, subsets, top-k accuracy, and running a ``TrainRun`` to its end under the stage's checkpoint."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torchvision.datasets import ImageFolder

from harness.api import EvalInputs
from harness.data import SeededAugmentDataset
from harness.stages import write_progress
from harness.train import TrainRun


class LabelledAugmentDataset(SeededAugmentDataset):
    """``SeededAugmentDataset`` whose batch carries the label, so a supervised step sees ``(images, labels)``."""

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int]:
        x, y = super().__getitem__(key)
        return (x, y), y


class FeatureDataset(torch.utils.data.Dataset):
    """Cached features as a dataset for the generic loop (keys ``(index, epoch)``; no augmentation)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features, self.labels = features.cpu(), labels.cpu()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int]:
        i = key[0]
        return (self.features[i], self.labels[i]), self.labels[i]


def subset_folder(folder: ImageFolder, indices: Sequence[int]) -> ImageFolder:
    """The same ImageFolder (classes, loader, transform) restricted to ``indices``, in that order."""
    sub = copy.copy(folder)
    sub.samples = [folder.samples[i] for i in indices]
    sub.imgs = sub.samples
    sub.targets = [s[1] for s in sub.samples]
    return sub


def heldout_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices): ``fraction`` of each class (at least one image) held out, drawn
    with a fixed generator so every rank and every restart makes the same split."""
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    train, held = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = max(1, int(round(fraction * len(idx)))) if len(idx) > 1 else 0
        held.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Percent of rows whose label is among the top-k logits (k clamped to the number of classes)."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices.eq(labels[:, None])
    return [100.0 * top[:, : min(k, k_max)].any(dim=1).float().mean().item() for k in ks]


def run_to_end(inputs: EvalInputs, run: TrainRun) -> dict[str, Any]:
    """Train under the stage's checkpoint: a preemption saves ``run`` and the requeued job resumes it.
    Rank 0 reports progress to the stage folder (``repro status``), as pre-training does."""
    main = inputs.dist is None or inputs.dist.is_main
    progress = (lambda s, n, info: write_progress(run.stage_dir, s, n, info)) if main else None
    inputs.track(run)
    try:
        return run.run(on_progress=progress)
    finally:
        inputs.track(None)
