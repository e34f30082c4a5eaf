"""Does each method's tiny preset learn? The smoke of issue 10: pre-train the ``tiny`` preset through the real
pipeline (matrix -> stages -> export -> k-NN) and compare its k-NN top-1 (k = 20, the protocol's default
feature) with the same backbone at initialisation (the random-init floor, same seed). Each method must beat
its floor by MIN_MARGIN points without a collapse flag from the representation-health metrics; a plugin
whose teacher never moves must fail the same check.

Each pre-training runs with one torch thread (its loader workers on the other core): a second torch thread
only contends on a 2-core machine, and one thread makes the float reductions, hence every margin, the same
on every machine. (Two pre-trainings side by side, data loaded in-process, were no faster in total: at this
size the work does not scale over the 2 cores.) The numbers per seed are in each preset's description
(``repro methods <method> tiny``)."""

from __future__ import annotations

import pytest

from tests.helpers import torch_threads
from tests.learning import MIN_MARGIN, learning_problems, measure_learning

# method -> the tiny set its preset is measured on
LEARNS: dict[str, str] = {
    "mae": "digits",
    "ropim": "digits",
    "esvit": "digits",
    "simmim": "digits",
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(LEARNS))
def test_tiny_preset_beats_its_random_init_floor(tmp_path, tiny_data, method):
    with torch_threads(1):
        result = measure_learning(tmp_path, method, data=LEARNS[method], tiny_root=tiny_data)
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
