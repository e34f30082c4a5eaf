"""Shared fixtures: tiny data (tests/conftest_data.py) and the real SLURM cluster."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

pytest_plugins = ["tests.conftest_data"]


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
