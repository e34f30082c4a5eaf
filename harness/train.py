"""The generic training loop every method (and every training evaluation) runs through.

Per iteration: schedules (lr, weight decay, teacher momentum) -> method.training_step under autocast ->
backward -> clipping -> optimiser step -> method.after_step (EMA, centers). Randomness inside a step
is reseeded from (seed, rank, step), and augmentations from (seed, epoch, index), so a resumed run
retraces the uninterrupted one exactly. A SIGUSR2 that arrives during an iteration (the step, its logging and
checkpoint) waits for its end (``harness.preemption.StepGate``): submitit's preemption handler then only ever
runs between iterations, where the state is consistent and can be checkpointed.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from harness import checkpoint as ckpt
from harness.api import METHODS, Method, StepState
from harness.atomic import write_text
from harness.config import TrainConfig, resolve
from harness.data import (
    ResumableSampler,
    SeededAugmentDataset,
    build_loader,
    drop_unreadable,
    image_folder,
    mix_seed,
    seed_everything,
)
from harness.datacheck import cache_dir_for, run_dir_of, scan_split
from harness.distributed import DistInfo
from harness.errors import NonFiniteLossError, UserError
from harness.export import save_export
from harness.health import PREFIX as HEALTH
from harness.health import CollapseError, HealthConfig, HealthMonitor, find_collapse
from harness.optim import build_optimizer
from harness.preemption import StepGate
from harness.schedules import SCHEDULES, cosine_schedule
from harness.tb import TrainingCurves

CKPT_NAME = "last.pt"


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision_used(precision, device)]


def precision_used(precision: str, device: torch.device) -> str:
    """The precision a run actually uses: "auto" is bf16 on GPU; on a CPU fp16 autocast is emulated and
    its matmuls are ~30x slower than fp32 (the paper presets say fp16), so a CPU runs fp32 instead."""
    if device.type != "cuda":
        return "bf16" if precision == "bf16" else "fp32"
    return "bf16" if precision == "auto" else precision


@dataclass
class Schedules:
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray

    @classmethod
    def build(cls, t: TrainConfig, iters_per_epoch: int) -> Schedules:
        lr_fn = SCHEDULES[t.lr_schedule]
        steps = {"milestones": t.lr_milestones, "gamma": t.lr_gamma} if t.lr_schedule == "multistep" else {}
        lr = lr_fn(t.lr, t.min_lr, t.epochs, iters_per_epoch, t.warmup_epochs, t.warmup_lr, **steps)
        wd_end = t.weight_decay if t.weight_decay_end is None else t.weight_decay_end
        wd = cosine_schedule(t.weight_decay, wd_end, t.epochs, iters_per_epoch)
        mom = cosine_schedule(t.momentum_teacher, t.momentum_teacher_end, t.epochs, iters_per_epoch)
        return cls(lr=lr, wd=wd, momentum=mom)


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float, mode: str) -> None:
    """Global-norm clipping (MAE/SimMIM) or per-tensor clipping (DINO ``utils.clip_gradients``),
    both without a host sync: the per-tensor factor min(1, max/(norm+1e-6)) is applied on device."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if mode == "global":
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return
    norms = torch._foreach_norm(grads)
    factors = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, factors)


