"""Does each method's tiny preset learn? The smoke of issue 10: pre-train the ``tiny`` preset through the real
pipeline (matrix -> stages -> export -> k-NN) and compare its k-NN top-1 (k = 20, the protocol's default
feature) with the same backbone at initialisation (the random-init floor, same seed). Each method must beat
its floor by MIN_MARGIN points without a collapse flag from the representation-health metrics; a plugin
whose teacher never moves must fail the same check.

The methods' pre-trainings run side by side, one torch thread each: on a 2-core machine two single-threaded
runs finish in half the time of one two-threaded run after the other (a second thread mostly contends),
and one thread makes the float reductions, hence every margin, the same on every machine. The numbers per
seed are in each preset's description (``repro methods <method> tiny``)."""

from __future__ import annotations

import multiprocessing
import os
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.learning import MIN_MARGIN, Learning, learning_problems, measure_learning

# method -> the tiny set its preset is measured on. Slowest first, so the pool's last job is a short one.
LEARNS: dict[str, str] = {
    "mae": "digits",
    "ropim": "digits",
}


def _one_thread() -> None:
    torch.set_num_threads(1)


def _measure(root: Path, method: str, data: str, tiny_root: Path) -> Learning | BaseException:
    try:
        (root / method).mkdir()
        return measure_learning(root / method, method, data=data, tiny_root=tiny_root)
    except Exception:  # reported by the method's own test, not by every test of the module
        # As text: a harness exception with its own __init__ need not survive the trip back through pickle.
        return RuntimeError(traceback.format_exc())


@pytest.fixture(scope="module")
def learned(tmp_path_factory, tiny_data) -> dict[str, Learning | BaseException]:
    root = tmp_path_factory.mktemp("learning")
    workers = max(1, min(len(LEARNS), os.cpu_count() or 1))
    # spawn, not fork: a forked child of a process that already ran torch's thread pools can deadlock.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_one_thread) as pool:
        jobs = {m: pool.submit(_measure, root, m, data, tiny_data) for m, data in LEARNS.items()}
        return {m: job.result() for m, job in jobs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(LEARNS))
def test_tiny_preset_beats_its_random_init_floor(learned, method):
    result = learned[method]
    if isinstance(result, BaseException):
        raise result
    assert not learning_problems(result, MIN_MARGIN), result.describe()


@pytest.mark.slow
def test_a_teacher_that_never_moves_fails_the_learning_check(tmp_path, tiny_data):
    # EMA momentum 1.0: the teacher, which is what DINO exports, stays at its initialisation whatever the
    # student learns, so the export is the floor's backbone and the margin is exactly 0 (one epoch shows it).
    # (Its centred targets are also near uniform, as at initialisation: the collapse flag may come too.)
    result = measure_learning(tmp_path, "dino", tiny_root=tiny_data, seed=0,
                              overrides={"momentum_teacher": 1.0, "momentum_teacher_end": 1.0, "epochs": 1,
                                         "warmup_teacher_temp_epochs": 0})
    assert result.trained == result.floor, result.describe()
    assert learning_problems(result)[:1] == ["margin +0.0 < 10"], result.describe()
