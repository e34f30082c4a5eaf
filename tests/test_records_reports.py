"""Issue 6, records and reports: damaged files, comparable data only, costs over attempts, a stated
verdict test, a readable report, and report/status without torch, plugins or sacct."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.dataset_id import fingerprint, split_fingerprint
from harness.errors import UserError
from harness.manifest import write_manifest
from harness.matrix import expand, load_spec
from harness.records import attempt_costs, begin_attempt, end_attempt, write_record
from reports.collect import expected_frame, load_records
from reports.paper import load_paper_numbers
from reports.tables import comparison_table, to_markdown
from reports.verdict import verdict
from tests.test_reports import DIGITS, IMAGENET, KNN, by_method, cell, write

ROOT = Path(__file__).resolve().parents[1]


def make_run(tmp: Path, seeds=(0,), report: dict | None = None, name: str = "r", fp=None, floor: bool = False
             ) -> tuple[Path, object]:
    """A spec (MAE tiny, k-NN; with ``floor``, its random-init floor) and its manifest as launch writes it;
    no stage has run."""
    spec = {"name": name, "out": "runs", "data": {"pretrain": "data"},
            "experiments": [{"method": "mae", "preset": "tiny", "seeds": list(seeds), "evaluations": ["knn"],
                             "floor": floor}]}
    if report is not None:
        spec["report"] = report
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    matrix = expand(path)
    write_manifest(matrix, load_spec(path), {s.data_root: fp for s in matrix.stages()})
    return path, matrix


def stage_record(stage, status="done", value=None, **extra) -> dict:
    rec = {"cell_id": stage.cell_id, "stage_id": stage.stage_id, "stage": stage.stage, "status": status,
           "method": stage.method, "preset": stage.preset, "backbone": stage.backbone, "epochs": stage.epochs,
           "evaluation": None if stage.stage == "pretrain" else stage.stage, "protocol": stage.protocol,
           "headline_metric": stage.headline_metric, "seed": stage.seed,
           "metrics": {} if value is None else {stage.headline_metric: value}, "wall_time_s": 10.0,
           "gpu_hours": 0.0, "data_fingerprint": DIGITS, "recipe_deviations": stage.recipe_deviations}
    rec.update(extra)
    write_record(stage.stage_dir, rec)
    return rec


# --- 8. one damaged file must not take report, status or launch down ------------------------------------


def test_damaged_record_ledger_and_progress_are_skipped_and_named(tmp_path, capsys, tiny_data):
    tmp_path.joinpath("data").symlink_to(tiny_data / "synthetic")  # a dry run checks the data as launch does
    path, matrix = make_run(tmp_path)
    pre, knn = matrix.stages()
    Path(pre.stage_dir).mkdir(parents=True)
    (Path(pre.stage_dir) / "record.json").write_text('{"schema_version": 1, "cell_id": "tru')  # torn
    Path(knn.stage_dir).mkdir(parents=True)
    (Path(knn.stage_dir) / "progress.json").write_text("\x00\x00garbage")
    (matrix.out / "launch" / "ledger.json").write_text("[not a ledger")
    for command in (["report", str(path)], ["status", str(path)], ["launch", str(path), "--dry-run"]):
        with warnings.catch_warnings():
            warnings.simplefilter("always")  # each command is its own process for a user
            assert main(command) == 0, command
        out, err = capsys.readouterr()
        assert str(Path(pre.stage_dir) / "record.json") in err, command  # the warning names the file
        if command[0] != "launch":
            assert "damaged" in out, command
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        main(["status", str(path)])
    err = capsys.readouterr().err
    assert str(Path(knn.stage_dir) / "progress.json") in err and str(matrix.out / "launch" / "ledger.json") in err


# --- 9. compare only what is comparable -----------------------------------------------------------------


def test_fingerprint_counts_hashes_and_is_cached(tmp_path, monkeypatch, tiny_data):
    monkeypatch.setenv("SSL_REPRO_CACHE", str(tmp_path / "cache"))
    root = tiny_data / "digits"
    fp = fingerprint(root, ("train", "val"))
    train = fp["splits"]["train"]
    classes = [d for d in (root / "train").iterdir() if d.is_dir()]
    assert train["classes"] == len(classes) == 10
    assert train["images"] == sum(len(list(d.iterdir())) for d in classes)
    assert fp["splits"]["val"]["files_sha256"] != train["files_sha256"]
    calls = []
    monkeypatch.setattr("harness.dataset_id.split_fingerprint", lambda d: calls.append(d) or split_fingerprint(d))
    assert fingerprint(root, ("train", "val")) == fp and calls == []  # unchanged folders: from the cache
    copy = tmp_path / "digits"
    subprocess.run(["cp", "-r", str(root), str(copy)], check=True)
    extra = next((copy / "train").iterdir())
    (extra / "zz_new.png").write_bytes(next(extra.iterdir()).read_bytes())
    changed = fingerprint(copy)["splits"]["train"]
    assert changed["images"] == train["images"] + 1 and changed["files_sha256"] != train["files_sha256"]


def test_paper_number_joins_only_a_run_on_the_papers_dataset(tmp_path):
    rows = []
    for method, fp in (("dino", DIGITS), ("ibot", IMAGENET)):  # DINO ViT-S/16 800 ep on 32-px digits
        for seed, top1 in ((0, 74.4), (1, 74.6)):
            pre, knn = cell(method, "vit_small", "ViT-S/16", 800, seed, "knn", KNN)
            write(tmp_path, pre, data_fingerprint=fp)
            write(tmp_path, knn, value=top1, data_fingerprint=fp)
            rows += [pre, knn]
    df = comparison_table(expected_frame(rows), load_records(tmp_path), load_paper_numbers())
    dino, ibot = by_method(df, "dino"), by_method(df, "ibot")
    assert (dino[f"{KNN} paper"], dino[f"{KNN} Δ"], dino[f"{KNN} verdict"]) == ("—", "—", "other data")
    assert "data 10 classes, 1,437 train images (paper: ImageNet-1k" in dino["deviations"]
    assert "knn:data" not in dino["deviations"]  # the k-NN ran on the same (other) data: listed once
    assert (ibot[f"{KNN} paper"], ibot[f"{KNN} Δ"]) == ("75.2", "-0.70")
    assert "data" not in ibot["deviations"]


def test_failed_stages_show_as_failed_not_as_not_launched(tmp_path):
    failed = cell("ibot", "vit_b16", "ViT-B/16", 400, 0, "knn", KNN)
    blocked = cell("dino", "vit_b16", "ViT-B/16", 400, 0, "knn", KNN)
    write(tmp_path, failed[0])
    write(tmp_path, failed[1], status="failed", error="RuntimeError: boom")
    write(tmp_path, blocked[0], status="failed", error="OOM")  # its k-NN never ran
    for r in failed + blocked:
        r["status"] = "not launched"  # e.g. run with 'repro run', so the launch ledger knows nothing
    df = comparison_table(expected_frame(failed + blocked), load_records(tmp_path), load_paper_numbers())
    assert by_method(df, "ibot")[f"{KNN} ours"] == "— (failed)"
    assert by_method(df, "dino")[f"{KNN} ours"] == "— (pretrain failed)"


# --- 10. costs that add up -------------------------------------------------------------------------------


def test_every_attempt_is_kept_and_summed(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("harness.records.time", type("Clock", (), {"time": staticmethod(lambda: clock[0])}))
    stage = tmp_path / "stage"
    cpu = {"host": os.uname().nodename, "device": "cpu", "num_gpus": 0, "cpu_cores": 4, "cpu_model": "X",
           "gpu_model": None, "python": "3.11", "torch": "2", "cuda": None}
    begin_attempt(stage, cpu)
    clock[0] = 1100.0
    end_attempt(stage, "preempted")
    clock[0] = 1200.0
    begin_attempt(stage, cpu)  # then SIGKILLed: it never writes an end; its last progress is at 1250
    (stage / "progress.json").write_text("{}")
    os.utime(stage / "progress.json", (1250.0, 1250.0))
    clock[0] = 1300.0
    begin_attempt(stage, {**cpu, "device": "cuda", "num_gpus": 2, "gpu_model": "H100"})
    clock[0] = 1350.0
    rec = stage_record_at(stage)
    assert [a["status"] for a in rec["attempts"]] == ["preempted", "interrupted", "done"]
    assert [a["wall_s"] for a in rec["attempts"]] == [100.0, 50.0, 50.0]
    assert rec["wall_time_s"] == 200.0 and rec["last_attempt_wall_s"] == 50.0
    assert rec["cpu_hours"] == pytest.approx(4 * 150 / 3600)  # CPU attempts: cores x wall
    assert rec["gpu_hours"] == pytest.approx(2 * 50 / 3600)
    assert rec["hardware"] == "2x H100"
    assert attempt_costs(rec["attempts"]) == {k: rec[k] for k in ("wall_time_s", "gpu_hours", "cpu_hours")}


def stage_record_at(stage: Path) -> dict:
    write_record(stage, {"cell_id": "c", "stage_id": "c", "stage": "pretrain", "status": "done", "method": "m",
                         "preset": "p", "backbone": "b", "epochs": 1, "evaluation": None, "protocol": "pretrain",
                         "metrics": {}, "seed": 0})
    return json.loads((stage / "record.json").read_text())


def test_report_shows_cpu_hours_and_speed_per_hardware(tmp_path):
    rows = []
    for seed, (hw, speed) in enumerate((("1x A100", 100.0), ("1x A100", 110.0), ("CPU X (2 cores)", 5.0))):
        pre, knn = cell("mae", "tiny", "ViT-T", 2, seed, "knn", KNN)
        write(tmp_path, pre, hardware=hw, img_per_s=speed, cpu_hours=0.25 if hw.startswith("CPU") else 0.0)
        rows += [pre, knn]
    row = by_method(comparison_table(expected_frame(rows), load_records(tmp_path), load_paper_numbers()), "mae")
    assert row["img/s"] == "105.0 ± 7.1 (n=2, 1x A100); 5.0 (n=1, CPU X (2 cores))"
    assert row["CPU-h"] == "0.250"


# --- 11. a verdict with a stated test --------------------------------------------------------------------


def test_verdict_is_a_t_interval_with_tolerance_and_paper_seeds():
    # mean 77.2, s 0.2, n 3: t(0.975, 2) = 4.303, half-width 0.497 -> [76.70, 77.70]
    assert verdict([77.0, 77.2, 77.4], 76.75).label == "consistent"
    assert verdict([77.0, 77.2, 77.4], 76.65).label == "gap"  # |Δ| 0.55 ≤ 2·std (0.4)? no, but t says gap too
    assert verdict([77.0, 77.2, 77.4], 76.0).label == "gap"
    assert verdict([77.0, 77.2, 77.4], 76.0, tolerance=0.75).label == "consistent"
    # |Δ| = 0.15 > 2·std = 0.08: the old rule said "gap"; with n = 2, t(0.975, 1) = 12.7 says we cannot tell
    assert verdict([83.70, 83.76], 83.58).label == "consistent"
    # MAE's four paper seeds (mean 83.57, s 0.093): Welch's interval of the difference of the two means
    mae = [83.63, 83.66, 83.52, 83.46]
    assert verdict([82.9, 83.0, 83.1], 83.6, mae).label == "gap"
    assert verdict([83.5, 83.6, 83.7], 83.6, mae).label == "consistent"
    assert verdict([83.0], 83.6).label == "n<2: no test"


def test_spec_tolerance_is_typed_and_printed_in_the_legend(tmp_path, capsys):
    path, matrix = make_run(tmp_path, report={"tolerance": 0.5})
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Legend: verdict:" in out and "95% confidence interval" in out and "tolerance ±0.5" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("tolerance: 0.5", "tolerance: half"))
    with pytest.raises(UserError, match=r"report\.tolerance: must be a number"):
        expand(bad)
    assert main(["report", str(bad)]) == 2


# --- 12. a readable report -------------------------------------------------------------------------------


def test_rows_have_keys_with_deviations_and_paper_sources_as_footnotes(tmp_path):
    devs = {"epochs": [1600, 2], "batch_size": [4096, 64]}
    rows = cell("mae", "tiny", "ViT-B/16", 1600, 0, "finetune", "finetune/mae-lrd", devs, "vit_base")
    rows += cell("ibot", "vit_b16", "ViT-B/16", 400, 0, "knn", KNN)
    paper = load_paper_numbers()
    paper.loc[paper["method"] == "ibot", "verified"] = False
    md = to_markdown(comparison_table(expected_frame(rows), load_records(tmp_path), paper))
    table, _, notes = md.partition("\n\n")
    assert "| R1 " in table and "| R2 " in table and "see R1" in table and "4096→64" not in table
    assert "- R1: paper recipe: vit_base; batch_size 4096→64, epochs 1600→2" in notes
    assert "83.6 (83.57 ± 0.09, n=4) [p1]" in table and "75.2" not in table
    assert "77.1 [p2, unverified]" in table
    assert "- [p1] facebookresearch/mae README / FINETUNE.md (PyTorch" in notes
    assert "- [p2] iBOT arXiv v3 Tab. 1; bytedance/ibot README@da316d8 — UNVERIFIED" in notes


def test_report_plot_writes_a_png(tmp_path, capsys):
    path, matrix = make_run(tmp_path, seeds=(0, 1), fp=IMAGENET)
    for i, stage in enumerate(matrix.stages()):
        stage_record(stage, value=None if stage.stage == "pretrain" else 50.0 + i, data_fingerprint=IMAGENET)
    assert main(["report", str(path), "--plot"]) == 0
    assert "(no plot: no row has both" in capsys.readouterr().out  # MAE ViT-T has no paper k-NN number
    png = matrix.out / "gaps.png"
    assert not png.exists()
    from reports.plots import plot_gaps

    rows = []
    for seed in (0, 1):
        pre, knn = cell("ibot", "vit_b16", "ViT-B/16", 400, seed, "knn", KNN)
        write(tmp_path / "r2", pre)
        write(tmp_path / "r2", knn, value=77.0 + seed)
        rows += [pre, knn]
    df = comparison_table(expected_frame(rows), load_records(tmp_path / "r2"), load_paper_numbers())
    assert plot_gaps(df, png).read_bytes()[:4] == b"\x89PNG"


def test_report_out_never_overwrites_another_runs_report(tmp_path, capsys):
    mine, _ = make_run(tmp_path / "a", name="a")
    theirs, their_matrix = make_run(tmp_path / "b", name="b")
    assert main(["report", str(theirs)]) == 0
    before = (their_matrix.out / "report.md").read_text()
    capsys.readouterr()
    assert main(["report", str(mine), "--out", str(their_matrix.out)]) == 2
    assert "is the run folder of spec 'b'" in capsys.readouterr().err
    assert (their_matrix.out / "report.md").read_text() == before
    (their_matrix.out / "launch" / "manifest.json").unlink()  # an older run folder: the report's mark decides
    assert main(["report", str(mine), "--out", str(their_matrix.out)]) == 2
    assert (their_matrix.out / "report.md").read_text() == before


def test_relative_out_and_data_resolve_against_the_spec_folder(tmp_path, monkeypatch):
    path, _ = make_run(tmp_path / "specs")
    monkeypatch.chdir(tmp_path)
    matrix = expand(path)
    assert matrix.out == tmp_path / "specs" / "runs"
    assert {s.data_root for s in matrix.stages()} == {str(tmp_path / "specs" / "data")}


# --- 14. report at scale: no torch, no plugins, no sacct -------------------------------------------------


def test_report_and_status_import_no_torch_and_only_status_asks_slurm(tmp_path):
    path, matrix = make_run(tmp_path, seeds=(0, 1))
    for stage in matrix.stages():
        stage_record(stage, value=None if stage.stage == "pretrain" else 60.0)
    job = tmp_path / "job"
    (matrix.out / "launch" / "ledger.json").write_text(json.dumps(
        {s.key: {"job_id": "4242", "executor": "slurm", "folder": str(job)} for s in matrix.stages()}))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "sacct-calls"
    (bin_dir / "sacct").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\necho 'JobID|State|NodeList'\n")
    (bin_dir / "sacct").chmod(0o755)
    code = ("import sys; from harness.cli import main; rc = main(sys.argv[1:]); "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'methods', 'evaluations', "
            "'torchvision', 'timm'}); print('IMPORTED', bad); sys.exit(rc)")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    for command in ("report", "status"):
        out = subprocess.run([sys.executable, "-c", code, command, str(path)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "IMPORTED []" in out.stdout, (command, out.stdout)
        if command == "report":
            assert not calls.exists()  # the report never asks SLURM
    assert len(calls.read_text().splitlines()) == 1  # status: one sacct for the whole matrix


def test_official_weights_are_judged_on_their_evaluation_data_only(tmp_path):
    rows = []
    for seed, top1 in ((0, 74.4), (1, 74.6)):
        pre, knn = cell("dino", "vit_small (official weights)", "ViT-S/16", 800, seed, "knn", KNN)
        write(tmp_path, pre, data_fingerprint=DIGITS)  # the spec's data root, never read by an import
        write(tmp_path, knn, value=top1, data_fingerprint=IMAGENET)
        rows += [pre, knn]
    row = by_method(comparison_table(expected_frame(rows), load_records(tmp_path), load_paper_numbers()), "dino")
    assert (row[f"{KNN} paper"], row[f"{KNN} Δ"]) == ("74.5", "+0.00")
