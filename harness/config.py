"""Typed configs: the generic loop's ``TrainConfig`` and the resolution of preset + overrides.

A cell's full configuration is ``TrainConfig`` (shared by every method) plus the method's own
dataclass. Both are filled from a preset, then from the user's overrides; an override naming a
setting that neither has is a one-line error.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal

from harness.errors import UserError


@dataclass(frozen=True)
class TrainConfig:
    """The generic pre-training loop's settings (per-iteration schedules, optimiser, checkpoints)."""

    epochs: int
    batch_size: int  # total over all processes
    blr: float  # base learning rate; lr = blr * batch_size / lr_batch_denom
    lr_batch_denom: int = 256
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    warmup_lr: float = 0.0  # lr at the first warm-up step
    lr_schedule: Literal["cosine", "half_cycle"] = "cosine"  # DINO cosine_scheduler | MAE lr_sched
    weight_decay: float = 0.05
    weight_decay_end: float | None = None  # None: constant; else cosine from weight_decay (DINO)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float | None = None
    clip_mode: Literal["global", "per_param"] = "global"
    momentum_teacher: float = 0.996  # EMA momentum start (cosine to momentum_teacher_end per iteration)
    momentum_teacher_end: float = 1.0
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU (fp16 too)
    num_workers: int = 4
    ckpt_every_steps: int = 0  # 0: only at the end of each epoch (and on preemption)
    log_every: int = 20
    max_steps: int = 0  # >0 stops after this many steps (debugging, tests); the schedule is unchanged
    bad_images: Literal["fail", "skip"] = "fail"  # unreadable images: stop the job, or leave them out and count

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "lr_batch_denom", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"overrides.{name}", f"must be positive, got {getattr(self, name)}",
                                f"set {name} to a value > 0")
        nonneg = ("blr", "min_lr", "warmup_epochs", "warmup_lr", "weight_decay", "num_workers",
                  "ckpt_every_steps", "max_steps")
        for name in nonneg:
            if getattr(self, name) < 0:
                raise UserError(f"overrides.{name}", f"must be >= 0, got {getattr(self, name)}",
                                f"set {name} to a value >= 0")
        if self.warmup_epochs > self.epochs:
            raise UserError("overrides.warmup_epochs", f"{self.warmup_epochs} exceeds epochs={self.epochs}",
                            "lower warmup_epochs or raise epochs")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise UserError("overrides.clip_grad", f"must be positive or null, got {self.clip_grad}",
                            "use null to disable clipping")

    @property
    def lr(self) -> float:
        return self.blr * self.batch_size / self.lr_batch_denom


def _coerce(value: Any, field: dataclasses.Field, where: str) -> Any:
    """YAML gives lists where configs want tuples; numbers may come as ints for floats, and YAML 1.1
    reads ``1e-4`` (no dot) as a string; a bool is never a number although Python says it is an int."""
    ftype = str(field.type)
    if isinstance(value, list) and ftype.startswith("tuple"):
        return tuple(value)
    if isinstance(value, bool) and ftype.startswith(("int", "float")):
        raise UserError(where, f"expects a number, got {value!r}", "write a number, not true/false")
    if isinstance(value, str) and ftype.startswith("float"):
        try:
            return float(value)
        except ValueError:
            raise UserError(where, f"expects a number, got {value!r}", "write a number such as 1.5e-4") from None
    choices = re.findall(r"'([^']*)'|\"([^\"]*)\"", ftype) if ftype.startswith("Literal") else []
    if choices and value not in {a or b for a, b in choices}:
        allowed = ", ".join(a or b for a, b in choices)
        raise UserError(where, f"unknown value {value!r}", f"choose one of: {allowed}")
    if isinstance(value, int) and not isinstance(value, bool) and ftype.startswith("float"):
        return float(value)
    if ftype.startswith("int") and not isinstance(value, int):
        raise UserError(where, f"expects an integer, got {value!r}", "write a whole number")
    return value


