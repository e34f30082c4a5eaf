"""MAE against numbers from the official facebookresearch/mae code (tests/fixtures/golden)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from harness.schedules import half_cycle_schedule
from methods.backbones import sincos_pos_embed_2d
from methods.mae import MAE, mae_loss, patchify, random_masking

GOLDEN = Path(__file__).parent / "fixtures" / "golden"


def _load(name: str) -> dict:
    return json.loads((GOLDEN / name).read_text())


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def test_patchify_and_loss_match_official():
    fx = _load("mae_loss.json")
    inp, out = fx["inputs"], fx["outputs"]
    imgs, pred, mask = t64(inp["imgs"]), t64(inp["pred"]), t64(inp["mask"])
    p = inp["patch_size"]
    assert torch.allclose(patchify(imgs, p), t64(out["patchified"]), atol=0, rtol=0)
    for flag in (False, True):
        ours = mae_loss(imgs, pred, mask, p, norm_pix_loss=flag).item()
        assert abs(ours - out[f"loss_norm_pix_{str(flag).lower()}"]) <= 1e-12


def test_random_masking_matches_official_given_the_same_noise():
    fx = _load("mae_loss.json")
    inp, out = fx["inputs"], fx["outputs"]
    x_masked, mask, ids_restore = random_masking(t64(inp["masking_x"]), inp["mask_ratio"],
                                                 noise=t64(inp["masking_noise"]))
    assert torch.equal(x_masked, t64(out["x_masked"]))
    assert torch.equal(mask, t64(out["mask"]).to(mask.dtype))
    assert torch.equal(ids_restore, torch.tensor(out["ids_restore"]))


def test_half_cycle_schedule_matches_official_adjust_learning_rate():
    fx = _load("mae_schedule.json")
    inp = fx["inputs"]
    iters = 100  # evaluate at the fixture's fractional epochs: step = epoch * iters
    sched = half_cycle_schedule(inp["lr"], inp["min_lr"], inp["epochs"], iters, inp["warmup_epochs"])
    for epoch, expected in zip(inp["epoch"], fx["outputs"]["lr"], strict=True):
        step = round(epoch * iters)
        assert abs(step / iters - epoch) < 1e-12
        assert abs(sched[step] - expected) <= 1e-15


def test_sincos_position_embedding_layout():
    emb = sincos_pos_embed_2d(16, 4, cls_token=True)[0].numpy()
    assert emb.shape == (17, 16) and not emb[0].any()  # zero CLS slot
    omega = 1.0 / 10000 ** (np.arange(4) / 4.0)
    row, col = 2, 3  # first half encodes the column, second half the row
    expected = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])
    assert np.allclose(emb[1 + row * 4 + col], expected, atol=1e-6)


def test_mae_step_masks_75_percent_and_exports_a_timm_vit():
    cfg = MAE.config_cls(vit="pico", img_size=32, patch_size=4, decoder_embed_dim=32, decoder_depth=1,
                         decoder_num_heads=4)
    model = MAE(cfg, train=None)
    latent, mask, _ = model.encode(torch.randn(2, 3, 32, 32), cfg.mask_ratio)
    assert latent.shape[1] == 1 + 16  # CLS + 25% of 64 patches
    assert mask.sum(1).tolist() == [48.0, 48.0]
    assert not model.encoder.pos_embed.requires_grad
    exp = model.export_backbone()
    assert exp.label == "ViT-pico/4@32" and "pos_embed" in exp.state_dict
    assert exp.feature_spec.knn == "cls"
