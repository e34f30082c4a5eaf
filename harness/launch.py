"""Submit a matrix's stages with submitit: SLURM (arrays, afterok/aftercorr dependencies, requeue)
or the local executor (stages one after another in subprocesses, for laptops and CI).

Idempotent: a stage with a finished record is skipped; a stage whose SLURM job is still queued or
running (per the ledger and ``sacct``) is not submitted twice.

With a code snapshot (the default on SLURM) the jobs import a frozen copy of the launched code from
the run folder (harness/snapshot.py) instead of the working tree.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from harness.api import EVALUATIONS
from harness.atomic import read_json_state, write_json
from harness.config import explain_preset_value, make_eval_config, resolve
from harness.data import check_layout
from harness.datacheck import SplitScan, cache_dir_for, scan_split
from harness.dataset_id import fingerprint
from harness.errors import UserError
from harness.locks import LAUNCHER_ENV, launch_lock, launcher_token
from harness.manifest import write_manifest
from harness.matrix import INIT, PRETRAIN, Matrix, StageSpec, load_spec
from harness.records import read_record
from harness.snapshot import Snapshot, code_state, job_python, make_snapshot
from harness.stages import StageRunner
from harness.status import ACTIVE_STATES, blocked_jobs

log = logging.getLogger(__name__)
EXECUTORS = ("local", "slurm")


@dataclass
class LaunchResult:
    submitted: dict[str, str] = field(default_factory=dict)  # stage key -> job id
    skipped_done: list[str] = field(default_factory=list)
    skipped_active: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # local executor: stage key -> error line
    snapshot: Snapshot | None = None  # the code the submitted jobs import, when snapshotting
    code_hash: str = ""  # this launch's code
    other_code: list[str] = field(default_factory=list)  # finished stages whose records name other code
    replaced: dict[str, str] = field(default_factory=dict)  # stage key -> job id cancelled as blocked


class Ledger:
    """stage key -> {job_id, executor}: which job was submitted for which stage."""

    def __init__(self, out: Path) -> None:
        self.path = out / "launch" / "ledger.json"
        # A damaged ledger warns (naming it) and counts as empty: stages with records are still skipped.
        self.entries: dict[str, dict[str, Any]] = read_json_state(self.path)[0] or {}

    def record(self, key: str, job_id: str, executor: str, folder: Path) -> None:
        self.entries[key] = {"job_id": job_id, "executor": executor, "folder": str(folder)}
        write_json(self.path, self.entries)

    def slurm_job(self, key: str) -> submitit.SlurmJob | None:
        entry = self.entries.get(key)
        if not entry or entry["executor"] != "slurm":
            return None
        return submitit.SlurmJob(folder=entry["folder"], job_id=entry["job_id"])


def job_state(job: submitit.Job) -> str:
    try:
        state = job.get_info(mode="force").get("State") or "UNKNOWN"
    except Exception:  # sacct unreachable: be conservative, the job may still be there
        return "UNKNOWN"
    return state.split()[0]


def resource_params(resources: dict[str, Any], executor: str) -> dict[str, Any]:
    """Matrix/CLI resources -> submitit AutoExecutor parameters (one task per GPU)."""
    r = dict(resources)
    gpus = int(r.get("gpus_per_node", 0))
    params: dict[str, Any] = {
        "timeout_min": int(r.get("timeout_min", 60)),
        "nodes": int(r.get("nodes", 1)),
        "tasks_per_node": int(r.get("tasks_per_node", max(1, gpus))),
        "gpus_per_node": gpus,
        "cpus_per_task": int(r.get("cpus_per_task", 2)),
        "name": "ssl-repro",
    }
    if executor == "slurm":
        if r.get("hold"):  # submitted held: nothing runs before 'scontrol release'
            params["slurm_additional_parameters"] = {"hold": True}
        if "mem_gb" in r:
            params["mem_gb"] = r["mem_gb"]
        for key in ("partition", "account", "qos", "constraint", "array_parallelism", "signal_delay_s",
                    "max_num_timeout"):
            if key in r:
                params[f"slurm_{key}"] = r[key]
    elif params["nodes"] != 1:
        raise UserError("resources.nodes", "the local executor runs on one node", "use --executor slurm")
    elif r.get("hold"):
        raise UserError("--hold", "only SLURM jobs can be held", "use --executor slurm")
    return params


def check_executor(executor: str) -> None:
    if executor not in EXECUTORS:
        raise UserError("executor", f"unknown executor {executor!r}", f"choose one of: {', '.join(EXECUTORS)}")
    if executor == "slurm" and shutil.which("sbatch") is None:
        raise UserError("--executor", "slurm: no 'sbatch' on PATH (this machine has no SLURM client)",
                        "run on the cluster's login node, or use --executor local")


def make_executor(executor: str, folder: Path, params: dict[str, Any], python: str | None = None
                  ) -> submitit.AutoExecutor:
    """``python``: the command a job starts with (a code snapshot's, see harness/snapshot.py)."""
    check_executor(executor)
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster=executor,
                               **({f"{executor}_python": python} if python else {}))
    ex.update_parameters(**params)
    return ex


