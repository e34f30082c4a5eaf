"""Tiny dense-prediction sets in the real ADE20K and COCO layouts, for the ``ade20k`` and ``coco`` evaluations.

Each image holds one to three coloured geometric shapes (circle, square, triangle; the class is the shape, the
colour is drawn per object) on a textured background, so a model must read shape, not colour. Images are
``2 * size`` pixels square (64 for the default 32: detection anchors start at stride 4 and go to 64).

- ``ade20k``: ``images/{training,validation}/ADE_*.jpg`` and ``annotations/{training,validation}/ADE_*.png``,
  labels in ADE20K's 150-class id space with 0 = "other" (mmseg's ``reduce_zero_label`` turns it into the
  ignore index): background ``ADE_IDS["background"]``, each shape its own id, and a 3-pixel unlabelled frame.
- ``coco``: ``{train2017,val2017}/*.jpg`` and ``annotations/instances_{train,val}2017.json`` with one polygon per
  object, its box ``[x, y, w, h]``, its area (the polygon's pixel count) and ``iscrowd`` 0.

Written through ``harness.tinydata.make_tiny`` (atomic, with its marker), which calls the writers below.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
# ADE20K raw ids (1..150; 0 = other). Spread over the id space, 150 included, so that the reduce_zero_label
# shift and the 150-way head are exercised; the ADE class names at these ids mean nothing here.
ADE_IDS = {"background": 1, "circle": 40, "square": 90, "triangle": 150}
COCO_IDS = {name: i + 1 for i, name in enumerate(SHAPES)}
PER_SPLIT = {"train": 48, "val": 16}
_ADE_SPLIT = {"train": "training", "val": "validation"}
_FRAME = 3  # unlabelled (0) border of every ADE label map


def image_size(size: int) -> int:
    return 2 * size


def write_ade20k(folder: Path, size: int, seed: int) -> dict[str, dict[str, int]]:
    """ADE20K layout under ``folder``; returns {split: {class name: images containing it}}."""
    counts: dict[str, dict[str, int]] = {}
    for split, idx, image, objects in _scenes(image_size(size), seed):
        sub = _ADE_SPLIT[split]
        name = f"ADE_{sub[:5]}_{idx:08d}"
        label = Image.new("L", image.size, ADE_IDS["background"])
        draw = ImageDraw.Draw(label)
        for shape, polygon in objects:
            draw.polygon(polygon, fill=ADE_IDS[shape])
        w, h = image.size
        draw.rectangle([0, 0, w - 1, h - 1], outline=0, width=_FRAME)
        for kind, obj, ext in (("images", image, "jpg"), ("annotations", label, "png")):
            (folder / kind / sub).mkdir(parents=True, exist_ok=True)
            obj.save(folder / kind / sub / f"{name}.{ext}", **({"quality": 95} if ext == "jpg" else {}))
        seen = counts.setdefault(split, {})
        for shape in {"background", *(s for s, _ in objects)}:
            seen[shape] = seen.get(shape, 0) + 1
    return counts


def write_coco(folder: Path, size: int, seed: int) -> dict[str, dict[str, int]]:
    """COCO layout under ``folder``; returns {split: {category name: instances}}."""
    splits: dict[str, dict] = {}
    for split, idx, image, objects in _scenes(image_size(size), seed + 1):
        year = f"{split}2017"
        (folder / year).mkdir(parents=True, exist_ok=True)
        file_name = f"{idx:012d}.jpg"
        image.save(folder / year / file_name, quality=95)
        doc = splits.setdefault(split, {"images": [], "annotations": []})
        image_id = idx + 1
        doc["images"].append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for shape, polygon in objects:
            xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
            x0, y0 = min(xs), min(ys)
            doc["annotations"].append({
                "id": len(doc["annotations"]) + 1, "image_id": image_id,
                "category_id": COCO_IDS[shape], "segmentation": [[round(v, 2) for p in polygon for v in p]],
                "area": float(_pixel_area(polygon, image.size)), "bbox": [round(x0, 2), round(y0, 2),
                                                                          round(max(xs) - x0, 2),
                                                                          round(max(ys) - y0, 2)],
                "iscrowd": 0})
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"id": i, "name": name, "supercategory": "shape"} for name, i in COCO_IDS.items()]
    counts = {}
    for split, doc in splits.items():
        full = {"info": {"description": "ssl-repro tiny shapes (COCO layout)"}, "licenses": [], **doc,
                "categories": categories}
        (folder / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(full))
        counts[split] = {name: sum(a["category_id"] == i for a in doc["annotations"]) for name, i in COCO_IDS.items()}
    return counts


Polygon = list[tuple[float, float]]


def _scenes(side: int, seed: int) -> Iterator[tuple[str, int, Image.Image, list[tuple[str, Polygon]]]]:
    rng = np.random.default_rng(seed)
    for split, n in PER_SPLIT.items():
        for idx in range(n):
            image = _background(rng, side)
            draw = ImageDraw.Draw(image)
            objects: list[tuple[str, Polygon]] = []
            boxes: list[tuple[float, float, float, float]] = []
            for _ in range(int(rng.integers(1, 4))):
                shape = SHAPES[int(rng.integers(len(SHAPES)))]
                placed = _place(rng, shape, side, boxes)
                if placed is None:
                    continue
                polygon, box = placed
                boxes.append(box)
                objects.append((shape, polygon))
                draw.polygon(polygon, fill=_colour(rng))
            yield split, idx, _noisy(rng, image), objects


def _place(rng: np.random.Generator, shape: str, side: int, boxes: list[tuple[float, float, float, float]]
           ) -> tuple[Polygon, tuple[float, float, float, float]] | None:
    """A polygon of ``shape`` that overlaps no earlier object (so every mask is fully visible), or None."""
    for _ in range(20):
        r = rng.uniform(0.14, 0.24) * side
        cx, cy = rng.uniform(_FRAME + r, side - _FRAME - r, size=2)
        turn = rng.uniform(0, 2 * math.pi)
        corners = {"circle": 16, "square": 4, "triangle": 3}[shape]
        polygon = [(float(cx + r * math.cos(turn + 2 * math.pi * k / corners)),
                    float(cy + r * math.sin(turn + 2 * math.pi * k / corners))) for k in range(corners)]
        xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
        box = (min(xs) - 2, min(ys) - 2, max(xs) + 2, max(ys) + 2)
        if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in boxes):
            return polygon, box
    return None


def _background(rng: np.random.Generator, side: int) -> Image.Image:
    # A smooth random colour field (8x8 noise, bicubic-upsampled) plus stripes: texture, not a flat colour.
    coarse = rng.uniform(60, 200, size=(8, 8, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC), dtype=np.float64)
    yy, xx = np.mgrid[0:side, 0:side]
    angle = rng.uniform(0, math.pi)
    stripes = 20 * np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / rng.uniform(4, 10))
    return Image.fromarray(np.clip(field + stripes[..., None], 0, 255).astype(np.uint8))


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    hue = rng.uniform()
    rgb = 0.5 + 0.45 * np.cos(2 * math.pi * (hue - np.array([0.0, 1 / 3, 2 / 3])))
    return tuple(int(v) for v in np.rint(rgb * 255))


def _noisy(rng: np.random.Generator, image: Image.Image) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, 8, size=(image.height, image.width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _pixel_area(polygon: Polygon, size: tuple[int, int]) -> int:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).polygon(polygon, fill=1)
    return int(np.asarray(mask).sum())
