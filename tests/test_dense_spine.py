"""The dense evaluations' harness side, without training: tiny ADE20K/COCO data, fingerprints, launch-time
checks (one-line errors, exit 2) and the report's mIoU / AP columns beside the paper's."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from harness.api import ExportedBackbone, FeatureSpec
from harness.cli import main
from harness.dataset_id import fingerprint
from harness.errors import UserError
from harness.tinydata import MARKER
from harness.tinydense import ADE_IDS, COCO_IDS, PER_SPLIT
from reports.datasets import identify, load_datasets
from reports.paper import load_paper_numbers
from reports.tables import comparison_table


@pytest.fixture(scope="module")
def dense(tiny_dense):
    return tiny_dense


def test_tiny_ade20k_has_the_real_layout_and_label_ids(dense):
    root = dense["ade20k"]
    for split, sub in (("train", "training"), ("val", "validation")):
        images = sorted(p.stem for p in (root / "images" / sub).glob("*.jpg"))
        labels = sorted(p.stem for p in (root / "annotations" / sub).glob("*.png"))
        assert images == labels and len(images) == PER_SPLIT[split]
    label = np.asarray(Image.open(next((root / "annotations" / "training").glob("*.png"))))
    assert label.shape == (64, 64) and label.dtype == np.uint8
    assert set(np.unique(label)) <= {0, *ADE_IDS.values()} and ADE_IDS["background"] in label
    assert (label[:3] == 0).all() and (label[:, -3:] == 0).all()  # the unlabelled frame: ignored after reduce_zero
    marker = json.loads((root / MARKER).read_text())
    assert marker["set"] == "ade20k" and marker["counts"]["train"]["background"] == PER_SPLIT["train"]


def test_tiny_coco_annotations_match_their_images(dense):
    root = dense["coco"]
    for split in ("train", "val"):
        doc = json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())
        assert [c["id"] for c in doc["categories"]] == sorted(COCO_IDS.values())
        assert len(doc["images"]) == PER_SPLIT[split]
        assert {p.name for p in (root / f"{split}2017").iterdir()} == {i["file_name"] for i in doc["images"]}
        assert len({a["id"] for a in doc["annotations"]}) == len(doc["annotations"]) >= PER_SPLIT[split]
        for ann in doc["annotations"][:20]:
            x, y, w, h = ann["bbox"]
            poly = ann["segmentation"][0]
            xs, ys = poly[0::2], poly[1::2]
            assert len(poly) >= 6 and ann["iscrowd"] == 0 and ann["category_id"] in COCO_IDS.values()
            assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64
            assert (min(xs), min(ys)) == pytest.approx((x, y), abs=0.02)
            mask = Image.new("L", (64, 64), 0)
            ImageDraw.Draw(mask).polygon(list(zip(xs, ys, strict=True)), fill=1)
            assert ann["area"] == pytest.approx(np.asarray(mask).sum(), abs=len(xs))  # rounding of the vertices


def test_dense_fingerprints_identify_the_papers_datasets(dense, tmp_path):
    datasets = load_datasets()
    ade = fingerprint(dense["ade20k"], ("train", "val"), cache=tmp_path)
    coco = fingerprint(dense["coco"], ("train", "val"), cache=tmp_path)
    assert ade["splits"]["train"] == {**ade["splits"]["train"], "layout": "ade20k", "images": 48, "annotations": 48}
    assert coco["splits"]["val"]["layout"] == "coco" and coco["splits"]["val"]["images"] == 16
    assert identify(ade, datasets) is None and identify(coco, datasets) is None  # tiny data is other data
    full = {"splits": {"train": {"layout": "ade20k", "images": 20210}, "val": {"layout": "ade20k", "images": 2000}}}
    assert identify(full, datasets) == "ade20k"
    assert identify({"splits": {"train": {"classes": 5, "images": 20210}}}, datasets) is None  # an ImageFolder
    assert identify({"splits": {"train": {"layout": "coco", "images": 118287}}}, datasets) == "coco"


def _spec(tmp_path, digits, dense, eval_overrides=None, method="mae", data=None):
    spec = {"name": "dense", "out": str(tmp_path / "runs"),
            "data": {"pretrain": str(digits), "ade20k": str(dense["ade20k"]), "coco": str(dense["coco"]),
                     **(data or {})},
            "experiments": [{"method": method, "preset": "tiny", "evaluations": ["ade20k", "coco"],
                             "eval_overrides": eval_overrides or {"ade20k": {"recipe": "tiny"},
                                                                  "coco": {"recipe": "tiny"}}}]}
    path = tmp_path / "dense.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_dry_run_accepts_the_tiny_dense_sets(tmp_path, tiny_data, dense, capsys):
    assert main(["launch", str(_spec(tmp_path, tiny_data / "digits", dense)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "/ade20k" in out and "/coco" in out


def _broken(tmp_path, dense, name, remove):
    root = tmp_path / name
    shutil.copytree(dense[name], root)
    target = root / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    return root


@pytest.mark.parametrize("data, message", [
    (lambda t, d: {"ade20k": str(t / "nowhere")}, "nowhere is not a folder"),
    (lambda t, d: {"ade20k": str(_broken(t, d, "ade20k", "annotations/validation"))},
     "has no annotations/validation/ folder (val split)"),
    (lambda t, d: {"coco": str(_broken(t, d, "coco", "annotations/instances_val2017.json"))},
     "has no annotations/instances_val2017.json (val annotations)"),
])
def test_missing_or_misshapen_dense_data_is_one_line_exit_2(tmp_path, tiny_data, dense, capsys, data, message):
    path = _spec(tmp_path, tiny_data / "digits", dense, data=data(tmp_path, dense))
    assert main(["launch", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "repro data tiny --sets" in err


@pytest.mark.parametrize("over, message", [
    ({"ade20k": {"recipe": "tiny", "crop_size": 66}},
     "eval_overrides.ade20k.crop_size: mae/tiny: 66x66 is not a positive multiple of the patch size (4)"),
    ({"coco": {"recipe": "tiny", "crop_size": [64, 30]}},
     "eval_overrides.coco.crop_size: mae/tiny: 64x30 is not a positive multiple"),
    ({"ade20k": {"recipe": "nope"}}, "ade20k.recipe: unknown recipe 'nope'"),
    ({"coco": {"recipe": "tiny", "epochs": "x"}}, "coco.epochs: expects an integer, got 'x'"),
])
def test_bad_dense_settings_stop_the_launch_in_one_line(tmp_path, tiny_data, dense, capsys, over, message):
    overrides = {"ade20k": {"recipe": "tiny"}, "coco": {"recipe": "tiny"}, **over}
    assert main(["launch", str(_spec(tmp_path, tiny_data / "digits", dense, overrides)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_a_backbone_the_adapter_cannot_serve_is_refused():
    from evaluations.mmstage import check_backbone

    resnet = ExportedBackbone("resnet18", {}, {}, FeatureSpec(), "ResNet-18")
    with pytest.raises(UserError, match="no block outputs the dense adapter can read"):
        check_backbone(resnet, 64)


def _record(cell, stage, stage_id, metrics, fp, protocol=None):
    return {"cell_id": cell, "stage_id": stage_id, "stage": stage, "status": "done", "metrics": metrics,
            "headline_metric": "loss" if stage == "pretrain" else None, "data_fingerprint": fp,
            **{f"metric.{k}": v for k, v in metrics.items()}}


def test_report_puts_miou_and_box_and_mask_ap_beside_the_papers():
    imagenet = {"splits": {"train": {"classes": 1000, "images": 1281167}}}
    ade = {"splits": {"train": {"layout": "ade20k", "images": 20210}}}
    coco = {"splits": {"train": {"layout": "coco", "images": 118287}}}
    common = {"cell_id": "c", "method": "ibot", "preset": "vit_base", "backbone": "ViT-B/16", "epochs": 400,
              "seed": 0, "paper_recipe": "vit_base", "recipe_deviations": {}}
    expected = [
        {**common, "stage_id": "c", "stage": "pretrain", "evaluation": None, "protocol": "pretrain",
         "headline_metric": "loss"},
        {**common, "stage_id": "a", "stage": "ade20k", "evaluation": "ade20k", "protocol": "ade20k/upernet-160k-ss",
         "headline_metric": "mIoU", "report_metrics": ["mIoU"]},
        {**common, "stage_id": "d", "stage": "coco", "evaluation": "coco", "protocol": "coco/cascade-mrcnn-1x",
         "headline_metric": "AP_box", "report_metrics": ["AP_box", "AP_mask"]},
    ]
    records = [_record("c", "pretrain", "c", {"loss": 1.0}, imagenet),
               _record("c", "ade20k", "a", {"mIoU": 49.5, "mAcc": 60.0, "aAcc": 83.0}, ade),
               _record("c", "coco", "d", {"AP_box": 51.0, "AP_mask": 44.0, "AP_box50": 70.0}, coco)]
    table = comparison_table(expected, records, load_paper_numbers()).iloc[0]
    assert table["ade20k/upernet-160k-ss ours"] == "49.50 (n=1)"
    assert table["ade20k/upernet-160k-ss paper"] == "50.0" and table["ade20k/upernet-160k-ss Δ"] == "-0.50"
    assert table["coco/cascade-mrcnn-1x ours"] == "51.00 (n=1)" and table["coco/cascade-mrcnn-1x paper"] == "51.2"
    assert table["coco/cascade-mrcnn-1x AP_mask ours"] == "44.00 (n=1)"
    assert table["coco/cascade-mrcnn-1x AP_mask paper"] == "44.2"
    # The same runs on tiny data: no Δ, "other data", and the data named as a deviation.
    tiny = {"splits": {"train": {"layout": "coco", "images": 48}}}
    records[2] = _record("c", "coco", "d", {"AP_box": 51.0, "AP_mask": 44.0}, tiny)
    row = comparison_table(expected, records, load_paper_numbers()).iloc[0]
    assert row["coco/cascade-mrcnn-1x AP_mask verdict"] == "other data"
    assert "coco:data coco layout, 48 train images" in row["deviations"]
