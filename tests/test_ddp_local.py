"""One job as two processes (gloo on CPU) through submitit's local executor."""

from __future__ import annotations

from harness import checkpoint as ckpt
from harness.launch import launch
from harness.matrix import expand
from harness.records import read_record
from tests.helpers import read_metrics, write_spec


def test_two_task_job_trains_with_ddp_and_only_rank0_writes(tmp_path, tiny_data):
    path = write_spec(tmp_path / "ddp.yaml", tiny_data / "synthetic", tmp_path / "runs",
                      [{"method": "mae", "preset": "tiny", "seeds": [0],
                        "overrides": {"epochs": 1, "batch_size": 64, "num_workers": 0, "log_every": 1}}],
                      resources={"pretrain": {"tasks_per_node": 2, "cpus_per_task": 1}})
    matrix = expand(path)
    result = launch(matrix, "local")
    assert not result.failed, result.failed
    stage = matrix.cells[0].pretrain
    rec = read_record(stage.stage_dir)
    assert rec["status"] == "done" and rec["world_size"] == 2
    # rank 0 alone writes the log: every step once
    assert [m["step"] for m in read_metrics(stage.stage_dir)] == list(range(1, 10))
    state = ckpt.load(f"{stage.stage_dir}/ckpt/last.pt")
    assert state["step"] == 9  # 600 images // global batch 64, each rank 32 per step