def _pending_stages(matrix: Matrix, ledger: Ledger, executor: str, result: LaunchResult
                    ) -> tuple[list[StageSpec], dict[str, str]]:
    """Stages to submit, and job ids of stages already queued/running (for dependencies)."""
    todo, active = [], {}
    for stage in matrix.stages():
        rec = read_record(stage.stage_dir)
        if rec is not None and rec.get("status") == "done":
            result.skipped_done.append(stage.key)
            continue
        job = ledger.slurm_job(stage.key) if executor == "slurm" else None
        state = job_state(job) if job is not None else None
        parent_resubmitted = not stage.builds and any(s.key == stage.build_key for s in todo)
        # sacct may not list a pending job yet ("UNKNOWN"); squeue's reason is what says it is stuck.
        blocked = state in {"PENDING", "UNKNOWN"} and job.job_id in blocked_jobs([job.job_id])
        if blocked or (state == "PENDING" and parent_resubmitted):
            job.cancel(check=False)  # it waits on a job that failed or is being replaced: it would never run
            result.replaced[stage.key] = job.job_id
        elif state in ACTIVE_STATES | {"UNKNOWN"}:
            active[stage.key] = job.job_id
            result.skipped_active[stage.key] = job.job_id
            continue
        todo.append(stage)
    return todo, active


def launch(matrix: Matrix, executor: str, cli_resources: dict[str, Any] | None = None,
           snapshot: bool | None = None, on_event: Callable[[str], None] | None = None) -> LaunchResult:
    """``snapshot``: run the jobs from a frozen copy of the code (None: the spec's setting, else on for
    SLURM and off locally, where stages run while you wait)."""
    cli_resources = {k: v for k, v in (cli_resources or {}).items() if v is not None}
    check_executor(executor)
    # Bad data and settings fail here, in one line, before anything is submitted.
    preflight(matrix, on_event)
    folder = matrix.out / "submitit"
    # One launch at a time reads the ledger and submits; a second one of a local run (which runs for
    # hours) is refused at once, one of a SLURM run waits for the other's submissions.
    with launch_lock(matrix.out, wait_s=60 if executor == "slurm" else 0):
        write_manifest(matrix, load_spec(matrix.spec_path),
                       {root: fingerprint(root, splits) for root, splits in _data_roots(matrix).items()})
        ledger = Ledger(matrix.out)
        result = LaunchResult()
        todo, active = _pending_stages(matrix, ledger, executor, result)
        use_snapshot = snapshot if snapshot is not None else matrix.snapshot
        use_snapshot = bool(todo) and (use_snapshot if use_snapshot is not None else executor == "slurm")
        state = code_state(strict=use_snapshot)
        result.code_hash = state.short
        result.other_code = _other_code(matrix, result.skipped_done, state.short)
        if use_snapshot:
            result.snapshot = make_snapshot(matrix.out, state)
        python = job_python(result.snapshot) if result.snapshot else None
        if executor == "local":
            _launch_local(todo, folder, cli_resources, ledger, result, on_event or (lambda _: None), python)
        else:
            _launch_slurm(todo, active, folder, cli_resources, ledger, result, python)
    return result


def _other_code(matrix: Matrix, done_keys: list[str], code_hash: str) -> list[str]:
    """Finished stages computed by other code than this launch's. They are kept: a stage's identity is
    its configuration (and CODE_VERSION), by design; the report can show each row's code."""
    stages = {s.key: s for s in matrix.stages()}
    return [key for key in done_keys
            if ((read_record(stages[key].stage_dir) or {}).get("code") or {}).get("hash") != code_hash]


