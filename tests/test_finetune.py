"""Fine-tuning: learns on real data (beats the k-NN of its own random init), MAE's head and groups, mixing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

from evaluations.finetune import FinetuneConfig, FinetuneNet, Finetuner
from evaluations.finetune import run as finetune
from evaluations.knn import KNNConfig
from evaluations.knn import run as knn
from harness.api import FeatureSpec
from harness.errors import UserError
from tests.eval_helpers import eval_inputs
from tests.helpers import torch_threads


def _builder(drop_path_rate: float = 0.0, trainable: bool = False, grad_checkpointing: bool = False):
    torch.manual_seed(0)  # the same random-init backbone every call
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                          depth=2, embed_dim=48, num_heads=3, drop_path_rate=drop_path_rate)
    return m.requires_grad_(trainable).train(trainable)


@pytest.mark.slow
def test_tiny_finetune_lowers_loss_and_beats_knn_of_its_init(tmp_path, tiny_data):
    with torch_threads(1):  # tiny matrices: threads only contend
        _finetune_beats_knn(tmp_path, tiny_data)


def _finetune_beats_knn(tmp_path, tiny_data):
    inputs = eval_inputs(tmp_path, tiny_data / "digits", _builder(), stage="finetune",
                         feature_spec=FeatureSpec(finetune="avg"), build=_builder)
    base = knn(inputs, KNNConfig(ks=(20,))).values["top1"]
    m = finetune(inputs, FinetuneConfig(preset="tiny", num_workers=0, log_every=22))
    lines = [json.loads(x) for x in (tmp_path / "finetune" / "metrics.jsonl").read_text().splitlines()]
    print(f"k-NN of the init {base:.1f} %, fine-tuned {m.values['top1']:.1f} %; loss {lines[0]['loss']:.3f} -> "
          f"{lines[-1]['loss']:.3f}")
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.5
    assert m.values["top1"] > base + 8
    assert m.tag == "finetune:mae@ld0.75,6ep" and m.protocol == "finetune/mae-lrd"


def test_avg_pool_head_is_maes_global_pool():
    net = FinetuneNet(_builder(trainable=True), "avg", 10)
    assert isinstance(net.backbone.norm, torch.nn.Identity) and isinstance(net.fc_norm, torch.nn.LayerNorm)
    assert net.head.weight.std() < 1e-4 and net.head.bias.abs().sum() == 0
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    cls = FinetuneNet(_builder(trainable=True), "cls", 10)
    assert isinstance(cls.backbone.norm, torch.nn.LayerNorm) and isinstance(cls.fc_norm, torch.nn.Identity)


def test_layer_decay_groups_put_the_head_on_top():
    model = Finetuner(FinetuneNet(_builder(trainable=True), "avg", 10), FinetuneConfig(preset="mae"), 10)
    scale = {name: g["lr_scale"] for g in model.param_groups() for name in g["names"]}
    wd = {name: g["weight_decay"] for g in model.param_groups() for name in g["names"]}
    # depth 2 -> num_layers 3: embeddings 0.65^3, block i 0.65^(2-i), head and fc_norm 1.
    assert scale["backbone.cls_token"] == pytest.approx(0.65**3)
    assert scale["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(0.65**2)
    assert scale["backbone.blocks.1.mlp.fc2.weight"] == pytest.approx(0.65)
    assert scale["head.weight"] == scale["fc_norm.weight"] == 1.0
    assert wd["backbone.pos_embed"] == 0.0 and wd["head.bias"] == 0.0 and wd["head.weight"] == 0.05


def test_mixup_targets_are_the_smoothed_label_mix():
    cfg = FinetuneConfig(preset="mae", cutmix=0.0, mixup=0.8)
    model = Finetuner(FinetuneNet(_builder(trainable=True), "avg", 5), cfg, 5)
    np.random.seed(3)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    mixed, target = model.mixup(x.clone(), y)
    lam = float(((mixed - x.flip(0)) / (x - x.flip(0))).median())
    off, on = 0.1 / 5, 1 - 0.1 + 0.1 / 5
    smooth = torch.full((4, 5), off).scatter_(1, y[:, None], on)
    torch.testing.assert_close(target, lam * smooth + (1 - lam) * smooth.flip(0), atol=1e-5, rtol=0)
    assert 0 < lam < 1


def test_bad_settings_and_deviations():
    with pytest.raises(UserError, match="finetune.preset"):
        FinetuneConfig(preset="beit3")
    with pytest.raises(UserError, match="finetune.layer_decay"):
        FinetuneConfig(layer_decay=1.5)
    devs = FinetuneConfig(preset="tiny").deviations()
    assert devs["preset"] == ["mae", "tiny"] and devs["epochs"] == [100, 6]
    assert FinetuneConfig(preset="mae").deviations() == {}
