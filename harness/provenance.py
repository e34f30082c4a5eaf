"""Code and environment provenance recorded with every result (the code's state: harness/snapshot.py)."""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version

from harness.snapshot import commit_label, running_code

PACKAGES = ("torch", "torchvision", "timm", "submitit", "numpy", "pandas", "safetensors", "ssl-repro")


def git_commit() -> str:
    """The commit of the code this process runs, with '+dirty' when uncommitted changes ran too."""
    return commit_label(running_code())


@cache
def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out