def preflight(matrix: Matrix, on_event: Callable[[str], None] | None = None) -> dict[tuple[str, str], SplitScan]:
    """Everything that would otherwise fail at job start: the data folders and every image's header
    (cached under the run folder), a writable run folder, batch sizes against the data, and each
    method's own checks (warm-ups against epochs), run by building the model on the meta device."""
    roots = _data_roots(matrix)
    for root, splits in roots.items():
        check_layout(root, splits)
    check_writable(matrix.out)
    scans = {(root, split): scan_split(Path(root) / split, cache_dir_for(matrix.out))
             for root, splits in roots.items() for split in splits}
    policy = _bad_image_policies(matrix)
    for (root, split), scan in scans.items():
        empty = scan.empty_classes()
        if empty:
            raise UserError("data.root", f"class folders of {scan.path} without images: {', '.join(empty[:3])}"
                            + (f" and {len(empty) - 3} more" if len(empty) > 3 else ""),
                            "remove the empty folders (each class needs images) or fill them")
        if scan.bad and policy.get((root, split)) != "skip":
            raise UserError("data", scan.describe_bad(),
                            "remove or replace them, or set bad_images: skip in the pre-training overrides "
                            "(they are then left out and counted in the record)")
        if scan.bad and on_event:
            on_event(f"warning: {scan.describe_bad()}: left out (bad_images: skip)")
    checked: set[str] = set()
    for stage in matrix.stages():
        # Seeds do not change what these checks see: one per method, preset, overrides and data.
        what = json.dumps([stage.method, stage.preset, stage.overrides, stage.data_root], sort_keys=True, default=str)
        if stage.stage != PRETRAIN or stage.import_from or what in checked:
            continue
        checked.add(what)
        _check_pretrain(stage, scans[(stage.data_root, "train")])
    _check_eval_data(matrix)
    return scans


def _bad_image_policies(matrix: Matrix) -> dict[tuple[str, str], str]:
    """(root, split) -> "skip" when every stage reading it leaves bad images out (only pre-training can)."""
    from harness.api import METHODS

    policy: dict[tuple[str, str], str] = {}
    for s in matrix.stages():
        if s.stage == INIT:  # a floor's export reads no data
            continue
        if s.stage == PRETRAIN and not s.import_from:
            train, _, _ = resolve(METHODS.get(s.method), s.preset, s.overrides)
            mine = {(s.data_root, "train"): train.bad_images}
        else:
            mine = {(s.data_root, split): "fail" for split in ("train", "val")}
        for key, value in mine.items():
            policy[key] = "fail" if policy.get(key, value) == "fail" or value == "fail" else "skip"
    return policy


def _check_pretrain(stage: StageSpec, scan: SplitScan) -> None:
    import torch

    from harness.api import METHODS

    method_cls = METHODS.get(stage.method)
    train, cfg, _ = resolve(method_cls, stage.preset, stage.overrides)
    where = f"{stage.method}/{stage.preset} seed {stage.seed}"
    images = scan.n_readable if train.bad_images == "skip" else scan.n_images
    if train.batch_size > images:
        err = UserError("overrides.batch_size", f"{where}: {train.batch_size} exceeds the {images} readable "
                        f"training images in {stage.data_root}", "lower batch_size or use a larger dataset")
        raise explain_preset_value(err, method_cls, stage.preset, stage.overrides)
    try:
        with torch.device("meta"):  # the method's own checks, without allocating its weights
            method_cls(cfg, train)
    except UserError as e:
        e = explain_preset_value(e, method_cls, stage.preset, stage.overrides)
        raise UserError(e.field, f"{where}: {e.problem}", e.fix) from None
    except Exception as e:  # noqa: BLE001 - a model that cannot be built on meta is checked at job start
        log.debug("meta-device check of %s skipped: %s", where, e)


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as e:
        raise UserError("out", f"run folder {out} is not writable ({e.strerror or e})",
                        "choose a writable folder with --out or 'out:' in the spec") from None


def _data_roots(matrix: Matrix) -> dict[str, tuple[str, ...]]:
    roots: dict[str, set[str]] = defaultdict(set)
    for s in matrix.stages():
        if s.stage == INIT:
            continue
        if s.stage == PRETRAIN or EVALUATIONS.get(s.stage, "evaluation").check_data is None:
            roots[s.data_root] |= {"train"} if s.stage == PRETRAIN else {"train", "val"}
    return {root: tuple(sorted(splits)) for root, splits in roots.items()}


