"""Random-init floors (matrix, report, plot) and representation health (metrics, collapse, early stop)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from harness.errors import UserError
from harness.health import (
    CollapseError,
    HealthConfig,
    argmax_share,
    entropy,
    feature_std,
    find_collapse,
    health_values,
    kl_divergence,
    rankme,
)
from harness.matrix import INIT, expand, verify_identity
from harness.records import read_record
from harness.stages import run_stage
from harness.status import status_rows
from reports.collect import load_records
from reports.paper import load_paper_numbers
from reports.plots import plot_gaps
from reports.tables import comparison_table
from tests.learning import measure_learning
from tests.test_records_reports import make_run, stage_record

KNN = "knn@k20,T0.07"


def _spec(tmp: Path, experiments: list[dict]) -> Path:
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "f", "out": "runs", "data": {"pretrain": "data"},
                                    "experiments": experiments}))
    return path


# --- the floor in the matrix -----------------------------------------------------------------------------


def test_tiny_cells_get_a_random_init_floor_with_its_own_identity(tmp_path):
    matrix = expand(_spec(tmp_path, [{"method": "mae", "preset": "tiny", "seeds": [0, 1], "evaluations": ["knn"]},
                                     {"method": "mae", "preset": "vit_base", "evaluations": ["knn"]}]))
    trained = [c for c in matrix.cells if not c.is_floor]
    floors = [c for c in matrix.cells if c.is_floor]
    assert len(trained) == 3 and len(floors) == 2  # on by default for tiny, off for a paper recipe
    by_id = {c.pretrain.cell_id: c for c in trained}
    for floor in floors:
        ours = by_id[floor.pretrain.floor_of]
        assert floor.pretrain.stage == INIT and floor.pretrain.builds
        assert (floor.pretrain.method, floor.pretrain.preset, floor.pretrain.seed, floor.pretrain.overrides) == \
            (ours.pretrain.method, ours.pretrain.preset, ours.pretrain.seed, ours.pretrain.overrides)
        assert floor.pretrain.cell_id != ours.pretrain.cell_id
        knn = floor.evaluations[0]
        assert knn.pretrain_dir == floor.pretrain.stage_dir and knn.build_key == f"{floor.pretrain.cell_id}/init"
        assert knn.eval_config == ours.evaluations[0].eval_config  # the same evaluation, same settings
        for stage in floor.stages:
            verify_identity(stage)  # a queued floor job re-resolves to the ids it was launched with
    off = expand(_spec(tmp_path, [{"method": "mae", "preset": "tiny", "floor": False, "evaluations": ["knn"]},
                                  {"method": "mae", "preset": "vit_base", "floor": True}]))
    assert [c.is_floor for c in off.cells] == [False, False, True]
    with pytest.raises(UserError, match=r"experiments\[0\]\.floor: must be true or false"):
        expand(_spec(tmp_path, [{"method": "mae", "preset": "tiny", "floor": "yes"}]))


def test_report_has_a_floor_row_under_its_method_and_a_margin_column(tmp_path):
    spec, matrix = make_run(tmp_path, seeds=(0, 1), floor=True)
    values = {False: (80.0, 84.0), True: (60.0, 61.0)}
    for c in matrix.cells:
        stage_record(c.pretrain, floor_of=c.pretrain.floor_of,
                     **({} if c.is_floor else {"collapse": None, "health": {"rankme": 5.0}}))
        stage_record(c.evaluations[0], value=values[c.is_floor][c.pretrain.seed], floor_of=c.pretrain.floor_of)
    expected = [{**s, "status": "not launched"} for s in _rows(matrix)]
    df = comparison_table(expected, load_records(tmp_path / "runs"), load_paper_numbers())
    assert list(df["preset"]) == ["tiny", "tiny (random init)"]
    assert list(df["epochs"]) == [matrix.cells[0].pretrain.epochs, 0]
    ours, floor = df.iloc[0], df.iloc[1]
    assert ours[f"{KNN} ours"] == "82.00 ± 2.83 (n=2)" and floor[f"{KNN} ours"] == "60.50 ± 0.71 (n=2)"
    assert ours[f"{KNN} margin"] == "+21.50" and floor[f"{KNN} margin"] == ""
    assert ours["health"] == "ok" and floor[f"{KNN} paper"] == "—"
    assert plot_gaps(df, tmp_path / "gaps.png") is not None  # no paper number, but a floor to draw


def test_report_flags_a_collapsed_seed_and_a_margin_waits_for_the_floor(tmp_path):
    spec, matrix = make_run(tmp_path, seeds=(0,), floor=True)
    trained = next(c for c in matrix.cells if not c.is_floor)
    collapse = {"metric": "teacher_entropy_ratio", "value": 0.999, "threshold": 0.98, "epoch": 3, "why": "uniform"}
    stage_record(trained.pretrain, collapse=collapse, health={"teacher_entropy_ratio": 0.999})
    stage_record(trained.evaluations[0], value=50.0)
    df = comparison_table([{**s, "status": "not launched"} for s in _rows(matrix)], load_records(tmp_path / "runs"),
                          load_paper_numbers())
    assert df.iloc[0]["health"] == "collapsed: s0 teacher_entropy_ratio 0.999 at epoch 3"
    assert df.iloc[0][f"{KNN} margin"] == "—" and df.iloc[1][f"{KNN} ours"] == "— (not launched)"


def _rows(matrix) -> list[dict]:
    from harness.manifest import stage_rows

    return stage_rows(matrix)


# --- health metrics on synthetic embeddings --------------------------------------------------------------


def test_rankme_is_garrido_et_al_on_known_singular_values():
    assert rankme(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(
        math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel=1e-6)
    healthy = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    assert rankme(healthy) > 55  # isotropic: close to the full width 64
    assert rankme(torch.ones(512, 64)) == pytest.approx(1.0, abs=1e-3)  # one direction: rank 1
    line = torch.randn(512, 1) @ torch.randn(1, 64)
    assert rankme(line) < 1.01


def test_feature_std_is_one_over_sqrt_d_when_healthy_and_zero_when_collapsed():
    healthy = torch.randn(1024, 256, generator=torch.Generator().manual_seed(0))
    assert feature_std(healthy) * math.sqrt(256) == pytest.approx(1.0, abs=0.05)
    assert feature_std(torch.ones(1024, 256) * 3) == pytest.approx(0.0, abs=1e-9)
    values = health_values({"embedding": torch.ones(64, 16)})
    collapse = find_collapse(values, HealthConfig(), epoch=2)
    assert collapse["metric"] == "rankme" and collapse["epoch"] == 2


def test_teacher_entropy_kl_and_both_collapse_modes():
    k = 32
    uniform = torch.full((16, k), 1.0 / k)
    assert entropy(uniform).mean().item() == pytest.approx(math.log(k))
    assert kl_divergence(uniform, uniform.log()).abs().max().item() < 1e-6
    one_hot = torch.nn.functional.one_hot(torch.zeros(16, dtype=torch.long), k).float()
    assert argmax_share(one_hot) == 1.0 and entropy(one_hot).max().item() == 0.0
    healthy = torch.softmax(torch.randn(16, k, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
    emb = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    cfg = HealthConfig()
    ok = health_values({"embedding": emb, "teacher_probs": healthy, "student_log_probs": uniform.log()})
    assert find_collapse(ok, cfg, 1) is None and ok["teacher_kl"] > 0
    flat = health_values({"embedding": emb, "teacher_probs": uniform})
    assert find_collapse(flat, cfg, 1)["why"].startswith("uniform")
    spike = health_values({"embedding": emb, "teacher_probs": one_hot})
    assert find_collapse(spike, cfg, 1)["why"].startswith("one-hot")


def test_health_settings_are_checked_when_the_spec_is_expanded(tmp_path):
    with pytest.raises(UserError, match=r"experiments\[0\]\.health\.min_rank: unknown setting"):
        expand(_spec(tmp_path, [{"method": "mae", "preset": "tiny", "health": {"min_rank": 2}}]))
    with pytest.raises(UserError, match=r"health\.stop_on_collapse: expects true or false"):
        expand(_spec(tmp_path, [{"method": "mae", "preset": "tiny", "health": {"stop_on_collapse": 1}}]))


# --- a deliberately broken teacher: uniform targets ------------------------------------------------------


def _small_digits(tiny_data: Path, out: Path, per_class: int = 8) -> Path:
    """A few images per class of the tiny digits: a pre-training epoch of 2 steps."""
    for split in ("train", "val"):
        for cls in sorted((tiny_data / "digits" / split).iterdir()):
            (out / split / cls.name).mkdir(parents=True)
            for img in sorted(cls.iterdir())[:per_class]:
                shutil.copy(img, out / split / cls.name / img.name)
    return out


# A DINO teacher this hot gives every image the same, uniform target: DINO's collapse, by construction.
UNIFORM_TEACHER = {"teacher_temp": 1000.0, "warmup_teacher_temp": 1000.0, "warmup_teacher_temp_epochs": 0,
                   "batch_size": 32, "local_crops_number": 2}


def test_uniform_teacher_is_flagged_in_record_learning_and_status(tmp_path, tiny_data):
    data = _small_digits(tiny_data, tmp_path / "small")
    result = measure_learning(tmp_path, "dino", data=data, overrides={**UNIFORM_TEACHER, "epochs": 1},
                              eval_overrides={"knn": {"ks": [5]}})
    assert result.collapsed and result.collapse["metric"] == "teacher_entropy_ratio", result.describe()
    assert result.health["teacher_entropy_ratio"] > 0.999
    assert result.records["init"]["floor_of"] == result.records["pretrain"]["cell_id"]
    matrix = expand(tmp_path / "learning.yaml")
    row = next(r for r in status_rows(matrix, query_slurm=False) if r["preset"] == "tiny")
    assert "COLLAPSED: teacher_entropy_ratio" in row["health"]


def test_stop_on_collapse_ends_the_run_at_the_epoch_and_blocks_its_evaluations(tmp_path, tiny_data):
    data = _small_digits(tiny_data, tmp_path / "small")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "c", "out": str(tmp_path / "runs"), "data": {"pretrain": str(data)},
                                    "experiments": [{"method": "dino", "preset": "tiny", "floor": False,
                                                     "overrides": {**UNIFORM_TEACHER, "epochs": 3},
                                                     "health": {"stop_on_collapse": True},
                                                     "evaluations": ["knn"]}]}))
    cell = expand(spec).cells[0]
    with pytest.raises(CollapseError, match=r"collapse at epoch 1: teacher_entropy_ratio 1 > 0.98 \(uniform"):
        run_stage(cell.pretrain)
    rec = read_record(cell.pretrain.stage_dir)
    assert rec["status"] == "failed" and rec["collapse"]["epoch"] == 1
    assert "stopped (health.stop_on_collapse)" in rec["error"]
    expected = [{**s, "status": "not launched"} for s in _rows(expand(spec))]
    df = comparison_table(expected, load_records(tmp_path / "runs"), load_paper_numbers())
    assert df.iloc[0][f"{KNN} ours"] == "— (pretrain collapsed)"


def test_slurm_floor_evaluations_wait_for_their_init_job(tmp_path, monkeypatch):
    """The SLURM launch submits a floor's init export with the pre-trainings and makes each of its
    evaluations depend on it (never on the trained cell's pre-training)."""
    import harness.launch as launch

    class FakeJob:
        def __init__(self, job_id: str) -> None:
            self.job_id = job_id

    submitted: list[tuple[dict, list]] = []

    def fake_submit(folder, params, stages, python=None):
        array = str(1000 + len(submitted))
        submitted.append((params, stages))
        return [FakeJob(f"{array}_{i}" if len(stages) > 1 else array) for i in range(len(stages))]

    monkeypatch.setattr(launch, "_submit_array", fake_submit)
    matrix = expand(_spec(tmp_path, [{"method": "mae", "preset": "tiny", "seeds": [0, 1], "evaluations": ["knn"]}]))
    result = launch.LaunchResult()
    launch._launch_slurm(matrix.stages(), {}, tmp_path / "submitit", {}, launch.Ledger(tmp_path), result)
    job_of = {s.key: result.submitted[s.key] for s in matrix.stages()}
    for params, stages in submitted:
        dep = params.get("slurm_additional_parameters", {}).get("dependency")
        for i, s in enumerate(stages):
            if s.builds:
                assert dep is None
                continue
            parent = job_of[s.build_key]
            assert parent.split("_")[0] in dep, (s.key, dep)
            if dep.startswith("aftercorr:"):
                assert parent.endswith(f"_{i}")  # task i waits for task i of its parent array
            else:
                assert dep == f"afterok:{parent}"
    floors = [c for c in matrix.cells if c.is_floor]
    assert all(job_of[c.pretrain.key] for c in floors) and len(job_of) == 8
