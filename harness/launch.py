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
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from harness.api import EVALUATIONS
from harness.atomic import read_json_state, write_json
from harness.config import make_eval_config
from harness.data import check_layout
from harness.dataset_id import fingerprint
from harness.errors import UserError
from harness.manifest import write_manifest
from harness.matrix import PRETRAIN, Matrix, StageSpec, load_spec
from harness.records import read_record
from harness.snapshot import Snapshot, code_state, job_python, make_snapshot
from harness.stages import StageRunner
from harness.status import ACTIVE_STATES

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


def make_executor(executor: str, folder: Path, params: dict[str, Any], python: str | None = None
                  ) -> submitit.AutoExecutor:
    """``python``: the command a job starts with (a code snapshot's, see harness/snapshot.py)."""
    if executor not in EXECUTORS:
        raise UserError("executor", f"unknown executor {executor!r}", f"choose one of: {', '.join(EXECUTORS)}")
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
        if job is not None and job_state(job) in ACTIVE_STATES | {"UNKNOWN"}:
            active[stage.key] = job.job_id
            result.skipped_active[stage.key] = job.job_id
            continue
        todo.append(stage)
    return todo, active


def launch(matrix: Matrix, executor: str, cli_resources: dict[str, Any] | None = None,
           snapshot: bool | None = None) -> LaunchResult:
    """``snapshot``: run the jobs from a frozen copy of the code (None: the spec's setting, else on for
    SLURM and off locally, where stages run while you wait)."""
    cli_resources = {k: v for k, v in (cli_resources or {}).items() if v is not None}
    # Bad data folders fail here, in one line, before anything is submitted or written.
    for root, splits in _data_roots(matrix).items():
        check_layout(root, splits)
    _check_eval_data(matrix)
    write_manifest(matrix, load_spec(matrix.spec_path),
                   {root: fingerprint(root, splits) for root, splits in _data_roots(matrix).items()})
    folder = matrix.out / "submitit"
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
        _launch_local(todo, folder, cli_resources, ledger, result, python)
    else:
        _launch_slurm(todo, active, folder, cli_resources, ledger, result, python)
    return result


def _other_code(matrix: Matrix, done_keys: list[str], code_hash: str) -> list[str]:
    """Finished stages computed by other code than this launch's. They are kept: a stage's identity is
    its configuration (and CODE_VERSION), by design; the report can show each row's code."""
    stages = {s.key: s for s in matrix.stages()}
    return [key for key in done_keys
            if ((read_record(stages[key].stage_dir) or {}).get("code") or {}).get("hash") != code_hash]


def _data_roots(matrix: Matrix) -> dict[str, tuple[str, ...]]:
    roots: dict[str, set[str]] = defaultdict(set)
    for s in matrix.stages():
        if s.stage == PRETRAIN or EVALUATIONS.get(s.stage, "evaluation").check_data is None:
            roots[s.data_root] |= {"train"} if s.stage == PRETRAIN else {"train", "val"}
    return {root: tuple(sorted(splits)) for root, splits in roots.items()}


def _check_eval_data(matrix: Matrix) -> None:
    """Evaluations that declare their own data check (e.g. a low-shot subset file) run it once per setting."""
    seen: set[str] = set()
    for s in matrix.stages():
        if s.stage == PRETRAIN:
            continue
        evaluation = EVALUATIONS.get(s.stage, "evaluation")
        key = json.dumps([s.stage, s.data_root, s.eval_config], sort_keys=True, default=str)
        if evaluation.check_data is not None and key not in seen:
            seen.add(key)
            evaluation.check_data(s.data_root, make_eval_config(evaluation.config_cls, s.eval_config,
                                                                f"eval_overrides.{s.stage}"))


def _launch_local(todo: list[StageSpec], folder: Path, cli_res: dict, ledger: Ledger, result: LaunchResult,
                  python: str | None = None) -> None:
    failed_cells: set[str] = set()
    for stage in todo:  # pre-training stages come before their cell's evaluations
        if stage.cell_id in failed_cells:
            result.failed[stage.key] = "skipped: pre-training failed"
            continue
        ex = make_executor("local", folder, resource_params({**stage.resources, **cli_res}, "local"), python)
        job = ex.submit(StageRunner(), stage)
        ledger.record(stage.key, str(job.job_id), "local", folder)
        result.submitted[stage.key] = str(job.job_id)
        try:
            job.results()
        except Exception as e:  # the stage wrote its own 'failed' record; keep going with the others
            rec = read_record(stage.stage_dir) or {}
            result.failed[stage.key] = rec.get("error") or _last_error_line(str(e).strip().splitlines())
            if stage.stage == PRETRAIN:
                failed_cells.add(stage.cell_id)


def _last_error_line(lines: list[str]) -> str:
    for line in reversed(lines):
        if line.strip() and not line.startswith(" "):
            return line.strip()[:300]
    return "failed"


def _launch_slurm(todo: list[StageSpec], active: dict[str, str], folder: Path, cli_res: dict, ledger: Ledger,
                  result: LaunchResult, python: str | None = None) -> None:
    pre = [s for s in todo if s.stage == PRETRAIN]
    evals = [s for s in todo if s.stage != PRETRAIN]
    job_of: dict[str, str] = dict(active)  # stage key -> job id (new or already active)
    array_of: dict[str, tuple[str, int]] = {}  # pretrain key -> (array id, index) for new arrays
    # Pre-training: one array per resource shape (the seeds of an experiment share it).
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
            parents = [array_of.get(f"{s.cell_id}/{PRETRAIN}") for s in stages]
            same_array = all(parents) and len({p[0] for p in parents}) == 1 and \
                [p[1] for p in parents] == list(range(len(stages)))
            extra = params.get("slurm_additional_parameters", {})
            if same_array:
                jobs = _submit_array(folder, {**params, "slurm_additional_parameters":
                                              {**extra, "dependency": f"aftercorr:{parents[0][0]}"}}, stages, python)
            else:
                jobs = []
                for s in stages:
                    dep = job_of.get(f"{s.cell_id}/{PRETRAIN}")
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
