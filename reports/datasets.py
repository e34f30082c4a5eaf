"""Which known dataset a recorded data fingerprint is: the paper's, or something else.

``reports/data/datasets.json`` describes each dataset a paper number was measured on, split by split
(class count, image count, optionally the file-list hash), with its source. A fingerprint (written by
harness/dataset_id.py into manifests and records) is that dataset when every described split it has
matches; it must have ``train``.
"""

from __future__ import annotations

import importlib.resources
import json
import os
from typing import Any


def load_datasets(path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    if path is None:
        resource = importlib.resources.files("reports") / "data" / "datasets.json"
        return json.loads(resource.read_text(encoding="utf-8"))
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def identify(fp: dict[str, Any] | None, datasets: dict[str, dict[str, Any]]) -> str | None:
    """The name of the known dataset ``fp`` is, or None (unknown data, or no fingerprint)."""
    splits = (fp or {}).get("splits") or {}
    if "train" not in splits:
        return None
    for name, desc in datasets.items():
        shared = set(splits) & set(desc.get("splits", {}))
        if "train" in shared and all(_same(splits[s], desc["splits"][s]) for s in shared):
            return name
    return None


def _same(seen: dict[str, Any], known: dict[str, Any]) -> bool:
    keys = [k for k in ("layout", "classes", "images", "files_sha256") if k in known]
    return all(seen.get(k) == known[k] for k in keys)


def describe(fp: dict[str, Any] | None) -> str:
    """"10 classes, 1,437 train images" (or "not recorded"); a dense layout's: "coco layout, 48 train images"."""
    train = ((fp or {}).get("splits") or {}).get("train")
    if not train:
        return "not recorded"
    return _counts(train)


def describe_known(name: str, datasets: dict[str, dict[str, Any]]) -> str:
    desc = datasets.get(name)
    if desc is None:
        return f"{name} (not described in reports/data/datasets.json)"
    return f"{desc.get('title', name)}, {_counts(desc['splits']['train'])}"


def _counts(split: dict[str, Any]) -> str:
    # ImageFolder splits count classes; the dense layouts' class lists live in their annotations instead.
    kind = f"{split['classes']} classes" if "classes" in split else f"{split.get('layout', '?')} layout"
    return f"{kind}, {split['images']:,} train images"
