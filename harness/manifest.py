"""The run folder's manifest: the expanded matrix as ``launch`` last submitted it, in one small JSON file.

``report`` and ``status`` read it instead of expanding the spec, so they need neither torch nor the method
plugins (expanding imports both), and ``report`` never asks SLURM anything. It is trusted only while the
spec file still says what it said at launch (a hash of the spec without its ``report:`` block, which only
changes how results are shown); otherwise the callers expand the spec as before.

Also here, because both the fast path and ``harness.matrix`` need them: where a spec's run folder is, how a
relative path in a spec resolves (against the spec's folder, as ``checkpoint:`` always did) and the typed
``report:`` settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from harness.atomic import read_json_state, write_json
from harness.errors import UserError

MANIFEST_VERSION = 1
# Fields of a stage that reports and status need; everything else stays in the spec.
STAGE_FIELDS = ("cell_id", "stage_id", "stage", "method", "preset", "backbone", "epochs", "seed", "protocol",
                "headline_metric", "paper_recipe", "recipe_deviations", "data_root", "stage_dir", "pretrain_dir",
                "floor_of", "report_metrics")


@dataclass(frozen=True)
class ReportSettings:
    """``report:`` in a spec. ``tolerance``: a gap (in metric points) the verdict forgives on top of the
    confidence interval; ``confidence``: the interval's level."""

    tolerance: float = 0.0
    confidence: float = 0.95


def report_settings(spec: dict[str, Any]) -> ReportSettings:
    block = spec.get("report") or {}
    if not isinstance(block, dict):
        raise UserError("report", f"must be a mapping, got {type(block).__name__}", "e.g. report: {tolerance: 0.5}")
    fields = {f.name for f in dataclasses.fields(ReportSettings)}
    bad = set(block) - fields
    if bad:
        raise UserError(f"report.{sorted(bad)[0]}", "unknown setting", f"use: {', '.join(sorted(fields))}")
    values = {}
    for key, value in block.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"report.{key}", f"must be a number, got {value!r}", "e.g. report: {tolerance: 0.5}")
        values[key] = float(value)
    settings = ReportSettings(**values)
    if settings.tolerance < 0:
        raise UserError("report.tolerance", f"must be >= 0, got {settings.tolerance}", "give a gap in metric points")
    if not 0 < settings.confidence < 1:
        raise UserError("report.confidence", f"must be in (0, 1), got {settings.confidence}", "e.g. 0.95")
    return settings


def spec_path_value(value: Any, spec_dir: Path) -> Path:
    """A path written in a spec: relative ones resolve against the spec's folder, not the current one."""
    path = Path(str(value)).expanduser()
    # normpath, not resolve(): "../data" is tidied, but a symlinked mount keeps the name the user gave it
    return Path(os.path.normpath(path if path.is_absolute() else spec_dir / path))


def run_folder(spec: dict[str, Any], spec_path: Path, cli_out: str | os.PathLike | None) -> Path:
    """``--out`` (relative to the current folder, as any command-line path), else the spec's ``out``
    (relative to the spec), else ``runs/<name>`` beside the spec."""
    if cli_out:
        return Path(cli_out).resolve()
    name = str(spec.get("name") or spec_path.stem)
    return spec_path_value(spec.get("out") or f"runs/{name}", spec_path.parent).resolve()


def spec_name(spec: dict[str, Any], spec_path: Path) -> str:
    return str(spec.get("name") or spec_path.stem)


def spec_hash(spec: dict[str, Any]) -> str:
    shown = {k: v for k, v in spec.items() if k != "report"}
    return hashlib.sha256(json.dumps(shown, sort_keys=True, default=str).encode()).hexdigest()


def manifest_path(out: Path) -> Path:
    return Path(out) / "launch" / "manifest.json"


