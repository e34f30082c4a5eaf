"""The generic loop: exact resume, checkpoint contents, NaN handling."""

from __future__ import annotations

import pytest
import torch

from harness import checkpoint as ckpt
from harness.errors import NonFiniteLossError
from harness.records import read_record
from harness.stages import run_stage
from methods.mae import MAE
from tests.helpers import pretrain_spec, read_metrics

# 2 epochs x 9 steps on the synthetic set (600 images, batch 64); a checkpoint every 4 steps.
FAST = {"epochs": 2, "batch_size": 64, "log_every": 1, "ckpt_every_steps": 4, "num_workers": 2,
        "warmup_epochs": 1}


def test_resume_reproduces_the_uninterrupted_loss_trajectory(tmp_path, tiny_data):
    full = pretrain_spec(tmp_path / "full", tiny_data / "synthetic", FAST).cells[0].pretrain
    run_stage(full)
    reference = {m["step"]: m["loss"] for m in read_metrics(full.stage_dir)}
    assert len(reference) == 18

    # Same cell, interrupted after 7 steps (mid-epoch, between checkpoints), then resumed.
    part = pretrain_spec(tmp_path / "part", tiny_data / "synthetic", {**FAST, "max_steps": 7}).cells[0].pretrain
    run_stage(part)
    state = ckpt.load(f"{part.stage_dir}/ckpt/last.pt")
    assert state["step"] == 7
    assert read_record(part.stage_dir) is None  # not finished: no record
    resumed = pretrain_spec(tmp_path / "part", tiny_data / "synthetic", FAST).cells[0].pretrain
    assert resumed.stage_dir == part.stage_dir  # max_steps is not part of the cell's identity
    run_stage(resumed)
    record = read_record(resumed.stage_dir)
    assert record["status"] == "done" and record["resumed_from_step"] == 7
    trajectory = read_metrics(resumed.stage_dir)
    assert [m["step"] for m in trajectory] == list(range(1, 19))  # no step logged twice
    for m in trajectory:
        assert m["loss"] == reference[m["step"]], f"step {m['step']}: {m['loss']} != {reference[m['step']]}"

    # Same final weights, bit for bit.
    a = ckpt.load(f"{full.stage_dir}/ckpt/last.pt")["model"]
    b = ckpt.load(f"{resumed.stage_dir}/ckpt/last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_holds_everything_for_a_resume(tmp_path, tiny_data):
    stage = pretrain_spec(tmp_path, tiny_data / "synthetic", {**FAST, "max_steps": 4}).cells[0].pretrain
    run_stage(stage)
    state = ckpt.load(f"{stage.stage_dir}/ckpt/last.pt")
    assert {"model", "optimizer", "scaler", "step", "epoch", "rng", "stage_id"} <= set(state)
    assert {"torch", "numpy", "python"} <= set(state["rng"])
    assert state["optimizer"]["state"], "AdamW moments are saved"
    assert state["step"] == 4 and state["stage_id"] == stage.stage_id


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data, monkeypatch):
    original = MAE.training_step

    def poisoned(self, batch, state):
        out = original(self, batch, state)
        return {"loss": out["loss"] * float("nan")} if state.step >= 6 else out

    monkeypatch.setattr(MAE, "training_step", poisoned)
    stage = pretrain_spec(tmp_path, tiny_data / "synthetic", FAST).cells[0].pretrain
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        run_stage(stage)
    state = ckpt.load(f"{stage.stage_dir}/ckpt/last.pt")
    assert state["step"] == 4  # the checkpoint before the NaN, not a poisoned one
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    record = read_record(stage.stage_dir)
    assert record["status"] == "failed" and "NonFiniteLossError" in record["error"]
