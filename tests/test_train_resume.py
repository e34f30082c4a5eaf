"""The generic loop: exact resume, checkpoint contents, NaN handling, seeding and its one loader."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from harness import checkpoint as ckpt
from harness.data import ResumableSampler, SeededAugmentDataset, build_loader, mix_seed, seed_everything
from harness.errors import NonFiniteLossError
from harness.preemption import StepGate
from harness.records import read_record
from harness.stages import StageRunner, run_stage
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


def test_a_preemption_during_a_step_is_handled_after_the_step(tmp_path, tiny_data, monkeypatch):
    # CPython runs a Python signal handler in the main thread whichever thread the kernel gave the signal to, so a
    # SIGUSR2 blocked in the main thread still reached submitit's handler mid-step whenever another thread left it
    # unblocked (torch's OpenMP pool, tqdm's monitor; here `taker`): after the optimiser step, before the step
    # counter moved, it checkpointed weights one update ahead of their step.
    runner, seen = StageRunner(), []

    def preemption_handler(signum, frame):  # what submitit's would checkpoint
        run = runner.active
        seen.append((run.step, {int(s["step"]) for s in run.optimizer.state.values()}))

    original = MAE.after_step

    def after_step_then_preempted(self, state):
        original(self, state)
        if state.step == 2:  # the third step, after its optimiser step
            os.kill(os.getpid(), signal.SIGUSR2)
            deadline = time.monotonic() + 2.0  # Python bytecodes, where a handler let in runs (once `taker` took it)
            while not seen and time.monotonic() < deadline:
                pass

    monkeypatch.setattr(MAE, "after_step", after_step_then_preempted)
    release = threading.Event()
    taker = threading.Thread(target=release.wait, daemon=True)
    taker.start()
    previous = signal.signal(signal.SIGUSR2, preemption_handler)
    try:
        stage = pretrain_spec(tmp_path, tiny_data / "synthetic", {**FAST, "max_steps": 5}).cells[0].pretrain
        run_stage(stage, runner)
        assert signal.getsignal(signal.SIGUSR2) is preemption_handler  # the loop put it back
    finally:
        signal.signal(signal.SIGUSR2, previous)
        release.set()
    assert seen == [(3, {3})]  # after the third step, which the optimiser's state counts too


def test_the_step_gate_delivers_after_the_step_and_drops_what_a_failed_step_held():
    calls = []

    def handler(signum, frame):
        calls.append(signum)

    previous = signal.signal(signal.SIGUSR2, handler)
    try:
        with StepGate() as gate:
            with gate.step():
                signal.raise_signal(signal.SIGUSR2)
                assert calls == []
            assert calls == [signal.SIGUSR2]
            with pytest.raises(RuntimeError), gate.step():
                signal.raise_signal(signal.SIGUSR2)
                raise RuntimeError("the step failed: its state is not one to checkpoint")
            assert calls == [signal.SIGUSR2]
            signal.raise_signal(signal.SIGUSR2)  # between steps: straight through
            assert calls == [signal.SIGUSR2] * 2
        assert signal.getsignal(signal.SIGUSR2) is handler  # the gate put it back
    finally:
        signal.signal(signal.SIGUSR2, previous)


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


def test_a_preemption_after_a_non_finite_step_keeps_the_last_good_checkpoint(tmp_path, tiny_data, monkeypatch):
    # The loop checks the loss only at a log line or a checkpoint; a preemption between (here after the sixth step,
    # the log lines every 5) must not write the weights the NaN reached over the good step-4 checkpoint.
    runner, written = StageRunner(), []

    def preemption_handler(signum, frame):  # what submitit's does: StageRunner.checkpoint saves the active loop
        written.append(runner.active.save_checkpoint())

    original_step, original_after = MAE.training_step, MAE.after_step

    def poisoned(self, batch, state):
        out = original_step(self, batch, state)
        return {"loss": out["loss"] * float("nan")} if state.step == 5 else out

    def after_step_then_preempted(self, state):
        original_after(self, state)
        if state.step == 5:
            os.kill(os.getpid(), signal.SIGUSR2)  # the gate hands it over when this iteration ends

    monkeypatch.setattr(MAE, "training_step", poisoned)
    monkeypatch.setattr(MAE, "after_step", after_step_then_preempted)
    previous = signal.signal(signal.SIGUSR2, preemption_handler)
    try:
        stage = pretrain_spec(tmp_path, tiny_data / "synthetic", {**FAST, "log_every": 5}).cells[0].pretrain
        with pytest.raises(NonFiniteLossError, match="step 4"):
            run_stage(stage, runner)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert written == [None]  # the preemption came, and wrote nothing
    state = ckpt.load(f"{stage.stage_dir}/ckpt/last.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_seed_everything_gives_torch_manual_seeds_cpu_stream():
    seed_everything(mix_seed(3, 1, 4))
    ours = (torch.rand(5), torch.randperm(9))
    torch.manual_seed(mix_seed(3, 1, 4))
    assert all(torch.equal(a, b) for a, b in zip(ours, (torch.rand(5), torch.randperm(9)), strict=True))


def test_one_loader_for_the_run_yields_what_a_fresh_loader_per_epoch_did(tiny_data):
    # The loop builds its loader once (workers persist across epochs) and moves the sampler between epochs,
    # mid-epoch too after a resume: every epoch's batches must be those of a loader built for that position.
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    def augment(img):  # random, so a batch shows whether the (index, epoch) seeding reached the worker
        return transforms.functional.to_tensor(transforms.RandomResizedCrop(8)(img))

    dataset = SeededAugmentDataset(ImageFolder(str(tiny_data / "synthetic" / "train")), augment, seed=0)
    sampler = ResumableSampler(len(dataset), 64, 1, 0, seed=0)
    positions = [(0, 0), (1, 5), (2, 0)]

    def batches(loader_for):
        out = []
        for epoch, start in positions:
            sampler.set_position(epoch, start)
            out += [(images.clone(), labels.clone()) for images, labels in loader_for()]
        return out

    persistent = build_loader(dataset, sampler, num_workers=2, pin_memory=False)
    assert persistent.persistent_workers
    fresh = batches(lambda: build_loader(dataset, sampler, num_workers=0, pin_memory=False))
    assert len(fresh) == 9 + 4 + 9
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(batches(lambda: persistent), fresh, strict=True))