def optimisation_step(model: Method, forward: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler, t: TrainConfig, state: StepState, batch: Any,
                      amp_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """One iteration: schedules -> forward under autocast -> backward -> clipping -> the method's
    pre-step hook -> optimiser -> the method's after-step (EMA). ``forward`` is ``model`` or its DDP
    wrapper. Returns the detached loss terms; nothing here waits for the device."""
    for g in optimizer.param_groups:
        g["lr"] = state.lr * g.get("lr_scale", 1.0)  # layer-wise decay and per-head lrs scale the schedule
        if g.get("apply_wd", True):
            g["weight_decay"] = state.weight_decay
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        out = forward(batch, state)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(out["loss"]).backward()
    if t.clip_grad:
        scaler.unscale_(optimizer)
        clip_gradients([p for p in model.parameters() if p.requires_grad], t.clip_grad, t.clip_mode)
    model.on_before_optimizer_step(state)
    scaler.step(optimizer)
    scaler.update()
    model.after_step(state)
    return {k: v.detach().float() for k, v in out.items()}


def sync_batchnorms(model: torch.nn.Module, dist: DistInfo) -> torch.nn.Module:
    """``model`` with SyncBatchNorms when it asks for them (``Method.sync_batchnorm``, e.g. main_dino.py:
    "synchronize batch norms (if any)") and runs on several GPUs; the probes' BatchNorm stays per GPU, as in MAE
    main_linprobe.py. The BatchNorms keep their Parameters, so param_groups() is unchanged. (SyncBatchNorm has
    no CPU kernel.)"""
    if getattr(model, "sync_batchnorm", False) and dist.world_size > 1 and dist.device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


class TrainRun:
    """The generic loop in one process (one rank of a multi-process job), over any ``model`` with the
    ``Method`` step interface (``training_step``, ``after_step``, ``on_before_optimizer_step``,
    ``param_groups``): pre-training (``PretrainRun``) and the evaluations that train (linear probes,
    fine-tuning) share its schedules, autocast, clipping, checkpoints, exact resume and USR2 handling.
    The dataset yields ``(batch, label)`` for keys ``(index, epoch)`` (``SeededAugmentDataset``)."""

    def __init__(self, spec: Any, dist: DistInfo, train: TrainConfig, model: torch.nn.Module, dataset: Any,
                 optimizer: str = "adamw", momentum: float = 0.9, desc: str = "train") -> None:
        self.spec, self.dist, self.train, self.desc = spec, dist, train, desc
        self.stage_dir = Path(spec.stage_dir)
        self.ckpt_path = self.stage_dir / "ckpt" / CKPT_NAME
        t = self.train
        if t.batch_size % dist.world_size:
            raise UserError("overrides.batch_size", f"{t.batch_size} is not divisible by {dist.world_size} "
                            "processes", "choose a batch size that is a multiple of the GPU count")
        model = sync_batchnorms(model, dist)
        self.model, self.dataset = model, dataset
        self.sampler = ResumableSampler(len(self.dataset), t.batch_size, dist.world_size, dist.rank, spec.seed)
        self.ipe = self.sampler.batches_per_epoch
        if self.ipe == 0:
            raise UserError("overrides.batch_size", f"{t.batch_size} exceeds the {len(self.dataset)} training "
                            f"images in {spec.data_root}", "lower batch_size or use a larger dataset")
        self.total_steps = t.epochs * self.ipe
        self.sched = Schedules.build(t, self.ipe)
        self.optimizer = build_optimizer(optimizer, self.model.param_groups(), t.lr, t.weight_decay, t.betas,
                                         t.eps, momentum, dist.device)
        self.amp_dtype = autocast_dtype(t.precision, dist.device)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.amp_dtype == torch.float16)
        self.ddp = self.model
        if dist.world_size > 1 and any(p.requires_grad for p in self.model.parameters()):
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False)
        self.step = 0
        self.resumed_from_step: int | None = None
        self.curves: TrainingCurves | None = None  # rank 0's TensorBoard writer, while run() runs
        self.health: HealthMonitor | None = None  # pre-training: representation health at each epoch end
        self.health_cfg = HealthConfig()
        self.saved_step: int | None = None  # step of the checkpoint on disk, if any
        self._nonfinite_seen: torch.Tensor | None = None  # the running loop's flag (_Interval.nonfinite)
        if self.ckpt_path.exists():
            self._load(ckpt.load(self.ckpt_path))

    # -- checkpoints -------------------------------------------------------------------------------
    def _load(self, state: dict[str, Any]) -> None:
        if state.get("stage_id") != self.spec.stage_id:
            raise UserError("checkpoint", f"{self.ckpt_path} belongs to stage {state.get('stage_id')}, "
                            f"not {self.spec.stage_id}", "delete the stage folder to start it afresh")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = self.resumed_from_step = self.saved_step = int(state["step"])
        ckpt.set_rng_state(state["rng"])
        if self.dist.is_main:
            self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from; they will be written again."""
        path = self.stage_dir / "metrics.jsonl"
        if path.exists():
            keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
            write_text(path, "".join(line + "\n" for line in keep))

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes; state is consistent because this runs only between steps. Weights a non-finite loss
        has reached are not written: a preemption can land after such a step and before the loop's next check
        (at the next log line or checkpoint), and the last good checkpoint must stay."""
        if not self.dist.is_main or (self._nonfinite_seen is not None and bool(self._nonfinite_seen)):
            return None
        self.saved_step = self.step
        return ckpt.save(self.ckpt_path, {
            "stage_id": self.spec.stage_id,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.step // self.ipe,
            "rng": ckpt.rng_state(),
        })

    # -- the loop ----------------------------------------------------------------------------------
    def _state(self, s: int) -> StepState:
        return StepState(step=s, epoch=s // self.ipe, iters_per_epoch=self.ipe, total_steps=self.total_steps,
                         lr=float(self.sched.lr[s]), weight_decay=float(self.sched.wd[s]),
                         momentum=float(self.sched.momentum[s]), world_size=self.dist.world_size)

    def _step(self, batch: Any) -> dict[str, torch.Tensor]:
        s = self.step
        seed_everything(mix_seed(self.spec.seed, self.dist.rank, s, 0x57E9))
        state = self._state(s)
        out = optimisation_step(self.model, self.ddp, self.optimizer, self.scaler, self.train, state,
                                to_device(batch, self.dist.device), self.amp_dtype)
        self.step += 1
        return out

    def run(self, on_progress=None) -> dict[str, Any]:
        t, dist = self.train, self.dist
        max_steps = min(self.total_steps, t.max_steps) if t.max_steps else self.total_steps
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not dist.is_main, mininterval=5,
                   desc=f"{self.desc} {self.spec.method}/{self.spec.preset} s{self.spec.seed}")
        interval = _Interval(torch.zeros((), dtype=torch.bool, device=dist.device))
        self._nonfinite_seen = interval.nonfinite  # updated in place by interval.add
        t_start, start_step = time.perf_counter(), self.step
        self.curves = TrainingCurves.for_run(self) if dist.is_main else None
        self.model.train()
        # One loader for the run: its workers persist across epochs, each iteration re-reads the sampler's position.
        loader = build_loader(self.dataset, self.sampler, t.num_workers, dist.device.type == "cuda")
        try:
            with StepGate() as gate:
                while self.step < max_steps:
                    self.sampler.set_position(*divmod(self.step, self.ipe))
                    for batch, _labels in loader:
                        with gate.step():  # a preemption waits for the end of the iteration
                            self._iteration(batch, interval, max_steps, bar, on_progress)
                        if self.step >= max_steps:
                            break
        finally:
            bar.close()
            if self.curves is not None:
                self.curves.close()
        elapsed = time.perf_counter() - t_start
        images = (self.step - start_step) * t.batch_size
        return {"final": interval.last_logged, "steps": self.step,
                "img_per_s": images / elapsed if elapsed > 0 else 0.0, "train_seconds": elapsed,
                "resumed_from_step": self.resumed_from_step}

    def _iteration(self, batch: Any, interval: _Interval, max_steps: int, bar: tqdm, on_progress) -> None:
        """One step and what follows it: the interval's log line (and the health pass at an epoch end), the
        checkpoint when due, the collapse check."""
        t = self.train
        out = self._step(batch)
        interval.add(out)
        end_of_epoch = self.step % self.ipe == 0
        health = None
        if interval.n == t.log_every or end_of_epoch or self.step == max_steps:
            seconds = time.perf_counter() - interval.t0  # the health pass is not training time
            health = self._measure_health() if end_of_epoch else None
            logged = self._log(interval.sums, interval.n, interval.nonfinite, seconds, health)
            bar.update(interval.n)
            bar.set_postfix(loss=f"{logged['loss']:.4f}")
            if on_progress:
                on_progress(self.step, self.total_steps, logged)
            interval.restart(logged)
        ckpt_due = t.ckpt_every_steps and self.step % t.ckpt_every_steps == 0
        if ckpt_due or end_of_epoch or self.step == max_steps:
            if bool(interval.nonfinite):
                raise self._nonfinite()
            self.save_checkpoint()
        collapse = health and find_collapse(health, self.health_cfg, self.step // self.ipe)
        if collapse and self.health_cfg.stop_on_collapse:
            raise CollapseError(collapse, health)

    def _nonfinite(self) -> NonFiniteLossError:
        kept = (f"the last good checkpoint {self.ckpt_path} (step {self.saved_step}) was kept"
                if self.saved_step is not None else "no checkpoint had been written yet")
        return NonFiniteLossError(f"non-finite loss before step {self.step} of {self.spec.method}/"
                                  f"{self.spec.preset} (seed {self.spec.seed}); {kept}: lower the lr or "
                                  "enable clip_grad")

    def _measure_health(self) -> dict[str, float] | None:
        if self.health is None:
            return None
        t0 = time.perf_counter()
        values = self.health.measure(self.model, self.step // self.ipe - 1)  # the (0-based) epoch that ended
        return {**values, "seconds": time.perf_counter() - t0}

    def _log(self, sums: dict[str, torch.Tensor], n: int, nonfinite: torch.Tensor, seconds: float,
             health: dict[str, float] | None = None) -> dict:
        """The one host sync of an interval: read the accumulated loss terms."""
        if bool(nonfinite):
            raise self._nonfinite()
        values = {k: float(v) / n for k, v in sums.items()}
        entry = {"step": self.step, "epoch": self.step / self.ipe, "lr": float(self.sched.lr[self.step - 1]),
                 "img_per_s": n * self.train.batch_size / seconds if seconds > 0 else 0.0, **values,
                 **{HEALTH + k: v for k, v in (health or {}).items()}}
        if self.dist.is_main:
            with open(self.stage_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
            if self.curves is not None:
                self.curves.log(entry, self._state(self.step - 1))
        return entry



@dataclass
class _Interval:
    """The loss terms summed on the device since the last log line (read at the next one: no host sync per
    step), and whether any was non-finite since the run started."""

    nonfinite: torch.Tensor
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    n: int = 0
    t0: float = field(default_factory=time.perf_counter)
    last_logged: dict[str, float] = field(default_factory=dict)

    def add(self, out: dict[str, torch.Tensor]) -> None:
        for k, v in out.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.nonfinite.logical_or_(~torch.isfinite(out["loss"]))  # in place: TrainRun.save_checkpoint reads it
        self.n += 1

    def restart(self, logged: dict[str, float]) -> None:
        self.sums, self.n, self.t0, self.last_logged = {}, 0, time.perf_counter(), logged


class PretrainRun(TrainRun):
    """One pre-training stage: the method's model, its augmentations, AdamW over its param groups."""

    def __init__(self, spec: Any, dist: DistInfo) -> None:
        method_cls: type[Method] = METHODS.get(spec.method, "method")
        train, self.method_cfg, _ = resolve(method_cls, spec.preset, spec.overrides)
        model = build_method(method_cls, self.method_cfg, train, spec.seed, dist.device)
        base = image_folder(spec.data_root, "train")
        skipped = _skip_unreadable(base, Path(spec.stage_dir)) if train.bad_images == "skip" else 0
        dataset = SeededAugmentDataset(base, method_cls.build_transform(self.method_cfg), spec.seed, train.bad_images)
        super().__init__(spec, dist, train, model, dataset, optimizer="adamw", desc="pretrain")
        self.skipped_images = skipped
        self.health_cfg = HealthConfig.from_spec(getattr(spec, "health", None), "health")
        if self.health_cfg.enabled:
            self.health = HealthMonitor(model, self.health_cfg, spec.data_root, dist.device)

    def export(self) -> Path | None:
        if not self.dist.is_main:
            return None
        return save_export(self.model.export_backbone(), self.stage_dir / "export")


def build_method(method_cls: type[Method], cfg: Any, train: TrainConfig, seed: int, device: torch.device) -> Method:
    """The method at initialisation: the same weights on every rank, and in a cell's random-init floor
    (the floor's "init" stage builds it with this too, so the floor is the trained cell's step 0)."""
    seed_everything(mix_seed(seed, 0x1417))
    return method_cls(cfg, train).to(device)


def _skip_unreadable(base: Any, stage_dir: Path) -> int:
    """``bad_images: skip``: leave out what the (cached) header scan finds unreadable."""
    scan = scan_split(base.root, cache_dir_for(run_dir_of(stage_dir)))
    return drop_unreadable(base, {path for path, _ in scan.bad})


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "host_max_rss"
