"""Tiny data sets, ImageFolder errors, feature pooling, and a tiny end-to-end k-NN evaluation."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from PIL import Image

from evaluations.features import eval_transform, image_folder, pool_features
from evaluations.knn import KNNConfig
from harness.api import EVALUATIONS, EvalInputs, FeatureSpec
from harness.errors import UserError
from harness.tinydata import MARKER, make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def _files(root):
    return {p.relative_to(root): p.stat().st_mtime_ns for p in root.rglob("*")}


def _counts(split_dir):
    return {d.name: len(list(d.glob("*.png"))) for d in sorted(split_dir.iterdir())}


def test_digits_layout(tiny):
    root = tiny["digits"]
    train, val = _counts(root / "train"), _counts(root / "val")
    assert sorted(train) == sorted(val) == [str(d) for d in range(10)]
    assert sum(train.values()) + sum(val.values()) == 1797  # every scikit-learn digit, once
    assert sum(val.values()) == 360  # 20 %, stratified: each class keeps its share
    assert all(35 <= n <= 37 for n in val.values())
    marker = json.loads((root / MARKER).read_text())
    assert marker["counts"] == {"train": train, "val": val}
    image = Image.open(next((root / "val" / "3").glob("*.png")))
    assert image.size == (32, 32) and image.mode == "RGB"


def test_synthetic_layout(tiny):
    root = tiny["synthetic"]
    assert set(_counts(root / "train").values()) == {60} and len(_counts(root / "train")) == 10
    assert set(_counts(root / "val").values()) == {15} and len(_counts(root / "val")) == 10
    image = Image.open(next((root / "train" / "class7").glob("*.png")))
    assert image.size == (32, 32) and image.mode == "RGB"


def test_second_call_rewrites_nothing(tiny):
    out = tiny["digits"].parent
    before = _files(out)
    assert make_tiny(out) == tiny
    assert _files(out) == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no temp folders left behind


def test_synthetic_is_deterministic(tiny, tmp_path):
    again = make_tiny(tmp_path, sets=("synthetic",))["synthetic"]
    for path in (tiny["synthetic"] / "val").rglob("*.png"):
        assert path.read_bytes() == (again / path.relative_to(tiny["synthetic"])).read_bytes()


def test_existing_folders_it_did_not_make_are_refused(tiny, tmp_path):
    with pytest.raises(UserError, match="size"):
        make_tiny(tiny["digits"].parent, sets=("digits",), size=16)
    (tmp_path / "digits").mkdir()
    with pytest.raises(UserError, match="not a finished tiny data set"):
        make_tiny(tmp_path, sets=("digits",))


@pytest.mark.parametrize("layout", ["missing", "no_classes", "empty_class"])
def test_image_folder_errors_are_one_line(tmp_path, layout):
    if layout != "missing":
        (tmp_path / "train").mkdir()
    if layout == "empty_class":
        (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(UserError) as err:
        image_folder(tmp_path, "train", eval_transform(32))
    message = str(err.value)
    assert err.value.field == "data.root" and message.startswith("data.root: ")
    assert "\n" not in message and "ROOT/{train,val}/<class>/<image>" in message
    assert "repro data tiny --out DIR" in message


def test_eval_transform_is_resize_256_crop_224():
    resize, crop = eval_transform(224).transforms[:2]
    assert resize.size == 256 and resize.interpolation.value == "bicubic" and crop.size == (224, 224)
    assert eval_transform(32)(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def _tiny_vit():
    torch.manual_seed(0)
    # pretrained=False: nothing may download in tests.
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8
    ).eval()


def test_pool_features_vit_and_swin():
    vit, x = _tiny_vit(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit.forward_features(x)  # (B, 1 + 16, 192), final norm applied
        assert torch.equal(pool_features(vit, x, "cls"), tokens[:, 0])
        assert torch.allclose(pool_features(vit, x, "avg"), tokens[:, 1:].mean(1))
        assert pool_features(vit, x, "cls+avg").shape == (2, 384)

        swin = timm.create_model(
            "swin_tiny_patch4_window7_224",
            pretrained=False,
            num_classes=0,
            img_size=32,
            window_size=4,
            embed_dim=24,
            depths=(1, 1),
            num_heads=(1, 2),
        ).eval()
        fmap = swin.forward_features(x)  # (B, H, W, C): NHWC
        assert torch.allclose(pool_features(swin, x, "avg"), fmap.mean((1, 2)))
    with pytest.raises(ValueError, match="CLS"):
        pool_features(swin, x, "cls")


def test_knn_end_to_end_on_tiny_digits(tiny):
    evaluation = EVALUATIONS.get("knn")
    inputs = EvalInputs(
        backbone=_tiny_vit(),
        feature_spec=FeatureSpec(knn="cls"),
        data_root=tiny["digits"],
        img_size=32,
        device=torch.device("cpu"),
        num_workers=0,
        seed=0,
    )
    metrics = evaluation.run(inputs, evaluation.config_cls())
    assert evaluation.config_cls is KNNConfig
    assert metrics.protocol == "knn@k20,T0.07" and metrics.headline == "top1"
    assert metrics.extra["n_train"] == 1437 and metrics.extra["n_val"] == 360
    assert metrics.extra["feature_dim"] == 192
    assert metrics.values["top1"] == metrics.values["top1@k20"]
    # A random-init ViT still beats chance (10 %) on digits; this is a smoke check, not a target.
    assert 10.0 < metrics.values["top1"] <= 100.0
