"""ExtreMA against numbers from microsoft/ExtreMA (tests/fixtures/golden), mask properties, the
training-step order (momentum update before the momentum forward), exports rebuilt in a fresh process,
official checkpoint import and a tiny end-to-end run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from harness.api import METHODS, StepState
from harness.config import resolve
from harness.errors import UserError
from harness.export import save_export
from harness.schedules import cosine_schedule, half_cycle_schedule
from methods.cait import ClassAttentionViT
from methods.extrema import ExtreMA, byol_loss, disjoint_keep, extrema_loss, view_size
from reports.paper import load_paper_numbers
from tests.helpers import formula_weights, golden, pretrain_then_knn, wave

TOL = 1e-5
E2E = {"epochs": 1, "batch_size": 100}  # one pass over the 600 images: the pipeline, not learning


def test_class_attention_vit_matches_official_forward():
    fx = golden("extrema_vit")
    inp, out = fx["inputs"], fx["outputs"]
    vit = ClassAttentionViT(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, init_values=0.1,
                            class_attention_layers=2).eval()
    formula_weights(vit)
    x = wave(inp["x"][:4], *inp["x"][4:])
    keep = [torch.tensor(k) for k in inp["keep"]]
    with torch.no_grad():
        assert torch.allclose(vit(x), torch.tensor(out["cls_full"]).float(), atol=TOL)
        assert torch.allclose(vit(x, keep), torch.tensor(out["cls_masked"]).float(), atol=TOL)


@pytest.mark.parametrize("case", golden("extrema_masks_loss_schedules")["outputs"]["masks"],
                         ids=lambda c: f"{c['mask_ratio']}x{c['num_masks']}")
def test_disjoint_masks_match_official_slicing(case):
    torch.manual_seed(case["seed"])
    noise = torch.rand(case["batch"], 196)  # what generate_mask draws
    keep = disjoint_keep(noise, case["num_masks"], view_size(196, case["mask_ratio"]))
    assert [keep[:, i].tolist() for i in range(case["num_masks"])] == case["masks"]


@pytest.mark.parametrize("tokens,ratio,n,size", [(196, 0.8, 5, 39), (196, 0.9, 8, 19), (64, 0.8, 5, 12)])
def test_masks_are_disjoint_with_the_right_sizes(tokens, ratio, n, size):
    keep = disjoint_keep(torch.rand(4, tokens), n, view_size(tokens, ratio))
    assert keep.shape == (4, n, size)
    for row in keep:
        assert len(set(row.flatten().tolist())) == n * size  # no token in two views


def test_loss_and_schedules_match_official():
    fx = golden("extrema_masks_loss_schedules")
    inp, out = fx["inputs"], fx["outputs"]
    t = torch.tensor
    assert abs(byol_loss(t(inp["q"]), t(inp["k"])).item() - out["byol"]) <= TOL
    assert abs(extrema_loss(t(inp["q5"]), t(inp["k4"]), 5).item() - out["byol_5_views"]) <= TOL
    ipe, epochs = inp["iters_per_epoch"], inp["epochs"]
    lr = half_cycle_schedule(inp["lr"], 0.0, epochs, ipe, inp["warmup_epochs"])
    mom = cosine_schedule(inp["ema_momentum"], 1.0, epochs, ipe)
    assert np.allclose(lr, out["lr"], rtol=0, atol=1e-12)
    assert np.allclose(mom, out["momentum"], rtol=0, atol=1e-12)


def _tiny(overrides=None):
    train, cfg, _ = resolve(ExtreMA, "tiny", overrides or {})
    torch.manual_seed(0)
    return ExtreMA(cfg, train)


def _batch(model, b=2):
    x1, x2 = torch.randn(b, 3, 32, 32), torch.randn(b, 3, 32, 32)
    keep = disjoint_keep(torch.rand(b, 64), model.cfg.num_masks, view_size(64, model.cfg.mask_ratio))
    return [x1, x2, keep]


def _state(momentum):
    return StepState(step=0, epoch=0, iters_per_epoch=1, total_steps=1, lr=0.0, weight_decay=0.0, momentum=momentum)


def test_momentum_encoder_is_updated_before_it_encodes_and_gets_no_gradient():
    model = _tiny()
    with torch.no_grad():  # make the two encoders differ
        for p in model.student.parameters():
            p.add_(0.01)
    online = {k: v.clone() for k, v in model.student.state_dict().items()}
    seen = {}
    model.teacher.register_forward_pre_hook(lambda mod, args: seen.update(
        {k: v.clone() for k, v in mod.state_dict().items()}))
    out = model.training_step(_batch(model), _state(0.0))  # m = 0: the momentum encoder becomes the online one
    assert all(torch.equal(seen[k], online[k]) for k in online)
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert model.student.blocks[0].attn.qkv.weight.grad is not None


def test_loss_reads_the_masked_online_view_against_the_unmasked_momentum_view():
    model = _tiny().eval()
    x1, x2, keep = _batch(model)
    loss = model.training_step([x1, x2, keep], _state(1.0))["loss"]
    with torch.no_grad():
        q = model.predictor(model.student(x1, list(keep.unbind(1))))
        k = model.teacher(x2)
    assert torch.allclose(loss, extrema_loss(q, k, model.cfg.num_masks), atol=1e-6)


def test_config_errors_are_one_line():
    with pytest.raises(UserError) as err:
        resolve(ExtreMA, "tiny", {"num_masks": 6})  # 6 x 32 > 64 tokens
    assert "\n" not in str(err.value) and "overrides.num_masks" in str(err.value)
    with pytest.raises(UserError, match="overrides.mask_ratio"):
        resolve(ExtreMA, "tiny", {"mask_ratio": 0.99})


def test_presets_cite_sources_and_the_readme_recipes():
    for name, (ratio, n, color) in {"extrema": (0.8, 5, True), "extrema-nocolor": (0.8, 5, False),
                                    "extrema-m90x8": (0.9, 8, True)}.items():
        cls = METHODS.get(name)
        train, cfg, _ = resolve(cls, "vit_base", {})
        assert (cfg.mask_ratio, cfg.num_masks, cfg.color_aug, train.epochs, train.warmup_epochs) == (
            ratio, n, color, 300, 40)
        assert all(v.source for p in cls.presets.values() for v in p.values.values())
        resolve(cls, "tiny", {})
    paper = load_paper_numbers()
    assert {"extrema", "extrema-nocolor", "extrema-m90x8"} <= set(paper.method)
    assert "ropim" not in set(paper.method)  # no ROPIM number could be read anywhere (research notes)


def test_export_rebuilds_in_a_fresh_process_that_never_imported_the_method(tmp_path):
    model = _tiny()
    exp = model.export_backbone()
    save_export(exp, tmp_path / "export")
    assert json.loads((tmp_path / "export" / "backbone.json").read_text())["timm_module"] == "methods.cait"
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model.teacher.eval().forward_features(x)
    code = ("import sys, torch; from harness.export import load_export; "
            f"m, spec, _ = load_export({str(tmp_path / 'export')!r}); "
            "assert 'methods.extrema' not in sys.modules; "
            f"torch.save(m.eval().forward_features(torch.load({str(tmp_path / 'x.pt')!r})), "
            f"{str(tmp_path / 'y.pt')!r}); print(spec.linear)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cls"
    assert torch.allclose(torch.load(tmp_path / "y.pt"), expected, atol=1e-6)


def test_import_official_picks_the_branch_and_is_strict():
    model = _tiny()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.5)
    state = {f"module.base_encoder.{k}": v for k, v in model.student.state_dict().items()}
    state |= {f"module.momentum_encoder.{k}": v for k, v in model.teacher.state_dict().items()}
    state |= {f"module.predictor.{k}": v for k, v in model.predictor.state_dict().items()}
    ckpt = {"state_dict": state, "epoch": 3}
    for key, net in (("teacher", model.teacher), ("student", model.student)):
        exp = ExtreMA.import_official(ckpt, model.cfg, key)
        ref = {k: v for k, v in net.state_dict().items() if not k.startswith("head.")}
        assert exp.timm_name == "extrema_vit" and all(torch.equal(exp.state_dict[k], ref[k]) for k in ref)
    del state["module.momentum_encoder.blocks_token.0.gamma_1"]
    with pytest.raises(UserError) as err:
        ExtreMA.import_official(ckpt, model.cfg)
    assert "\n" not in str(err.value) and "blocks_token.0.gamma_1" in str(err.value)


def test_tiny_extrema_pretrains_exports_and_knn_runs(tmp_path, tiny_data):
    run = pretrain_then_knn(tmp_path, tiny_data / "synthetic", "extrema", E2E)
    assert run["pretrain"]["status"] == "done" and run["meta"]["timm_module"] == "methods.cait"
    assert run["feature_spec"].linear == "cls" and run["feature_spec"].finetune == "avg"
    assert run["knn"]["status"] == "done" and run["knn"]["metrics"]["top1"] > 10.0
