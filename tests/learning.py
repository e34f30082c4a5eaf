"""Does a method's preset learn? Pre-train one cell through the real pipeline (matrix -> stages -> export ->
evaluations, in this process) together with its random-init floor, and compare.

    from tests.learning import measure_learning
    result = measure_learning(tmp_path, "dino", tiny_root=tiny_data)
    assert result.margin >= 10, result.describe()
    assert not result.collapsed, result.describe()
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.matrix import expand
from harness.records import read_record
from harness.stages import run_stage
from harness.tinydata import make_tiny
from tests.helpers import write_spec


@dataclass
class Learning:
    """One cell against its floor. ``trained``/``floor``/``margin``: the first evaluation's headline (k-NN
    top-1 by default, in percent); ``per_eval``: every evaluation's (trained, floor) headlines."""

    method: str
    preset: str
    trained: float
    floor: float
    per_eval: dict[str, tuple[float, float]]
    health: dict[str, float]  # the last representation-health values of the pre-training (record["health"])
    collapse: dict[str, Any] | None  # record["collapse"]: the first metric found collapsed, or None
    pretrain_wall_s: float
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # "pretrain", "init", "<eval>", "<eval>@floor"

    @property
    def margin(self) -> float:
        return self.trained - self.floor

    @property
    def collapsed(self) -> bool:
        return self.collapse is not None

    def describe(self) -> str:
        health = ", ".join(f"{k} {v:.4g}" for k, v in sorted(self.health.items()))
        return (f"{self.method}/{self.preset}: trained {self.trained:.1f}, random init {self.floor:.1f}, "
                f"margin {self.margin:+.1f}; health: {health or 'none'}; collapse: {self.collapse}; "
                f"pre-training {self.pretrain_wall_s:.1f}s")


def measure_learning(tmp_path: Path, method: str, preset: str = "tiny", data: str | Path = "digits",
                     overrides: dict[str, Any] | None = None, seed: int = 0,
                     evaluations: tuple[str, ...] = ("knn",), eval_overrides: dict[str, Any] | None = None,
                     tiny_root: Path | None = None) -> Learning:
    """Pre-train ``method``/``preset`` (with ``overrides``) on ``data`` and evaluate it and its random-init floor.

    ``data``: a tiny set's name ("digits", "synthetic"), made under ``tiny_root`` (default
    ``tmp_path/"tiny"``; pass the session's ``tiny_data`` fixture to make it once), or an ImageFolder path."""
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    if isinstance(data, Path) or "/" in str(data):
        data_root = Path(data)
    else:
        data_root = make_tiny(tiny_root or tmp_path / "tiny", sets=(str(data),))[str(data)]
    experiment = {"method": method, "preset": preset, "seeds": [seed], "overrides": dict(overrides or {}),
                  "evaluations": list(evaluations), "floor": True}
    if eval_overrides:
        experiment["eval_overrides"] = eval_overrides
    spec = write_spec(tmp_path / "learning.yaml", data_root, tmp_path / "runs", [experiment])
    matrix = expand(spec)
    trained = next(c for c in matrix.cells if not c.is_floor)
    floor = next(c for c in matrix.cells if c.is_floor and c.pretrain.floor_of == trained.pretrain.cell_id)
    records: dict[str, dict[str, Any]] = {}
    for cell, suffix in ((trained, ""), (floor, "@floor")):
        for stage in cell.stages:
            run_stage(stage)  # raises (with a 'failed' record) when a stage fails
            records[stage.stage + (suffix if not stage.builds else "")] = read_record(stage.stage_dir)
    per_eval = {}
    for ev in evaluations:
        ours, base = records[ev], records[f"{ev}@floor"]
        per_eval[ev] = (float(ours["metrics"][ours["headline_metric"]]),
                        float(base["metrics"][base["headline_metric"]]))
    pre = records["pretrain"]
    first = per_eval[evaluations[0]]
    return Learning(method=method, preset=preset, trained=first[0], floor=first[1], per_eval=per_eval,
                    health=dict(pre.get("health") or {}), collapse=pre.get("collapse"),
                    pretrain_wall_s=float(pre["wall_time_s"]), records=records)


MIN_MARGIN = 10.0  # k-NN top-1 points over the random-init floor (issue 10)
# The longest measurement takes ~4 min beside other runs on 2 cores; a run still going long after is hung.
RESULT_TIMEOUT_S = 1200.0

