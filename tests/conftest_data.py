"""Session fixtures for data (registered from conftest.py)."""

from __future__ import annotations

import pytest

from harness.tinydata import make_tiny


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The tiny ImageFolder sets (digits, synthetic), made once per test session."""
    root = tmp_path_factory.mktemp("tiny")
    make_tiny(root)
    return root


@pytest.fixture(scope="session")
def tiny_dense(tmp_path_factory):
    """The tiny ADE20K- and COCO-layout sets (harness/tinydense.py), made once per test session."""
    return make_tiny(tmp_path_factory.mktemp("tiny_dense"), sets=("ade20k", "coco"))
