"""The OpenMMLab glue of the dense evaluations: adapters, layer decay, compiled-op stand-in, checkpoints,
lazy imports, bad input, and 4-iteration UperNet / Mask R-CNN runs through mmengine's Runner."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from evaluations.dense.adapters import build_backbone, default_out_indices
from harness.errors import UserError
from harness.export import load_export
from tests.dense_helpers import export_beit, export_extrema, export_swin, export_vit, write_ade, write_coco

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mm():
    """OpenMMLab, ready (imported once per test module: ~10 s)."""
    from evaluations.dense.openmmlab import prepare

    prepare()


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


# -- adapters --------------------------------------------------------------------------------------


def test_out_indices_scale_with_depth():
    assert default_out_indices(12) == (3, 5, 7, 11)  # iBOT/BEiT out_indices
    assert default_out_indices(24) == (7, 11, 15, 23)  # BEiT ViT-L
    assert default_out_indices(4) == (0, 1, 2, 3)


@pytest.mark.parametrize("class_token", [True, False])
@pytest.mark.parametrize("crop", [None, 64])
def test_vit_levels_equal_timm_forward_intermediates(tmp_path, class_token, crop):
    exp = export_vit(tmp_path, class_token=class_token)
    adapter = build_backbone(str(exp), img_size=crop, norm="BN").eval()
    ref, _, _ = load_export(exp)
    if crop:
        ref.set_input_size(img_size=(crop, crop))  # timm's own resampling of the position embedding
    x = torch.randn(2, 3, crop or 32, crop or 32)
    with torch.no_grad():
        want = ref.forward_intermediates(x, indices=[0, 1, 2, 3], norm=True, intermediates_only=True)
        _close(adapter.levels(x), want)
        feats = adapter(x)
    side = crop or 32
    assert [tuple(f.shape[-2:]) for f in feats] == [(side // s, side // s) for s in (4, 8, 16, 32)]


def test_vit_takes_other_input_sizes(tmp_path):
    """Detection batches vary in size: the position embedding is resampled on the fly (timm dynamic size)."""
    adapter = build_backbone(str(export_vit(tmp_path)), img_size=64, norm="BN").eval()
    with torch.no_grad():
        feats = adapter(torch.randn(1, 3, 48, 80))
    assert [tuple(f.shape[-2:]) for f in feats] == [(12, 20), (6, 10), (3, 5), (1, 2)]


def test_beit_levels_equal_timm_with_resampled_relative_bias(tmp_path):
    exp = export_beit(tmp_path)
    adapter = build_backbone(str(exp), img_size=64, norm="BN").eval()
    ref, _, _ = load_export(exp)
    before = ref.rel_pos_bias.relative_position_bias_table.shape
    ref.set_input_size(img_size=(64, 64))
    assert ref.rel_pos_bias.relative_position_bias_table.shape != before  # 4x4 -> 8x8 grid: resampled
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _close(adapter.levels(x), ref.forward_intermediates(x, indices=[0, 1, 2, 3], norm=True,
                                                             intermediates_only=True))


def test_beit_other_input_sizes_resample_the_relative_bias(tmp_path):
    """A BEiT built at its pre-training size, fed a larger input, equals timm resized to that input."""
    exp = export_beit(tmp_path)
    adapter = build_backbone(str(exp), norm="BN").eval()
    ref, _, _ = load_export(exp)
    ref.set_input_size(img_size=(48, 64))
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        _close(adapter.levels(x), ref.forward_intermediates(x, indices=[0, 1, 2, 3], norm=True,
                                                             intermediates_only=True))


@pytest.mark.parametrize("crop", [None, 128])
def test_swin_levels_equal_timm_forward_intermediates(tmp_path, crop):
    exp = export_swin(tmp_path)
    adapter = build_backbone(str(exp), img_size=crop).eval()
    ref, _, _ = load_export(exp, strict_img_size=False)
    if crop:
        ref.set_input_size(img_size=(crop, crop), window_size=4)  # the pre-training window, kept
    x = torch.randn(2, 3, crop or 64, crop or 64)
    with torch.no_grad():
        _close(adapter.levels(x), ref.forward_intermediates(x, norm=False, intermediates_only=True))
        feats = adapter(x)
    assert adapter.strides == (4, 8, 16, 32) and adapter.out_channels == [16, 32, 64, 128]
    assert [f.shape[1] for f in feats] == adapter.out_channels


def test_extrema_levels_are_its_patch_tokens(tmp_path):
    """ExtreMA's class-attention blocks only update [CLS]: the last level (with the final norm) is the patch
    part of its own ``forward_features``."""
    exp = export_extrema(tmp_path)
    adapter = build_backbone(str(exp), norm="BN").eval()
    ref, _, _ = load_export(exp)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        last = adapter.levels(x)[-1]
        tokens = ref.forward_features(x)[:, 1:]
    torch.testing.assert_close(last.flatten(2).transpose(1, 2), tokens, rtol=1e-5, atol=1e-5)
    assert isinstance(adapter.encoder.blocks_token, torch.nn.Identity)  # unused by dense heads: dropped


def test_neck_matches_ibot_for_patch_16(tmp_path):
    adapter = build_backbone(str(export_vit(tmp_path, img_size=64, patch=16)), norm="BN")
    kinds = [[type(m).__name__ for m in (n if isinstance(n, torch.nn.Sequential) else [n])] for n in adapter.necks]
    # iBOT register_backbone.py fpn1..fpn4 for patch 16
    assert kinds == [["ConvTranspose2d", "BatchNorm2d", "GELU", "ConvTranspose2d"], ["ConvTranspose2d"],
                     ["Identity"], ["MaxPool2d"]]


# -- bad input -------------------------------------------------------------------------------------


def test_crop_not_a_multiple_of_the_patch_is_one_line_error(tmp_path):
    with pytest.raises(UserError, match="crop_size: 60x60 is not a positive multiple of the patch size"):
        build_backbone(str(export_vit(tmp_path)), img_size=60)


def test_swin_crop_must_survive_the_down_sampling(tmp_path):
    with pytest.raises(UserError, match="crop_size: 72x72"):
        build_backbone(str(export_swin(tmp_path)), img_size=72)


def test_missing_export_and_unknown_recipe_are_one_line_errors(tmp_path):
    from evaluations.dense.recipes import det_recipe, seg_recipe

    with pytest.raises(UserError, match="no exported backbone"):
        build_backbone(str(tmp_path / "nothing"))
    with pytest.raises(UserError, match="unknown recipe 'vit_huge'.*ibot_vit_base"):
        seg_recipe("vit_huge")
    with pytest.raises(UserError, match="lr_typo: not a setting"):
        det_recipe("tiny", lr_typo=1.0)


def test_backbone_the_adapter_cannot_serve(tmp_path):
    import timm

    from harness.api import ExportedBackbone, FeatureSpec
    from harness.export import save_export

    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    save_export(ExportedBackbone("resnet18", {}, model.state_dict(), FeatureSpec(), "R18"), tmp_path)
    with pytest.raises(UserError, match="backbone: ResNet has no block outputs"):
        build_backbone(str(tmp_path))


def test_shallow_vit_cannot_give_four_levels(tmp_path):
    with pytest.raises(UserError, match="depth 3"):
        build_backbone(str(export_vit(tmp_path, depth=3)))


# -- recipes ---------------------------------------------------------------------------------------


def test_paper_recipes_cite_every_value():
    import dataclasses

    from evaluations.dense.recipes import DET_RECIPES, SEG_RECIPES

    for recipe in [*SEG_RECIPES.values(), *DET_RECIPES.values()]:
        if recipe.name.startswith("tiny"):  # test recipes: defaults stand for themselves
            continue
        fields = {f.name for f in dataclasses.fields(recipe)} - {"sources"}
        assert set(recipe.sources) == fields, recipe.name
    base = SEG_RECIPES["ibot_vit_base"]
    assert (base.crop_size, base.iters, base.batch_size, base.lr, base.layer_decay) == (512, 160_000, 16, 8e-5, 0.65)
    assert "optimizer.lr=8e-5" in base.sources["lr"]
    assert (SEG_RECIPES["ibot_vit_small"].lr, SEG_RECIPES["ibot_vit_small"].layer_decay) == (3e-5, 0.9)
    assert DET_RECIPES["ibot_vit_small"].layer_decay == 0.8 and DET_RECIPES["ibot_vit_base"].layer_decay == 0.75
    assert DET_RECIPES["ibot_vit_base"].lr_steps == (8, 11) and DET_RECIPES["ibot_vit_base"].epochs == 12


# -- OpenMMLab -------------------------------------------------------------------------------------


def test_shim_ops_equal_torchvision(mm):
    import mmcv.ops
    import torchvision

    from evaluations.dense import shim

    if not shim.install():
        pytest.skip("a compiled mmcv is installed: the stand-in is not in use")
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(30, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + 5 + torch.rand(30, 2, generator=g) * 30], dim=1)
    scores = torch.rand(30, generator=g)
    dets, keep = mmcv.ops.nms(boxes, scores, 0.5)
    assert torch.equal(keep, torchvision.ops.nms(boxes, scores, 0.5))
    feats = torch.randn(2, 4, 16, 16, generator=g, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 2.0, 10.0, 12.0], [1, 0.5, 0.5, 15.0, 9.0]])
    out = mmcv.ops.RoIAlign((5, 5), spatial_scale=0.5, sampling_ratio=0, aligned=True)(feats, rois)
    ref_feats = feats.detach().clone().requires_grad_(True)
    ref = torchvision.ops.roi_align(ref_feats, rois, (5, 5), spatial_scale=0.5, sampling_ratio=0, aligned=True)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(feats.grad, ref_feats.grad)
    with pytest.raises(shim.MissingOpError, match=r"mmcv\._ext\.deform_conv_forward: compiled mmcv op not available"):
        sys.modules["mmcv._ext"].deform_conv_forward(feats)


def _seg_model(export_dir: Path, data_root: Path, tmp: Path):
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS

    from evaluations.dense.recipes import seg_recipe
    from evaluations.dense.seg_config import segmentation_config

    cfg = segmentation_config(export_dir, data_root, seg_recipe("tiny"), tmp / "work", seed=0)
    with DefaultScope.overwrite_default_scope("mmseg"):
        return MODELS.build(cfg["model"]), cfg


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_layer_decay_groups_equal_finetuning_rule(mm, tmp_path, family):
    from mmengine.optim import build_optim_wrapper

    from harness.optim import backbone_layer_rule, param_groups_lrd

    exp = (export_vit if family == "vit" else export_swin)(tmp_path / "exp")
    model, cfg = _seg_model(exp, tmp_path, tmp_path)
    optimizer = build_optim_wrapper(model, cfg["optim_wrapper"]).optimizer
    base_lr, wd, ld = 1e-3, 0.05, 0.65
    encoder = model.backbone.encoder
    layer_id, num_layers = backbone_layer_rule(encoder)
    want = param_groups_lrd(model, wd, set(encoder.no_weight_decay()), ld, layer_id, num_layers,
                            prefix="backbone.encoder.")
    got = {n: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for n in g["names"]}
    assert got == {n: (base_lr * g["lr_scale"], g["weight_decay"]) for g in want for n in g["names"]}
    assert set(got) == {n for n, p in model.named_parameters() if p.requires_grad}
    if family == "vit":
        # iBOT/BEiT LayerDecayOptimizerConstructor: scale = rate ** (depth + 2 - layer_id - 1), blocks.i -> i + 1,
        # embeddings 0, everything else (norm, necks, heads) depth + 1.
        num = len(encoder.blocks) + 2
        assert got["backbone.encoder.blocks.3.attn.qkv.weight"][0] == pytest.approx(base_lr * ld ** (num - 4 - 1))
        assert got["backbone.encoder.patch_embed.proj.weight"][0] == pytest.approx(base_lr * ld ** (num - 0 - 1))
        assert got["backbone.necks.0.0.weight"][0] == got["decode_head.conv_seg.weight"][0] == base_lr
        assert got["backbone.encoder.pos_embed"][1] == 0.0 and got["decode_head.conv_seg.bias"][1] == 0.0


def test_registered_in_both_registries_and_idempotent(mm):
    from mmdet.registry import MODELS as DET
    from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
    from mmseg.registry import MODELS as SEG

    from evaluations.dense.openmmlab import BACKBONE, CONSTRUCTOR, prepare

    prepare()
    assert SEG.get(BACKBONE) is DET.get(BACKBONE) is build_backbone
    assert OPTIM_WRAPPER_CONSTRUCTORS.get(CONSTRUCTOR) is not None


def _run(cfg: dict):
    from mmengine.config import Config
    from mmengine.runner import Runner

    runner = Runner.from_cfg(Config(cfg))
    runner.train()
    return runner


@pytest.mark.slow
def test_upernet_runner_smoke_and_weights_only_checkpoint(mm, tmp_path):
    """4 iterations of UperNet on an ADE20K-layout set, validation (mIoU), and the checkpoint loads with
    torch's weights_only default (the allow-list, no TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD)."""
    from evaluations.dense.recipes import seg_recipe
    from evaluations.dense.seg_config import multiscale_test_config, segmentation_config

    recipe = seg_recipe("tiny", val_interval=4, checkpoint_interval=4)
    cfg = segmentation_config(export_vit(tmp_path / "exp"), write_ade(tmp_path / "ade"), recipe, tmp_path / "w",
                              seed=0, max_iters=4)
    runner = _run(cfg)
    assert {"val/aAcc", "val/mIoU", "val/mAcc"} <= set(runner.message_hub.log_scalars)  # validated at iter 4
    ckpt = torch.load(tmp_path / "w" / "iter_4.pth", map_location="cpu")
    assert ckpt["meta"]["iter"] == 4 and "message_hub" in ckpt
    ms = multiscale_test_config(cfg)
    assert ms["model"]["type"] == "SegTTAModel" and ms["model"]["module"] == cfg["model"]


