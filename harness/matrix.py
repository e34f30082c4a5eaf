"""Matrix specs (YAML) -> cells -> stages, with a content hash as each stage's identity.

A spec::

    name: demo
    out: runs/demo                     # optional; default runs/<name>
    data: {pretrain: data/tiny/digits} # ImageFolder roots; evaluations default to the pretrain data
    experiments:
      - method: mae                    # or a list: the experiment is the product of lists
        preset: tiny
        seeds: [0, 1]
        overrides: {epochs: 2}
        evaluations: [knn]
        eval_overrides: {knn: {ks: [10, 20]}}
    resources:
      pretrain: {gpus_per_node: 1, timeout_min: 60}
      eval: {gpus_per_node: 1, timeout_min: 30}
    snapshot: true                     # optional: jobs run a frozen copy of the code (default: SLURM only)
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.api import EVALUATIONS, METHODS
from harness.config import identity_config, make_eval_config, recipe_deviations, resolve
from harness.errors import UserError
from harness.health import HealthConfig
from harness.manifest import report_settings, run_folder, spec_path_value

CODE_VERSION = 1  # bump when a change makes old results incomparable; it is part of every stage id
PRETRAIN = "pretrain"
INIT = "init"  # a random-init floor cell's first stage: the method built with the cell's seed, exported untrained
_SPEC_KEYS = {"name", "out", "data", "experiments", "resources", "snapshot", "report"}
_EXP_KEYS = {"method", "preset", "seeds", "overrides", "evaluations", "eval_overrides", "checkpoint",
             "checkpoint_key", "floor", "health"}
RESOURCE_KEYS = {"nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "timeout_min",
                 "partition", "account", "qos", "constraint", "array_parallelism", "signal_delay_s",
                 "max_num_timeout"}


@dataclass(frozen=True)
class StageSpec:
    """Everything one job needs, picklable and JSON-able: the job resolves its config from it."""

    stage: str  # "pretrain", "init" (a floor cell's untrained export) or an evaluation name
    cell_id: str
    stage_id: str
    method: str
    preset: str
    seed: int
    overrides: dict[str, Any]
    data_root: str
    stage_dir: str
    pretrain_dir: str
    eval_config: dict[str, Any] = field(default_factory=dict)
    protocol: str = PRETRAIN  # evaluation stages: the protocol tag their metrics carry
    headline_metric: str = "loss"
    report_metrics: tuple[str, ...] = ()  # metrics the report shows beside the headline (COCO: box and mask AP)
    backbone: str = ""
    epochs: int = 0
    paper_recipe: str | None = None
    recipe_deviations: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    import_from: str | None = None  # an official checkpoint: the "pretrain" stage imports it instead
    checkpoint_key: str = "teacher"
    # What the ids were hashed from at launch ({"cell": ..., "stage": ...}) and the evaluation's own
    # overrides: a job re-resolves both with the code it runs and refuses to start on a mismatch.
    identity: dict[str, Any] = field(default_factory=dict)
    eval_overrides: dict[str, Any] = field(default_factory=dict)
    floor_of: str | None = None  # a random-init floor cell: the id of the trained cell it is the floor of
    health: dict[str, Any] = field(default_factory=dict)  # the experiment's 'health:' block (not identity)

    @property
    def builds(self) -> bool:
        """The stage that makes the cell's backbone (pre-training, import, or a floor's init export)."""
        return self.stage in (PRETRAIN, INIT)

    @property
    def build_key(self) -> str:
        """The key of the stage this one's cell builds its backbone in (what an evaluation waits for)."""
        return f"{self.cell_id}/{INIT if self.floor_of else PRETRAIN}"

    @property
    def preset_label(self) -> str:
        return f"{self.preset} (official weights)" if self.import_from else self.preset

    @property
    def key(self) -> str:
        return f"{self.cell_id}/{self.stage}"


@dataclass(frozen=True)
class Cell:
    pretrain: StageSpec
    evaluations: tuple[StageSpec, ...]

    @property
    def stages(self) -> tuple[StageSpec, ...]:
        return (self.pretrain, *self.evaluations)

    @property
    def is_floor(self) -> bool:
        return self.pretrain.floor_of is not None


@dataclass(frozen=True)
class Matrix:
    name: str
    out: Path
    cells: tuple[Cell, ...]
    spec_path: Path
    snapshot: bool | None = None  # the spec's 'snapshot:' (None: on for SLURM, off locally)

    def stages(self) -> list[StageSpec]:
        return [s for c in self.cells for s in c.stages]


def digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _require_mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(where, f"must be a mapping, got {type(value).__name__}", "write 'key: value' lines")
    return value