def stage_rows(matrix: Any, fingerprints: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One plain row per stage of an expanded matrix (what the manifest keeps)."""
    fingerprints = fingerprints or {}
    rows = []
    for s in matrix.stages():
        row = {k: getattr(s, k) for k in STAGE_FIELDS}
        row.update(preset=s.preset_label, evaluation=None if s.builds else s.stage,
                   data_fingerprint=fingerprints.get(s.data_root))
        rows.append(row)
    return rows


def write_manifest(matrix: Any, spec: dict[str, Any], fingerprints: dict[str, Any] | None = None) -> Path:
    """Written atomically by ``launch`` before it submits anything. ``fingerprints``: data root -> its
    fingerprint (harness/dataset_id.py), so a report knows each stage's data before its record exists."""
    check_owner(matrix.out, matrix.name)
    stages, shared = _pack(stage_rows(matrix, fingerprints))
    return write_json(manifest_path(matrix.out), {
        "manifest_version": MANIFEST_VERSION, "name": matrix.name, "spec_path": str(matrix.spec_path),
        "spec_sha256": spec_hash(spec), "created_at": datetime.now(UTC).isoformat(), "shared": shared,
        "stages": stages})


# Fields whose values repeat across thousands of stages: stored once under "shared", referenced by index,
# which keeps a 10,000-stage manifest a few MB instead of 15.
_SHARED = ("recipe_deviations", "data_fingerprint")


def _pack(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, list]]:
    shared: dict[str, list] = {k: [] for k in _SHARED}
    seen: dict[str, dict[str, int]] = {k: {} for k in _SHARED}
    out = []
    for row in rows:
        row = dict(row)
        for k in _SHARED:
            blob = json.dumps(row[k], sort_keys=True, default=str)
            if blob not in seen[k]:
                seen[k][blob] = len(shared[k])
                shared[k].append(row[k])
            row[k] = seen[k][blob]
        out.append(row)
    return out, shared


def unpack(manifest: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The stage rows of a manifest, shared values put back; None for a malformed one."""
    shared, stages = manifest.get("shared"), manifest.get("stages")
    if not isinstance(shared, dict) or not isinstance(stages, list):
        return None
    try:
        for row in stages:
            for k in _SHARED:
                row[k] = shared[k][row[k]]
    except (KeyError, IndexError, TypeError):
        return None
    return stages


@dataclass
class Run:
    """What report and status need of a matrix: its folder, name, settings and expected stages."""

    name: str
    out: Path
    stages: list[dict[str, Any]]
    settings: ReportSettings
    from_manifest: bool


def open_run(spec_path: str | os.PathLike, cli_out: str | os.PathLike | None = None) -> Run | None:
    """The run from its manifest, or None when there is none or it is stale (the caller expands the spec).

    Raises UserError when ``--out`` names the run folder of another spec: its report is not ours to
    overwrite.
    """
    spec_path = Path(spec_path).resolve()
    try:
        # libyaml when present: a spec listing thousands of seeds parses in milliseconds, not a second
        spec = yaml.load(spec_path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, yaml.YAMLError):
        return None  # expanding the spec gives the one-line error
    if not isinstance(spec, dict):
        return None
    out = run_folder(spec, spec_path, cli_out)
    manifest, _ = read_json_state(manifest_path(out))
    name = spec_name(spec, spec_path)
    check_owner(out, name, manifest)
    if (manifest is None or manifest.get("manifest_version") != MANIFEST_VERSION
            or manifest.get("spec_sha256") != spec_hash(spec)):
        return None
    stages = unpack(manifest)
    if stages is None:
        return None
    return Run(name=name, out=out, stages=stages, settings=report_settings(spec), from_manifest=True)


def check_owner(out: Path, name: str, manifest: dict[str, Any] | None = None) -> None:
    """Refuse to treat ``out`` as this spec's run folder when its manifest says it belongs to another."""
    if manifest is None:
        manifest, _ = read_json_state(manifest_path(out))
    if manifest is not None and manifest.get("name") not in (None, name):
        raise UserError("--out", f"{out} is the run folder of spec {manifest.get('name')!r} "
                        f"({manifest.get('spec_path')}), not of {name!r}",
                        "pass that spec, or an --out of this spec's own")


def run_from_matrix(matrix: Any, spec: dict[str, Any] | None = None) -> Run:
    """The slow path: a freshly expanded matrix (no manifest yet, or the spec changed since launch)."""
    return Run(name=matrix.name, out=matrix.out, stages=stage_rows(matrix), settings=report_settings(spec or {}),
               from_manifest=False)


def load_run(spec_path: str | os.PathLike, cli_out: str | os.PathLike | None = None) -> Run:
    """The run of a spec: from its manifest when current (fast, no torch), else by expanding the spec."""
    run = open_run(spec_path, cli_out)
    if run is not None:
        return run
    from harness.matrix import expand, load_spec  # imports torch and every method plugin

    matrix = expand(spec_path, cli_out)
    check_owner(matrix.out, matrix.name)
    return run_from_matrix(matrix, load_spec(matrix.spec_path))
