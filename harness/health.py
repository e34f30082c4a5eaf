"""Representation health during pre-training: cheap signs that a run is learning or collapsing.

Pure functions on one fixed batch of outputs (embeddings; for student/teacher methods, the teacher's
target distribution and the student's log-probabilities), the thresholds that call a value a collapse,
and the fixed held-out batch they are measured on. The loop (harness/train.py) measures them at every
epoch end, under no_grad in eval mode, through ``Method.health_outputs``; they go to metrics.jsonl
(``health/<name>``), TensorBoard and the pre-training record (``health``, ``collapse``).

- ``rankme``: RankMe (Garrido et al., ICML 2023, eq. 1): exp of the entropy of the singular values of the
  embedding matrix normalised to sum 1 (+ eps 1e-7). 1 for a constant embedding, at most min(N, d).
- ``feature_std``: the mean over dimensions of the per-dimension std of the L2-normalised embeddings
  (SimSiam, Chen & He, CVPR 2021, sec. 4.1); ~1/sqrt(d) when healthy, 0 when collapsed.
  ``std_sqrt_d`` is it times sqrt(d), so ~1 healthy whatever the width.
- ``teacher_entropy`` (nats) and ``teacher_entropy_ratio`` (/ log K): the mean entropy of the teacher's
  centred, sharpened targets. DINO's collapse is a uniform target (ratio 1); the other mode is one
  dimension dominating (ratio near 0 and the same argmax for every image: ``teacher_argmax_share`` 1).
- ``teacher_kl``: mean KL(teacher || student) in nats (DINO sec. 5.3: 0 when both collapse).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch.nn import functional as F

from harness.errors import UserError

RANKME_EPS = 1e-7  # Garrido et al.: p_k = sigma_k / ||sigma||_1 + eps
PREFIX = "health/"  # the metrics.jsonl keys of these values


def rankme(embeddings: torch.Tensor, eps: float = RANKME_EPS) -> float:
    """exp(-sum_k p_k log p_k), p_k = sigma_k / ||sigma||_1 + eps, over the singular values of (N, d)."""
    s = torch.linalg.svdvals(embeddings.double())
    p = s / s.sum().clamp_min(torch.finfo(torch.float64).tiny) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def feature_std(embeddings: torch.Tensor) -> float:
    """Mean per-dimension std of the L2-normalised rows (SimSiam's collapse indicator)."""
    z = F.normalize(embeddings.double(), dim=1)
    return float(z.std(dim=0).mean())


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-row entropy in nats of (N, K) probabilities (0 log 0 = 0)."""
    p = probs.double()
    return -(p * p.clamp_min(1e-300).log()).sum(dim=-1)


def kl_divergence(probs: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || q) in nats, with q given as log-probabilities."""
    p = probs.double()
    return (p * (p.clamp_min(1e-300).log() - log_q.double())).sum(dim=-1)


def argmax_share(probs: torch.Tensor) -> float:
    """The fraction of rows whose argmax is the most common one (1: every image gets the same target)."""
    counts = torch.bincount(probs.argmax(dim=-1), minlength=probs.shape[-1])
    return float(counts.max()) / probs.shape[0]


def health_values(outputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """``outputs``: "embedding" (N, d); optionally "teacher_probs" (N, K) and "student_log_probs" (N, K)."""
    emb = outputs["embedding"].detach().flatten(1).float()
    std = feature_std(emb)
    values = {"rankme": rankme(emb), "feature_std": std, "std_sqrt_d": std * math.sqrt(emb.shape[1])}
    probs = outputs.get("teacher_probs")
    if probs is not None:
        h = entropy(probs).mean()
        values.update(teacher_entropy=float(h), teacher_entropy_ratio=float(h) / math.log(probs.shape[-1]),
                      teacher_argmax_share=argmax_share(probs))
        if outputs.get("student_log_probs") is not None:
            values["teacher_kl"] = float(kl_divergence(probs, outputs["student_log_probs"]).mean())
    return values


@dataclass(frozen=True)
class HealthConfig:
    """An experiment's ``health:`` block. Monitoring only: not part of a cell's identity.

    A value is a collapse when ``rankme < min_rankme``, ``std_sqrt_d < min_std_sqrt_d``, the teacher's
    ``entropy / log K > max_teacher_entropy_ratio`` (uniform targets), or its ratio is below
    ``min_teacher_entropy_ratio`` with ``teacher_argmax_share >= one_hot_share`` (one dimension wins)."""

    enabled: bool = True
    # The fixed held-out batch (val split of the pre-training data, else train). 128 keeps a pass at ~2 % of a
    # tiny-preset epoch on a CPU (three forwards for DINO-like methods: export, teacher, student).
    images: int = 128
    stop_on_collapse: bool = False
    # Complete collapse gives rankme 1 and std 0. Healthy tiny runs sit far above the thresholds (MAE tiny on
    # the digits ends at rankme 7.1, std_sqrt_d 0.18), but some random inits start low (a tiny BEiT: rankme ~3),
    # so the thresholds sit close to the collapse rather than near the healthy values.
    min_rankme: float = 1.2
    min_std_sqrt_d: float = 0.02
    max_teacher_entropy_ratio: float = 0.98
    min_teacher_entropy_ratio: float = 0.02
    one_hot_share: float = 0.95

    @classmethod
    def from_spec(cls, raw: Any, where: str) -> HealthConfig:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise UserError(where, f"must be a mapping, got {raw!r}", "e.g. health: {stop_on_collapse: true}")
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in raw.items():
            if key not in known:
                raise UserError(f"{where}.{key}", "unknown setting", f"use: {', '.join(sorted(known))}")
            default = getattr(cls, key)
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            else:
                ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
            if not ok:
                kind = "true or false" if isinstance(default, bool) else "a positive number"
                raise UserError(f"{where}.{key}", f"expects {kind}, got {value!r}", f"the default is {default!r}")
            values[key] = float(value) if isinstance(default, float) else value
        return cls(**values)


def find_collapse(values: dict[str, float], cfg: HealthConfig, epoch: int) -> dict[str, Any] | None:
    """The first collapsed metric of one measurement: {"metric", "value", "threshold", "epoch", "why"}."""

    def hit(metric: str, threshold: float, why: str) -> dict[str, Any]:
        return {"metric": metric, "value": values[metric], "threshold": threshold, "epoch": epoch, "why": why}

    if values.get("rankme", math.inf) < cfg.min_rankme:
        return hit("rankme", cfg.min_rankme, "effective rank below the threshold (embeddings on a line)")
    if values.get("std_sqrt_d", math.inf) < cfg.min_std_sqrt_d:
        return hit("std_sqrt_d", cfg.min_std_sqrt_d, "normalised embeddings barely vary (constant output)")
    ratio = values.get("teacher_entropy_ratio")
    if ratio is not None and ratio > cfg.max_teacher_entropy_ratio:
        return hit("teacher_entropy_ratio", cfg.max_teacher_entropy_ratio, "uniform teacher output (entropy at log K)")
    if (ratio is not None and ratio < cfg.min_teacher_entropy_ratio
            and values.get("teacher_argmax_share", 0.0) >= cfg.one_hot_share):
        return hit("teacher_entropy_ratio", cfg.min_teacher_entropy_ratio,
                   "one-hot teacher output (one dimension for every image)")
    return None


def describe_collapse(collapse: dict[str, Any]) -> str:
    """One line: ``collapse at epoch 3: teacher_entropy_ratio 0.9993 > 0.98 (uniform teacher output ...)``."""
    op = ">" if collapse["why"].startswith("uniform") else "<"
    return (f"collapse at epoch {collapse['epoch']}: {collapse['metric']} {collapse['value']:.4g} {op} "
            f"{collapse['threshold']:.4g} ({collapse['why']})")


class CollapseError(RuntimeError):
    """``health.stop_on_collapse``: the run stopped at an epoch end; its checkpoint of that epoch is kept."""

    def __init__(self, collapse: dict[str, Any], health: dict[str, float]) -> None:
        self.collapse, self.health = collapse, health
        super().__init__(f"{describe_collapse(collapse)}; stopped (health.stop_on_collapse)")


def strip(entry: dict[str, Any]) -> dict[str, float]:
    """The health values of a metrics.jsonl entry, without their prefix."""
    return {k[len(PREFIX):]: v for k, v in entry.items() if k.startswith(PREFIX)}


def from_log(entries: list[dict[str, Any]], cfg: HealthConfig) -> tuple[dict[str, float], dict[str, Any] | None]:
    """A pre-training's last health values and the collapse of its last measurement (None: healthy), from
    its metrics.jsonl entries (so a resumed run reports what the whole run measured)."""
    measured = [e for e in entries if any(k.startswith(PREFIX) for k in e)]
    if not measured:
        return {}, None
    last = measured[-1]
    values = strip(last)
    return values, find_collapse(values, cfg, int(round(last.get("epoch", 0))))


def held_out_batch(data_root: str, img_size: int, images: int) -> torch.Tensor:
    """Up to ``images`` images, spread evenly over the sorted file list (so every class shows up), of the
    pre-training data's ``val`` split (else ``train``), through the evaluation transform: no augmentation,
    the same images at every epoch."""
    from pathlib import Path

    from evaluations.features import eval_transform
    from harness.data import image_folder

    split = "val" if (Path(data_root) / "val").is_dir() else "train"
    folder = image_folder(data_root, split, eval_transform(img_size))
    n = min(images, len(folder))
    picks = torch.linspace(0, len(folder) - 1, n).round().long().unique().tolist()
    return torch.stack([folder[i][0] for i in picks])


class HealthMonitor:
    """Measures a method's health on a fixed held-out batch: ``measure(model, epoch) -> values``. The default
    embedding is the one k-NN reads: the method's export, loaded into one timm model kept for the run."""

    def __init__(self, model: Any, cfg: HealthConfig, data_root: str, device: torch.device,
                 chunk: int = 64) -> None:
        from harness.export import build_timm, registering_module

        exported = model.export_backbone()
        self.cfg, self.device, self.chunk = cfg, device, chunk
        self.pool = exported.feature_spec.knn
        self.backbone = build_timm(exported.timm_name, exported.timm_kwargs,
                                   registering_module(exported.timm_name)).to(device).eval()
        self.images = held_out_batch(data_root, int(exported.timm_kwargs.get("img_size", 224)), cfg.images)

    def embed(self, model: Any, images: torch.Tensor) -> torch.Tensor:
        from evaluations.features import spec_features

        self.backbone.load_state_dict(model.export_backbone().state_dict, strict=True)
        return spec_features(self.backbone, images, self.pool).float()

    @torch.no_grad()
    def measure(self, model: Any, epoch: int) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            images = self.images.to(self.device)
            outputs = model.health_outputs(images, lambda x: self.embed(model, x), epoch)
        finally:
            model.train(was_training)
        return health_values(outputs)
