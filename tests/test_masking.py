"""iBOT/BEiT masks against the official bytedance/ibot loader (golden fixture) and by their properties."""

from __future__ import annotations

import json
import math
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.data import SeededAugmentDataset
from methods.masking import BlockMaskGenerator, MaskedMultiCrop, block_mask

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "golden" / "ibot_masks.json").read_text())
SETTINGS = {s["name"]: s for s in GOLDEN["inputs"]["settings"]}
RESULTS = {s["name"]: s["results"] for s in GOLDEN["outputs"]["settings"]}
LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))


def _generator(params: dict) -> BlockMaskGenerator:
    return BlockMaskGenerator(params["pred_ratio"], params["pred_ratio_var"], tuple(params["pred_aspect_ratio"]),
                              params["pred_shape"])


def _seed(s: int) -> None:
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


@pytest.fixture
def rng_calls(monkeypatch):
    """Record every call to the RNG functions the official loader uses, as [name, args, result]."""
    calls: list = []

    def recorder(module, name, label):
        original = getattr(module, name)

        def wrapped(*args):
            out = original(*args)
            calls.append([label, list(args), out] if label != "np.random.shuffle" else [label, len(args[0])])
            return out

        monkeypatch.setattr(module, name, wrapped)

    for name in ("uniform", "choice", "randint"):
        recorder(random, name, f"random.{name}")
    recorder(np.random, "shuffle", "np.random.shuffle")
    return calls


@pytest.mark.parametrize("name", list(SETTINGS))
def test_masks_ratios_and_rng_calls_match_official(name, rng_calls):
    """Every fixture mask and ratio bit for bit, and the exact sequence of RNG calls (incl. the
    multi-crop setting, where one seed's stream continues from crop to crop)."""
    params = SETTINGS[name]["params"]
    gen = _generator(params)
    grids = params["grid"] if isinstance(params["grid"][0], list) else [params["grid"]]
    for result in RESULTS[name]:
        _seed(result["seed"])
        rng_calls.clear()
        for i, (h, w) in enumerate(grids):
            mask, ratio = gen(h, w)
            assert mask.dtype == bool and mask.shape == (h, w)
            assert ratio == result["ratio"][i], f"seed {result['seed']} crop {i}"
            assert mask.astype(int).tolist() == result["masks"][i], f"seed {result['seed']} crop {i}"
            assert int(mask.sum()) == result["mask_sum"][i]
        assert json.loads(json.dumps(rng_calls)) == result["rng_calls"], f"seed {result['seed']}"


def test_recipe_masks_about_half_the_images():
    """pred_ratio [0, 0.3] var [0, 0.2]: ratio 0 w.p. 1/2, else U(0.1, 0.5); never more than floor(r·HW)."""
    gen = BlockMaskGenerator([0.0, 0.3], [0.0, 0.2])
    _seed(0)
    ratios, fills = [], []
    for _ in range(2000):
        mask, ratio = gen(14, 14)
        ratios.append(ratio)
        assert mask.sum() <= math.floor(ratio * 196)
        if ratio > 0:
            fills.append(mask.sum() / (ratio * 196))
    ratios = np.array(ratios)
    assert abs((ratios == 0).mean() - 0.5) < 0.04
    masked = ratios[ratios > 0]
    assert masked.min() >= 0.1 and masked.max() <= 0.5 and abs(masked.mean() - 0.3) < 0.01
    assert np.mean(fills) > 0.9  # the block filler gets close to its budget


def test_rand_masks_have_exactly_int_ratio_hw_cells():
    gen = BlockMaskGenerator(0.3, 0.2, pred_shape="rand")
    _seed(1)
    for _ in range(300):
        mask, ratio = gen(14, 14)
        assert mask.sum() == int(ratio * 196)
    positions = np.zeros((14, 14))
    for _ in range(500):
        positions += gen(14, 14, ratio=0.5)[0]
    assert positions.min() > 0  # every cell gets masked sometimes