def resolve(method_cls: type, preset_name: str, overrides: dict[str, Any], where: str = "overrides"
            ) -> tuple[TrainConfig, Any, dict[str, Any]]:
    """preset + overrides -> (TrainConfig, method config, the flat resolved dict)."""
    presets = method_cls.presets
    if preset_name not in presets:
        raise UserError("preset", f"unknown preset {preset_name!r} for method {method_cls.name!r}",
                        f"choose one of: {', '.join(sorted(presets))}")
    values = presets[preset_name].plain()
    for key, value in (overrides or {}).items():
        values[key] = value
    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    method_fields = {f.name: f for f in dataclasses.fields(method_cls.config_cls)}
    train_kw, method_kw = {}, {}
    for key, value in values.items():
        if key in train_fields:
            train_kw[key] = _coerce(value, train_fields[key], f"{where}.{key}")
        elif key in method_fields:
            method_kw[key] = _coerce(value, method_fields[key], f"{where}.{key}")
        else:
            known = ", ".join(sorted(set(train_fields) | set(method_fields)))
            raise UserError(f"{where}.{key}", f"unknown setting for method {method_cls.name!r}",
                            f"use one of: {known}")
    try:
        train = TrainConfig(**train_kw)
        method_cfg = method_cls.config_cls(**method_kw)
    except TypeError as e:  # a required setting missing from the preset
        raise UserError(where, str(e), "add the missing setting to the preset or overrides") from None
    except UserError as e:
        raise explain_preset_value(e, method_cls, preset_name, overrides or {}) from None
    flat = {**dataclasses.asdict(train), **dataclasses.asdict(method_cfg)}
    return train, method_cfg, flat


def recipe_deviations(method_cls: type, preset_name: str, flat: dict[str, Any]) -> tuple[str | None, dict]:
    """Every setting that differs from the paper recipe the preset derives from: {key: [paper, ours]}."""
    preset = method_cls.presets[preset_name]
    paper_name = preset.paper_recipe or preset_name
    if paper_name not in method_cls.presets:
        return None, {}
    _, _, paper_flat = resolve(method_cls, paper_name, {})
    devs = {}
    for key in sorted(flat):
        ours, theirs = flat[key], paper_flat.get(key)
        if key in _BOOKKEEPING or _same(ours, theirs):
            continue
        devs[key] = [theirs, ours]
    ours_p = _gpu_precision(flat.get("precision", "auto"))
    paper_p = getattr(method_cls, "recipe_precision", None) or _gpu_precision(paper_flat.get("precision", "auto"))
    if ours_p != paper_p:  # excluded above as bookkeeping, but a recipe's own precision is part of it
        devs["precision"] = [paper_p, ours_p]
    return paper_name, devs


def _gpu_precision(precision: str) -> str:
    # What the setting means on the GPUs the recipes are written for ("auto" is bf16 there).
    return "bf16" if precision == "auto" else precision


def explain_preset_value(err: UserError, method_cls: type, preset_name: str, overrides: dict[str, Any]
                         ) -> UserError:
    """A check failed on a setting the user never wrote: say which preset value it comes from."""
    key = err.field.rsplit(".", 1)[-1]
    value = method_cls.presets[preset_name].values.get(key)
    if key in overrides or value is None:
        return err
    note = f" (you did not set {key}: preset {method_cls.name}/{preset_name} sets {value.value!r}, from " \
           f"{value.source}; override it to change it)"
    return UserError(err.field, err.problem + note, err.fix)


# Settings that do not change what is computed (logging, loader workers, checkpoint cadence, where
# to stop): they are not part of a cell's identity, so changing them resumes the same cell.
NOT_IDENTITY = frozenset({"num_workers", "ckpt_every_steps", "log_every", "max_steps", "bad_images"})
# ... nor of the recipe comparison (precision changes numerics, so it is identity but not recipe).
_BOOKKEEPING = NOT_IDENTITY | {"precision"}


def identity_config(flat: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flat.items() if k not in NOT_IDENTITY}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b
