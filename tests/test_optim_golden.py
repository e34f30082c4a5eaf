"""Layer decay, LARS, schedules and the linear head init against numbers from the official code
(tests/fixtures/golden: MAE util/lr_decay.py, util/lars.py, util/lr_sched.py; DINO eval_linear.py; SimMIM
optimizer.py and iBOT optim_factory.py for Swin)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from evaluations.finetune import FinetuneConfig, FinetuneNet, Finetuner
from evaluations.linear import RECIPES, make_head
from harness.optim import LARS, backbone_layer_rule, param_groups_lrd, swin_layer_id
from harness.schedules import SCHEDULES
from methods.swin import LN_EPS, SwinShape, create_swin

GOLDEN = Path(__file__).parent / "fixtures" / "golden"


def _load(name: str) -> dict:
    return json.loads((GOLDEN / name).read_text())


def test_param_groups_lrd_matches_mae_on_vit_tiny():
    g = _load("mae_lr_decay.json")
    vit = timm.create_model(g["inputs"]["timm_name"], pretrained=False, **g["inputs"]["timm_kwargs"])
    rule, n = backbone_layer_rule(vit)
    groups = param_groups_lrd(vit, 0.05, set(vit.no_weight_decay()), 0.65, rule, n)
    ours = {name: {"lr_scale": grp["lr_scale"], "weight_decay": grp["weight_decay"]}
            for grp in groups for name in grp["names"]}
    assert len(groups) == g["outputs"]["n_groups"]
    assert ours.keys() == g["outputs"]["params"].keys()
    for name, want in g["outputs"]["params"].items():
        assert ours[name]["lr_scale"] == pytest.approx(want["lr_scale"], rel=1e-12), name
        assert ours[name]["weight_decay"] == want["weight_decay"], name


def test_lars_matches_mae_step_by_step():
    g = _load("mae_lars.json")
    i = g["inputs"]
    params = [torch.tensor(i[k], dtype=torch.float64, requires_grad=True) for k in ("w0", "b0", "z0")]
    opt = LARS(params, lr=i["lr"], weight_decay=i["weight_decay"])
    for grads, want in zip(i["grads"], g["outputs"]["after_step"], strict=True):
        for p, gr in zip(params, grads, strict=True):
            p.grad = torch.tensor(gr, dtype=torch.float64)
        opt.step()
        for p, w in zip(params, want, strict=True):
            torch.testing.assert_close(p.detach(), torch.tensor(w, dtype=torch.float64), rtol=1e-12, atol=1e-14)


def test_half_cycle_with_lr_scale_matches_mae_lr_sched():
    g = _load("mae_lr_sched_groups.json")
    i = g["inputs"]
    sched = SCHEDULES["half_cycle"](i["lr"], i["min_lr"], i["epochs"], 80, i["warmup_epochs"])
    for e, (scaled, plain) in zip(i["epoch"], g["outputs"]["group_lrs"], strict=True):
        step = round(e * 80)
        assert abs(step / 80 - e) < 1e-9, "fixture epochs sit on the 80-step grid"
        assert sched[step] == pytest.approx(plain, rel=1e-12)
        assert sched[step] * 0.5 == pytest.approx(scaled, rel=1e-12)


def test_epoch_cosine_is_torch_cosine_annealing_per_epoch():
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.3)
    torch_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 7, eta_min=0)
    want = []
    for _ in range(7):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        torch_sched.step()
    ours = SCHEDULES["epoch_cosine"](0.3, 0.0, 7, 3)
    np.testing.assert_allclose(ours, np.repeat(want, 3), rtol=1e-12)


def test_dino_linear_head_init_matches_official():
    g = _load("dino_linear_head.json")
    torch.manual_seed(g["inputs"]["seed"])
    head = make_head(g["inputs"]["dim"], g["inputs"]["num_labels"], RECIPES["dino"])
    torch.testing.assert_close(head.weight.detach(), torch.tensor(g["outputs"]["weight"]))
    assert head.bias.detach().tolist() == g["outputs"]["bias"]


def test_mae_and_mocov3_heads_are_affine_free_batchnorm_then_linear():
    for recipe, eps in (("mae", 1e-6), ("mocov3", 1e-5)):
        head = make_head(8, 3, RECIPES[recipe])
        bn = head[0]
        assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == eps
        assert head[1].bias.abs().sum() == 0 and head[1].weight.std() < 0.02


def test_swin_rule_numbers_blocks_through_the_stages():
    depths = (2, 2, 6, 2)
    assert swin_layer_id("patch_embed.proj.weight", depths) == 0
    assert swin_layer_id("layers.0.blocks.0.attn.qkv.weight", depths) == 1
    assert swin_layer_id("layers.2.blocks.5.mlp.fc1.weight", depths) == 2 + 2 + 5 + 1
    # timm's downsample opening stage 1 is the official merge closing stage 0: the id of its last block.
    assert swin_layer_id("layers.1.downsample.reduction.weight", depths) == 2
    assert swin_layer_id("norm.weight", depths) == sum(depths) + 1


def _esvit_swin(depths: list[int], num_heads: list[int]) -> torch.nn.Module:
    """The timm Swin the EsViT plugin exports ("nano" widths), with the case's stage depths."""
    shape = SwinShape("nano", window=7)
    if list(depths) == list(shape.timm_kwargs()["depths"]):
        return create_swin(shape)
    kwargs = {**shape.timm_kwargs(), "depths": depths, "num_heads": num_heads}
    return timm.create_model(shape.timm_name, pretrained=False, num_classes=0, strict_img_size=False,
                             norm_layer=partial(torch.nn.LayerNorm, eps=LN_EPS), **kwargs)


@pytest.mark.parametrize("case", ["nano_2222", "tiny_depths_2262"])
def test_swin_finetune_groups_match_simmim(case):
    g = _load("swin_layer_decay.json")
    ld, wd = g["provenance"]["layer_decay"], g["provenance"]["weight_decay"]
    inputs, want = g["cases"][case]["inputs"], g["cases"][case]["outputs"]
    backbone = _esvit_swin(inputs["depths"], inputs["num_heads"])
    net = FinetuneNet(backbone, "avg", inputs["num_classes"])
    groups = Finetuner(net, FinetuneConfig(preset="mae", layer_decay=ld, weight_decay=wd),
                       inputs["num_classes"]).param_groups()
    ours = {name.removeprefix("backbone."): grp for grp in groups for name in grp["names"]}
    assert ours.keys() == want["params"].keys()
    assert len(groups) == want["n_groups_simmim"]
    rule, n = backbone_layer_rule(backbone)
    assert n == want["num_layers"]
    for name, w in want["params"].items():
        if not name.startswith("head."):
            assert rule(name) == w["layer_id"], name
        assert ours[name]["lr_scale"] == pytest.approx(w["lr_scale"], rel=1e-12), name
        # SimMIM leaves the relative position bias tables undecayed (iBOT's weight_decay_ibot does not).
        assert ours[name]["weight_decay"] == w["weight_decay_simmim"], name
        assert ours[name]["apply_wd"] == (w["weight_decay_simmim"] > 0), name


def test_swin_rule_on_names_timm_never_has_matches_the_official_rules():
    g = _load("swin_layer_decay.json")["special_names"]
    for name, ids in g["layer_ids"].items():
        assert ids["simmim"] == ids["ibot"]
        assert swin_layer_id(name, tuple(g["depths"])) == ids["simmim"], name
