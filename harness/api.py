"""The contracts between the harness, method plugins and evaluation plugins.

A method is an ``nn.Module`` subclass registered with ``@register_method(name)``; an evaluation is a
function registered with ``@register_evaluation(name)``. Everything else (launching, checkpoints,
records) lives in the harness and never needs to know which method or evaluation it runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from harness.registry import Registry

METHODS: Registry[type[Method]] = Registry(
    "method",
    "ssl_repro.methods",
    "methods",
)
EVALUATIONS: Registry[Evaluation] = Registry(
    "evaluation",
    "ssl_repro.evaluations",
    "evaluations",
)


def register_method(name: str):
    def decorator(cls: type[Method]) -> type[Method]:
        cls.name = name
        return METHODS.register(name)(cls)

    return decorator


def register_evaluation(name: str, config_cls: type, resources: str | None = None,
                        check_data: Callable[[str, Any], None] | None = None,
                        check_backbone: Callable[[ExportedBackbone, Any], None] | None = None):
    """``@register_evaluation("knn", KNNConfig) def run(inputs: EvalInputs, cfg: KNNConfig) -> Metrics``.

    ``resources``: the key of the spec's ``resources:`` block this evaluation runs with (default: its
    name; a spec without that block falls back to ``eval``). ``check_data(root, cfg)``: a cheap layout
    check run at launch (default: ``train/`` and ``val/`` ImageFolders). ``check_backbone(exported, cfg)``:
    run at launch on the backbone the cell's method will export, built on the meta device (no weights)."""

    def decorator(fn: Callable[[EvalInputs, Any], Metrics]) -> Callable[[EvalInputs, Any], Metrics]:
        EVALUATIONS.register(name)(Evaluation(name=name, run=fn, config_cls=config_cls,
                                              resources=resources or name, check_data=check_data,
                                              check_backbone=check_backbone))
        return fn

    return decorator


@dataclass(frozen=True)
class Evaluation:
    name: str
    run: Callable[[EvalInputs, Any], Metrics]
    config_cls: type
    resources: str = "eval"
    check_data: Callable[[str, Any], None] | None = None
    check_backbone: Callable[[ExportedBackbone, Any], None] | None = None


@dataclass(frozen=True)
class Cited:
    """A preset value and where it comes from (paper table, README or official file)."""

    value: Any
    source: str


@dataclass(frozen=True)
class Preset:
    """A recipe: values for the generic loop (``TrainConfig``) and the method's own config.

    ``paper_recipe`` names the preset holding the paper's recipe this one derives from; the report
    prints every setting that differs from it (the recipe-deviation column).
    """

    values: Mapping[str, Cited]
    description: str = ""
    paper_recipe: str | None = None

    def plain(self) -> dict[str, Any]:
        return {k: v.value for k, v in self.values.items()}


def preset(description: str = "", paper_recipe: str | None = None, **values: tuple[Any, str]) -> Preset:
    """``preset(epochs=(1600, "MAE PRETRAIN.md"), ...)``: every value carries its source."""
    cited = {}
    for key, item in values.items():
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], str)):
            raise TypeError(f"preset value {key!r} must be a (value, source) pair, got {item!r}")
        cited[key] = Cited(*item)
    return Preset(values=cited, description=description, paper_recipe=paper_recipe)


@dataclass(frozen=True)
class FeatureSpec:
    """Which representation each evaluation reads from the exported backbone.

    ``pool``: "cls" (final-norm CLS token), "avg" (mean of final-norm patch tokens),
    "cls+avg" (concatenation), or "avg_norm" (mean-pooled tokens, for backbones without a CLS token).
    """

    knn: str = "cls"
    linear: str = "cls"
    linear_n_last_blocks: int = 1
    finetune: str = "avg"


@dataclass
class ExportedBackbone:
    """A timm architecture, its weights, and how evaluations read features from it."""

    timm_name: str
    timm_kwargs: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    feature_spec: FeatureSpec
    label: str  # human name for reports, e.g. "ViT-B/16"


@dataclass
class StepState:
    """What a method sees of the loop at one optimisation step (values of the per-step schedules)."""

    step: int
    epoch: int
    iters_per_epoch: int
    total_steps: int
    lr: float
    weight_decay: float
    momentum: float  # teacher EMA momentum at this step (methods without a teacher ignore it)
    world_size: int = 1


@dataclass
class Metrics:
    """Evaluation output: values in percent, a protocol tag, and which value is the headline."""

    values: dict[str, float]
    protocol: str  # the protocol family the report's columns key on, e.g. "linear/dino"
    headline: str = "top1"
    extra: dict[str, Any] = field(default_factory=dict)
    tag: str | None = None  # the full tag with the chosen sweep point, e.g. "linear:dino@lr0.003,n4"


