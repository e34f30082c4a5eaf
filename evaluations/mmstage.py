"""An mmengine ``Runner`` run as a harness stage: the glue the ``ade20k`` and ``coco`` evaluations share.

mmseg's and mmdet's own models, datasets, metrics and training loop do the work; this module makes their run
behave like every other stage:

- its logs, config dump and checkpoints stay in the stage folder (``<stage>/mmengine``);
- the harness's process group (``harness.distributed``) is handed over: ``launcher="pytorch"`` on an already
  initialised group makes mmengine skip its own ``init_dist``; on CPU the DDP wrapper gets no device ids;
- a preemption (submitit's USR2) is let in only between two iterations; ``save_checkpoint`` then writes an
  mmengine checkpoint of the iterations done and points ``last_checkpoint`` at it (atomically, after the file is
  complete), and the requeued job resumes from it through mmengine's own ``resume``;
- rank 0 reports progress to ``progress.json`` (``repro status``, the local executor's progress lines).

Nothing here imports OpenMMLab at import time: the evaluation registry imports every evaluation module.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from harness.api import EvalInputs
from harness.atomic import write_text
from harness.errors import UserError
from harness.preemption import StepGate
from harness.stages import write_progress

WORK_DIR = "mmengine"
LAST = "last_checkpoint"  # mmengine's pointer file to the checkpoint ``resume`` loads


def _hook_base() -> type:
    from mmengine.hooks import Hook

    return Hook


@dataclass
class RunResult:
    metrics: dict[str, float]  # the evaluator's final values, as mmengine names them
    iters: int
    resumed_from_iter: int | None
    train_seconds: float
    img_per_s: float
    log_dir: str
    final_loss: float | None


class StageRun:
    """What ``StageRunner.checkpoint()`` sees of a running mmengine training (``inputs.track``)."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner

    def save_checkpoint(self) -> Path | None:
        """Between two iterations (the hook lets USR2 in only there): the iterations done so far."""
        runner = self.runner
        if runner.rank != 0:
            return None
        work_dir = Path(runner.work_dir)
        name = f"iter_{runner.iter}.pth"
        runner.save_checkpoint(str(work_dir), filename=name, meta={"iter": runner.iter, "epoch": runner.epoch},
                               save_optimizer=True, save_param_scheduler=True)
        write_text(work_dir / LAST, str(work_dir / name))
        return work_dir / name


def stage_hook(stage_dir: Path, is_main: bool, images_per_iter: int, log_every: int, gate: StepGate) -> Any:
    """An mmengine hook: USR2 only between iterations (``gate``, installed around ``runner.train()``), progress
    for the stage, the last metrics and timing."""
    hook_base = _hook_base()

    class _StageHook(hook_base):
        priority = "VERY_LOW"

        def __init__(self) -> None:
            self.metrics: dict[str, float] | None = None
            self.start_iter: int | None = None
            self.t_train = 0.0
            self.iters_timed = 0
            self.last_loss: float | None = None
            self._t0 = 0.0

        def before_train(self, runner: Any) -> None:
            self.start_iter = runner.iter
            gate.hold()

        def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
            # A pending preemption is delivered here, with every finished iteration counted in runner.iter.
            gate.release()
            gate.hold()
            self._t0 = time.perf_counter()

        def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None) -> None:
            self.t_train += time.perf_counter() - self._t0
            self.iters_timed += 1
            done = runner.iter + 1
            if done % log_every == 0 or done == runner.max_iters:
                loss = (outputs or {}).get("loss")
                self.last_loss = float(loss.detach()) if loss is not None else None  # a host sync per log interval
                if is_main:
                    rate = self.iters_timed * images_per_iter / self.t_train if self.t_train > 0 else None
                    write_progress(stage_dir, done, runner.max_iters, {"loss": self.last_loss, "img_per_s": rate})

        def after_train(self, runner: Any) -> None:
            gate.release()

        def after_val_epoch(self, runner: Any, metrics: dict[str, float] | None = None) -> None:
            self.metrics = dict(metrics or {})

    return _StageHook()


_EPOCH_LOOP = "StageEpochBasedTrainLoop"


def _register_epoch_loop() -> None:
    """mmengine's epoch loop restarts an epoch from its first batch on resume; a preemption mid-epoch would then
    train that epoch's first batches twice and run past the schedule. This loop skips the batches of the current
    epoch that the checkpoint already counts (the sampler gives the same order for the same epoch and seed), as
    mmengine's iteration loop does."""
    from mmengine.registry import LOOPS
    from mmengine.runner import EpochBasedTrainLoop

    if _EPOCH_LOOP in LOOPS.module_dict:
        return

    class StageEpochBasedTrainLoop(EpochBasedTrainLoop):
        def run_epoch(self) -> None:
            self.runner.call_hook("before_train_epoch")
            self.runner.model.train()
            done = self._iter - self._epoch * len(self.dataloader)
            for idx, data_batch in enumerate(self.dataloader):
                if idx >= done:
                    self.run_iter(idx, data_batch)
            self.runner.call_hook("after_train_epoch")
            self._epoch += 1

    LOOPS.register_module(name=_EPOCH_LOOP, module=StageEpochBasedTrainLoop)


