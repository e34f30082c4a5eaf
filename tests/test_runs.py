"""Runs a user can trust: bad images, one writer per stage, no lost results, honest messages, checks
at launch, the precision a CPU uses, and progress while a local launch works (issue 6, runs)."""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import cli
from harness.config import recipe_deviations, resolve
from harness.datacheck import cache_dir_for, scan_split
from harness.errors import NonFiniteLossError, UserError
from harness.launch import _job_error_line
from harness.locks import STAGE_LOCK, read_owner, stage_lock
from harness.matrix import expand
from harness.records import read_record
from harness.stages import run_stage
from harness.train import autocast_dtype
from methods.dino import DINO
from methods.ibot import IBOT
from methods.mae import MAE
from tests.helpers import read_metrics, repro, write_spec

QUICK = {"epochs": 1, "batch_size": 200, "num_workers": 0}  # 3 steps on the synthetic set


@pytest.fixture
def dirty_data(tmp_path, tiny_data):
    """The synthetic set plus a text file named .png and a truncated JPEG."""
    root = tmp_path / "dirty"
    shutil.copytree(tiny_data / "synthetic", root)
    (root / "train" / "class1" / "notes.png").write_text("this is not an image\n")
    good = next((root / "train" / "class2").iterdir())
    from PIL import Image

    buf = io.BytesIO()
    Image.open(good).convert("RGB").resize((64, 64)).save(buf, "JPEG")
    (root / "train" / "class2" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return root


def _one_line_exit_2(out: subprocess.CompletedProcess) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), out.stderr[-2000:]
    assert "Traceback" not in out.stderr


# -- 1. bad images -----------------------------------------------------------------------------------------

def test_a_bad_image_ends_the_job_promptly_naming_the_file(tmp_path, tiny_data):
    root = tmp_path / "bad"
    shutil.copytree(tiny_data / "synthetic", root)
    (root / "train" / "class1" / "notes.png").write_text("this is not an image\n")
    spec = write_spec(tmp_path / "s.yaml", root, tmp_path / "runs",
                      [{"method": "mae", "preset": "tiny", "overrides": {**QUICK, "num_workers": 2}}])
    cell = expand(spec).cells[0].pretrain.cell_id
    t0 = time.time()
    out = repro("run", str(spec), "--cell", cell, timeout=60)  # hung forever before (workers never joined)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    error = [line for line in out.stderr.replace("\r", "\n").splitlines() if "error: " in line]
    assert len(error) == 1 and "notes.png" in error[0] and "bad_images: skip" in error[0], out.stderr
    assert time.time() - t0 < 60
    rec = read_record(expand(spec).cells[0].pretrain.stage_dir)
    assert rec["status"] == "failed" and "notes.png" in rec["error"]


def test_a_stage_ends_its_loader_workers_and_no_process_it_did_not_start(tmp_path, tiny_data):
    # run_stage in a process that has children of its own (the learning tests' process pool): those survive.
    spec = write_spec(tmp_path / "s.yaml", tiny_data / "synthetic", tmp_path / "runs",
                      [{"method": "mae", "preset": "tiny", "overrides": {**QUICK, "num_workers": 2}}])
    other = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(120,))
    other.start()
    before = set(multiprocessing.active_children())  # the session's learning pool too, when it runs
    try:
        assert run_stage(expand(spec).cells[0].pretrain)["status"] == "done"
        assert other.is_alive() and set(multiprocessing.active_children()) == before
    finally:
        other.kill()
        other.join()


def test_launch_and_dry_run_find_unreadable_images_before_submitting(tmp_path, dirty_data, monkeypatch):
    spec = write_spec(tmp_path / "s.yaml", dirty_data, tmp_path / "runs",
                      [{"method": "mae", "preset": "tiny", "overrides": QUICK}])
    for args in (["--dry-run"], []):
        out = repro("launch", str(spec), *args)
        _one_line_exit_2(out)
        assert "2 unreadable image(s)" in out.stderr and "notes.png" in out.stderr and "cut.jpg" in out.stderr
        assert "truncated JPEG" in out.stderr and "bad_images: skip" in out.stderr
    assert not (tmp_path / "runs" / "submitit").exists() and not (tmp_path / "runs" / "cells").exists()
    # The scan is cached under the run folder, keyed by the file list: a second scan reads no image ...
    cache = cache_dir_for(tmp_path / "runs")
    assert len(list(cache.glob("*.json"))) == 1 and not list(dirty_data.rglob("*.json"))
    import harness.datacheck as dc

    monkeypatch.setattr(dc, "image_problem", lambda p: pytest.fail("rescanned a cached split"))
    assert len(scan_split(dirty_data / "train", cache).bad) == 2
    # ... and a changed file list is scanned again.
    (dirty_data / "train" / "class1" / "notes.png").unlink()
    monkeypatch.undo()
    assert len(scan_split(dirty_data / "train", cache).bad) == 1