@pytest.mark.slow
def test_mask_rcnn_runner_smoke(mm, tmp_path):
    from evaluations.dense.det_config import detection_config
    from evaluations.dense.recipes import det_recipe

    cfg = detection_config(export_vit(tmp_path / "exp"), write_coco(tmp_path / "coco"),
                           det_recipe("tiny", val_interval=2), tmp_path / "w", seed=0, max_epochs=2)
    assert cfg["model"]["roi_head"]["bbox_head"]["num_classes"] == 2  # read from the annotation file
    runner = _run(cfg)
    logged = set(runner.message_hub.log_scalars)  # validated at epoch 2
    assert {f"val/coco/{k}" for k in ("bbox_mAP", "segm_mAP", "bbox_mAP_50", "segm_mAP_75")} <= logged


# -- imports ---------------------------------------------------------------------------------------


def test_unrelated_commands_never_import_openmmlab():
    code = textwrap.dedent("""
        import sys
        from harness.cli import main
        main(["methods"])
        from harness.api import EVALUATIONS, METHODS
        EVALUATIONS.get("knn"); METHODS.get("mae"); EVALUATIONS.names()
        import reports.tables, reports.collect
        print(sorted({m.split(".")[0] for m in sys.modules} & {"mmengine", "mmcv", "mmseg", "mmdet"}))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_plugin_that_fails_to_import_breaks_only_itself(tmp_path, monkeypatch):
    from harness.registry import Registry

    pkg = tmp_path / "plugpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text("from tests.test_dense_mm import REG\nREG.register('good')(1)\n")
    (pkg / "broken.py").write_text("import a_module_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry("widget", "ssl_repro.none", "plugpkg")
    monkeypatch.setattr(sys.modules[__name__], "REG", registry, raising=False)
    assert registry.get("good") == 1
    with pytest.raises(UserError, match=r"unknown widget 'other'; choose one of: good \(plugins that failed to "
                                        r"import: plugpkg\.broken: ModuleNotFoundError"):
        registry.get("other")