def _check_eval_data(matrix: Matrix) -> None:
    """Evaluations that declare their own data check (e.g. a low-shot subset file) run it once per setting."""
    seen: set[str] = set()
    for s in matrix.stages():
        if s.builds:
            continue
        evaluation = EVALUATIONS.get(s.stage, "evaluation")
        key = json.dumps([s.stage, s.data_root, s.eval_config], sort_keys=True, default=str)
        if evaluation.check_data is not None and key not in seen:
            seen.add(key)
            evaluation.check_data(s.data_root, make_eval_config(evaluation.config_cls, s.eval_config,
                                                                f"eval_overrides.{s.stage}"))
        backbone_key = json.dumps([s.stage, s.method, s.preset, s.overrides, s.eval_config], sort_keys=True,
                                  default=str)
        if evaluation.check_backbone is not None and not s.import_from and backbone_key not in seen:
            seen.add(backbone_key)
            exported = _meta_export(s)
            if exported is not None:
                cfg = make_eval_config(evaluation.config_cls, s.eval_config, f"eval_overrides.{s.stage}")
                try:
                    evaluation.check_backbone(exported, cfg)
                except UserError as e:
                    raise UserError(f"eval_overrides.{s.stage}.{e.field}", f"{s.method}/{s.preset}: {e.problem}",
                                    e.fix) from None


def _meta_export(stage: StageSpec) -> Any:
    """The backbone description a cell's method will export, from the method built on the meta device (no
    weights); None when the method cannot be built there (its job checks the backbone at start instead)."""
    import torch

    from harness.api import METHODS

    method_cls = METHODS.get(stage.method)
    train, cfg, _ = resolve(method_cls, stage.preset, stage.overrides)
    try:
        with torch.device("meta"):
            return method_cls(cfg, train).export_backbone()
    except Exception as e:  # noqa: BLE001 - checked at job start
        log.debug("meta-device export of %s/%s skipped: %s", stage.method, stage.preset, e)
        return None


def _launch_local(todo: list[StageSpec], folder: Path, cli_res: dict, ledger: Ledger, result: LaunchResult,
                  on_event: Callable[[str], None], python: str | None = None) -> None:
    failed_cells: set[str] = set()
    for stage in todo:  # pre-training stages come before their cell's evaluations
        if stage.cell_id in failed_cells:
            result.failed[stage.key] = "skipped: pre-training failed"
            continue
        ex = make_executor("local", folder, resource_params({**stage.resources, **cli_res}, "local"), python)
        with _launcher_env():
            job = ex.submit(StageRunner(), stage)
        ledger.record(stage.key, str(job.job_id), "local", folder)
        result.submitted[stage.key] = str(job.job_id)
        on_event(f"  {_label(stage)}: started job {job.job_id}; log {job.paths.stderr}")
        t0 = time.time()
        try:
            _follow(job, stage, on_event)
            job.results()
            on_event(f"  {_label(stage)}: done in {_hms(time.time() - t0)}")
        except KeyboardInterrupt:
            job.cancel()  # its checkpoint stays; the next launch resumes from it
            raise
        except Exception as e:  # the stage wrote its own 'failed' record; keep going with the others
            rec = read_record(stage.stage_dir) or {}
            mine = rec.get("status") == "failed" and str(rec.get("job_id")) == str(job.job_id)
            result.failed[stage.key] = rec["error"] if mine and rec.get("error") else _job_error_line(
                str(e), str(job.paths.stderr))
            on_event(f"  {_label(stage)}: FAILED: {result.failed[stage.key]}")
            if stage.builds:
                failed_cells.add(stage.cell_id)


@contextmanager
def _launcher_env():
    """Tell the local job who launched it (submitit copies the environment), so it ends with us."""
    previous = os.environ.get(LAUNCHER_ENV)
    os.environ[LAUNCHER_ENV] = launcher_token()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(LAUNCHER_ENV, None)
        else:
            os.environ[LAUNCHER_ENV] = previous


POLL_S = 2.0


def _label(stage: StageSpec) -> str:
    return f"[{stage.method}/{stage.preset_label} s{stage.seed} {stage.stage}]"