def test_skip_policy_trains_without_the_bad_images_and_counts_them(tmp_path, dirty_data):
    spec = write_spec(tmp_path / "s.yaml", dirty_data, tmp_path / "runs",
                      [{"method": "mae", "preset": "tiny", "overrides": {**QUICK, "bad_images": "skip"}}])
    matrix = expand(spec)
    assert cli.main(["launch", str(spec), "--dry-run"]) == 0
    rec = run_stage(matrix.cells[0].pretrain)
    assert rec["status"] == "done" and rec["skipped_images"] == 2
    with pytest.raises(UserError, match="bad_images: must be one of 'fail', 'skip', got 'ignore'"):
        resolve(MAE, "tiny", {"bad_images": "ignore"})


# -- 2. one stage, one writer ------------------------------------------------------------------------------

def test_a_stage_refuses_to_run_while_another_process_holds_it(tmp_path, tiny_data):
    spec = write_spec(tmp_path / "s.yaml", tiny_data / "synthetic", tmp_path / "runs",
                      [{"method": "mae", "preset": "tiny", "overrides": QUICK}])
    stage = expand(spec).cells[0].pretrain
    with stage_lock(stage.stage_dir, job_id="4242"):
        with pytest.raises(UserError, match=r"busy: held by pid \d+ on .*job 4242"):
            run_stage(stage)
    assert read_record(stage.stage_dir) is None  # the refusal wrote nothing over the holder's stage
    # A dead owner's lock (its flock went with it) is taken over.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = Path(stage.stage_dir) / STAGE_LOCK
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout), "job_id": None}))
    assert run_stage(stage)["status"] == "done"


