"""Registries: decorators for built-ins, a Python entry point for plugins living outside the repo."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from harness.api import EVALUATIONS, METHODS

PLUGIN = '''
from dataclasses import dataclass
from harness.api import register_method
from methods.mae import MAE

@register_method("outside_mae")
class OutsideMAE(MAE):
    """A method that lives in another package."""
'''


def test_builtin_registries():
    assert {"mae"} <= set(METHODS.names())
    assert "knn" in EVALUATIONS.names()


def test_entry_point_plugin_is_found(tmp_path):
    (tmp_path / "outside_plugin.py").write_text(textwrap.dedent(PLUGIN))
    dist = tmp_path / "outside_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: outside-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ssl_repro.methods]\noutside_mae = outside_plugin\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "harness.cli", "methods"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "outside_mae" in out.stdout and "mae" in out.stdout
