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
from harness.config import identity_config, recipe_deviations, resolve
from harness.errors import UserError

CODE_VERSION = 1  # bump when a change makes old results incomparable; it is part of every stage id
PRETRAIN = "pretrain"
_SPEC_KEYS = {"name", "out", "data", "experiments", "resources"}
_EXP_KEYS = {"method", "preset", "seeds", "overrides", "evaluations", "eval_overrides", "checkpoint",
             "checkpoint_key"}
RESOURCE_KEYS = {"nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "timeout_min",
                 "partition", "account", "qos", "constraint", "array_parallelism", "signal_delay_s",
                 "max_num_timeout"}


@dataclass(frozen=True)
class StageSpec:
    """Everything one job needs, picklable and JSON-able: the job resolves its config from it."""

    stage: str  # "pretrain" or an evaluation name
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
    backbone: str = ""
    epochs: int = 0
    paper_recipe: str | None = None
    recipe_deviations: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    import_from: str | None = None  # an official checkpoint: the "pretrain" stage imports it instead
    checkpoint_key: str = "teacher"

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


@dataclass(frozen=True)
class Matrix:
    name: str
    out: Path
    cells: tuple[Cell, ...]
    spec_path: Path

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


def expand(path: str | Path, out: str | Path | None = None) -> Matrix:
    """Parse and fully validate a spec; every bad field is reported before anything is launched."""
    path = Path(path).resolve()
    spec = load_spec(path)
    name = str(spec.get("name") or path.stem)
    out_dir = Path(out or spec.get("out") or f"runs/{name}").resolve()
    data = _require_mapping(spec.get("data"), "data")
    if "pretrain" not in data:
        raise UserError("data.pretrain", "missing", "give the ImageFolder root used for pre-training")
    experiments = spec.get("experiments")
    if not isinstance(experiments, list) or not experiments:
        raise UserError("experiments", "must be a non-empty list", "add at least one experiment")
    res_pre, res_eval = resources_for(spec, "pretrain"), resources_for(spec, "eval")
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
            imported = _import_source(exp, where, path.parent)
            cell = _cell(method_cls, preset_name, seed, overrides, flat, method_cfg, data, evals, eval_over,
                         out_dir, where, res_pre, res_eval, imported)
            cells.setdefault(cell.pretrain.cell_id, cell)
    return Matrix(name=name, out=out_dir, cells=tuple(cells.values()), spec_path=path)


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


def _cell(method_cls, preset_name, seed, overrides, flat, method_cfg, data, evals, eval_over, out_dir, where,
          res_pre, res_eval, imported: dict[str, str] | None = None) -> Cell:
    pre_root = str(data["pretrain"])
    cell_id = digest({"v": CODE_VERSION, "method": method_cls.name, "config": identity_config(flat), "seed": seed,
                      "data": pre_root, **({"import": imported} if imported else {})})
    shape = getattr(method_cfg, "shape", None)
    backbone = shape.label if shape is not None else str(flat.get("backbone", "?"))
    paper_recipe, devs = recipe_deviations(method_cls, preset_name, flat)
    if imported:  # released weights: the paper's own run, so nothing deviates from its recipe
        devs = {}
    tag = "-official" if imported else ""
    cell_dir = out_dir / "cells" / f"{method_cls.name}-{preset_name}{tag}-s{seed}-{cell_id}"
    common = dict(cell_id=cell_id, method=method_cls.name, preset=preset_name, seed=seed,
                  overrides=dict(overrides), backbone=backbone, epochs=int(flat["epochs"]),
                  paper_recipe=paper_recipe, recipe_deviations=devs, pretrain_dir=str(cell_dir / PRETRAIN),
                  import_from=imported["path"] if imported else None,
                  checkpoint_key=imported["key"] if imported else "teacher")
    pretrain = StageSpec(stage=PRETRAIN, stage_id=cell_id, data_root=pre_root, stage_dir=str(cell_dir / PRETRAIN),
                         resources=res_pre, **common)
    stages = []
    for ev in evals:
        evaluation = EVALUATIONS.get(str(ev), f"{where}.evaluations")
        raw = _require_mapping(eval_over.get(ev), f"{where}.eval_overrides.{ev}")
        cfg_obj = make_eval_config(evaluation.config_cls, raw, f"{where}.eval_overrides.{ev}")
        eval_cfg = json.loads(json.dumps(dataclasses.asdict(cfg_obj)))
        eval_root = str(data.get(ev, pre_root))
        stage_id = digest({"v": CODE_VERSION, "pretrain": cell_id, "eval": ev, "config": eval_cfg,
                           "data": eval_root})
        stages.append(StageSpec(stage=str(ev), stage_id=stage_id, data_root=eval_root,
                                stage_dir=str(cell_dir / f"{ev}-{stage_id}"), eval_config=eval_cfg,
                                protocol=cfg_obj.protocol(), headline_metric=cfg_obj.headline,
                                resources=res_eval, **common))
    return Cell(pretrain=pretrain, evaluations=tuple(stages))


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
