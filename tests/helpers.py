"""Small builders shared by tests (imported explicitly, not a fixture module)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from harness.matrix import expand


def write_spec(path: Path, data_root: Path, out: Path, experiments: list[dict[str, Any]],
               resources: dict[str, Any] | None = None) -> Path:
    spec = {"name": path.stem, "out": str(out), "data": {"pretrain": str(data_root)},
            "experiments": experiments}
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
