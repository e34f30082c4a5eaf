"""Pieces of the student/teacher family (DINO, iBOT, EsViT, ExtreMA): the momentum-teacher base class
(teacher copy and freeze, EMA step, last-layer freeze, teacher export), centering, the teacher
temperature schedule, and the sharpened teacher targets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from harness.api import Method, StepState
from harness.distributed import all_reduce_mean
from harness.errors import UserError
from methods.heads import cancel_last_layer_grads


@dataclass(frozen=True, kw_only=True)
class MultiCropDistillationConfig:
    """Settings DINO and EsViT share (defaults: facebookresearch/dino main_dino.py argparse). Each method's
    config extends it with its backbone fields; presets cite the source of every value they set."""

    local_size: int = 96
    local_crops_number: int = 8
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    color_jitter_prob: float = 0.8  # DataAugmentationDINO: RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8)
    solarize_prob: float = 0.2  # DataAugmentationDINO: utils.Solarization(0.2) on the second global crop
    drop_path_rate: float = 0.1  # student only
    out_dim: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    norm_last_layer: bool = True
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    freeze_last_layer: int = 1  # epochs


def check_multicrop_distillation(cfg, method: str) -> None:
    """Checks shared by the DINO-family configs: crops tile into patches, positive temperatures,
    a center momentum in [0, 1). One-line errors naming the override to fix."""
    for name in ("img_size", "local_size"):
        if getattr(cfg, name) % cfg.patch_size:
            raise UserError(f"overrides.{name}", f"{getattr(cfg, name)} is not a multiple of patch_size "
                            f"{cfg.patch_size}", "pick crop sizes that tile into patches")
    if cfg.local_crops_number < 0:
        raise UserError("overrides.local_crops_number", f"must be >= 0, got {cfg.local_crops_number}",
                        "use 0 to disable multi-crop")
    for name in ("teacher_temp", "warmup_teacher_temp", "student_temp"):
        if not getattr(cfg, name) > 0:
            raise UserError(f"overrides.{name}", f"must be positive, got {getattr(cfg, name)}",
                            f"{method} uses 0.04-0.07 for the teacher and 0.1 for the student")
    for name in ("color_jitter_prob", "solarize_prob"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise UserError(f"overrides.{name}", f"must be a probability in [0, 1], got {getattr(cfg, name)}",
                            f"{method} uses 0.8 (colour jitter) and 0.2 (solarize)")
    if not 0.0 <= cfg.center_momentum < 1.0:
        raise UserError("overrides.center_momentum", f"must be in [0, 1), got {cfg.center_momentum}",
                        f"{method} uses 0.9")


def frozen_copy(teacher: nn.Module, student: nn.Module, strict: bool = True) -> nn.Module:
    """The momentum teacher at initialisation: ``teacher`` (built like the student, without drop-path) gets
    the student's weights and never receives gradients. ``strict=False`` when the student has extra parts
    the teacher lacks (iBOT's [MASK] embedding)."""
    teacher.load_state_dict(student.state_dict(), strict=strict)
    teacher.requires_grad_(False)
    return teacher


class MomentumTeacherMethod(Method):
    """A student trained by gradient and a frozen teacher that follows it by EMA.

    Subclasses build ``self.student`` and pass a teacher built like it (without drop-path) to
    ``init_teacher``. After each optimiser step the teacher moves towards the student with the step's
    momentum, unless ``ema_after_step`` is False (ExtreMA calls ``ema_step`` inside its step, before the
    teacher's forward). A config with ``freeze_last_layer`` (epochs) keeps the student's ``last_layer``
    gradients at None that long. Exports read ``teacher_backbone()``.
    """

    ema_after_step: ClassVar[bool] = True

    def init_teacher(self, teacher: nn.Module, strict: bool = True) -> None:
        self.teacher = frozen_copy(teacher, self.student, strict)

    @torch.no_grad()
    def ema_step(self, state: StepState) -> None:
        ema_update(self.teacher, self.student, state.momentum)

    def on_before_optimizer_step(self, state: StepState) -> None:
        freeze_epochs = getattr(self.cfg, "freeze_last_layer", 0)
        if freeze_epochs:
            cancel_last_layer_grads(self.student, state.epoch, freeze_epochs)

    @torch.no_grad()
    def after_step(self, state: StepState) -> None:
        if self.ema_after_step:
            self.ema_step(state)

    def curve_scalars(self, state: StepState) -> dict[str, float]:
        return {"teacher/momentum": state.momentum}

    def teacher_backbone(self) -> nn.Module:
        return self.teacher.backbone

    def health_outputs(self, images: torch.Tensor, embed, epoch: int) -> dict[str, torch.Tensor]:
        """The k-NN embedding, plus the teacher's targets and the student's log-probabilities on the same
        (un-augmented) images, with the loss's center and temperatures at ``epoch``."""
        out = super().health_outputs(images, embed, epoch)
        logits = self.distillation_logits(images)
        if logits is not None:
            (teacher, student), loss = logits, self.distillation_loss()
            out["teacher_probs"] = sharpen(teacher.float(), loss.center.center, self.distillation_temperature(epoch))
            out["student_log_probs"] = F.log_softmax(student.float() / loss.student_temp, dim=-1)
        return out

    def distillation_loss(self) -> nn.Module:
        """The loss holding ``center``, ``student_temp`` and the per-epoch teacher temperatures."""
        return self.loss

    def distillation_temperature(self, epoch: int) -> float:
        return float(self.distillation_loss().teacher_temps[epoch])

    def distillation_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(teacher, student) view-level head outputs for ``images`` (one crop each), or None for a method
        without a softmax head (ExtreMA). Networks called on a list of crops (DINO, EsViT) work as they are."""
        if not hasattr(self, "loss") or not hasattr(self.loss, "center"):
            return None
        teacher, student = (net([images]) for net in (self.teacher, self.student))
        # EsViT's networks return ViewOutputs (view- and region-level), DINO's the view logits
        return tuple(out if isinstance(out, torch.Tensor) else out.view for out in (teacher, student))

    def teacher_backbone_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.teacher_backbone().state_dict().items()}


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, over parameters both have (iBOT ``names_common``)."""
    student_params = dict(student.named_parameters())
    pairs = [(t, student_params[n]) for n, t in teacher.named_parameters() if n in student_params]
    t_params = [t.data for t, _ in pairs]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, [s.detach().data for _, s in pairs], alpha=1.0 - momentum)


