"""TensorBoard curves beside each training stage's metrics log: tags, hparams, one curve across a resume."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from harness.api import METHODS, StepState
from harness.config import resolve
from harness.stages import run_stage
from harness.tb import TB_DIR
from tests.helpers import pretrain_spec, read_metrics

# 9 steps on the synthetic set (600 images, batch 64); logged every 2 steps and at the end.
FAST = {"epochs": 1, "batch_size": 64, "log_every": 2, "num_workers": 0, "warmup_epochs": 1}


def scalars(tb: Path) -> EventAccumulator:
    acc = EventAccumulator(str(tb))
    acc.Reload()
    return acc


def test_curves_have_the_expected_tags_and_continue_one_curve_across_a_resume(tmp_path, tiny_data):
    part = pretrain_spec(tmp_path, tiny_data / "synthetic", {**FAST, "max_steps": 5}).cells[0].pretrain
    run_stage(part)  # stops (and checkpoints) after step 5
    tb = Path(part.stage_dir) / TB_DIR
    with SummaryWriter(str(tb)) as w:  # what a run killed before its next checkpoint had logged past it
        for step in (6, 7, 8):
            w.add_scalar("train/loss", 99.0, step)
    resumed = pretrain_spec(tmp_path, tiny_data / "synthetic", FAST).cells[0].pretrain
    run_stage(resumed)

    acc = scalars(tb)
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "opt/lr", "opt/weight_decay", "perf/img_per_s", "progress/epoch"} <= tags
    loss = acc.Scalars("train/loss")
    steps = [e.step for e in loss]
    assert steps == sorted(set(steps)) and steps[-1] == 9  # monotone, no step twice, to the end
    logged = read_metrics(resumed.stage_dir)  # the same intervals as the metrics log, the same values
    assert steps == [m["step"] for m in logged]
    assert [e.value for e in loss] == pytest.approx([m["loss"] for m in logged], rel=1e-6)
    assert [e.value for e in acc.Scalars("opt/lr")] == pytest.approx([m["lr"] for m in logged], rel=1e-6)
    assert set(acc.PluginTagToContent("hparams")) >= {"_hparams_/experiment", "_hparams_/session_start_info"}
    start = acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    assert b"mae" in start and b"cell_id" in start and resumed.cell_id.encode() in start


@pytest.mark.parametrize("method", ["dino", "ibot"])
def test_teacher_momentum_and_temperature_follow_their_schedules(method):
    cls = METHODS.get(method)
    train, cfg, _ = resolve(cls, "tiny", {})
    model = cls(cfg, train)

    def state(epoch: int) -> StepState:
        return StepState(step=epoch, epoch=epoch, iters_per_epoch=1, total_steps=train.epochs, lr=0.0,
                         weight_decay=0.0, momentum=0.5 + epoch / 100)

    first, last = model.curve_scalars(state(0)), model.curve_scalars(state(train.epochs - 1))
    assert first["teacher/momentum"] == 0.5 and last["teacher/momentum"] == 0.5 + (train.epochs - 1) / 100
    assert first["teacher/temperature"] == pytest.approx(cfg.warmup_teacher_temp)
    assert last["teacher/temperature"] == pytest.approx(cfg.teacher_temp)