def _wait_for(predicate, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


@pytest.mark.slow
def test_concurrent_launch_progress_and_no_orphan_after_a_killed_launch(tmp_path, tiny_data):
    spec = write_spec(tmp_path / "s.yaml", tiny_data / "synthetic", tmp_path / "runs",
                      [{"method": "mae", "preset": "tiny",
                        "overrides": {"epochs": 100, "batch_size": 64, "num_workers": 0, "log_every": 1}}])
    stage = expand(spec).cells[0].pretrain
    # Launched as from a script's `repro launch ... &`: SIGINT ignored, which its jobs inherit.
    first = subprocess.Popen([sys.executable, "-m", "harness.cli", "launch", str(spec)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    owner: dict = {}
    try:
        lock = Path(stage.stage_dir) / STAGE_LOCK
        owner = _wait_for(lambda: read_owner(lock), 90, "the trainer to take its stage lock")
        _wait_for(lambda: (Path(stage.stage_dir) / "progress.json").exists(), 90, "progress")
        second = repro("launch", str(spec))  # both submitted every stage before
        _one_line_exit_2(second)
        assert "another 'repro launch' of this matrix is running" in second.stderr
        time.sleep(3)  # a progress poll or two
        first.send_signal(signal.SIGKILL)  # not even a chance to clean up
        first.wait(10)
        # The trainer ends with its launcher, so a relaunch cannot duplicate it.
        _wait_for(lambda: not _alive(owner["pid"]), 30, "the orphaned trainer to stop")
        out = first.stdout.read()
        assert "log " in out and str(tmp_path / "runs" / "submitit") in out
        line = next(x for x in out.splitlines() if "step " in x)
        assert "/100" not in line and "loss " in line and "img/s" in line and "ETA" in line, line
    finally:
        if first.poll() is None:
            first.kill()
        if owner and _alive(owner["pid"]):  # a failed check must not leave a trainer running on the cores
            with contextlib.suppress(ProcessLookupError):  # it may end between the check and the kill
                os.kill(owner["pid"], signal.SIGKILL)
    assert read_record(stage.stage_dir) is None  # interrupted, not failed: the relaunch resumes it
    # A relaunch runs it again; a trainer killed without a word is reported as such, not by its progress bar.
    (Path(stage.stage_dir) / "progress.json").unlink()
    third = subprocess.Popen([sys.executable, "-m", "harness.cli", "launch", str(spec)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (Path(stage.stage_dir) / "progress.json").exists(), 90, "progress")
        os.kill(read_owner(Path(stage.stage_dir) / STAGE_LOCK)["pid"], signal.SIGKILL)
        out, _ = third.communicate(timeout=60)
    finally:
        if third.poll() is None:
            third.kill()
    assert third.returncode == 1
    failed = next(x for x in out.splitlines() if x.strip().startswith("FAILED"))
    assert "%|" not in failed and "without a result" in failed and "log " in failed, failed


def test_a_killed_trainer_is_reported_with_its_real_error_not_a_progress_bar():
    stderr = ("submitit INFO (2026-01-01) - Starting with JobEnvironment(job_id=1, hostname=h)\n"
              "pretrain mae/tiny s0:  30%|###       | 27/90 [00:12<00:28,  2.21it/s, loss=0.8123]\n"
              "pretrain mae/tiny s0:  40%|####      | 36/90 [00:16<00:24,  2.22it/s, loss=0.8001]")
    text = f"Job (task=0) failed during processing with trace:\n{'-' * 40}\nhas not produced any output " \
           f"(state: FAILED)\nError stream produced:\n{'-' * 40}\n{stderr}"
    line = _job_error_line(text, log="/runs/x/submitit/1/1_0_log.err")
    assert "%|" not in line and "killed" in line and "1_0_log.err" in line
    real = stderr + "\nTraceback (most recent call last):\n  File x\nRuntimeError: CUDA out of memory"
    assert _job_error_line(real, log="L") == "RuntimeError: CUDA out of memory"


# -- 4. no lost results ---------------------------------------------------------------------------------

def test_finished_results_are_never_replaced_by_worse_ones(tmp_path, tiny_data):
    spec = write_spec(tmp_path / "s.yaml", tiny_data / "synthetic", tmp_path / "runs",
                      [{"method": "mae", "preset": "tiny", "overrides": {**QUICK, "log_every": 2,
                                                                         "precision": "fp16"}}])
    stage = expand(spec).cells[0].pretrain
    run_stage(stage)
    first = read_record(stage.stage_dir)
    assert first["metrics"]["loss"] > 0
    assert first["precision"] == "fp32" and first["precision_requested"] == "fp16"  # on a CPU
    # `repro run --cell` of the finished cell keeps its record.
    assert cli.main(["run", str(spec), "--cell", stage.cell_id]) == 0
    again = read_record(stage.stage_dir)
    assert again["metrics"] == first["metrics"] and again["created_at"] == first["created_at"]
    # The record lost after the last checkpoint: the resume at the last step rebuilds it from the log.
    (Path(stage.stage_dir) / "record.json").unlink()
    rebuilt = run_stage(stage)
    log = read_metrics(stage.stage_dir)
    assert rebuilt["status"] == "done" and rebuilt["rebuilt_from"] == "metrics.jsonl"
    assert rebuilt["metrics"]["loss"] == pytest.approx(log[-1]["loss"]) == pytest.approx(first["metrics"]["loss"])
    assert rebuilt["img_per_s"] == pytest.approx(first["img_per_s"], rel=0.5)
    assert rebuilt["wall_time_s"] >= 0.5 * first["train_seconds"]


# -- 5. honest messages -----------------------------------------------------------------------------------

def test_non_finite_loss_before_any_checkpoint_names_none(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setattr(MAE, "training_step", lambda self, batch, state: {"loss": torch.tensor(float("nan"),
                                                                                               requires_grad=True)})
    spec = write_spec(tmp_path / "s.yaml", tiny_data / "synthetic", tmp_path / "runs",
                      [{"method": "mae", "preset": "tiny", "overrides": {**QUICK, "log_every": 2}}])
    stage = expand(spec).cells[0].pretrain
    with pytest.raises(NonFiniteLossError) as err:
        run_stage(stage)
    assert "no checkpoint had been written yet" in str(err.value) and "last good" not in str(err.value)
    assert not (Path(stage.stage_dir) / "ckpt" / "last.pt").exists()


def test_slurm_without_slurm_and_an_unwritable_run_folder_are_one_line_errors(tmp_path, tiny_data):
    spec = write_spec(tmp_path / "s.yaml", tiny_data / "synthetic", tmp_path / "runs",
                      [{"method": "mae", "preset": "tiny", "overrides": QUICK}])
    no_slurm = {**os.environ, "PATH": os.path.dirname(sys.executable)}
    out = repro("launch", str(spec), "--executor", "slurm", env=no_slurm)
    _one_line_exit_2(out)
    assert "sbatch" in out.stderr and "--executor local" in out.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = repro("launch", str(spec), "--out", str(blocker / "runs"))  # works as root too, unlike chmod
    _one_line_exit_2(out)
    assert "not writable" in out.stderr and "--out" in out.stderr


def test_a_closed_output_pipe_is_one_line_exit_2(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "methods"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # like `| head` that has already exited
    err = proc.stderr.read()
    assert proc.wait(60) == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and "output" in err


# -- 6. checks at launch ---------------------------------------------------------------------------------

def _dry_run(tmp_path, data, experiment, capsys) -> tuple[int, str]:
    spec = write_spec(tmp_path / "s.yaml", data, tmp_path / "runs", [experiment])
    code = cli.main(["launch", str(spec), "--dry-run"])
    return code, capsys.readouterr().err


def test_launch_checks_what_would_fail_at_job_start(tmp_path, tiny_data, capsys):
    code, err = _dry_run(tmp_path, tiny_data / "synthetic",
                         {"method": "mae", "preset": "tiny", "overrides": {**QUICK, "batch_size": 4096}}, capsys)
    assert code == 2 and "batch_size" in err and "4096 exceeds the 600 readable training images" in err
    code, err = _dry_run(tmp_path, tiny_data / "synthetic",
                         {"method": "dino", "preset": "tiny",
                          "overrides": {"epochs": 2, "warmup_teacher_temp_epochs": 3}}, capsys)
    assert code == 2 and "warmup_teacher_temp_epochs: dino/tiny seed 0: 3 exceeds epochs=2" in err
    assert "you did not set" not in err  # the user set both
    code, err = _dry_run(tmp_path, tiny_data / "synthetic",
                         {"method": "ibot", "preset": "tiny", "overrides": {"epochs": 1, "pred_start_epoch": 2}},
                         capsys)
    assert code == 2 and "pred_start_epoch 2 exceed epochs 1" in err and "preset ibot/tiny sets 0" in err
    root = tmp_path / "holes"
    shutil.copytree(tiny_data / "synthetic", root)
    (root / "train" / "zz_empty").mkdir()
    code, err = _dry_run(tmp_path, root, {"method": "mae", "preset": "tiny", "overrides": QUICK}, capsys)
    assert code == 2 and "zz_empty" in err
    assert not (tmp_path / "runs" / "submitit").exists()


def test_yaml_numbers_as_a_user_means_them(tmp_path, tiny_data):
    def cell(overrides_yaml: str):
        path = tmp_path / "n.yaml"
        path.write_text(f"name: n\nout: {tmp_path / 'runs'}\ndata: {{pretrain: {tiny_data / 'synthetic'}}}\n"
                        f"experiments:\n  - method: mae\n    preset: tiny\n    overrides: {overrides_yaml}\n")
        return expand(path)

    with pytest.raises(UserError, match=r"overrides\.epochs: expects an integer, got True"):
        cell("{epochs: true}")
    _, _, flat = resolve(MAE, "tiny", {"blr": "1e-4"})  # what YAML 1.1 gives for blr: 1e-4
    assert flat["blr"] == 1e-4 and isinstance(flat["blr"], float)
    assert cell("{blr: 1e-4}").cells[0].pretrain.recipe_deviations["blr"][1] == 1e-4
    with pytest.raises(UserError, match=r"overrides\.blr: expects a number, got 'fast'"):
        cell("{blr: fast}")
    spec = write_spec(tmp_path / "r.yaml", tiny_data / "synthetic", tmp_path / "runs",
                      [{"method": "mae", "preset": "tiny"}], resources={"pretrain": {"gpus_per_node": True}})
    with pytest.raises(UserError, match=r"resources\.pretrain\.gpus_per_node: must be a positive integer"):
        expand(spec)


# -- 7. precision ----------------------------------------------------------------------------------------

def test_a_cpu_runs_fp32_and_says_so_and_deviations_name_the_recipes_precision(tmp_path, tiny_data):
    assert autocast_dtype("fp16", torch.device("cpu")) is None
    assert autocast_dtype("fp16", torch.device("cuda")) is torch.float16
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    spec = write_spec(tmp_path / "s.yaml", tiny_data / "synthetic", tmp_path / "runs",
                      [{"method": "mae", "preset": "tiny", "overrides": {**QUICK, "precision": "fp16",
                                                                         "max_steps": 2}}])
    stage = expand(spec).cells[0].pretrain
    from harness.distributed import DistInfo
    from harness.train import PretrainRun

    run = PretrainRun(stage, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    assert run.amp_dtype is None and not run.scaler.is_enabled()
    for cls, paper in ((MAE, "vit_base"), (DINO, "vit_small")):
        _, devs = recipe_deviations(cls, paper, resolve(cls, paper, {})[2])
        assert devs == {"precision": ["fp16", "bf16"]}, cls
    _, devs = recipe_deviations(IBOT, "vit_small", resolve(IBOT, "vit_small", {})[2])
    assert devs == {}
