"""Small builders shared by tests (imported explicitly, not a fixture module)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from harness.matrix import expand


def repro(*args: str, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess:
    """The ``repro`` command in a fresh process (``python -m harness.cli``), output captured as text."""
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run in-process training on ``n`` torch threads: CPU float reductions split by thread, so runs meant to
    match bit for bit (or margins meant to be the same on every machine) need the same count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_spec(path: Path, data_root: Path, out: Path, experiments: list[dict[str, Any]],
               resources: dict[str, Any] | None = None) -> Path:
    # A random-init floor (on by default for tiny presets) only where a test asks for one: each costs stages.
    spec = {"name": path.stem, "out": str(out), "data": {"pretrain": str(data_root)},
            "experiments": [{"floor": False, **exp} for exp in experiments]}
    if resources:
        spec["resources"] = resources
    path.write_text(yaml.safe_dump(spec))
    return path


def pretrain_spec(tmp: Path, data_root: Path, overrides: dict[str, Any], seed: int = 0,
                  evaluations: list[str] | None = None):
    tmp.mkdir(parents=True, exist_ok=True)
    spec = write_spec(tmp / "spec.yaml", data_root, tmp / "runs",
                      [{"method": "mae", "preset": "tiny", "seeds": [seed], "overrides": overrides,
                        "evaluations": evaluations or []}])
    return expand(spec)


def read_metrics(stage_dir: str | Path) -> list[dict[str, Any]]:
    lines = (Path(stage_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def golden(name: str) -> dict[str, Any]:
    """A fixture of numbers from an official implementation (tests/fixtures/golden/<name>.json)."""
    return json.loads((Path(__file__).parent / "fixtures" / "golden" / f"{name}.json").read_text())


def pretrain_then_knn(tmp: Path, data_root: Path, method: str, overrides: dict[str, Any],
                      preset: str = "tiny") -> dict[str, Any]:
    """Pre-train one tiny cell through the spine (matrix -> stage -> export), then run k-NN as its own
    evaluation stage on the export. Returns the records, losses, export and the cell."""
    from harness.export import load_export
    from harness.records import read_record
    from harness.stages import run_stage

    path = write_spec(tmp / "spec.yaml", data_root, tmp / "runs",
                      [{"method": method, "preset": preset, "seeds": [0], "evaluations": ["knn"],
                        "overrides": overrides}])
    cell = expand(path).cells[0]
    pre = run_stage(cell.pretrain)
    backbone, spec, meta = load_export(Path(cell.pretrain.stage_dir) / "export")
    run_stage(cell.evaluations[0])
    return {"cell": cell, "pretrain": pre, "losses": [m["loss"] for m in read_metrics(cell.pretrain.stage_dir)],
            "backbone": backbone, "feature_spec": spec, "meta": meta,
            "knn": read_record(cell.evaluations[0].stage_dir)}


def wave(shape, a: float, b: float) -> torch.Tensor:
    """The fixtures' deterministic inputs: sin(a * arange(numel) + b) in float64, cast to float32."""
    n = torch.Size(shape).numel()
    return torch.sin(a * torch.arange(n, dtype=torch.float64) + b).float().reshape(shape)


def formula_weights(module: torch.nn.Module) -> None:
    """The fixtures' deterministic weights: parameter j (sorted names) = 0.05 sin(0.37 arange + j)."""
    with torch.no_grad():
        for j, (name, p) in enumerate(sorted(module.named_parameters())):
            if "gamma" in name or name == "pos_embed":
                continue
            p.copy_((0.05 * torch.sin(0.37 * torch.arange(p.numel(), dtype=torch.float64) + j)).reshape(p.shape))


# The tiny preset's shape before it was tuned to learn (issue 10): 4-px patches, two local crops, DINO's
# augmentations, drop-path, a frozen last layer and a teacher-temperature warm-up, so that the model's plumbing
# is tested in the paper's multi-crop shape.
DINO_PLUMBING = {"patch_size": 4, "local_crops_number": 2, "global_crops_scale": (0.25, 1.0),
                 "color_jitter_prob": 0.8, "solarize_prob": 0.2, "drop_path_rate": 0.1, "out_dim": 256,
                 "use_bn_in_head": False, "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 3, "epochs": 10,
                 "batch_size": 64, "freeze_last_layer": 1}
