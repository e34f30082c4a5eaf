"""Test helpers of the dense evaluations: exports of every backbone family and minimal ADE20K / COCO sets.

The data is the smallest that exercises the real formats (ADE20K: JPEG images + PNG label maps with
0 = other; COCO: instances json with polygons, boxes and areas); ``repro data tiny`` makes the larger sets
that a model learns from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from harness.api import ExportedBackbone, FeatureSpec
from harness.export import save_export


def export_vit(folder: Path, class_token: bool = True, img_size: int = 32, patch: int = 8, depth: int = 4,
               seed: int = 0) -> Path:
    """A random timm ViT (embed 32), with or without [cls], exported as a method would."""
    import timm

    kwargs = dict(img_size=img_size, patch_size=patch, embed_dim=32, depth=depth, num_heads=2, mlp_ratio=2.0,
                  class_token=class_token, global_pool="token" if class_token else "avg")
    torch.manual_seed(seed)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **kwargs)
    save_export(ExportedBackbone("vit_base_patch16_224", kwargs, model.state_dict(), FeatureSpec(), "ViT-test"),
                folder)
    return folder


def export_beit(folder: Path, img_size: int = 32, patch: int = 8, seed: int = 0) -> Path:
    from methods.backbones import ViTShape
    from methods.beit import beit_export, beit_kwargs, create_beit

    kwargs = beit_kwargs(ViTShape("pico", img_size, patch), layer_scale=0.1, drop_path=0.0)
    torch.manual_seed(seed)
    model = create_beit(kwargs)
    with torch.no_grad():  # a non-zero relative position bias, so that resampling it matters
        model.rel_pos_bias.relative_position_bias_table.normal_(std=0.5)
    save_export(beit_export(kwargs, model.state_dict(), "BEiT-test"), folder)
    return folder


def export_swin(folder: Path, size: str = "nano", window: int = 4, img_size: int = 64, seed: int = 0) -> Path:
    from methods.esvit import export_norm_kwargs
    from methods.swin import SwinShape, create_swin

    shape = SwinShape(size, window, img_size, 4)
    torch.manual_seed(seed)
    model = create_swin(shape)
    save_export(ExportedBackbone(shape.timm_name, shape.timm_kwargs() | export_norm_kwargs(), model.state_dict(),
                                 FeatureSpec(knn="avg", linear="avg"), shape.label), folder)
    return folder


def export_extrema(folder: Path, img_size: int = 32, patch: int = 8, seed: int = 0) -> Path:
    from methods.cait import TIMM_NAME, ClassAttentionViT

    kwargs = dict(img_size=img_size, patch_size=patch, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0,
                  class_attention_layers=1)
    torch.manual_seed(seed)
    model = ClassAttentionViT(**kwargs)
    save_export(ExportedBackbone(TIMM_NAME, kwargs, model.state_dict(), FeatureSpec(), "ExtreMA-test"), folder)
    return folder


def _scene(rng: np.random.Generator, side: int) -> tuple[Image.Image, list[tuple[int, list[float]]]]:
    """A noisy background with one or two filled squares/triangles; (class 1 or 2, polygon) per object."""
    image = Image.fromarray(rng.integers(90, 160, size=(side, side, 3), dtype=np.uint8))
    draw, objects = ImageDraw.Draw(image), []
    for k in range(int(rng.integers(1, 3))):
        cls = int(rng.integers(1, 3))
        r = side * 0.18
        cx, cy = side * (0.3 + 0.4 * k), side * rng.uniform(0.3, 0.7)
        poly = ([cx - r, cy - r, cx + r, cy - r, cx + r, cy + r, cx - r, cy + r] if cls == 1 else
                [cx, cy - r, cx + r, cy + r, cx - r, cy + r])
        draw.polygon(poly, fill=(230, 40, 40) if cls == 1 else (40, 40, 230))
        objects.append((cls, poly))
    return image, objects


def write_ade(root: Path, n_train: int = 4, n_val: int = 2, side: int = 64, seed: int = 0) -> Path:
    """ADE20K layout: labels 0 (other, ignored), 1 background, 20 squares, 150 triangles."""
    rng = np.random.default_rng(seed)
    ids = {1: 20, 2: 150}
    for split, n in (("training", n_train), ("validation", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, objects = _scene(rng, side)
            label = Image.new("L", image.size, 1)
            for cls, poly in objects:
                ImageDraw.Draw(label).polygon(poly, fill=ids[cls])
            image.save(root / "images" / split / f"ADE_{split}_{i:08d}.jpg", quality=95)
            label.save(root / "annotations" / split / f"ADE_{split}_{i:08d}.png")
    return root


def write_coco(root: Path, n_train: int = 4, n_val: int = 2, side: int = 64, seed: int = 0) -> Path:
    """COCO layout: {train,val}2017/ and annotations/instances_{train,val}2017.json (2 categories)."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(n):
            image, objects = _scene(rng, side)
            name = f"{i:012d}.jpg"
            image.save(root / f"{split}2017" / name, quality=95)
            images.append(dict(id=i + 1, file_name=name, width=side, height=side))
            for cls, poly in objects:
                xs, ys = poly[0::2], poly[1::2]
                mask = Image.new("L", (side, side), 0)
                ImageDraw.Draw(mask).polygon(poly, fill=1)
                anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=cls, segmentation=[poly],
                                 area=float(np.asarray(mask).sum()), iscrowd=0,
                                 bbox=[min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]))
        doc = dict(images=images, annotations=anns, categories=[dict(id=1, name="square"), dict(id=2, name="triangle")])
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))
    return root
