"""What data a stage saw: a fingerprint of an ImageFolder root (class count, image count, file-list hash), or of
an ADE20K- or COCO-layout root (image count, annotation count or size, file-list hash) for the dense evaluations.

Reports join a paper number only to runs on the paper's dataset; the fingerprint is how a record says
which dataset that was, independent of where it is mounted. Listing ImageNet takes seconds to minutes on a
network file system, so fingerprints are cached per (root, split) and the cache is trusted while the split
folder and every class folder keep their modification times (adding, removing or renaming an image changes
its folder's mtime). No torch here: ``launch`` and ``report`` use this too.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from harness.atomic import read_json_state, write_json

# torchvision's ImageFolder extensions (torchvision.datasets.folder.IMG_EXTENSIONS), re-stated so that
# fingerprinting does not import torch; they decide what counts as an image, exactly as the loader does.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FINGERPRINT_VERSION = 1
# The dense datasets' own layouts: split -> (image folder, annotations folder or file), relative to the root.
# A fingerprint keys their splits "train" and "val" like an ImageFolder's, so reports compare them alike.
DENSE_LAYOUTS = {
    "ade20k": {"train": ("images/training", "annotations/training"),
               "val": ("images/validation", "annotations/validation")},
    "coco": {"train": ("train2017", "annotations/instances_train2017.json"),
             "val": ("val2017", "annotations/instances_val2017.json")},
}


def layout_of(root: str | os.PathLike) -> str:
    """"ade20k" or "coco" when ``root`` has that dataset's folders (any one of them), else "imagefolder"."""
    root = Path(root)
    for name, splits in DENSE_LAYOUTS.items():
        if any((root / p).exists() for pair in splits.values() for p in pair):
            return name
    return "imagefolder"


def cache_dir() -> Path:
    """``$SSL_REPRO_CACHE`` or ``$XDG_CACHE_HOME/ssl-repro`` (default ``~/.cache/ssl-repro``)."""
    if os.environ.get("SSL_REPRO_CACHE"):
        return Path(os.environ["SSL_REPRO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ssl-repro"


def split_fingerprint(split_dir: str | os.PathLike) -> dict[str, Any]:
    """{classes, images, files_sha256} of one ImageFolder split (``train/`` or ``val/``), uncached.

    The hash covers the sorted relative paths of the images, not their bytes: it tells two copies of a
    dataset from two different subsets cheaply; a corrupted image is the loader's business.
    """
    split_dir = Path(split_dir)
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    digest = hashlib.sha256()
    images = 0
    for name in classes:
        files = sorted(e.name for e in os.scandir(split_dir / name)
                       if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        images += len(files)
        for f in files:
            digest.update(f"{name}/{f}\n".encode())
    return {"classes": len(classes), "images": images, "files_sha256": digest.hexdigest()}


def dense_split_fingerprint(root: str | os.PathLike, layout: str, split: str) -> dict[str, Any]:
    """{layout, images, annotations (ADE20K: label maps) or annotation_bytes (COCO: the JSON's size), files_sha256} of
    one split of a dense-layout root, uncached. The COCO JSON is not parsed: ImageNet-sized listings are
    cheap, a 450 MB annotation file is not."""
    images_rel, ann_rel = DENSE_LAYOUTS[layout][split]
    images = sorted(e.name for e in os.scandir(Path(root) / images_rel)
                    if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
    digest = hashlib.sha256("".join(f"{name}\n" for name in images).encode())
    ann = Path(root) / ann_rel
    if layout == "coco":
        annotations = {"annotation_bytes": ann.stat().st_size}
    else:
        annotations = {"annotations": sum(1 for e in os.scandir(ann) if e.is_file() and e.name.endswith(".png"))}
    return {"layout": layout, "images": len(images), **annotations, "files_sha256": digest.hexdigest()}


def fingerprint(root: str | os.PathLike, splits: tuple[str, ...] = ("train",),
                cache: Path | None = None) -> dict[str, Any] | None:
    """{root, splits: {split: {classes, images, files_sha256}}} of an ImageFolder root (of an ADE20K or COCO
    root: see ``dense_split_fingerprint``), from the cache when its folders are unchanged; None when the root
    cannot be listed (the stage will say why)."""
    root = Path(root)
    cache = cache_dir() if cache is None else cache
    layout = layout_of(root)
    out: dict[str, Any] = {"version": FINGERPRINT_VERSION, "root": str(root), "splits": {}}
    for split in splits:
        try:
            if layout == "imagefolder":
                out["splits"][split] = _cached_split(root / split, cache)
            else:
                paths = [root / p for p in DENSE_LAYOUTS[layout][split]]
                out["splits"][split] = _cached_split(paths[0], cache, paths[1:],
                                                     lambda s=split: dense_split_fingerprint(root, layout, s))
        except (OSError, KeyError):
            return None
    return out


def _cached_split(split_dir: Path, cache: Path, also: list[Path] = (), compute=None) -> dict[str, Any]:
    split_dir = split_dir.resolve()
    stamp = _folder_stamp(split_dir)
    for extra in also:  # a dense split's annotations: their folder's (or file's) time and size
        st = extra.stat()
        stamp += f"|{extra.name}:{st.st_mtime_ns}:{st.st_size if extra.is_file() else ''}"
    path = cache / "dataset_id" / f"{hashlib.sha256(str(split_dir).encode()).hexdigest()[:24]}.json"
    entry, _ = read_json_state(path)
    if entry and entry.get("stamp") == stamp and entry.get("version") == FINGERPRINT_VERSION:
        return entry["fingerprint"]
    fp = compute() if compute is not None else split_fingerprint(split_dir)
    try:
        write_json(path, {"version": FINGERPRINT_VERSION, "split_dir": str(split_dir), "stamp": stamp,
                          "fingerprint": fp})
    except OSError:
        pass  # a read-only cache only costs time
    return fp


def _folder_stamp(split_dir: Path) -> str:
    """mtimes of the split folder and of each class folder: any file added, removed or renamed changes one."""
    digest = hashlib.sha256(f"{split_dir.stat().st_mtime_ns}".encode())
    for e in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if e.is_dir():
            digest.update(f"{e.name}:{e.stat().st_mtime_ns}\n".encode())
    return digest.hexdigest()


def stage_splits(stage: str) -> tuple[str, ...]:
    """Pre-training reads train/; evaluations read train/ and val/ (as harness.launch checks the layout)."""
    return ("train",) if stage == "pretrain" else ("train", "val")