def _hms(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _follow(job: submitit.Job, stage: StageSpec, on_event: Callable[[str], None]) -> None:
    """Wait for a local job, printing a line whenever its stage's progress file moves."""
    path = Path(stage.stage_dir) / "progress.json"
    first: tuple[float, int] | None = None
    last_step = None
    while not job.done():
        time.sleep(POLL_S)
        try:
            prog = json.loads(path.read_text())
            step, total, at = int(prog["step"]), int(prog["total"]), float(prog["updated_at"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if step == last_step:
            continue
        if first is None or step < first[1]:
            first = (at, step)
        last_step = step
        rate = (step - first[1]) / (at - first[0]) if at > first[0] else 0.0
        eta = _hms((total - step) / rate) if rate > 0 else "?"
        loss = prog.get("loss")
        ips = prog.get("img_per_s")
        on_event(f"  {_label(stage)} step {step}/{total}"
                 + (f"  loss {loss:.4f}" if isinstance(loss, (int, float)) else "")
                 + (f"  {ips:.1f} img/s" if isinstance(ips, (int, float)) else "") + f"  ETA {eta}")


_PROGRESS = re.compile(r"\d+%\||\d+/\d+ \[|it/s|s/it")
_ERROR = re.compile(r"^[\w.]*(Error|Exception|Interrupt|Exit)(:|$)|^Killed\b")


def _job_error_line(text: str, log: str) -> str:
    """The real error of a job that wrote no record: the last exception line of its output, never a
    progress-bar line; for a job killed without a word (submitit's local controller does not keep the
    task's exit status), say so and where its log is."""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines()]
    for line in reversed(lines):
        if line and not _PROGRESS.search(line) and _ERROR.match(line):
            return line[:300]
    return f"the job ended without a result or an error message (killed, or out of memory?); see its log {log}"


def _launch_slurm(todo: list[StageSpec], active: dict[str, str], folder: Path, cli_res: dict, ledger: Ledger,
                  result: LaunchResult, python: str | None = None) -> None:
    pre = [s for s in todo if s.builds]  # pre-trainings, imports and floors' init exports
    evals = [s for s in todo if not s.builds]
    job_of: dict[str, str] = dict(active)  # stage key -> job id (new or already active)
    array_of: dict[str, tuple[str, int]] = {}  # pretrain key -> (array id, index) for new arrays
    # Pre-training: one array per resource shape and stage kind (the seeds of an experiment share it).
    for params_json, group in _group(pre, cli_res).items():
        jobs = _submit_array(folder, json.loads(params_json), group, python)
        for i, (stage, job) in enumerate(zip(group, jobs, strict=True)):
            job_of[stage.key] = job.job_id
            array_of[stage.key] = (job.job_id.split("_")[0], i)
            ledger.record(stage.key, job.job_id, "slurm", folder)
            result.submitted[stage.key] = job.job_id
    # Evaluations: an array with aftercorr when its pre-trainings are the same array in the same
    # order; otherwise one job each with afterok on its own pre-training job.
    for params_json, group in _group(evals, cli_res).items():
        params = json.loads(params_json)
        by_kind: dict[str, list[StageSpec]] = defaultdict(list)
        for s in group:
            by_kind[s.stage].append(s)
        for stages in by_kind.values():
            parents = [array_of.get(s.build_key) for s in stages]
            same_array = all(parents) and len({p[0] for p in parents}) == 1 and \
                [p[1] for p in parents] == list(range(len(stages)))
            extra = params.get("slurm_additional_parameters", {})
            if same_array:
                jobs = _submit_array(folder, {**params, "slurm_additional_parameters":
                                              {**extra, "dependency": f"aftercorr:{parents[0][0]}"}}, stages, python)
            else:
                jobs = []
                for s in stages:
                    dep = job_of.get(s.build_key)
                    after = {"slurm_additional_parameters": {**extra, "dependency": f"afterok:{dep}"}} if dep else {}
                    jobs += _submit_array(folder, {**params, **after}, [s], python)
            for s, job in zip(stages, jobs, strict=True):
                ledger.record(s.key, job.job_id, "slurm", folder)
                result.submitted[s.key] = job.job_id


def _group(stages: list[StageSpec], cli_res: dict) -> dict[str, list[StageSpec]]:
    groups: dict[str, list[StageSpec]] = defaultdict(list)
    for s in stages:
        params = resource_params({**s.resources, **cli_res}, "slurm")
        groups[json.dumps(params, sort_keys=True)].append(s)
    return groups


def _submit_array(folder: Path, params: dict[str, Any], stages: list[StageSpec], python: str | None = None
                  ) -> list[submitit.Job]:
    ex = make_executor("slurm", folder, params, python)
    if len(stages) == 1:
        return [ex.submit(StageRunner(), stages[0])]
    with ex.batch():
        jobs = [ex.submit(StageRunner(), s) for s in stages]
    return jobs
