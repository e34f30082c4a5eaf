"""ROPIM against numbers from csiro-robotics/ROPIM (tests/fixtures/golden), sketch properties, the
launch-time check of the token count, official checkpoint import and a tiny end-to-end run."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from harness.config import resolve
from harness.errors import UserError
from methods.beit import PixelDecoder
from methods.ropim import (
    ROPIM,
    CountSketch,
    check_sketch,
    project_tokens,
    projection,
    ropim_loss,
    sketch_matrix,
)
from tests.helpers import formula_weights, golden, pretrain_then_knn, wave

TOL = 1e-5
E2E = {"epochs": 1, "batch_size": 100}  # one pass over the 600 images: the pipeline, not learning


def official_sketch(tokens: int, seed: int, rho: float = 0.14) -> tuple[torch.Tensor, torch.Tensor, CountSketch]:
    torch.manual_seed(seed)
    random.seed(seed)
    gen = CountSketch(tokens, rho)
    h, s = gen()
    return h, s, gen


@pytest.mark.parametrize("case", golden("ropim_sketch")["outputs"]["cases"],
                         ids=lambda c: f"L{c['tokens']}s{c['seed']}")
def test_sketch_matches_official_generator_given_the_same_seeds(case):
    h, s, gen = official_sketch(case["tokens"], case["seed"])
    P = projection(h, s, gen.buckets, 0.14)
    vec = torch.linspace(-1, 1, case["tokens"] * 3).reshape(case["tokens"], 3)
    assert torch.allclose(P @ vec, torch.tensor(case["P_times_vec"]).float(), atol=TOL)
    assert abs(P.trace().item() - case["trace"]) <= TOL
    assert abs((P @ P).sum().item() - case["P_squared_sum"]) <= 1e-4 * max(1.0, abs(case["P_squared_sum"]))
    if "P" in case:
        assert torch.allclose(P, torch.tensor(case["P"]).float(), atol=TOL)


@pytest.mark.parametrize("tokens,rho", [(196, 0.14), (196, 1 / 7), (64, 0.125), (36, 0.14), (4, 0.14)])
def test_projection_properties(tokens, rho):
    torch.manual_seed(0)
    random.seed(0)
    gen = CountSketch(tokens, rho)
    h, s = gen()
    d = gen.buckets
    P = projection(h, s, d, rho, torch.float64)
    assert torch.bincount(h, minlength=d).tolist() == [tokens // d] * d  # balanced buckets
    assert (s == 1).sum() == (s == -1).sum() == tokens // 2  # balanced signs
    assert torch.allclose(P, P.T)
    assert abs(P.trace().item() - rho * tokens) < 1e-9
    assert torch.allclose(P @ P, (tokens / d) * rho * P, atol=1e-9)
    if abs(rho * tokens / d - 1) < 1e-12:  # 1/7 on 196 tokens, 1/8 on 64: an exact projector
        assert torch.allclose(P @ P, P, atol=1e-9)


def test_projection_is_a_batched_matmul_equal_to_P_times_tokens():
    torch.manual_seed(1)
    random.seed(1)
    gen = CountSketch(64, 0.125)
    pairs = [gen() for _ in range(3)]
    h, s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    x = torch.randn(3, 64, 16)
    ours = project_tokens(x, sketch_matrix(h, s, gen.buckets), 0.125)
    assert torch.allclose(ours, projection(h, s, gen.buckets, 0.125) @ x, atol=1e-5)


def test_decoder_and_loss_match_official():
    fx = golden("ropim_loss")
    inp, out = fx["inputs"], fx["outputs"]
    h, s, gen = official_sketch(inp["tokens"], inp["seed"])
    img, z = wave(inp["img"][:4], *inp["img"][4:]), wave(inp["z"][:4], *inp["z"][4:])
    decoder = PixelDecoder(z.shape[1], 4)
    formula_weights(decoder)
    rec = decoder(z)
    assert torch.allclose(rec[:, :, :2], torch.tensor(out["rec_first_rows"]).float(), atol=TOL)
    sk = sketch_matrix(h, s, gen.buckets).expand(2, -1, -1)
    loss = ropim_loss(img, rec, sk, 0.14, 4)
    assert abs(loss.item() - out["loss"]) <= TOL


def test_token_count_that_does_not_fill_the_buckets_is_a_one_line_error():
    with pytest.raises(UserError) as err:
        resolve(ROPIM, "tiny", {"rho": 0.14})  # 16 tokens -> 3 buckets
    msg = str(err.value)
    assert "\n" not in msg and "overrides.rho" in msg and "3 equal buckets" in msg
    with pytest.raises(UserError, match="overrides.rho"):
        resolve(ROPIM, "vit_base", {"img_size": 160})  # 100 tokens, 0.14 -> 15 buckets
    assert check_sketch(196, 0.14) == check_sketch(196, 1 / 7) == 28


def test_presets_cite_sources_and_use_the_official_ratio():
    for name in ("vit_base", "vit_small", "vit_tiny_in100"):
        values = ROPIM.presets[name].values
        assert values["rho"].value == 0.14 and values["lr_batch_denom"].value == 512
        assert all(v.source for v in values.values())
    train, cfg, _ = resolve(ROPIM, "vit_base", {})
    assert (cfg.tokens, cfg.buckets, train.epochs, train.betas) == (196, 28, 300, (0.9, 0.95))


def test_import_official_is_strict_and_round_trips():
    train, cfg, _ = resolve(ROPIM, "tiny", {})
    model = ROPIM(cfg, train)
    enc = model.encoder.state_dict()
    official = {"model": {**{f"encoder.{k}": v for k, v in enc.items()},
                          "encoder.rel_pos_bias.relative_position_index": torch.zeros(3, dtype=torch.long),
                          **{f"decoder.{k}": v for k, v in model.decoder.state_dict().items()}}}
    exp = ROPIM.import_official(official, cfg)
    assert exp.timm_name.startswith("beit") and all(torch.equal(exp.state_dict[k], enc[k]) for k in enc)
    assert exp.feature_spec.finetune == "avg" and exp.timm_kwargs["use_shared_rel_pos_bias"]
    del official["model"]["encoder.blocks.0.gamma_1"]
    with pytest.raises(UserError) as err:
        ROPIM.import_official(official, cfg)
    assert "\n" not in str(err.value) and "blocks.0.gamma_1" in str(err.value)


def test_tiny_ropim_pretrains_exports_a_timm_beit_and_knn_runs(tmp_path, tiny_data):
    run = pretrain_then_knn(tmp_path, tiny_data / "synthetic", "ropim", E2E)
    assert run["pretrain"]["status"] == "done" and run["cell"].pretrain.backbone == "ViT-pico/8@32"
    assert run["meta"]["timm_name"].startswith("beit") and "timm_module" not in run["meta"]
    assert run["pretrain"]["checkpoint"]["step"] == 6 and np.isfinite(run["losses"]).all()
    assert run["knn"]["status"] == "done" and run["knn"]["metrics"]["top1"] > 10.0  # chance: 10%