def load_spec(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError("spec", f"{str(path)!r} does not exist", "pass the path of a matrix YAML file")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise UserError("spec", f"{path} is not valid YAML{where}: {problem}", "fix the YAML syntax") from None
    if not isinstance(spec, dict):
        raise UserError("spec", f"{path} must hold a mapping with 'experiments'", "see README for an example")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise UserError(f"spec.{sorted(unknown)[0]}", "unknown key", f"use only: {', '.join(sorted(_SPEC_KEYS))}")
    return spec


def resources_for(spec: dict[str, Any], stage_kind: str) -> dict[str, Any]:
    res = _require_mapping(spec.get("resources"), "resources")
    block = _require_mapping(res.get(stage_kind), f"resources.{stage_kind}")
    bad = set(block) - RESOURCE_KEYS
    if bad:
        raise UserError(f"resources.{stage_kind}.{sorted(bad)[0]}", "unknown resource",
                        f"use: {', '.join(sorted(RESOURCE_KEYS))}")
    for key in ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "timeout_min"):
        if key in block and (not isinstance(block[key], int) or isinstance(block[key], bool)
                             or block[key] < (0 if key == "gpus_per_node" else 1)):
            raise UserError(f"resources.{stage_kind}.{key}", f"must be a positive integer, got {block[key]!r}",
                            "fix the value")
    return block


