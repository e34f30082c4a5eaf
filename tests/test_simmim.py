"""SimMIM against numbers from microsoft/SimMIM (tests/fixtures/golden), its lr schedules against timm's
schedulers driven as SimMIM drives them, official checkpoint import and a tiny end-to-end run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.scheduler.cosine_lr import CosineLRScheduler

from harness.config import resolve
from harness.errors import UserError
from harness.schedules import multistep_schedule, timm_cosine_schedule
from methods.beit import PixelDecoder
from methods.simmim import SimMIM, SimMIMMaskGenerator, simmim_loss
from tests.helpers import formula_weights, golden, pretrain_then_knn, wave

E2E = {"epochs": 1, "batch_size": 100}  # one pass over the 600 images: the pipeline, not learning


@pytest.mark.parametrize("case", golden("simmim_masks")["outputs"]["cases"], ids=lambda c: f"{c['img_size']}")
def test_mask_generator_matches_official_given_the_same_seed(case):
    np.random.seed(case["seed"])
    gen = SimMIMMaskGenerator(case["img_size"], case["mask_patch_size"], case["patch_size"], case["mask_ratio"])
    for expected in case["masks"]:
        mask = gen()
        assert mask.tolist() == expected
        scale = case["mask_patch_size"] // case["patch_size"]
        assert mask.sum() == gen.mask_count * scale**2 == int(np.ceil(gen.token_count * 0.6)) * scale**2


def test_decoder_and_masked_l1_match_official():
    fx = golden("simmim_loss")
    inp = fx["inputs"]
    img, z = wave(inp["img"][:4], *inp["img"][4:]), wave(inp["z"][:4], *inp["z"][4:])
    decoder = PixelDecoder(z.shape[1], 4)
    formula_weights(decoder)
    loss = simmim_loss(img, decoder(z), torch.tensor(inp["mask"]), 4)
    assert abs(loss.item() - fx["outputs"]["loss"]) <= 1e-5


def _timm_driven_like_simmim(base, warmup_lr, min_lr, epochs, ipe, warmup_epochs):
    """SimMIM: CosineLRScheduler(t_in_epochs=False); step_update(epoch * ipe + idx) AFTER each step."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = CosineLRScheduler(opt, t_initial=epochs * ipe, lr_min=min_lr, warmup_lr_init=warmup_lr,
                              warmup_t=warmup_epochs * ipe, cycle_limit=1, t_in_epochs=False)
    used = []
    for step in range(epochs * ipe):
        used.append(opt.param_groups[0]["lr"])
        sched.step_update(step)
    return np.array(used)


def test_timm_cosine_schedule_is_timms_scheduler_stepped_after_each_update():
    ours = timm_cosine_schedule(1e-3, 1e-5, 6, 7, 2, 1e-6)
    assert np.allclose(ours, _timm_driven_like_simmim(1e-3, 1e-6, 1e-5, 6, 7, 2), rtol=0, atol=1e-15)


def test_multistep_schedule_warms_up_then_divides_at_the_milestones():
    lr = multistep_schedule(1.0, 0.0, 10, 4, 2, 0.1, milestones=(7,), gamma=0.1)
    warm = 0.1 + np.arange(8) * 0.9 / 8
    assert np.allclose(lr[:9], np.concatenate([[warm[0]], warm]))  # step g runs at the value for g - 1
    assert np.allclose(lr[9:29], 1.0) and np.allclose(lr[29:], 0.1)


def test_presets_cite_sources_and_the_paper_recipe():
    train, cfg, _ = resolve(SimMIM, "vit_base", {})
    assert (train.epochs, train.lr_schedule, train.lr_milestones, cfg.mask_patch_size, cfg.mask_ratio) == (
        800, "multistep", (700,), 32, 0.6)
    assert all(v.source for p in SimMIM.presets.values() for v in p.values.values())
    with pytest.raises(UserError, match="overrides.mask_patch_size"):
        resolve(SimMIM, "tiny", {"mask_patch_size": 12})


def test_import_official_is_strict_and_round_trips():
    train, cfg, _ = resolve(SimMIM, "tiny", {})
    model = SimMIM(cfg, train)
    enc = model.encoder.state_dict()
    official = {"model": {**{f"encoder.{k}": v for k, v in enc.items()}, "encoder.mask_token": model.mask_token,
                          **{f"decoder.{k}": v for k, v in model.decoder.state_dict().items()}}}
    exp = SimMIM.import_official(official, cfg)
    assert all(torch.equal(exp.state_dict[k], enc[k]) for k in enc)
    official["model"]["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(UserError) as err:
        SimMIM.import_official(official, cfg)
    assert "\n" not in str(err.value) and "extra.weight" in str(err.value)


def test_tiny_simmim_pretrains_exports_and_knn_runs(tmp_path, tiny_data):
    run = pretrain_then_knn(tmp_path, tiny_data / "synthetic", "simmim", E2E)
    assert run["pretrain"]["status"] == "done" and run["meta"]["label"] == "ViT-pico/8@32"
    assert run["pretrain"]["checkpoint"]["step"] == 6 and np.isfinite(run["losses"]).all()
    assert run["knn"]["status"] == "done" and run["knn"]["metrics"]["top1"] > 10.0
