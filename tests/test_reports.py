"""Reports on synthetic records: formatting, paper join, verdicts, missing cells, the paper CSV."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from reports.collect import RecordWarning, expected_frame, load_records
from reports.paper import KEY, load_paper_numbers
from reports.plots import plot_gaps
from reports.tables import comparison_table, parse_ours, to_markdown, write_report

KNN = "knn@k20,T0.07"
PROTOCOLS = {
    "knn": {"knn@k20,T0.07"},
    "linear": {"linear/dino", "linear/mae-lars", "linear/mocov3"},
    "finetune": {"finetune/beit-lrd", "finetune/mae-lrd"},
    "ade20k": {"ade20k/upernet-160k-ss"},
    "coco": {"coco/cascade-mrcnn-1x"},
}
METHODS = {"ibot", "esvit", "extrema", "dino", "mae", "ropim", "simmim"}
# What harness/dataset_id.py records for an ImageNet-1k root (the counts of reports/data/datasets.json).
IMAGENET = {"version": 1, "root": "/datasets/imagenet", "splits": {
    "train": {"classes": 1000, "images": 1281167, "files_sha256": "0" * 64},
    "val": {"classes": 1000, "images": 50000, "files_sha256": "1" * 64}}}
DIGITS = {"version": 1, "root": "data/tiny/digits", "splits": {
    "train": {"classes": 10, "images": 1437, "files_sha256": "2" * 64},
    "val": {"classes": 10, "images": 360, "files_sha256": "3" * 64}}}


def cell(method, preset, backbone, epochs, seed, evaluation, protocol, deviations=None, paper_recipe=None):
    """Expected rows (pretrain + one evaluation stage) of one cell, as a matrix expansion gives them."""
    cell_id = f"{method}-{preset}-{evaluation}-s{seed}"
    common = dict(cell_id=cell_id, method=method, preset=preset, backbone=backbone, epochs=epochs, seed=seed,
                  paper_recipe=paper_recipe, recipe_deviations=deviations or {})
    return [
        dict(common, stage_id=f"{cell_id}/pretrain", stage="pretrain", evaluation=None, protocol=None,
             headline_metric=None),
        dict(common, stage_id=f"{cell_id}/{evaluation}", stage=evaluation, evaluation=evaluation,
             protocol=protocol, headline_metric="top1"),
    ]


def write(out: Path, row: dict, status: str = "done", value: float | None = None, **extra) -> Path:
    """A schema-1 record for an expected row, written where the harness would put it."""
    rec = {k: v for k, v in row.items() if k != "status"}
    rec.update(schema_version=1, status=status, metrics={} if value is None else {"top1": value},
               wall_time_s=60.0, gpu_hours=0.5, img_per_s=100.0 if row["stage"] == "pretrain" else None,
               created_at="2026-01-01T00:00:00+00:00", data_fingerprint=IMAGENET)
    rec.update(extra)
    path = out / row["cell_id"] / row["stage"] / "record.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return path


def run(out: Path, expected_rows: list[dict]) -> pd.DataFrame:
    return comparison_table(expected_frame(expected_rows), load_records(out), load_paper_numbers())


def by_method(df: pd.DataFrame, method: str) -> pd.Series:
    rows = df[df["method"] == method]
    assert len(rows) == 1
    return rows.iloc[0]


def test_three_seeds_mean_std_within_noise_against_real_paper_row(tmp_path):
    rows = []
    for seed, top1 in zip((0, 1, 2), (77.0, 77.2, 77.4), strict=True):
        pre, knn = cell("ibot", "vit_b16", "ViT-B/16", 400, seed, "knn", KNN)
        write(tmp_path, pre)
        write(tmp_path, knn, value=top1)
        rows += [pre, knn]
    row = by_method(run(tmp_path, rows), "ibot")
    assert row[f"{KNN} ours"] == "77.20 ± 0.20 (n=3)"
    assert row[f"{KNN} paper"] == "77.1"  # iBOT arXiv v3 Tab. 1
    assert row[f"{KNN} Δ"] == "+0.10"
    assert row[f"{KNN} verdict"] == "consistent"  # 77.1 in 77.2 ± t(0.975, 2)·0.2/√3 = [76.70, 77.70]
    assert row["seeds"] == "3/3"
    assert row["GPU-h"] == "3.000"  # 6 records x 0.5
    assert row["wall"] == "6m 00s"
    assert row["img/s"] == "100.0 ± 0.0 (n=3)"  # no hardware recorded: one group
    assert parse_ours(row[f"{KNN} ours"]) == (77.2, 0.2, 3)


def test_gap_and_single_seed_verdicts(tmp_path):
    rows = []
    for seed, top1 in ((0, 70.0), (1, 70.2)):
        pre, knn = cell("ibot", "vit_s16", "ViT-S/16", 800, seed, "knn", KNN)
        write(tmp_path, pre)
        write(tmp_path, knn, value=top1)
        rows += [pre, knn]
    pre, lin = cell("dino", "vit_s16", "ViT-S/16", 800, 0, "linear", "linear/dino")
    write(tmp_path, pre)
    write(tmp_path, lin, value=76.0)
    rows += [pre, lin]
    df = run(tmp_path, rows)
    ibot = by_method(df, "ibot")
    assert ibot[f"{KNN} ours"] == "70.10 ± 0.14 (n=2)"
    assert ibot[f"{KNN} Δ"] == "-5.10"  # 70.1 - 75.2
    assert ibot[f"{KNN} verdict"] == "gap"
    assert ibot["linear/dino ours"] == ""  # ibot cells here do not expect a linear probe
    dino = by_method(df, "dino")
    assert dino["linear/dino ours"] == "76.00 (n=1)"
    assert dino["linear/dino paper"] == "77.0"
    assert dino["linear/dino Δ"] == "-1.00"
    assert dino["linear/dino verdict"] == "n<2: no test"


def test_missing_cells_are_shown_with_their_status(tmp_path):
    pending = cell("mae", "vit_b16", "ViT-B/16", 1600, 0, "finetune", "finetune/mae-lrd")
    write(tmp_path, pending[0])  # pretrain done, fine-tune never ran
    failed = cell("ibot", "vit_b16", "ViT-B/16", 400, 0, "finetune", "finetune/beit-lrd")
    write(tmp_path, failed[0])
    write(tmp_path, failed[1], status="failed", error="CUDA OOM")
    running = cell("dino", "vit_b16", "ViT-B/16", 400, 0, "knn", KNN)
    running[1]["status"] = "running"  # the caller knows it from the queue
    df = run(tmp_path, pending + failed + running)
    assert len(df) == 3
    mae, ibot, dino = by_method(df, "mae"), by_method(df, "ibot"), by_method(df, "dino")
    assert mae["finetune/mae-lrd ours"] == "— (pending)"
    assert mae["finetune/mae-lrd paper"] == "83.6 (83.57 ± 0.09, n=4)"  # the paper's four fine-tune seeds
    assert mae["finetune/mae-lrd Δ"] == "—"
    assert mae["seeds"] == "0/1"
    assert ibot["finetune/beit-lrd ours"] == "— (failed)"
    assert ibot["GPU-h"] == "1.000"  # a failed stage still cost its GPU time
    assert dino[f"{KNN} ours"] == "— (running)"
    assert dino["GPU-h"] == "—" and dino["wall"] == "—"


def test_no_paper_number_gives_dash_verdict(tmp_path):
    pre, ft = cell("ropim", "vit_b16", "ViT-B/16", 300, 0, "finetune", "finetune/beit-lrd")
    write(tmp_path, pre)
    write(tmp_path, ft, value=80.0)
    row = by_method(run(tmp_path, [pre, ft]), "ropim")
    assert row["finetune/beit-lrd ours"] == "80.00 (n=1)"
    assert (row["finetune/beit-lrd paper"], row["finetune/beit-lrd Δ"], row["finetune/beit-lrd verdict"]) == (
        "—", "—", "—")


def test_deviations_column(tmp_path):
    devs = {"epochs": [1600, 2], "batch_size": [4096, 64], "lr": [0.00015, 0.001]}
    rows = cell("mae", "vit_b16_tiny", "ViT-B/16", 2, 0, "linear", "linear/mae-lars", devs, "vit_b16")
    rows[1]["recipe_deviations"] = {**devs, "epochs": [90, 1]}  # the probe's own epochs differ
    plain = cell("mae", "vit_b16", "ViT-B/16", 1600, 0, "linear", "linear/mae-lars", None, "vit_b16")
    df = run(tmp_path, rows + plain)
    assert df.loc[0, "deviations"] == (
        "paper recipe: vit_b16; batch_size 4096→64, epochs 1600→2, lr 0.00015→0.001, linear:epochs 90→1")
    assert df.loc[1, "deviations"] == "none"


def test_unreadable_and_newer_records_are_skipped_with_a_warning(tmp_path):
    pre, knn = cell("ibot", "vit_b16", "ViT-B/16", 400, 0, "knn", KNN)
    write(tmp_path, pre)
    write(tmp_path, knn, value=77.0)
    bad = tmp_path / "broken" / "record.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    future = cell("ibot", "vit_b16", "ViT-B/16", 400, 9, "knn", KNN)[1]
    write(tmp_path, future, value=1.0, schema_version=2)
    with pytest.warns(RecordWarning) as caught:
        records = load_records(tmp_path)
    messages = " ".join(str(w.message) for w in caught)
    assert "unreadable" in messages and "schema_version 2" in messages
    assert len(records) == 2
    assert records.loc[records["stage"] == "knn", "metric.top1"].tolist() == [77.0]


def test_empty_folder_gives_empty_frame_with_columns(tmp_path):
    records = load_records(tmp_path)
    assert records.empty and {"cell_id", "stage_id", "status"} <= set(records.columns)


def test_expected_frame_defaults_status_and_validates():
    df = expected_frame(cell("ibot", "vit_b16", "ViT-B/16", 400, 0, "knn", KNN))
    assert df["status"].tolist() == ["pending", "pending"]
    with pytest.raises(ValueError, match="stage_id"):
        expected_frame([{"cell_id": "x"}])


def test_paper_csv_is_clean():
    paper = load_paper_numbers()
    assert not paper.duplicated(list(KEY)).any()
    assert paper["value"].dtype == float and paper["value"].between(0, 100).all()
    assert paper["verified"].dtype == bool and paper["verified"].all()
    for evaluation, protocol in zip(paper["evaluation"], paper["protocol"], strict=True):
        assert protocol in PROTOCOLS[evaluation]
    # Variants keep a unique key by a suffix on a known method name (esvit-v, extrema-nocolor).
    assert {m.split("-")[0] for m in paper["method"]} <= METHODS
    assert "ropim" not in set(paper["method"])  # nothing verified for ROPIM
    row = paper[(paper["method"] == "ibot") & (paper["backbone"] == "ViT-B/16") & (paper["epochs"] == 400)
                & (paper["protocol"] == KNN)]
    assert row["value"].tolist() == [77.1]
    metrics = dict(zip(paper["evaluation"], paper["metric"], strict=True))
    assert metrics["ade20k"] == "mIoU" and set(paper.loc[paper["evaluation"] == "coco", "metric"]) == {
        "AP_box", "AP_mask"}


def test_paper_loader_names_the_bad_column(tmp_path):
    good = load_paper_numbers()
    good["seed_values"] = ["/".join(f"{v:g}" for v in vs) for vs in good["seed_values"]]  # back to CSV text
    path = tmp_path / "p.csv"
    good.drop(columns=["note"]).to_csv(path, index=False)
    with pytest.raises(ValueError, match="note"):
        load_paper_numbers(path)
    bad = good.astype({"value": str})
    bad.loc[0, "value"] = "about 80"
    bad.to_csv(path, index=False)
    with pytest.raises(ValueError, match="'value'"):
        load_paper_numbers(path)
    pd.concat([good, good.head(1)]).to_csv(path, index=False)
    with pytest.raises(ValueError, match="duplicate"):
        load_paper_numbers(path)


def test_markdown_report_and_plot(tmp_path):
    rows = []
    for seed, top1 in ((0, 77.0), (1, 77.4)):
        pre, knn = cell("ibot", "vit_b16", "ViT-B/16", 400, seed, "knn", KNN)
        write(tmp_path / "runs", pre)
        write(tmp_path / "runs", knn, value=top1)
        rows += [pre, knn]
    rows += cell("mae", "vit_b16", "ViT-B/16", 1600, 0, "linear", "linear/mae-lars")
    df = run(tmp_path / "runs", rows)
    md = to_markdown(df)
    for header in (f"{KNN} ours", f"{KNN} paper", f"{KNN} Δ", "linear/mae-lars verdict"):
        assert header in md
    assert "| 77.1 " in md  # tabulate must not reformat the paper's "77.1"
    md_path, csv_path = write_report(df, tmp_path / "report")
    assert md_path.read_text() == md + "\n"
    assert pd.read_csv(csv_path, keep_default_na=False).equals(df.astype({"epochs": int}))
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["report.csv", "report.md"]
    png = plot_gaps(df, tmp_path / "report" / "gaps.png")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"
    assert plot_gaps(df[df["method"] == "mae"], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_reports_never_import_torch_or_the_harness():
    # reports know records, not models: of the harness they use only its stdlib-only atomic writer
    code = ("import sys, reports, reports.plots; "
            "banned = {'torch', 'methods', 'evaluations'}; "
            "names = {m.split('.')[0] for m in sys.modules} & banned; "
            "names |= {m for m in sys.modules if m.startswith('harness.') and m != 'harness.atomic'}; "
            "print(sorted(names))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