# method -> the tiny set its preset is measured on (tests/test_learning.py). The longest pre-training first (seconds
# on one thread, from each preset's description; MAE's is its 880 steps x ~0.09 s): the background pool starts
# them in this order, and a long one started last would run on alone at the end of the session.
LEARNS: dict[str, str] = {
    "simmim": "digits",  # ~150-175
    "ibot": "digits",  # ~165
    "esvit": "digits",  # ~120
    "dino": "digits",  # ~110
    "mae": "digits",  # ~80
    "ropim": "digits",  # ~70
    "extrema": "digits",  # ~35
}

# Tiny presets that do not reach MIN_MARGIN (issue 10 stays open for them): method -> the margin their test guards
# instead, about half the one measured on seed 0, so that a change which stops the preset learning what it does
# learn fails (a teacher that never moves scores the floor exactly). The reasons are in each preset's description.
SHORT_OF_THE_BAR: dict[str, float] = {
    "extrema": 2.5,  # seed 0: 84.2 vs 79.2 (+5.0); seeds 1, 2: +4.7, +3.6
}


# Deliberately broken tiny presets the learning check must fail (issue 10): name -> (method, overrides).
BROKEN: dict[str, tuple[str, dict[str, Any]]] = {
    # The teacher as soft as the student: nothing sharpens its targets, which go uniform (DINO sec. 5.3). Five
    # epochs show it (34 s); the preset's 20 gave 34.2 vs 50.0 (teacher entropy ratio 0.999).
    "dino_teacher_temp_equals_student_temp": ("dino", {"teacher_temp": 0.1, "warmup_teacher_temp": 0.1,
                                                       "epochs": 5}),
    # EMA momentum 1.0: the teacher, which is what DINO exports, stays at its initialisation whatever the student
    # learns, so the export is the floor's backbone and the margin is exactly 0 (one epoch shows it).
    "dino_teacher_never_moves": ("dino", {"momentum_teacher": 1.0, "momentum_teacher_end": 1.0, "epochs": 1}),
}


def measure_on_one_thread(out: Path, name: str, tiny_root: Path) -> Learning:
    """``measure_learning`` of a tiny preset named in LEARNS (a method) or BROKEN, on one torch thread in a fresh
    (spawned) process: one thread makes the float reductions, hence every margin, the same on every machine."""
    torch.set_num_threads(1)
    method, overrides = BROKEN[name] if name in BROKEN else (name, {})
    return measure_learning(out, method, data=LEARNS[method], overrides=overrides, tiny_root=tiny_root)


def learning_problems(result: Learning, min_margin: float = MIN_MARGIN) -> list[str]:
    """Why ``result`` does not show learning (empty: it does)."""
    problems = []
    if result.margin < min_margin:
        problems.append(f"margin {result.margin:+.1f} < {min_margin:g}")
    if result.collapsed:
        problems.append(f"collapsed: {result.collapse}")
    return problems


class BackgroundMeasurements:
    """A test session's learning measurements (names from LEARNS or BROKEN), each in a spawned process (a forked
    child would inherit pytest's state and torch's thread pool), ``workers`` at a time from the session's start.
    They run at the lowest CPU priority (nice 19), so that they take the CPU time the other tests leave (waits
    on subprocesses, on SLURM, on jobs) rather than slowing them. ``result(name)`` waits for one."""

    def __init__(self, names: list[str], root: Path, tiny_root: Path, workers: int) -> None:
        self._root, self._tiny_root = root, tiny_root
        self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=os.nice, initargs=(19,))
        self.futures: dict[str, Future] = {
            name: self._pool.submit(measure_on_one_thread, root / name, name, tiny_root) for name in names}

    def result(self, name: str, timeout_s: float = RESULT_TIMEOUT_S) -> Learning:
        """Raises TimeoutError when the measurement is not over ``timeout_s`` after this call (a hung run must fail
        its test, not hang the session)."""
        return self.futures[name].result(timeout=timeout_s)

    def close(self) -> None:
        """Ends the measurements; one still running (after a timeout, or when the session stops early) is killed."""
        running = any(not f.done() for f in self.futures.values())
        # concurrent.futures cannot stop a call that runs: its worker processes are ended instead
        workers = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=not running, cancel_futures=True)
        for process in workers if running else ():
            process.kill()
