"""Weighted k-NN on frozen features: the protocol of DINO's ``eval_knn.py`` (Caron et al., 2021).

Features are L2-normalised; each test image votes with its k most cosine-similar training images,
each neighbour weighted exp(sim / T); the class with the largest summed weight is the prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from evaluations.features import cached_features, image_folder
from harness.api import EvalInputs, Metrics, register_evaluation
from harness.errors import UserError

# Elements of one chunk's test x train similarity matrix (512 MiB in float32) when chunk_size is None.
_CHUNK_ELEMENTS = 1 << 27


def headline_k(ks: Sequence[int]) -> int:
    """DINO reports k = 20 ("usually working the best"); without it, the first k asked for."""
    return 20 if 20 in ks else ks[0]


@torch.inference_mode()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Top-1/top-5 accuracy (percent) of DINO's weighted k-NN for every k in ``ks``.

    Runs on the device of ``train_features``. Keys: ``top1@k{k}``, ``top5@k{k}`` and ``top1``/``top5``
    (the values at ``headline_k(ks)``). A k above the number of training samples is clamped to it.
    ``chunk_size`` test rows are scored at a time (default: as many as fit ~2^27 similarities).
    """
    if not ks:
        raise ValueError("knn_classify: ks is empty")
    device = train_features.device
    # At least float32 (bf16 features would round the similarities); float64 inputs stay float64.
    dtype = torch.promote_types(train_features.dtype, torch.float32)
    train = F.normalize(train_features.to(dtype), dim=1)
    test = F.normalize(test_features.to(device, dtype), dim=1)
    train_labels = train_labels.to(device).long()
    test_labels = test_labels.to(device).long()
    n_train, n_test = train.shape[0], test.shape[0]
    if num_classes is None:
        num_classes = int(torch.maximum(train_labels.max(), test_labels.max())) + 1
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(n_train, 1))

    eff_ks = [min(k, n_train) for k in ks]
    k_max = max(eff_ks)
    # correct[i] = (top-1 hits, top-5 hits) at ks[i]; summed on the device, read once at the end.
    correct = torch.zeros(len(ks), 2, dtype=torch.long, device=device)
    for start in range(0, n_test, chunk_size):
        feats = test[start : start + chunk_size]
        targets = test_labels[start : start + chunk_size, None]
        # topk is sorted, so the neighbours of every smaller k are a prefix of the k_max ones.
        sims, idx = (feats @ train.T).topk(k_max, dim=1, largest=True, sorted=True)
        neighbour_labels = train_labels[idx]
        weights = (sims / temperature).exp()
        for i, k in enumerate(eff_ks):
            scores = torch.zeros(feats.shape[0], num_classes, device=device, dtype=weights.dtype)
            scores.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
            # Classes without a neighbour tie at 0 and can fill top-5 ranks. DINO's unstable sort orders
            # them by implementation (its small-row CPU result equals this stable one, see the golden
            # fixture); a stable sort makes that order the same on every device: lower class index first.
            ranked = scores.sort(dim=1, descending=True, stable=True).indices
            hits = ranked.eq(targets)
            correct[i, 0] += hits[:, 0].sum()
            # DINO commit 5783b4b: only k classes can get votes, so top-5 looks at min(5, k) ranks.
            correct[i, 1] += hits[:, : min(5, k)].sum()

    counts = correct.tolist()
    values: dict[str, float] = {}
    for k, (top1, top5) in zip(ks, counts, strict=True):
        values[f"top1@k{k}"] = 100.0 * top1 / n_test
        values[f"top5@k{k}"] = 100.0 * top5 / n_test
    values["top1"] = values[f"top1@k{headline_k(ks)}"]
    values["top5"] = values[f"top5@k{headline_k(ks)}"]
    return values


@dataclass(frozen=True)
class KNNConfig:
    ks: tuple[int, ...] = (10, 20, 100, 200)  # DINO eval_knn.py --nb_knn
    temperature: float = 0.07  # DINO eval_knn.py --temperature
    batch_size: int = 256  # images per feature-extraction batch (does not change the result)
    headline = "top1"

    def protocol(self) -> str:
        return f"knn@k{headline_k(self.ks)},T{self.temperature:g}"

    def __post_init__(self) -> None:
        # Configs arrive from YAML as lists; a tuple keeps the frozen config hashable.
        object.__setattr__(self, "ks", tuple(self.ks))
        if not self.ks or any(not isinstance(k, int) or isinstance(k, bool) or k <= 0 for k in self.ks):
            raise UserError(
                "knn.ks",
                f"must be a non-empty list of positive integers, got {list(self.ks)}",
                "fix it, e.g. knn.ks=[10,20,100,200]",
            )
        if not self.temperature > 0:
            raise UserError(
                "knn.temperature",
                f"must be positive, got {self.temperature}",
                "fix it, e.g. knn.temperature=0.07",
            )
        if self.batch_size <= 0:
            raise UserError(
                "knn.batch_size",
                f"must be positive, got {self.batch_size}",
                "fix it, e.g. knn.batch_size=256",
            )


@register_evaluation("knn", KNNConfig, resources="eval")
def run(inputs: EvalInputs, cfg: KNNConfig) -> Metrics:
    """DINO weighted k-NN: train/ and val/ through the same eval transform, features per FeatureSpec.knn
    (from the export's feature cache when another evaluation already extracted them)."""
    train_set = image_folder(inputs.data_root, "train")
    val_set = image_folder(inputs.data_root, "val")
    # ImageFolder numbers classes by sorted folder name, so both splits must hold the same names.
    if train_set.classes != val_set.classes:
        raise UserError(
            "data.root",
            f"train/ and val/ of {inputs.data_root} hold different class folders "
            f"({len(train_set.classes)} vs {len(val_set.classes)})",
            "give both splits the same class folders",
        )
    pool = inputs.feature_spec.knn
    train_features, train_labels, train_info = cached_features(inputs, "train", pool, batch_size=cfg.batch_size)
    val_features, val_labels, _ = cached_features(inputs, "val", pool, batch_size=cfg.batch_size)
    values = knn_classify(
        train_features,
        train_labels,
        val_features,
        val_labels,
        ks=cfg.ks,
        temperature=cfg.temperature,
        num_classes=len(train_set.classes),
    )
    return Metrics(
        values=values,
        protocol=cfg.protocol(),
        headline=cfg.headline,
        extra={
            "n_train": len(train_set),
            "n_val": len(val_set),
            "feature_dim": train_features.shape[1],
            "pool": pool,
            "ks_effective": [min(k, len(train_set)) for k in cfg.ks],
            "feature_cache": train_info["cache"],
        },
    )
