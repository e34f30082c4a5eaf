"""Every protocol through `launch` with the local executor: pretrain -> k-NN -> three linear probes ->
fine-tune -> low-shot, each evaluation with its own resources block; the report's columns per protocol."""

from __future__ import annotations

import pytest

from harness.launch import launch
from harness.matrix import expand
from harness.records import read_record
from reports.paper import load_paper_numbers
from reports.tables import comparison_table
from tests.helpers import write_spec

PROBE = {"mode": "cached", "epochs": 2, "batch_size": 128, "num_workers": 0}
EVALS = {
    "knn": {"ks": [10, 20]},
    "linear": {**PROBE, "blrs": [0.01, 0.1]},
    "linear_mae": {**PROBE, "blrs": [6.4]},
    "linear_mocov3": PROBE,
    "finetune": {"preset": "tiny", "epochs": 1, "batch_size": 64, "num_workers": 0},
    "lowshot": {**PROBE, "percent": 10, "batch_size": 32},
}
FAMILIES = {"knn": "knn@k20,T0.07", "linear": "linear/dino", "linear_mae": "linear/mae-lars",
            "linear_mocov3": "linear/mocov3", "finetune": "finetune/mae-lrd", "lowshot": "lowshot/10pct-dino"}


@pytest.mark.slow
def test_launch_runs_every_protocol_and_reports_each_in_its_columns(tmp_path, tiny_data):
    spec = write_spec(tmp_path / "spec.yaml", tiny_data / "synthetic", tmp_path / "runs",
                      [{"method": "mae", "preset": "tiny", "overrides": {"epochs": 1, "batch_size": 64},
                        "evaluations": list(EVALS), "eval_overrides": EVALS}],
                      resources={"eval": {"timeout_min": 10}, "finetune": {"timeout_min": 20}})
    matrix = expand(spec)
    by_stage = {s.stage: s for s in matrix.cells[0].evaluations}
    assert by_stage["finetune"].resources == {"timeout_min": 20} and by_stage["knn"].resources == {"timeout_min": 10}
    result = launch(matrix, "local")
    assert not result.failed, result.failed
    records = {}
    for stage, family in FAMILIES.items():
        rec = read_record(by_stage[stage].stage_dir)
        assert rec["status"] == "done" and rec["protocol"] == family, stage
        assert 0 <= rec["metrics"]["top1"] <= rec["metrics"]["top5"] <= 100
        assert rec["checkpoint"]["sha256"] and rec["protocol_tag"]
        records[stage] = rec
    assert records["linear"]["protocol_tag"].startswith("linear:dino@lr") and records["linear"]["protocol_tag"] \
        .endswith(",cached")
    assert records["finetune"]["protocol_tag"] == "finetune:mae@ld0.75,1ep"
    assert records["finetune"]["resumed_from_step"] is None
    # k-NN and the cached probes read the same features: one cache file per (split, pooling).
    assert records["knn"]["metrics_extra"]["feature_cache"] == records["linear"]["metrics_extra"]["feature_cache"]
    # The report: one column group per protocol family, cached mode listed as a deviation.
    from harness.status import expected_rows
    from reports.collect import expected_frame, load_records

    df = comparison_table(expected_frame(expected_rows(matrix)), load_records(matrix.out), load_paper_numbers())
    for family in FAMILIES.values():
        assert f"{family} ours" in df.columns and f"{family} paper" in df.columns
    assert "linear:mode full→cached" in df["deviations"].iloc[0]