@dataclass
class EvalInputs:
    """What an evaluation receives: the exported backbone, ready, and where its data lies.

    An evaluation that trains builds its own copy with ``build_backbone(drop_path_rate=..., trainable=True,
    grad_checkpointing=...)``, runs ``harness.train.TrainRun`` over ``spec`` and ``dist``, and hands that
    run to ``track`` so that a preemption checkpoints it (the requeued job resumes it exactly).
    Only rank 0 writes; ``cache_dir`` holds features shared by the evaluations of one export."""

    backbone: nn.Module  # timm model built with num_classes=0, in eval mode, on ``device``
    feature_spec: FeatureSpec
    data_root: Path  # ImageFolder root holding train/ and val/
    img_size: int  # the backbone's input size; eval transforms resize to img_size*256/224 then crop
    device: torch.device
    num_workers: int
    seed: int
    stage_dir: Path | None = None
    spec: Any = None  # the StageSpec (identity, seed, stage folder) a TrainRun needs
    dist: Any = None  # harness.distributed.DistInfo
    build_backbone: Callable[..., nn.Module] | None = None
    export_sha256: str = ""
    cache_dir: Path | None = None
    track: Callable[[Any], None] = lambda run: None


class Method(nn.Module):
    """Base class of method plugins: one file per method, reading like the paper's algorithm box.

    Subclasses set ``config_cls`` (a dataclass of the method's own settings) and ``presets``, and
    implement ``build_transform``, ``training_step`` and ``export_backbone``.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type]
    presets: ClassVar[dict[str, Preset]] = {}
    # The paper recipe's precision where its presets run another one (they say "auto": bf16 on GPU);
    # the recipe-deviation list then shows it.
    recipe_precision: ClassVar[str | None] = None
    # Whether its BatchNorms (if any) are synchronised across GPUs, as the official training script does.
    sync_batchnorm: ClassVar[bool] = False

    def __init__(self, cfg: Any, train: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.train_cfg = train

    @classmethod
    def build_transform(cls, cfg: Any) -> Callable[[Any], Any]:
        """Picklable callable run in the data-loader workers: PIL image -> model input(s).

        Its RNGs (Python ``random``, numpy, torch) are seeded per (seed, epoch, sample) before each call;
        a transform with a ``set_epoch(epoch)`` method is told the epoch first."""
        raise NotImplementedError

    def training_step(self, batch: Any, state: StepState) -> dict[str, torch.Tensor]:
        """Loss terms of one step; must include "loss" (the one back-propagated). No host syncs."""
        raise NotImplementedError

    def forward(self, batch: Any, state: StepState) -> dict[str, torch.Tensor]:
        # DDP hooks forward(), so the step goes through it.
        return self.training_step(batch, state)

    @torch.no_grad()
    def after_step(self, state: StepState) -> None:
        """Called after the optimiser step (EMA teachers, schedules kept by the method)."""

    def on_before_optimizer_step(self, state: StepState) -> None:
        """Called after backward and clipping, before ``optimizer.step`` (e.g. freeze-last-layer)."""

    def curve_scalars(self, state: StepState) -> dict[str, float]:
        """Host-side values of the method's own schedules at ``state`` (e.g. ``teacher/temperature``),
        written to the training curves at the loop's log interval. Never read a device tensor here."""
        return {}

    def health_outputs(self, images: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor],
                       epoch: int) -> dict[str, torch.Tensor]:
        """What the representation-health metrics (harness/health.py) read, on a fixed batch of evaluation-
        transformed ``images``, called under no_grad in eval mode at each epoch end. ``embed(images)`` is the
        exported backbone's k-NN feature. Student/teacher methods add "teacher_probs" (their centred,
        sharpened targets at ``epoch``, the 0-based epoch that just ended) and "student_log_probs" (N, K)."""
        return {"embedding": embed(images)}

    def no_weight_decay(self) -> set[str]:
        return set()

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups over trainable parameters (a frozen EMA teacher is left out): no weight decay on
        biases, 1-D parameters (norms) and ``no_weight_decay()`` names. With an empty ``no_weight_decay()``
        this is DINO/iBOT/EsViT's ``utils.get_params_groups`` and MAE's timm ``add_weight_decay``."""
        skip = self.no_weight_decay()
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim <= 1 or name.endswith(".bias") or name in skip:
                no_decay.append(p)
            else:
                decay.append(p)
        return [
            {"params": decay, "apply_wd": True},
            {"params": no_decay, "apply_wd": False, "weight_decay": 0.0},
        ]

    @classmethod
    def backbone_label(cls, cfg: Any) -> str:
        """The backbone's name in reports and cell listings (e.g. "ViT-B/16"). Methods override it when their
        config has no ``shape`` with a ``label``."""
        shape = getattr(cfg, "shape", None)
        return shape.label if shape is not None else str(getattr(cfg, "backbone", "?"))

    def export_backbone(self) -> ExportedBackbone:
        raise NotImplementedError

    @classmethod
    def import_official(cls, checkpoint: dict[str, Any], cfg: Any, checkpoint_key: str = "teacher"
                        ) -> ExportedBackbone:
        """Map an official released checkpoint (loaded with ``weights_only=True``) onto the backbone this
        method exports, with strict key checks (missing or unexpected backbone keys are errors).
        ``checkpoint_key`` picks the network of a full training checkpoint ("teacher" or "student")."""
        raise NotImplementedError(f"{cls.name} has no official checkpoint import")


def config_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}
