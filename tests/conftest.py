"""Shared fixtures: tiny data (tests/conftest_data.py), the real SLURM cluster, and the learning measurements
that run in the background while the rest of the suite runs."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

pytest_plugins = ["tests.conftest_data"]


def _is_learning_test(item: pytest.Item) -> bool:
    # tests/test_learning.py: a test marked "learning" reads the background measurement its "name" parameter
    # names (a method in tests/learning.LEARNS or a BROKEN preset)
    return item.get_closest_marker("learning") is not None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The learning tests last: their pre-trainings start with the session (learning_measurements), so they run
    # while the rest of the suite does, which on 2 cores leaves about one core idle (subprocess start-ups,
    # SLURM scheduling, waits on jobs: 28 core-minutes of CPU in 21.6 minutes, measured).
    items.sort(key=_is_learning_test)  # stable: every other test keeps its place


@pytest.fixture(scope="session", autouse=True)
def learning_measurements(request, tmp_path_factory):
    """The learning measurements (tests/learning.BackgroundMeasurements) of every learning test this session
    selected, started at the session's first test: one per pair of cores at a time, at least two, at nice 19
    beside the other tests (two on a 2-core machine). Measured here: 1098 and 1204 s of pytest with two, 1156 s
    with one (and a second once the other tests were over); the host's speed varied as much, so the gain is not
    shown. The margins do not depend on it (one torch thread each)."""
    # once each: several tests may read one measurement
    selected = list(dict.fromkeys(item.callspec.params["name"] for item in request.session.items
                                  if _is_learning_test(item)))
    if not selected:
        yield None
        return
    from tests.learning import BackgroundMeasurements  # here: it imports the harness, which a unit test may not need

    measurements = BackgroundMeasurements(selected, tmp_path_factory.mktemp("learning"),
                                          request.getfixturevalue("tiny_data"), max(2, (os.cpu_count() or 2) // 2))
    try:
        yield measurements
    finally:
        measurements.close()


def _cluster_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        parts = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=10)
        acct = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return parts.returncode == 0 and "debug" in parts.stdout.split() and acct.returncode == 0


@pytest.fixture(scope="session")
def slurm_cluster():
    """The single-node cluster started by scripts/slurm_cluster.sh (partitions debug, urgent)."""
    if not _cluster_answers():
        if os.environ.get("REQUIRE_SLURM") == "1":
            pytest.fail("REQUIRE_SLURM=1 but no SLURM cluster answers: run 'bash scripts/slurm_cluster.sh up'")
        pytest.skip("no SLURM cluster (bash scripts/slurm_cluster.sh up)")
    return {"partition": "debug", "urgent_partition": "urgent"}
