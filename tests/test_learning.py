"""Does each method's tiny preset learn? The smoke of issue 10: pre-train the ``tiny`` preset through the real
pipeline (matrix -> stages -> export -> k-NN) and compare its k-NN top-1 (k = 20, the protocol's default
feature) with the same backbone at initialisation (the random-init floor, same seed). Each method must beat
its floor by MIN_MARGIN points without a collapse flag from the representation-health metrics; a plugin
whose teacher never moves, or is as soft as its student (BROKEN), must fail the same check. A preset known to fall
short of the bar (SHORT_OF_THE_BAR: ExtreMA) is an expected failure of that check, strict so that the day it passes
is seen, and keeps the smaller margin it does reach.

Each pre-training runs on one torch thread in a spawned process, which makes the float reductions, hence every
margin, the same on every machine. The measurements start with the session and run in the background while the
other tests run (tests/conftest.py, ``learning_measurements``); these tests come last and read them. The numbers
per seed are in each preset's description (``repro methods <method> tiny``)."""

from __future__ import annotations

import pytest

from tests.learning import LEARNS, SHORT_OF_THE_BAR, learning_problems

# Only the margin assertion is the expected failure: a measurement that crashes or times out still fails.
_SHORT = pytest.mark.xfail(strict=True, raises=AssertionError,
                           reason="below the issue-10 bar: see the preset's description")


@pytest.mark.slow
@pytest.mark.learning
@pytest.mark.parametrize("name", [pytest.param(m, marks=_SHORT) if m in SHORT_OF_THE_BAR else m for m in LEARNS])
def test_tiny_preset_beats_its_random_init_floor(learning_measurements, name):
    result = learning_measurements.result(name)
    assert not learning_problems(result), result.describe()


@pytest.mark.slow
@pytest.mark.learning
@pytest.mark.parametrize("name", list(SHORT_OF_THE_BAR))
def test_a_preset_short_of_the_bar_keeps_the_margin_it_reaches(learning_measurements, name):
    result = learning_measurements.result(name)
    assert not learning_problems(result, min_margin=SHORT_OF_THE_BAR[name]), result.describe()


@pytest.mark.slow
@pytest.mark.learning
@pytest.mark.parametrize("name", ["dino_teacher_temp_equals_student_temp"])
def test_a_broken_preset_fails_the_learning_check(learning_measurements, name):
    # Measured (seed 0): 36.9 vs 50.0 (margin -13.1); teacher entropy ratio 0.982, just past the uniform flag.
    result = learning_measurements.result(name)
    assert result.margin < 0 and learning_problems(result)[0].startswith("margin -"), result.describe()


@pytest.mark.slow
@pytest.mark.learning
@pytest.mark.parametrize("name", ["dino_teacher_never_moves"])
def test_a_teacher_that_never_moves_fails_the_learning_check(learning_measurements, name):
    # (Its centred targets are also near uniform, as at initialisation: the collapse flag may come too.)
    result = learning_measurements.result(name)
    assert result.trained == result.floor, result.describe()
    assert learning_problems(result)[:1] == ["margin +0.0 < 10"], result.describe()
