"""Tiny ImageFolder data sets for tests and smoke runs, made on the spot with nothing downloaded.

- ``digits``: scikit-learn's 1797 real 8x8 handwritten digits (shipped inside the package), upscaled.
- ``synthetic``: 10 classes of procedural gratings (orientation/frequency), from a seeded numpy generator.
- ``ade20k`` and ``coco``: shapes on textured backgrounds in the ADE20K and COCO layouts (harness/tinydense.py),
  for the dense evaluations; not made unless asked for.

Layout: ``OUT/<set>/{train,val}/<class>/<idx>.png`` (the dense sets: their datasets' own layouts) plus
``OUT/<set>/.complete`` (counts and settings).
A set is built in a hidden temp folder beside its final place and renamed there when complete, so
a reader never sees half a data set, and a second call finds the marker and rewrites nothing.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from harness import tinydense
from harness.errors import UserError

MARKER = ".complete"
SYNTHETIC_CLASSES = 10
SYNTHETIC_PER_CLASS = {"train": 60, "val": 15}


def make_tiny(
    out: str | Path,
    sets: Sequence[str] = ("digits", "synthetic"),
    size: int = 32,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the requested sets under ``out`` (skipping complete ones) and return ``{set: path}``."""
    out = Path(out)
    unknown = [s for s in sets if s not in _WRITERS]
    if unknown:
        raise UserError("data.sets", f"unknown tiny data set(s) {unknown}", f"choose from {list(_WRITERS)}")
    if size < 8:
        raise UserError("data.size", f"image size must be at least 8, got {size}", "use e.g. --size 32")
    out.mkdir(parents=True, exist_ok=True)
    return {name: _make_set(out, name, size, seed) for name in sets}


def _make_set(out: Path, name: str, size: int, seed: int) -> Path:
    final = out / name
    settings = {"set": name, "size": size, "seed": seed}
    if final.exists():
        _check_complete(final, settings)
        return final
    # Not tempfile.mkdtemp: its 0700 mode would follow the data into place; mkdir honours the umask.
    tmp = out / f".{name}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir()
    try:
        counts = _WRITERS[name](tmp, size, seed)
        # Last file written; the rename below publishes it together with the images it counts.
        (tmp / MARKER).write_text(json.dumps({**settings, "counts": counts}, indent=2, sort_keys=True) + "\n")
        try:
            tmp.rename(final)
        except OSError:
            # Another process finished the same set first; keep its copy if it matches.
            if not (final / MARKER).exists():
                raise
            _check_complete(final, settings)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _check_complete(final: Path, settings: dict) -> None:
    marker = final / MARKER
    if not marker.is_file():
        raise UserError(
            "data.out",
            f"{final} exists but is not a finished tiny data set (no {MARKER})",
            "remove it or choose another --out",
        )
    found = json.loads(marker.read_text())
    if any(found.get(key) != value for key, value in settings.items()):
        was = {key: found.get(key) for key in settings}
        raise UserError(
            "data.out", f"{final} was made with {was}, not {settings}", "remove it or choose another --out"
        )


Sample = tuple[str, str, int, Image.Image]  # (split, class name, index, image)
Writer = Callable[[Path, int, int], dict[str, dict[str, int]]]  # (folder, size, seed) -> {split: {class: n}}


def _image_folder(builder: Callable[[int, int], Iterable[Sample]]) -> Writer:
    def write(folder: Path, size: int, seed: int) -> dict[str, dict[str, int]]:
        counts: dict[str, dict[str, int]] = {}
        for split, cls, idx, image in builder(size, seed):
            (folder / split / cls).mkdir(parents=True, exist_ok=True)
            image.save(folder / split / cls / f"{idx}.png")
            counts.setdefault(split, {}).setdefault(cls, 0)
            counts[split][cls] += 1
        return counts

    return write


def _digits(size: int, seed: int) -> Iterable[Sample]:
    # Imported here: scikit-learn is slow to import and only this set needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are 0..16 (ink counts of the 4x4 blocks the 32x32 scans were reduced to).
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    order = np.arange(len(pixels))
    train_idx, val_idx = train_test_split(order, test_size=0.2, random_state=seed, stratify=digits.target)
    for split, indices in (("train", train_idx), ("val", val_idx)):
        for i in sorted(indices):
            grey = Image.fromarray(pixels[i]).resize((size, size), Image.Resampling.BICUBIC)
            yield split, str(digits.target[i]), int(i), grey.convert("RGB")


def _synthetic(size: int, seed: int) -> Iterable[Sample]:
    # Class c: a sinusoidal grating at orientation c·18° (jitter σ ≈ 3°), 2 or 3 cycles per image.
    # Phase, colour and pixel noise are drawn per image, so only the structure names the class: with a
    # colour per class even a randomly initialised ViT scores 100 % k-NN and nothing learned would show
    # (random-init ViT-Tiny/8 at 32 px, CLS k-NN: 36 % this way).
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for split, per_class in SYNTHETIC_PER_CLASS.items():
        idx = 0
        for c in range(SYNTHETIC_CLASSES):
            cycles = 2 + c % 2
            for _ in range(per_class):
                angle = np.pi * c / SYNTHETIC_CLASSES + rng.normal(0, 0.05)
                phase = rng.uniform(0, 2 * np.pi)
                colour = _hue_to_rgb(rng.uniform())
                wave = np.sin(2 * np.pi * cycles * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
                img = 0.5 + 0.4 * wave[..., None] * colour + rng.normal(0, 0.15, (size, size, 3))
                pixels = np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)
                yield split, f"class{c}", idx, Image.fromarray(pixels)
                idx += 1


def _hue_to_rgb(h: float) -> np.ndarray:
    # Saturated colour on the hue circle, components in [-1, 1] so the grating swings around mid-grey.
    return np.cos(2 * np.pi * (h - np.array([0.0, 1 / 3, 2 / 3])))


_WRITERS: dict[str, Writer] = {"digits": _image_folder(_digits), "synthetic": _image_folder(_synthetic),
                               "ade20k": tinydense.write_ade20k, "coco": tinydense.write_coco}