def run_runner(inputs: EvalInputs, cfg_dict: dict[str, Any], images_per_iter: int, log_every: int,
               label: str) -> RunResult:
    """Build the Runner from ``cfg_dict`` inside the stage, train (resuming from the stage's last mmengine
    checkpoint), and return the evaluator's metrics after the last iteration."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    dist = inputs.dist
    stage_dir = Path(inputs.stage_dir)
    work_dir = stage_dir / WORK_DIR
    cfg = dict(cfg_dict)
    distributed = dist is not None and dist.world_size > 1
    cfg.update(work_dir=str(work_dir), resume=True, load_from=None,
               launcher="pytorch" if distributed else "none",
               # unique per attempt: mmengine keys its logger and visualiser instances by this name
               experiment_name=f"{label}-{inputs.spec.stage_id if inputs.spec else 'run'}-{time.time_ns()}")
    if distributed and dist.device.type != "cuda":  # gloo on CPU: DDP takes no device ids
        cfg["model_wrapper_cfg"] = {"type": "MMDistributedDataParallel", "device_ids": None,
                                    "broadcast_buffers": False,
                                    "find_unused_parameters": cfg.get("find_unused_parameters", False)}
    if (cfg.get("train_cfg") or {}).get("type") == "EpochBasedTrainLoop":
        _register_epoch_loop()
        cfg["train_cfg"] = {**cfg["train_cfg"], "type": _EPOCH_LOOP}
    runner = Runner.from_cfg(Config(cfg))
    gate = StepGate()
    hook = stage_hook(stage_dir, dist is None or dist.is_main, images_per_iter, log_every, gate)
    runner.register_hook(hook, priority="VERY_LOW")
    inputs.track(StageRun(runner))
    try:
        with gate:
            runner.train()
    finally:
        inputs.track(None)
    metrics = hook.metrics
    if metrics is None:  # resumed after the last iteration: nothing validated in this attempt
        metrics = runner.val_loop.run()
    resumed = hook.start_iter if hook.start_iter else None
    rate = hook.iters_timed * images_per_iter / hook.t_train if hook.t_train > 0 else 0.0
    # mmseg rounds in float32: 76.56 would read 76.55999755859375
    return RunResult(metrics={k: round(float(v), 6) for k, v in metrics.items() if isinstance(v, numbers.Real)},
                     iters=runner.iter, resumed_from_iter=resumed, train_seconds=hook.t_train, img_per_s=rate,
                     log_dir=str(runner.log_dir), final_loss=hook.last_loss)


# -- launch-time checks (no OpenMMLab, no training): one-line errors before anything is submitted ------------------
def check_layout(root: str | Path, layout: str) -> None:
    """The dataset's own folders and files (``harness.dataset_id.DENSE_LAYOUTS``), naming the first one missing."""
    from harness.dataset_id import DENSE_LAYOUTS, IMG_EXTENSIONS

    root = Path(root)
    fix = f"point data.{layout} at a {layout.upper()}-layout root (test data: repro data tiny --sets {layout} " \
          "--out DIR)"
    if not root.is_dir():
        raise UserError(f"data.{layout}", f"{root} is not a folder", fix)
    for split, (images, labels) in DENSE_LAYOUTS[layout].items():
        for rel, want in ((images, IMG_EXTENSIONS), (labels, (".png",) if layout == "ade20k" else None)):
            path = root / rel
            if want is None:  # an annotation file
                if not path.is_file():
                    raise UserError(f"data.{layout}", f"{root} has no {rel} ({split} annotations)", fix)
            elif not path.is_dir():
                raise UserError(f"data.{layout}", f"{root} has no {rel}/ folder ({split} split)", fix)
            elif next((e for e in os.scandir(path) if e.name.lower().endswith(want)), None) is None:
                raise UserError(f"data.{layout}", f"{path} holds no {' or '.join(want[:2])} files", fix)