class Center(nn.Module):
    """Running mean of the teacher's outputs (DINO ``update_center``), all-reduced across processes.

    ``update(rows)`` takes the rows to average (batch x K); callers pass what the official code sums.
    The buffer is saved in checkpoints and is identical on every rank.
    """

    def __init__(self, shape: tuple[int, ...], momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(*shape))

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        # In the center's dtype (float32 in training, bf16 rows are upcast; float64 in golden tests).
        batch_center = all_reduce_mean(rows.to(self.center.dtype).mean(dim=0).reshape(self.center.shape))
        self.center.mul_(self.momentum).add_(batch_center, alpha=1.0 - self.momentum)


def teacher_temperature_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int,
                                 hold_epochs: int = 0) -> np.ndarray:
    """Per-epoch teacher temperature: held at ``warmup_temp`` for ``hold_epochs`` (iBOT's
    mim_start_epoch shift), then ``np.linspace(warmup_temp, temp, warmup_epochs)`` (endpoint
    included, as in the official code, so ``temp`` is reached at epoch warmup_epochs-1), then ``temp``."""
    parts = [np.full(hold_epochs, warmup_temp), np.linspace(warmup_temp, temp, warmup_epochs),
             np.full(epochs - warmup_epochs - hold_epochs, temp)]
    return np.concatenate(parts)


def sharpen(teacher_logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher targets: softmax((t - center) / temperature), no gradient."""
    return F.softmax((teacher_logits.detach() - center) / temperature, dim=-1)
