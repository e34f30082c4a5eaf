"""The spine end to end with the local executor: launch, records, idempotent relaunch, status, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import checkpoint as ckpt
from harness.cli import main
from harness.launch import launch
from harness.manifest import unpack
from harness.matrix import expand
from harness.records import REQUIRED, read_record
from tests.helpers import repro, write_spec

QUICK = {"epochs": 1, "batch_size": 64, "num_workers": 1}


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_data):
    tmp = tmp_path_factory.mktemp("launch")
    path = write_spec(tmp / "spec.yaml", tiny_data / "synthetic", tmp / "runs",
                      [{"method": "mae", "preset": "tiny", "seeds": [0, 1], "overrides": QUICK,
                        "evaluations": ["knn"]}])
    matrix = expand(path)
    result = launch(matrix, "local")
    return path, matrix, result


def test_every_stage_runs_and_writes_a_complete_record(launched):
    _, matrix, result = launched
    assert not result.failed
    assert len(result.submitted) == 4
    for stage in matrix.stages():
        rec = read_record(stage.stage_dir)
        assert rec is not None and rec["status"] == "done", stage.key
        assert set(REQUIRED) <= set(rec)
        assert rec["schema_version"] == 1 and rec["cell_id"] == stage.cell_id and rec["seed"] == stage.seed
        assert rec["job_id"] == result.submitted[stage.key]
        assert {"torch", "timm", "submitit"} <= set(rec["packages"])
        assert rec["wall_time_s"] > 0 and rec["peak_mem_mb"] > 0
        assert Path(rec["checkpoint"]["path"]).exists()
        assert rec["checkpoint"]["sha256"] == ckpt.sha256(rec["checkpoint"]["path"])
    knn = read_record(matrix.cells[0].evaluations[0].stage_dir)
    assert knn["protocol"] == "knn@k20,T0.07" and 0 <= knn["metrics"]["top1"] <= 100
    pre = read_record(matrix.cells[0].pretrain.stage_dir)
    assert pre["img_per_s"] > 0 and pre["checkpoint"]["step"] == 9  # 600 images // 64
    assert pre["recipe_deviations"]["epochs"] == [1600, 1]


def test_relaunch_submits_nothing_and_a_new_seed_only_its_stages(launched, tmp_path):
    path, matrix, _ = launched
    again = launch(expand(path), "local")
    assert again.submitted == {} and len(again.skipped_done) == 4
    spec = json.loads(json.dumps(__import__("yaml").safe_load(path.read_text())))
    spec["experiments"][0]["seeds"] = [0, 1, 2]
    grown = tmp_path / "grown.yaml"
    grown.write_text(__import__("yaml").safe_dump(spec))
    more = launch(expand(grown), "local")
    assert sorted(k.split("/")[1] for k in more.submitted) == ["knn", "pretrain"]
    assert len(more.skipped_done) == 4


def test_status_and_report_commands(launched):
    path, matrix, _ = launched
    status = repro("status", str(path))
    assert status.returncode == 0, status.stderr
    assert status.stdout.count("done [") >= 4
    report = repro("report", str(path))
    assert report.returncode == 0, report.stderr
    assert "knn@k20,T0.07 ours" in report.stdout and "(n=2)" in report.stdout
    assert "epochs 1600→1" in report.stdout  # the recipe-deviation column
    assert (matrix.out / "report.md").exists() and (matrix.out / "report.csv").exists()


def test_records_keep_attempts_costs_data_fingerprint_and_launch_writes_a_manifest(launched, tiny_data):
    _, matrix, _ = launched
    # the last launch into this folder (an earlier test grew the spec to three seeds) wrote the manifest
    stages = unpack(json.loads((matrix.out / "launch" / "manifest.json").read_text()))
    assert {s.stage_id for s in matrix.stages()} <= {s["stage_id"] for s in stages}
    classes = len([d for d in (tiny_data / "synthetic" / "train").iterdir() if d.is_dir()])
    assert stages[0]["data_fingerprint"]["splits"]["train"]["classes"] == classes
    for stage in matrix.stages():
        rec = read_record(stage.stage_dir)
        assert rec["data_fingerprint"]["splits"]["train"]["classes"] == classes
        assert set(rec["data_fingerprint"]["splits"]) == ({"train"} if stage.stage == "pretrain" else {"train", "val"})
        (attempt,) = rec["attempts"]
        assert attempt["status"] == "done" and attempt["device"] == "cpu" and attempt["torch"]
        assert attempt["python"] and attempt["host"] and attempt["cpu_model"] and attempt["cpu_cores"] >= 1
        assert rec["wall_time_s"] == attempt["wall_s"] > 0
        assert rec["cpu_hours"] == pytest.approx(attempt["cpu_cores"] * attempt["wall_s"] / 3600)
        assert rec["gpu_hours"] == 0.0 and rec["hardware"].startswith("CPU ")


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, tiny_data, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nexperiments: [\n")
    out = repro("launch", str(bad), cwd=tmp_path)  # the real entry point once; the other cases in-process
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("error: spec:")
    assert "Traceback" not in out.stderr

    def launch_error(spec: Path) -> str:
        assert main(["launch", str(spec)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), err
        return err

    missing = write_spec(tmp_path / "missing.yaml", tmp_path / "no-such-data", tmp_path / "runs",
                         [{"method": "mae", "preset": "tiny", "evaluations": ["knn"]}])
    assert launch_error(missing).startswith("error: data.root:")
    flat = tmp_path / "flat"
    (flat / "train").mkdir(parents=True)
    (flat / "train" / "img.png").write_bytes(b"")
    wrong = write_spec(tmp_path / "wrong.yaml", flat, tmp_path / "runs", [{"method": "mae", "preset": "tiny"}])
    assert "has no class folders" in launch_error(wrong)
    assert not (tmp_path / "runs").exists()  # nothing half-written
    unknown = write_spec(tmp_path / "unknown.yaml", tiny_data / "digits", tmp_path / "runs",
                         [{"method": "mea", "preset": "tiny"}])
    err = launch_error(unknown)
    assert "unknown method 'mea'" in err and "choose one of:" in err


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path, tiny_data):
    path = write_spec(tmp_path / "c.yaml", tiny_data / "synthetic", tmp_path / "runs",
                      [{"method": "mae", "preset": "tiny", "overrides": QUICK}])
    stage = expand(path).cells[0].pretrain
    (Path(stage.stage_dir) / "ckpt").mkdir(parents=True)
    (Path(stage.stage_dir) / "ckpt" / "last.pt").write_bytes(b"not a checkpoint")
    out = repro("run", str(path), "--cell", stage.cell_id)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: checkpoint:") and "unreadable" in out.stderr
    assert "Traceback" not in out.stderr