def check_backbone(exported: Any, crop: int | tuple[int, int]) -> None:
    """Can the dense adapter serve this backbone at this crop size? Built on the meta device from the method's
    export description (no weights): an unsupported architecture or an unreachable crop is a one-line error."""
    import torch

    from evaluations.dense.adapters import pyramid
    from harness.export import build_timm, registering_module

    kwargs = dict(exported.timm_kwargs)
    with torch.device("meta"):
        encoder = build_timm(exported.timm_name, kwargs, registering_module(exported.timm_name))
        pyramid(encoder, kwargs, (crop, crop) if isinstance(crop, int) else tuple(crop), norm="BN")


def coerce_settings(cfg: Any, where: str) -> None:
    """Type-check a dense evaluation's settings as a spec's ``overrides:`` are checked (``epochs: x`` is a one-line
    error naming ``<where>.epochs``, a list becomes a tuple), in place on the frozen dataclass."""
    import typing

    from harness.config import _coerce

    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        object.__setattr__(cfg, f.name, _coerce(getattr(cfg, f.name), hints[f.name], f"{where}.{f.name}"))


# Recipe values that do not change what is computed (logging, loader workers, checkpoint and validation cadence,
# the multi-scale test a single-scale record does not run): never reported as deviations from the paper.
_NOT_RECIPE = frozenset({"name", "sources", "log_interval", "num_workers", "checkpoint_interval", "val_interval",
                         "ms_ratios", "ms_flip"})


class RecipeSettings:
    """What the ``ade20k`` and ``coco`` configs share: a named recipe of ``evaluations.dense.recipes`` and per-value
    overrides (None: the recipe's), type-checked and resolved when the spec is expanded."""

    evaluation: ClassVar[str]  # "ade20k" | "coco": the field prefix of error messages
    kind: ClassVar[str]  # "seg" | "det": which recipe table
    tunable: ClassVar[tuple[str, ...]]

    def __post_init__(self) -> None:
        coerce_settings(self, self.evaluation)
        self.resolved()  # an unknown recipe or a bad value fails when the spec is expanded

    def overrides(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.tunable if getattr(self, k) is not None}

    def resolved(self) -> Any:
        from evaluations.dense.recipes import det_recipe, seg_recipe

        try:
            return (seg_recipe if self.kind == "seg" else det_recipe)(self.recipe, **self.overrides())
        except UserError as e:
            raise UserError(f"{self.evaluation}.{e.field}", e.problem, e.fix) from None

    def recipe_deviations(self, paper_name: str) -> dict[str, list]:
        """{setting: [paper recipe's value, ours]} against the paper recipe the run derives from (``paper_name``
        for the tiny recipes, else the recipe itself: then only overrides deviate)."""
        from evaluations.dense.recipes import det_recipe, seg_recipe

        recipe = self.resolved()
        lookup = seg_recipe if self.kind == "seg" else det_recipe
        paper = lookup(paper_name if recipe.name.startswith("tiny") else recipe.name)
        devs = {f.name: [_plain(getattr(paper, f.name)), _plain(getattr(recipe, f.name))]
                for f in dataclasses.fields(recipe) if f.name not in _NOT_RECIPE
                and getattr(paper, f.name) != getattr(recipe, f.name)}
        if paper.name != recipe.name:
            devs["recipe"] = [paper.name, recipe.name]
        return devs


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, tuple) else v


def run_recipe(inputs: EvalInputs, cfg: RecipeSettings, build: Any) -> tuple[Any, RunResult]:
    """An ``ade20k`` / ``coco`` stage: its data checked, OpenMMLab prepared, the recipe's config built by ``build``
    (``segmentation_config`` / ``detection_config``) over the cell's export, and run to its end."""
    from evaluations.dense.openmmlab import prepare

    check_layout(inputs.data_root, cfg.evaluation)
    prepare()
    recipe = cfg.resolved()
    world = inputs.dist.world_size if inputs.dist is not None else 1
    mm_cfg = build(Path(inputs.spec.pretrain_dir) / "export", inputs.data_root, recipe, inputs.stage_dir, inputs.seed,
                   world_size=world, amp=inputs.device.type == "cuda")
    log_every = recipe.log_interval
    return recipe, run_runner(inputs, mm_cfg, images_per_iter=recipe.batch_size, log_every=log_every,
                              label=cfg.evaluation)


def record_extra(recipe: Any, result: RunResult, cfg: Any) -> dict[str, Any]:
    """What a dense record keeps besides its metrics: the recipe's values, the run's length, speed and logs."""
    return {"recipe": recipe.name, "recipe_values": dataclasses.asdict(recipe) | {"sources": None},
            "iters": result.iters, "img_per_s": result.img_per_s, "train_seconds": result.train_seconds,
            "resumed_from_step": result.resumed_from_iter, "final_train_loss": result.final_loss,
            "mmengine_log_dir": result.log_dir, "config": dataclasses.asdict(cfg)}