def test_blocks_respect_min_area_and_aspect_range():
    """Each block's target area is drawn from [(min(H,W)//3)², remaining] — so at least the minimum
    whenever the remaining budget allows — and its aspect log-uniformly within (0.3, 1/0.3); the
    rectangle is the rounded sqrt(area·aspect) x sqrt(area/aspect)."""
    _seed(2)
    n_checked = 0
    for _ in range(300):
        budget = random.uniform(0.1, 0.5) * 196
        placed: list = []
        mask = block_mask(14, 14, budget, LOG_ASPECT, placed=placed)
        assert mask.sum() == sum(b["new"] for b in placed) <= math.floor(budget)
        for b in placed:
            assert 0.3 - 1e-12 <= b["aspect"] <= 1 / 0.3 + 1e-12
            assert b["h"] == round(math.sqrt(b["area"] * b["aspect"]))
            assert b["w"] == round(math.sqrt(b["area"] / b["aspect"]))
            assert b["h"] < 14 and b["w"] < 14 and b["new"] <= b["remaining"]
            assert b["min_area"] == 16
            if b["remaining"] >= b["min_area"]:
                assert b["min_area"] <= b["area"] <= b["remaining"]
                n_checked += 1
        if placed:  # the first block is a solid rectangle
            first = placed[0]
            region = mask[first["top"]:first["top"] + first["h"], first["left"]:first["left"] + first["w"]]
            assert region.all()
    assert n_checked > 300


def test_single_ratio_without_variance_draws_nothing_from_random():
    gen = BlockMaskGenerator([0.3], [0.0], pred_shape="rand")
    _seed(3)
    state = random.getstate()
    mask, ratio = gen(4, 4)
    assert ratio == 0.3 and mask.sum() == 4 and random.getstate() == state


def test_bad_ratios_are_rejected():
    with pytest.raises(ValueError):
        BlockMaskGenerator([0.1, 0.3], [0.2, 0.0])  # var > ratio (official asserts prm >= prv)
    with pytest.raises(ValueError):
        BlockMaskGenerator([0.1, 0.3], [0.0, 0.1, 0.2])
    with pytest.raises(ValueError):
        BlockMaskGenerator(0.3, pred_shape="grid")


def _fixed_crops(img):
    return [torch.zeros(3, 32, 32), torch.zeros(3, 32, 32), torch.zeros(3, 16, 16)]


def test_transform_masks_the_global_crops_and_honours_pred_start_epoch():
    transform = MaskedMultiCrop(_fixed_crops, BlockMaskGenerator([0.0, 0.3], [0.0, 0.2]), patch_size=4,
                                pred_start_epoch=2)
    transform = pickle.loads(pickle.dumps(transform))  # runs in loader workers
    _seed(4)
    transform.set_epoch(1)
    state = random.getstate()
    crops, masks = transform(None)
    assert len(crops) == 3 and len(masks) == 2
    assert all(m.shape == (8, 8) and m.dtype == torch.bool and not m.any() for m in masks)
    assert random.getstate() == state  # before pred_start_epoch: ratio 0 and no draw, as official
    transform.set_epoch(2)
    sums = [int(m.sum()) for _ in range(40) for m in transform(None)[1]]
    assert sum(s == 0 for s in sums) > 10 and max(sums) > 6


def test_masks_are_reproducible_under_the_harness_seeding(tiny_data):
    from torchvision.datasets import ImageFolder

    from methods.augment import MultiCropAugmentation

    base = ImageFolder(tiny_data / "synthetic" / "train")
    crops = MultiCropAugmentation(32, 16, 2, (0.25, 1.0), (0.05, 0.25))
    transform = MaskedMultiCrop(crops, BlockMaskGenerator([0.0, 0.3], [0.0, 0.2]), patch_size=4)
    ds = SeededAugmentDataset(base, transform, seed=7)
    a, b = ds[(5, 3)][0], ds[(5, 3)][0]
    assert all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1], strict=True))
    other = [ds[(i, 3)][0][1] for i in range(12)]
    assert len({tuple(m.flatten().tolist()) for ms in other for m in ms}) > 6  # masks differ across images
