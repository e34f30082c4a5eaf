"""Typed configs: the generic loop's ``TrainConfig`` and the resolution of preset + overrides.

A cell's full configuration is ``TrainConfig`` (shared by every method) plus the method's own
dataclass. Both are filled from a preset, then from the user's overrides; an override naming a
setting that neither has is a one-line error.
"""

from __future__ import annotations

import dataclasses
import types
import typing
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
    lr_schedule: Literal["cosine", "half_cycle", "timm_cosine", "multistep"] = "cosine"  # DINO | MAE | SimMIM
    lr_milestones: tuple[float, ...] = ()  # epochs where "multistep" multiplies the lr by lr_gamma
    lr_gamma: float = 0.1
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


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """A YAML (or command-line) value -> the setting's type, or a one-line error naming it.

    Lists become tuples, whole numbers become floats where a float is wanted, and a float written
    without a dot ('1e-4', a string to YAML 1.1) is read as a number. Types this cannot check (for
    example a method's own classes) pass through unchanged."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        hint, args = (rest[0], typing.get_args(rest[0])) if len(rest) == 1 else (Any, ())
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in args:
            raise UserError(where, f"must be one of {', '.join(map(repr, args))}, got {value!r}", "pick one of them")
        return value
    if hint is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(where, f"expects a list, got {value!r}", "write a list, e.g. [0.9, 0.999]")
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            raise UserError(where, f"expects {len(args)} values, got {len(value)}", "fix the list's length")
        item_hints = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else (args or [Any] * len(value))
        return tuple(_coerce(v, h, f"{where}[{i}]") for i, (v, h) in enumerate(zip(value, item_hints, strict=True)))
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(where, f"expects a number, got {value!r}", "write a number, e.g. 1.5e-4")
        return float(value)
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(where, f"expects an integer, got {value!r}", "write a whole number")
    if hint is bool and not isinstance(value, bool):
        raise UserError(where, f"expects true or false, got {value!r}", "write true or false")
    if hint is str and not isinstance(value, str):
        raise UserError(where, f"expects a string, got {value!r}", "quote the value")
    return value


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that cannot be evaluated here: leave those unchecked
        return {}


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
    train_hints, method_hints = _hints(TrainConfig), _hints(method_cls.config_cls)
    train_kw, method_kw = {}, {}
    for key, value in values.items():
        if key in train_fields:
            train_kw[key] = _coerce(value, train_hints.get(key, Any), f"{where}.{key}")
        elif key in method_fields:
            method_kw[key] = _coerce(value, method_hints.get(key, Any), f"{where}.{key}")
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


def make_eval_config(config_cls: type, raw: dict[str, Any], where: str) -> Any:
    """An evaluation's typed config from YAML values; its class defines protocol() and headline."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    bad = set(raw) - fields
    if bad:
        raise UserError(f"{where}.{sorted(bad)[0]}", "unknown setting", f"use: {', '.join(sorted(fields))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    try:
        return config_cls(**values)
    except TypeError as e:
        raise UserError(where, str(e), "fix the evaluation settings") from None


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
