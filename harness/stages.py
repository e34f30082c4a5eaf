"""Stage entry points: plain ``main(spec) -> record`` functions, runnable with or without submitit.

``StageRunner`` is the thin submitit wrapper: on preemption or timeout submitit calls its
``checkpoint()``, which saves the running pre-training state and asks to be requeued with the same
spec; the requeued job finds the checkpoint and resumes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
import traceback
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import submitit
import torch

from harness import checkpoint as ckpt
from harness.api import EVALUATIONS, METHODS, EvalInputs
from harness.atomic import write_json
from harness.config import make_eval_config, resolve
from harness.dataset_id import fingerprint, stage_splits
from harness.distributed import DistInfo, destroy, init_distributed
from harness.errors import UserError
from harness.export import WEIGHTS, load_export, save_export
from harness.health import PREFIX as HEALTH
from harness.health import CollapseError
from harness.health import from_log as health_from_log
from harness.locks import LockBusy, stage_lock, watch_launcher
from harness.matrix import INIT, PRETRAIN, StageSpec, verify_identity
from harness.provenance import git_commit, package_versions
from harness.records import begin_attempt, end_attempt, hardware_info, read_record, write_record
from harness.snapshot import running_code, verify_snapshot
from harness.train import PretrainRun, TrainRun, build_method, peak_memory_mb, precision_used


def _job_id() -> str | None:
    try:
        return submitit.JobEnvironment().job_id
    except RuntimeError:
        return os.environ.get("SLURM_JOB_ID")


def _base_record(spec: StageSpec, dist: DistInfo) -> dict[str, Any]:
    return {
        "cell_id": spec.cell_id, "stage_id": spec.stage_id, "stage": spec.stage, "method": spec.method,
        "preset": spec.preset_label, "backbone": spec.backbone, "epochs": spec.epochs, "seed": spec.seed,
        "evaluation": None if spec.builds else spec.stage, "data": spec.data_root,
        "paper_recipe": spec.paper_recipe, "recipe_deviations": spec.recipe_deviations,
        "overrides": spec.overrides, "eval_config": spec.eval_config,
        "num_gpus": dist.world_size if dist.device.type == "cuda" else 0, "world_size": dist.world_size,
        "git_commit": git_commit(), "code": running_code(), "packages": package_versions(), "job_id": _job_id(),
        "data_fingerprint": fingerprint(spec.data_root, stage_splits(PRETRAIN if spec.builds else spec.stage)),
        "floor_of": spec.floor_of,
    }


def write_progress(stage_dir: Path, step: int, total: int, info: dict[str, Any]) -> None:
    write_json(stage_dir / "progress.json", {"step": step, "total": total, "updated_at": time.time(),
                                             "loss": info.get("loss"), "img_per_s": info.get("img_per_s")})


def pretrain_main(spec: StageSpec, dist: DistInfo, runner: StageRunner | None = None) -> dict[str, Any]:
    stage_dir = Path(spec.stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    run = PretrainRun(spec, dist)
    if runner is not None:
        runner.active = run
    progress = (lambda s, n, info: write_progress(stage_dir, s, n, info)) if dist.is_main else None
    try:
        result = run.run(on_progress=progress)
    finally:
        if runner is not None:
            runner.active = None
    # rank 0 writes the log; the other ranks' records are never written
    health, collapse = health_from_log(read_log(stage_dir), run.health_cfg) if dist.is_main else ({}, None)
    finished = run.step >= run.total_steps
    if finished and not result["final"]:  # resumed at the last step: nothing ran in this attempt
        result = {**result, **rebuild_from_log(stage_dir, run.train.batch_size)}
    export = run.export() if finished else None
    wall = time.time() - t0
    peak, peak_kind = peak_memory_mb(dist.device)
    record = {
        **_base_record(spec, dist),
        "status": "done" if finished else "stopped",
        "protocol": PRETRAIN,
        "metrics": {k: v for k, v in result["final"].items()
                    if k not in {"step", "epoch", "lr", "img_per_s"} and not k.startswith(HEALTH)},
        "health": health, "collapse": collapse,
        "headline_metric": "loss",
        "checkpoint": {"path": str(run.ckpt_path), "step": run.step,
                       "sha256": ckpt.sha256(run.ckpt_path) if dist.is_main else None},
        "export": str(export) if export else None,
        "wall_time_s": wall, "train_seconds": result["train_seconds"],
        "gpu_hours": wall * (dist.world_size if dist.device.type == "cuda" else 0) / 3600,
        "peak_mem_mb": peak, "peak_mem_kind": peak_kind, "img_per_s": result["img_per_s"],
        "resumed_from_step": result["resumed_from_step"], "error": None,
        "precision": precision_used(run.train.precision, dist.device), "precision_requested": run.train.precision,
        "skipped_images": run.skipped_images,
    }
    if result.get("rebuilt_from"):
        record["rebuilt_from"] = result["rebuilt_from"]
        record["wall_time_s"] = wall + result["train_seconds"]
    if dist.is_main and finished:
        return write_unless_worse(stage_dir, record)
    return record


def rebuild_from_log(stage_dir: Path, batch_size: int) -> dict[str, Any]:
    """The result of a run whose steps all ran in earlier attempts, from its metrics log: the last
    logged values, and the time and throughput summed over the logged intervals."""
    entries = read_log(stage_dir)
    seconds, images, prev = 0.0, 0, 0
    for e in entries:
        n = (e["step"] - prev) * batch_size
        if e.get("img_per_s"):
            seconds += n / e["img_per_s"]
            images += n
        prev = e["step"]
    return {"final": entries[-1] if entries else {}, "train_seconds": seconds,
            "img_per_s": images / seconds if seconds > 0 else 0.0, "rebuilt_from": "metrics.jsonl"}


def read_log(stage_dir: Path) -> list[dict[str, Any]]:
    path = stage_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _worse(new: dict[str, Any], old: dict[str, Any] | None) -> bool:
    if old is None or old.get("status") != "done":
        return False
    return new.get("status") != "done" or (bool(old.get("metrics")) and not new.get("metrics"))


def write_unless_worse(stage_dir: str | os.PathLike, record: dict[str, Any]) -> dict[str, Any]:
    """A finished record is never replaced by a failed or emptier one; returns the record kept."""
    try:
        old = read_record(stage_dir)
    except ValueError:  # a damaged record is no result to protect
        old = None
    if _worse(record, old):
        return old
    write_record(stage_dir, record)
    return record


def finished_record(spec: StageSpec) -> dict[str, Any] | None:
    try:
        rec = read_record(spec.stage_dir)
    except ValueError:
        return None
    return rec if rec is not None and rec.get("status") == "done" and rec.get("stage_id") == spec.stage_id else None


def stop_loader_workers(keep: set[multiprocessing.process.BaseProcess]) -> None:
    """Loader workers ignore SIGTERM (preemption signals are for the main process), so a failing job
    would wait forever at exit for multiprocessing to join them: end them now. Only the children the stage
    started: ``keep`` (those alive before it) belong to whoever called run_stage (a test session's process
    pool, say). torch's SIGCHLD handler would report each as "killed by signal", which is ours, so it is muted
    meanwhile."""
    children = [child for child in multiprocessing.active_children() if child not in keep]
    if not children:
        return
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        for child in children:
            child.kill()
        for child in children:
            child.join(timeout=5)
    finally:
        signal.signal(signal.SIGCHLD, previous)


def import_main(spec: StageSpec, dist: DistInfo) -> dict[str, Any]:
    """Released weights instead of a pre-training: the method maps them onto its exported backbone."""
    stage_dir = Path(spec.stage_dir)
    t0 = time.time()
    method_cls = METHODS.get(spec.method, "method")
    _, cfg, _ = resolve(method_cls, spec.preset, spec.overrides)
    exported = method_cls.import_official(ckpt.load_external(spec.import_from), cfg, spec.checkpoint_key)
    record = {
        **_base_record(spec, dist),
        "status": "done", "protocol": "import", "metrics": {}, "headline_metric": None,
        "checkpoint": {"path": spec.import_from, "step": None, "sha256": ckpt.sha256(spec.import_from),
                       "network": spec.checkpoint_key},
        "wall_time_s": time.time() - t0, "gpu_hours": 0.0, "img_per_s": None, "resumed_from_step": None,
        "error": None,
    }
    if dist.is_main:
        save_export(exported, stage_dir / "export")
        return write_unless_worse(stage_dir, record)
    return record


def init_main(spec: StageSpec, dist: DistInfo) -> dict[str, Any]:
    """A random-init floor: the method built exactly as its trained cell's pre-training builds it (same
    seed, same config), exported at step 0 through the same export path, without a training step."""
    stage_dir = Path(spec.stage_dir)
    t0 = time.time()
    method_cls = METHODS.get(spec.method, "method")
    train, cfg, _ = resolve(method_cls, spec.preset, spec.overrides)
    model = build_method(method_cls, cfg, train, spec.seed, torch.device("cpu"))
    record = {
        **_base_record(spec, dist),
        "status": "done", "protocol": INIT, "metrics": {}, "headline_metric": None,
        "checkpoint": {"path": None, "step": 0, "sha256": None},
        "wall_time_s": time.time() - t0, "gpu_hours": 0.0, "img_per_s": None, "resumed_from_step": None,
        "error": None,
    }
    if dist.is_main:
        record["export"] = str(save_export(model.export_backbone(), stage_dir / "export"))
        return write_unless_worse(stage_dir, record)
    return record


def backbone_builder(export_dir: Path, device: torch.device):
    """``build(drop_path_rate=0, trainable=False, grad_checkpointing=False)``: a fresh copy of the exported
    backbone on ``device``, frozen in eval mode or trainable in train mode."""

    def build(drop_path_rate: float = 0.0, trainable: bool = False, grad_checkpointing: bool = False):
        model, _, _ = load_export(export_dir, **({"drop_path_rate": drop_path_rate} if drop_path_rate else {}))
        if grad_checkpointing:
            model.set_grad_checkpointing(True)
        model.requires_grad_(trainable)
        return model.to(device).train(trainable)

    return build


def eval_main(spec: StageSpec, dist: DistInfo, runner: StageRunner | None = None) -> dict[str, Any]:
    stage_dir = Path(spec.stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    pre = read_record(spec.pretrain_dir)
    if pre is None or pre.get("status") != "done":
        raise UserError("pretrain", f"stage {spec.pretrain_dir} has no finished record",
                        "run (or re-run) the matrix so pre-training finishes first")
    t0 = time.time()
    export_dir = Path(spec.pretrain_dir) / "export"
    backbone, feature_spec, meta = load_export(export_dir)
    backbone = backbone.to(dist.device).eval().requires_grad_(False)
    evaluation = EVALUATIONS.get(spec.stage, "evaluation")
    cfg = make_eval_config(evaluation.config_cls, spec.eval_config, f"eval_overrides.{spec.stage}")
    img_size = int(meta["timm_kwargs"].get("img_size", 224))
    export_sha = ckpt.sha256(export_dir / WEIGHTS)

    def track(run: Any) -> None:
        if runner is not None:
            runner.active = run

    inputs = EvalInputs(backbone=backbone, feature_spec=feature_spec, data_root=Path(spec.data_root),
                        img_size=img_size, device=dist.device, num_workers=min(4, os.cpu_count() or 1),
                        seed=spec.seed, stage_dir=stage_dir, spec=spec, dist=dist,
                        build_backbone=backbone_builder(export_dir, dist.device), export_sha256=export_sha,
                        cache_dir=Path(spec.pretrain_dir) / "feature_cache", track=track)
    try:
        metrics = evaluation.run(inputs, cfg)
    finally:
        track(None)
    wall = time.time() - t0
    peak, peak_kind = peak_memory_mb(dist.device)
    record = {
        **_base_record(spec, dist),
        "status": "done", "protocol": metrics.protocol, "protocol_tag": metrics.tag or metrics.protocol,
        "metrics": metrics.values, "headline_metric": metrics.headline, "metrics_extra": metrics.extra,
        "checkpoint": {"path": str(export_dir / WEIGHTS), "step": pre["checkpoint"]["step"],
                       "sha256": export_sha},
        "wall_time_s": wall, "gpu_hours": wall * (dist.world_size if dist.device.type == "cuda" else 0) / 3600,
        "peak_mem_mb": peak, "peak_mem_kind": peak_kind, "img_per_s": metrics.extra.get("img_per_s"),
        "resumed_from_step": metrics.extra.get("resumed_from_step"), "error": None,
    }
    if dist.is_main:
        return write_unless_worse(stage_dir, record)
    return record


def run_stage(spec: StageSpec, runner: StageRunner | None = None) -> dict[str, Any]:
    """Run one stage in this process; a failure writes a 'failed' record (one line) and re-raises."""
    dist = init_distributed()
    held = ExitStack()
    others = set(multiprocessing.active_children())
    try:
        done = finished_record(spec)
        if done is not None:  # running it again could only lose its metrics
            return done
        if dist.is_main:
            held.enter_context(stage_lock(spec.stage_dir, _job_id()))
            # every attempt is kept, so that failed and preempted ones are counted too
            begin_attempt(spec.stage_dir, hardware_info(dist.device.type, dist.world_size), _job_id())
        verify_identity(spec)  # a job queued while the code changed stops here, before any compute
        verify_snapshot(running_code())
        if spec.stage == INIT:
            return init_main(spec, dist)
        if spec.stage == PRETRAIN:
            if spec.import_from:
                return import_main(spec, dist)
            record = pretrain_main(spec, dist, runner)
            if dist.is_main and record["status"] != "done":
                end_attempt(spec.stage_dir, record["status"])
            return record
        return eval_main(spec, dist, runner)
    except Exception as e:
        if dist.is_main and not isinstance(e, LockBusy):  # a refusal must not touch the holder's stage
            fail = {**_base_record(spec, dist), "status": "failed", "protocol": spec.stage, "metrics": {},
                    "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                    "traceback_tail": traceback.format_exc().splitlines()[-6:],
                    "failed_at": datetime.now(UTC).isoformat()}
            if isinstance(e, CollapseError):  # the evaluations and the report show why it stopped
                fail.update(health=e.health, collapse=e.collapse)
            write_unless_worse(spec.stage_dir, fail)
        raise
    finally:
        stop_loader_workers(keep=others)
        held.close()
        destroy()


class StageRunner(submitit.helpers.Checkpointable):
    """The callable submitit runs. ``active`` is the running training loop (a pre-training or an
    evaluation that trains), for ``checkpoint()``."""

    def __init__(self) -> None:
        self.active: TrainRun | None = None

    def __call__(self, spec: StageSpec) -> dict[str, Any]:
        torch.set_num_threads(max(1, int(os.environ.get("SLURM_CPUS_PER_TASK", os.cpu_count() or 1))))
        # local jobs end with their launcher, by SIGINT: a launcher started in the background (`&` in a
        # script, nohup) hands SIGINT down ignored, and then Python installs no KeyboardInterrupt for it
        if watch_launcher(lambda: signal.raise_signal(signal.SIGINT)) is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return run_stage(spec, self)

    def checkpoint(self, spec: StageSpec) -> submitit.helpers.DelayedSubmission:
        # Called by submitit's USR2 handler, which the loop (StepGate) lets in only between iterations.
        if self.active is not None:
            self.active.save_checkpoint()
        end_attempt(spec.stage_dir, "preempted")  # closes only an attempt this process began
        return submitit.helpers.DelayedSubmission(StageRunner(), spec)

    def __getstate__(self) -> dict[str, Any]:
        return {"active": None}
