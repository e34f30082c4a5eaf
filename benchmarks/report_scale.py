"""How long ``repro report`` and ``repro status`` take over a big run folder (issue 6: < 2 s at 10,000 records).

Builds a synthetic run: a spec of MAE tiny x k-NN over N/2 seeds (N stages), its manifest as ``launch``
writes it, one done record per stage (with a data fingerprint and one attempt) and a local-executor
ledger; then times each command as a user runs it (a fresh ``python -m harness.cli`` process, imports
included). Prints wall and CPU seconds per command (on a busy machine the CPU time is what the wall time
would be on an idle one) and whether torch was imported. The first report builds the run's records index
(launch/records_index.json); later ones reuse it.

    python benchmarks/report_scale.py --records 10000 [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from harness.atomic import write_json
from harness.manifest import write_manifest
from harness.matrix import expand, load_spec

FINGERPRINT = {"version": 1, "root": "data", "splits": {"train": {"classes": 10, "images": 1437,
                                                                  "files_sha256": "0" * 64}}}
PROBE = ("import runpy, sys, time; t = time.perf_counter(); sys.argv = ['repro', *sys.argv[1:]]\n"
         "try:\n    runpy.run_module('harness.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
         "sys.stderr.write(f'TORCH={\"torch\" in sys.modules}\\n')")


def build(folder: Path, records: int) -> Path:
    spec = {"name": "scale", "out": "runs", "data": {"pretrain": "data"},
            "experiments": [{"method": "mae", "preset": "tiny", "seeds": list(range(records // 2)),
                             "evaluations": ["knn"]}]}
    path = folder / "scale.yaml"
    path.write_text(yaml.safe_dump(spec))
    matrix = expand(path)
    write_manifest(matrix, load_spec(path), {s.data_root: FINGERPRINT for s in matrix.stages()})
    ledger = {}
    for i, s in enumerate(matrix.stages()):
        metrics = {"loss": 0.5} if s.stage == "pretrain" else {"top1": 50.0 + s.seed % 7, "top5": 90.0}
        rec = {"schema_version": 1, "cell_id": s.cell_id, "stage_id": s.stage_id, "stage": s.stage, "status": "done",
               "method": s.method, "preset": s.preset, "backbone": s.backbone, "epochs": s.epochs, "seed": s.seed,
               "evaluation": None if s.stage == "pretrain" else s.stage, "protocol": s.protocol,
               "headline_metric": s.headline_metric, "metrics": metrics, "paper_recipe": s.paper_recipe,
               "recipe_deviations": s.recipe_deviations, "data_fingerprint": FINGERPRINT, "wall_time_s": 60.0,
               "gpu_hours": 0.0, "cpu_hours": 0.03, "img_per_s": 100.0 + s.seed % 5, "hardware": "CPU x (2 cores)",
               "attempts": [{"attempt": 1, "status": "done", "wall_s": 60.0, "device": "cpu", "cpu_cores": 2}],
               "created_at": "2026-01-01T00:00:00+00:00"}
        Path(s.stage_dir).mkdir(parents=True, exist_ok=True)
        (Path(s.stage_dir) / "record.json").write_text(json.dumps(rec))
        ledger[s.key] = {"job_id": str(i), "executor": "local", "folder": str(matrix.out / "submitit")}
    write_json(matrix.out / "launch" / "ledger.json", ledger)
    return path


def timed(command: str, spec: Path) -> tuple[float, float, bool]:
    """Wall seconds, CPU seconds (user + system: what the wall is on an idle machine) and torch seen."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PROBE, command, str(spec)], capture_output=True, text=True,
                         check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, "TORCH=True" in out.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="build the run here and keep it (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        spec = build(folder, args.records)
        print(f"built {args.records} records in {time.perf_counter() - t0:.1f} s ({folder})")
        for command in ("report", "status"):
            runs = [timed(command, spec) for _ in range(args.repeats)]
            secs, cpu = sorted(r[0] for r in runs), sorted(r[1] for r in runs)
            print(f"repro {command:6s}: wall best {secs[0]:.2f} s, median {secs[len(secs) // 2]:.2f} s; CPU best "
                  f"{cpu[0]:.2f} s over {args.repeats} runs (load average {os.getloadavg()[0]:.1f}); "
                  f"torch imported: {any(r[2] for r in runs)}")


if __name__ == "__main__":
    main()