def expand(path: str | Path, out: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Matrix:
    """Parse and fully validate a spec; every bad field is reported before anything is launched.

    ``overrides`` (``repro launch SPEC key=value ...``) apply on top of every experiment's own."""
    path = Path(path).resolve()
    spec = load_spec(path)
    snapshot = spec.get("snapshot")
    if snapshot is not None and not isinstance(snapshot, bool):
        raise UserError("snapshot", f"must be true or false, got {snapshot!r}",
                        "true: jobs run a frozen copy of the launched code")
    name = str(spec.get("name") or path.stem)
    out_dir = run_folder(spec, path, out)
    report_settings(spec)  # a bad report: block fails here, before anything is launched
    # Relative data roots mean the spec's folder, whatever folder the command runs in.
    data = {k: str(spec_path_value(v, path.parent)) for k, v in _require_mapping(spec.get("data"), "data").items()}
    if "pretrain" not in data:
        raise UserError("data.pretrain", "missing", "give the ImageFolder root used for pre-training")
    experiments = spec.get("experiments")
    if not isinstance(experiments, list) or not experiments:
        raise UserError("experiments", "must be a non-empty list", "add at least one experiment")
    res_pre = resources_for(spec, "pretrain")
    # Per-evaluation blocks (resources.finetune, ...) fall back to resources.eval.
    res_blocks = _require_mapping(spec.get("resources"), "resources")
    known = {"pretrain", "eval"} | {EVALUATIONS.get(n, "evaluation").resources for n in EVALUATIONS.names()}
    for key in res_blocks:
        if key not in known:
            raise UserError(f"resources.{key}", "unknown resources block",
                            f"use one of: {', '.join(sorted(known))}")
    res_eval = {key: resources_for(spec, key) for key in res_blocks if key != "pretrain"}
    res_eval.setdefault("eval", {})
    cli_over = dict(overrides or {})
    cells: dict[str, Cell] = {}
    for i, exp in enumerate(experiments):
        where = f"experiments[{i}]"
        exp = _require_mapping(exp, where)
        unknown = set(exp) - _EXP_KEYS
        if unknown:
            raise UserError(f"{where}.{sorted(unknown)[0]}", "unknown key", f"use: {', '.join(sorted(_EXP_KEYS))}")
        for key in ("method", "preset"):
            if key not in exp:
                raise UserError(f"{where}.{key}", "missing", f"name the {key} to run")
        seeds = _as_list(exp.get("seeds", [0]))
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
            raise UserError(f"{where}.seeds", f"must be non-negative integers, got {seeds!r}", "e.g. seeds: [0, 1]")
        evals = _as_list(exp.get("evaluations", []))
        eval_over = _require_mapping(exp.get("eval_overrides"), f"{where}.eval_overrides")
        overrides = _require_mapping(exp.get("overrides"), f"{where}.overrides")
        for method, preset_name, seed in itertools.product(_as_list(exp["method"]), _as_list(exp["preset"]), seeds):
            method_cls = METHODS.get(str(method), f"{where}.method")
            if preset_name not in method_cls.presets:
                raise UserError(f"{where}.preset", f"unknown preset {preset_name!r} for method {method!r}",
                                f"choose one of: {', '.join(sorted(method_cls.presets))}")
            _, method_cfg, flat = resolve(method_cls, preset_name, overrides, f"{where}.overrides")
            cell_over = overrides
            if cli_over:
                cell_over = {**overrides, **cli_over}
                _, method_cfg, flat = resolve(method_cls, preset_name, cell_over, "command-line")
            imported = _import_source(exp, where, path.parent)
            health = _require_mapping(exp.get("health"), f"{where}.health")
            HealthConfig.from_spec(health, f"{where}.health")  # bad settings fail here, not in the job
            cell = _cell(method_cls, preset_name, seed, cell_over, flat, method_cfg, data, evals, eval_over,
                         out_dir, where, res_pre, res_eval, imported)
            if health:
                cell = dataclasses.replace(cell, pretrain=dataclasses.replace(cell.pretrain, health=dict(health)))
            cells.setdefault(cell.pretrain.cell_id, cell)
            if floor_wanted(exp, preset_name, where) and not imported:
                floor = _cell(method_cls, preset_name, seed, cell_over, flat, method_cfg, data, evals, eval_over,
                              out_dir, where, res_pre, res_eval, floor_of=cell.pretrain.cell_id)
                cells.setdefault(floor.pretrain.cell_id, floor)
    return Matrix(name=name, out=out_dir, cells=tuple(cells.values()), spec_path=path, snapshot=snapshot)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["epochs=2", "crop_scale=[0.2, 1.0]"]`` -> {"epochs": 2, ...}; values are read as YAML, like
    the spec's ``overrides:``, and checked with them when the matrix is expanded."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UserError(f"override {item!r}", "must be KEY=VALUE", "e.g. epochs=2 batch_size=32")
        if key in out:
            raise UserError(f"override {key}", "given twice", "keep one")
        try:
            out[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise UserError(f"override {key}", f"cannot read the value {text!r}", "write a YAML value") from None
    return out


def _import_source(exp: dict[str, Any], where: str, spec_dir: Path) -> dict[str, str] | None:
    """``checkpoint: PATH`` evaluates released weights instead of pre-training (relative to the spec)."""
    if "checkpoint" not in exp:
        return None
    ckpt = Path(str(exp["checkpoint"]))
    ckpt = ckpt if ckpt.is_absolute() else (spec_dir / ckpt)
    if not ckpt.is_file():
        raise UserError(f"{where}.checkpoint", f"{str(ckpt)!r} does not exist", "give the released checkpoint's path")
    key = str(exp.get("checkpoint_key", "teacher"))
    if key not in {"teacher", "student"}:
        raise UserError(f"{where}.checkpoint_key", f"unknown network {key!r}", "use 'teacher' or 'student'")
    return {"path": str(ckpt.resolve()), "key": key}


def floor_wanted(exp: dict[str, Any], preset_name: str, where: str) -> bool:
    """``floor: true|false`` in an experiment; by default on for the CPU test presets (``tiny``), where
    telling learning from no learning is the point, and off for paper recipes (an export costs nothing,
    but each evaluation of the floor costs as much as the trained cell's)."""
    value = exp.get("floor", preset_name == "tiny")
    if not isinstance(value, bool):
        raise UserError(f"{where}.floor", f"must be true or false, got {value!r}",
                        "true adds a random-init row (the same backbone untrained) under each cell")
    return value


def cell_identity(method: str, flat: dict[str, Any], seed: int, data_root: str, imported: dict | None,
                  floor: bool = False) -> dict[str, Any]:
    """What a cell id hashes: the resolved configuration and everything else that changes the result.
    A floor cell hashes the same plus ``"stage": "init"``."""
    return {"v": CODE_VERSION, "method": method, "config": identity_config(flat), "seed": seed, "data": data_root,
            **({"import": imported} if imported else {}), **({"stage": INIT} if floor else {})}


def eval_identity(cell_id: str, evaluation: str, eval_cfg: dict[str, Any], data_root: str) -> dict[str, Any]:
    return {"v": CODE_VERSION, "pretrain": cell_id, "eval": evaluation, "config": eval_cfg, "data": data_root}


def _cell(method_cls, preset_name, seed, overrides, flat, method_cfg, data, evals, eval_over, out_dir, where,
          res_pre, res_eval, imported: dict[str, str] | None = None, floor_of: str | None = None) -> Cell:
    pre_root = str(data["pretrain"])
    cell_ident = cell_identity(method_cls.name, flat, seed, pre_root, imported, floor=floor_of is not None)
    cell_id = digest(cell_ident)
    backbone = method_cls.backbone_label(method_cfg)
    paper_recipe, devs = recipe_deviations(method_cls, preset_name, flat)
    if imported:  # released weights: the paper's own run, so nothing deviates from its recipe
        devs = {}
    tag = "-official" if imported else "-init" if floor_of else ""
    cell_dir = out_dir / "cells" / f"{method_cls.name}-{preset_name}{tag}-s{seed}-{cell_id}"
    build = INIT if floor_of else PRETRAIN
    common = dict(cell_id=cell_id, method=method_cls.name, preset=preset_name, seed=seed,
                  overrides=dict(overrides), backbone=backbone, epochs=int(flat["epochs"]),
                  paper_recipe=paper_recipe, recipe_deviations=devs, pretrain_dir=str(cell_dir / build),
                  import_from=imported["path"] if imported else None,
                  checkpoint_key=imported["key"] if imported else "teacher", floor_of=floor_of)
    # A floor's export is cheap: it runs with the evaluations' resources, not the pre-training's.
    pretrain = StageSpec(stage=build, stage_id=cell_id, data_root=pre_root, stage_dir=str(cell_dir / build),
                         resources=res_eval["eval"] if floor_of else res_pre, identity={"cell": cell_ident},
                         **common)
    stages = []
    for ev in evals:
        evaluation = EVALUATIONS.get(str(ev), f"{where}.evaluations")
        raw = _require_mapping(eval_over.get(ev), f"{where}.eval_overrides.{ev}")
        cfg_obj = make_eval_config(evaluation.config_cls, raw, f"{where}.eval_overrides.{ev}")
        eval_cfg = json.loads(json.dumps(dataclasses.asdict(cfg_obj)))
        eval_root = str(data.get(ev, pre_root))
        # An evaluation's own recipe deviations (e.g. a cached linear probe) join the cell's.
        eval_devs = {**devs, **(cfg_obj.deviations() if hasattr(cfg_obj, "deviations") else {})}
        stage_ident = eval_identity(cell_id, str(ev), eval_cfg, eval_root)
        stage_id = digest(stage_ident)
        stages.append(StageSpec(stage=str(ev), stage_id=stage_id, data_root=eval_root,
                                stage_dir=str(cell_dir / f"{ev}-{stage_id}"), eval_config=eval_cfg,
                                protocol=cfg_obj.protocol(), headline_metric=cfg_obj.headline,
                                report_metrics=tuple(getattr(cfg_obj, "report_metrics", ())),
                                resources=res_eval.get(evaluation.resources, res_eval["eval"]),
                                identity={"cell": cell_ident, "stage": stage_ident},
                                eval_overrides=dict(raw), **{**common, "recipe_deviations": eval_devs}))
    return Cell(pretrain=pretrain, evaluations=tuple(stages))



def verify_identity(spec: StageSpec) -> None:
    """Re-resolve a stage's configuration with the code this process runs and compare it with what its
    ids were hashed from at launch; a queued job whose code changed underneath it stops here, before
    any compute, naming the settings that changed."""
    if not spec.identity:
        return
    launched_cell = spec.identity["cell"]
    _, _, flat = resolve(METHODS.get(spec.method, "method"), spec.preset, spec.overrides)
    now = {"cell": cell_identity(spec.method, flat, spec.seed, launched_cell["data"], launched_cell.get("import"),
                                 floor=spec.floor_of is not None)}
    if "stage" in spec.identity:
        evaluation = EVALUATIONS.get(spec.stage, "evaluation")
        cfg = make_eval_config(evaluation.config_cls, spec.eval_overrides, f"eval_overrides.{spec.stage}")
        eval_cfg = json.loads(json.dumps(dataclasses.asdict(cfg)))
        now["stage"] = eval_identity(digest(now["cell"]), spec.stage, eval_cfg, spec.data_root)
    if digest(now["cell"]) == spec.cell_id and digest(now.get("stage", now["cell"])) == spec.stage_id:
        return
    changes = _changes(json.loads(json.dumps(spec.identity, default=str)), json.loads(json.dumps(now, default=str)),
                       spec.stage)
    raise UserError("identity", f"{spec.key} was launched with other settings than this code resolves: "
                    f"{', '.join(changes) or 'its id'}", "relaunch the matrix (the code snapshot, on by default "
                    "on SLURM, keeps queued jobs on the launched code)")


def _changes(launched: dict[str, Any], now: dict[str, Any], stage: str) -> list[str]:
    """``["blr 0.00015→0.0003", "knn.ks [10]→[20]", "CODE_VERSION 1→2"]``: the settings that differ.
    (A stage's 'pretrain' id follows from its cell's settings, which are listed themselves.)"""
    out = []
    for part, label in (("cell", ""), ("stage", f"{stage}.")):
        a, b = launched.get(part) or {}, now.get(part) or {}
        for key in sorted(set(a) | set(b)):
            if key == "pretrain" or a.get(key) == b.get(key):
                continue
            if key == "config":
                ca, cb = a.get(key) or {}, b.get(key) or {}
                out += [f"{label}{k} {ca.get(k, '(unset)')}→{cb.get(k, '(unset)')}"
                        for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]
            else:
                out.append(f"{'CODE_VERSION' if key == 'v' else label + key} {a.get(key)}→{b.get(key)}")
    return list(dict.fromkeys(out))
