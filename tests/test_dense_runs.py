"""The dense evaluations run for real on the tiny sets: pre-training -> ADE20K UperNet -> COCO Mask R-CNN through
the launcher for a ViT plugin (MAE) and in-process for the Swin plugin (EsViT), the report's mIoU and AP columns,
and the learning check: the trained heads beat the same model with untrained heads (same backbone, zero
iterations, same seed)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.launch import launch
from harness.matrix import expand
from harness.records import read_record
from harness.stages import run_stage

pytestmark = pytest.mark.slow
PRE = {"epochs": 1, "batch_size": 64, "num_workers": 0}
TINY = {"ade20k": {"recipe": "tiny"}, "coco": {"recipe": "tiny", "epochs": 6}}


def _spec(tmp: Path, digits: Path, dense: dict[str, Path], method: str, eval_overrides: dict,
          extra: dict | None = None) -> Path:
    spec = {"name": f"dense-{method}", "out": str(tmp / "runs"),
            "data": {"pretrain": str(digits), "ade20k": str(dense["ade20k"]), "coco": str(dense["coco"])},
            # no random-init floor: the learning check here is untrained heads, and a floor's two dense runs cost ~50 s
            "experiments": [{"method": method, "preset": "tiny", "floor": False, "overrides": {**PRE, **(extra or {})},
                             "evaluations": ["ade20k", "coco"],
                             "eval_overrides": eval_overrides}]}
    path = tmp / f"dense-{method}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def vit(tmp_path_factory, tiny_data, tiny_dense):
    """MAE tiny through the local executor: pretrain, then its ade20k and coco jobs."""
    tmp = tmp_path_factory.mktemp("dense_vit")
    path = _spec(tmp, tiny_data / "digits", tiny_dense, "mae", TINY)
    matrix = expand(path)
    result = launch(matrix, "local")
    assert not result.failed, result.failed
    return path, matrix


def untrained(stage) -> dict[str, float]:
    """The stage's model evaluated before any training step: the exported backbone, heads at their seeded init."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    from evaluations.dense.det_config import detection_config
    from evaluations.dense.openmmlab import prepare
    from evaluations.dense.seg_config import segmentation_config
    from harness.api import EVALUATIONS
    from harness.config import make_eval_config

    prepare()
    cfg = make_eval_config(EVALUATIONS.get(stage.stage).config_cls, stage.eval_config, stage.stage)
    build = segmentation_config if stage.stage == "ade20k" else detection_config
    work = Path(stage.stage_dir).parent / f"untrained-{stage.stage}"
    mm = build(Path(stage.pretrain_dir) / "export", stage.data_root, cfg.resolved(), work, stage.seed, amp=False)
    return Runner.from_cfg(Config({**mm, "experiment_name": f"untrained-{stage.stage}"})).val()


def test_vit_pipeline_reports_miou_and_ap_beside_the_paper_columns(vit, capsys):
    path, matrix = vit
    for stage in matrix.cells[0].evaluations:
        rec = read_record(stage.stage_dir)
        assert rec["status"] == "done" and rec["data_fingerprint"]["splits"]["train"]["layout"] == stage.stage
        assert (Path(stage.stage_dir) / "mmengine" / "last_checkpoint").is_file()  # mmengine's files stay here
    assert set(read_record(matrix.cells[0].evaluations[0].stage_dir)["metrics"]) == {"mIoU", "mAcc", "aAcc"}
    assert {"AP_box", "AP_box50", "AP_box75", "AP_mask", "AP_mask50", "AP_mask75"} <= set(
        read_record(matrix.cells[0].evaluations[1].stage_dir)["metrics"])
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| key"))
    for column in ("ade20k/upernet-160k-ss ours", "ade20k/upernet-160k-ss paper", "coco/mrcnn-1x ours",
                   "coco/mrcnn-1x AP_mask ours", "coco/mrcnn-1x AP_mask paper"):
        assert column in header


def test_trained_heads_beat_the_same_model_with_untrained_heads(vit):
    _, matrix = vit
    ade, coco = matrix.cells[0].evaluations
    trained_ade, trained_coco = read_record(ade.stage_dir)["metrics"], read_record(coco.stage_dir)["metrics"]
    before_ade, before_coco = untrained(ade), untrained(coco)
    print("ade20k mIoU trained/untrained", trained_ade["mIoU"], before_ade["mIoU"],
          "coco AP_box trained/untrained", trained_coco["AP_box"], 100 * before_coco.get("coco/bbox_mAP", 0.0))
    assert trained_ade["mIoU"] > before_ade["mIoU"] + 5
    assert trained_coco["AP_box"] > 100 * before_coco.get("coco/bbox_mAP", 0.0) + 2
    assert trained_coco["AP_mask"] > 100 * before_coco.get("coco/segm_mAP", 0.0) + 2


@pytest.fixture(scope="module")
def swin(tmp_path_factory, tiny_data, tiny_dense):
    """EsViT tiny in this process (run_stage): pretrain, then short ade20k and coco runs."""
    tmp = tmp_path_factory.mktemp("dense_swin")
    short = {"ade20k": {"recipe": "tiny", "iters": 10}, "coco": {"recipe": "tiny", "epochs": 1}}
    path = _spec(tmp, tiny_data / "digits", tiny_dense, "esvit", short, {"warmup_teacher_temp_epochs": 1})
    cell = expand(path).cells[0]
    for stage in cell.stages:
        assert run_stage(stage)["status"] == "done"
    return path, cell


def test_swin_pipeline_runs_in_process(swin, capsys):
    path, cell = swin
    ade, coco = (read_record(s.stage_dir) for s in cell.evaluations)
    assert ade["metrics"]["mIoU"] > 0 and ade["metrics_extra"]["iters"] == 10
    assert "AP_mask" in coco["metrics"] and ade["backbone"].startswith("Swin")
    # A finished stage is not run again: its record comes back.
    assert run_stage(dataclasses.replace(cell.evaluations[0]))["created_at"] == ade["created_at"]
    assert main(["report", str(path)]) == 0
    assert "coco/mrcnn-1x AP_mask ours" in capsys.readouterr().out


def test_data_gone_at_run_time_is_a_one_line_error(swin, tmp_path, capsys):
    path, cell = swin
    spec = yaml.safe_load(path.read_text())
    spec["data"]["ade20k"] = str(tmp_path / "gone")  # launched fine, then the dataset went away
    moved = path.parent / "moved.yaml"
    moved.write_text(yaml.safe_dump(spec))
    assert main(["run", str(moved), "--cell", cell.pretrain.cell_id, "--stage", "ade20k"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gone is not a folder" in err
