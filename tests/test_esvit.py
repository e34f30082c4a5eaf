"""EsViT against numbers from the official microsoft/esvit code (tests/fixtures/golden/esvit_*.json),
the Swin wrapper, official checkpoint import, training-step semantics and a tiny end-to-end run."""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.layers import get_norm_layer
from timm.models.swin_transformer import WindowAttention

import harness.export
import methods.esvit as esvit_module
from harness.api import StepState
from harness.checkpoint import load_external
from harness.config import resolve
from harness.errors import UserError
from harness.export import build_timm, load_export
from harness.matrix import expand
from harness.records import read_record
from harness.stages import run_stage
from methods.dino import DINOLoss
from methods.esvit import DDINOLoss, EsViT, EsViTConfig, EsViTViewOnly, ViewOutputs
from methods.swin import (
    SwinShape,
    create_swin,
    esvit_to_timm_key,
    forward_tokens,
    last_blocks_features,
    relative_position_index,
    timm_to_esvit_key,
)
from tests.helpers import read_metrics, write_spec

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
PAPER_NUMBERS = Path(__file__).parents[1] / "reports" / "data" / "paper_numbers.csv"


def _load(name: str) -> dict:
    return json.loads((GOLDEN / name).read_text())


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# The layout these unit tests check: two local crops beside the globals, a 256-way head, drop-path in the student
# and a last layer frozen in the first epoch (the tiny preset itself trains on two global views only).
LAYOUT = {"local_crops_number": 2, "out_dim": 256, "drop_path_rate": 0.1, "freeze_last_layer": 1}


def tiny_esvit(**overrides) -> EsViT:
    train, cfg, _ = resolve(EsViT, "tiny", {**LAYOUT, **overrides})
    return EsViT(cfg, train)


def state(epoch: int = 0, momentum: float = 0.99) -> StepState:
    return StepState(step=0, epoch=epoch, iters_per_epoch=1, total_steps=10, lr=0.0, weight_decay=0.0,
                     momentum=momentum)


def crops(batch: int = 2, n_local: int = 2, size: int = 32, local: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return ([torch.randn(batch, 3, size, size, generator=g) for _ in range(2)]
            + [torch.randn(batch, 3, local, local, generator=g) for _ in range(n_local)])


# -- the loss against main_esvit.DDINOLoss / DINOLoss ----------------------------------------------------
LOSS = _load("esvit_loss.json")


@pytest.mark.parametrize("case", range(len(LOSS["inputs"]["cases"])))
def test_ddino_loss_centers_and_region_matches_equal_official(case, monkeypatch):
    params, inp, out = LOSS["inputs"]["params"], LOSS["inputs"]["cases"][case], LOSS["outputs"]["cases"][case]
    loss_fn = DDINOLoss(params["out_dim"], params["ncrops"], params["warmup_teacher_temp"], params["teacher_temp"],
                        params["warmup_teacher_temp_epochs"], params["nepochs"], params["student_temp"],
                        params["center_momentum"])
    loss_fn.center.center = t64(inp["center"])
    loss_fn.center_grid.center = t64(inp["center_grid"])
    matches = []

    def recording(s, t):
        idx = original(s, t)
        matches.append(idx.tolist())
        return idx

    original = esvit_module.match_regions
    monkeypatch.setattr(esvit_module, "match_regions", recording)
    student = ViewOutputs(t64(inp["student_cls_out"]), t64(inp["student_region_out"]),
                          t64(inp["student_region_fea"]), list(inp["npatch_student"]))
    teacher = ViewOutputs(t64(inp["teacher_cls_out"]), t64(inp["teacher_region_out"]),
                          t64(inp["teacher_region_fea"]), list(inp["npatch_teacher"]))
    result = loss_fn(student, teacher, inp["epoch"])

    assert loss_fn.teacher_temps[inp["epoch"]] == pytest.approx(out["teacher_temp"], abs=1e-15)
    assert abs(result["loss"].item() - out["loss"]) <= 1e-5
    assert torch.allclose(loss_fn.center.center, t64(out["center"]), atol=1e-5, rtol=0)
    assert torch.allclose(loss_fn.center_grid.center, t64(out["center_grid"]), atol=1e-5, rtol=0)
    assert matches == out["region_match_index"]  # one (B, N_s) index list per pair, in the official loop order
    assert result["loss"].item() == pytest.approx(0.5 * (result["loss_view"] + result["loss_region"]).item())


@pytest.mark.parametrize("case", range(len(LOSS["inputs"]["cases"])))
def test_view_only_loss_equals_official_dino_loss(case):
    params, inp, out = LOSS["inputs"]["params"], LOSS["inputs"]["cases"][case], LOSS["outputs"]["cases"][case]
    loss_fn = DINOLoss(params["out_dim"], params["ncrops"], params["warmup_teacher_temp"], params["teacher_temp"],
                       params["warmup_teacher_temp_epochs"], params["nepochs"], params["student_temp"],
                       params["center_momentum"])
    loss_fn.center.center = t64(inp["dino_center"])
    loss = loss_fn(t64(inp["student_cls_out"]), t64(inp["teacher_cls_out"]), inp["epoch"])
    assert abs(loss.item() - out["dino_loss"]) <= 1e-5
    assert torch.allclose(loss_fn.center.center, t64(out["dino_center"]), atol=1e-5, rtol=0)


# -- the Swin backbone against models/swin_transformer.py ---------------------------------------------
SWIN = _load("esvit_swin.json")


def golden_weights(shapes: dict[str, list[int]], seed: int) -> dict[str, torch.Tensor]:
    """The oracle's deterministic weights (see the fixture's provenance), in EsViT's key names."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        w = torch.randn(shapes[name], generator=g, dtype=torch.float64)
        if name.endswith("relative_position_bias_table"):
            pass
        elif len(shapes[name]) >= 2:
            w = w / math.sqrt(math.prod(shapes[name][1:]))
        elif name.endswith(".weight"):
            w = 1 + 0.2 * w
        else:
            w = 0.2 * w
        out[name] = w
    return out


def esvit_checkpoint(backbone: dict[str, torch.Tensor], window_of: dict[str, int]) -> dict:
    """A released checkpoint's layout: teacher as is, student through DDP ("module."), both with the
    relative_position_index buffers EsViT saves and a DINO head."""
    full = dict(backbone)
    for name, window in window_of.items():
        full[f"{name}.relative_position_index"] = relative_position_index((window, window))
    full["head.mlp.0.weight"] = torch.zeros(4, 4)
    full["head_dense.last_layer.weight_g"] = torch.ones(4, 1)
    return {"teacher": full, "student": {f"module.{k}": v for k, v in full.items()}, "epoch": 300,
            "args": argparse.Namespace(arch="swin_tiny")}


def _windows(model) -> dict[str, int]:
    """EsViT name of each window-attention module -> its window side."""
    return {timm_to_esvit_key(n): m.window_size[0] for n, m in model.named_modules() if isinstance(m, WindowAttention)}


@pytest.mark.parametrize("case", range(len(SWIN["cases"])))
def test_swin_import_forward_and_linear_feature_equal_official(case):
    c = SWIN["cases"][case]
    cfg = EsViTConfig(swin=c["name"].split("_")[0], window_size=c["window"], img_size=c["img_size"],
                      patch_size=c["patch_size"], local_size=c["patch_size"])
    weights = golden_weights(c["param_shapes"], seed=100 + case)
    assert sum(w.sum() for w in weights.values()).item() == pytest.approx(c["weight_sum"], abs=1e-9)
    # The import maps every key (values stored as float32, as the released checkpoints are) ...
    exp = EsViT.import_official(esvit_checkpoint(weights, _windows(create_swin(cfg.shape))), cfg)
    assert exp.state_dict.keys() == {esvit_to_timm_key(k) for k in weights}
    assert all(torch.equal(exp.state_dict[esvit_to_timm_key(k)], w.float()) for k, w in weights.items())
    # ... and the forward, in float64, equals the official one at the global and the local sizes.
    model = create_swin(cfg.shape).double().eval()
    model.load_state_dict({esvit_to_timm_key(k): w for k, w in weights.items()}, strict=True)
    for o in c["outputs"]:
        g = torch.Generator().manual_seed(1000 * (case + 1) + o["size"])
        images = torch.randn((2, 3, o["size"], o["size"]), generator=g, dtype=torch.float64)
        with torch.no_grad():
            z, regions = forward_tokens(model, images)
        assert regions.shape[1] == o["n_regions"] == cfg.shape.grid(o["size"]) ** 2
        assert torch.allclose(z, t64(o["z"]), atol=1e-10, rtol=0)
        assert torch.allclose(regions[..., :6], t64(o["regions_first6"]), atol=1e-10, rtol=0)
        assert torch.allclose(regions.sum(-1), t64(o["regions_sum"]), atol=1e-9, rtol=0)
        if o["size"] == c["img_size"]:  # no padding: the plain timm model (what evaluations run) agrees
            with torch.no_grad():
                assert torch.allclose(model.forward_features(images).flatten(1, 2), regions, atol=1e-12, rtol=0)
    # The linear-probe feature: eval_linear.py --n_last_blocks 4 (forward_return_n_last_blocks).
    lb = c["last_blocks"]
    g = torch.Generator().manual_seed(1000 * (case + 1) + lb["size"])
    with torch.no_grad():
        feats = last_blocks_features(model, torch.randn((2, 3, lb["size"], lb["size"]), generator=g,
                                                         dtype=torch.float64), n=lb["n"])
    assert feats.shape == (2, lb["dim"])
    assert torch.allclose(feats[:, :8], t64(lb["first8"]), atol=1e-10, rtol=0)
    assert torch.allclose(feats[:, -8:], t64(lb["last8"]), atol=1e-10, rtol=0)
    assert torch.allclose(feats.sum(-1), t64(lb["sum"]), atol=1e-9, rtol=0)


def test_swin_views_and_regions_have_swin_t_geometry():
    tiny = SwinShape("tiny", 7)
    model = create_swin(tiny, drop_path=0.1)
    assert tiny.label == "Swin-T/7" and SwinShape("base", 14).label == "Swin-B/14" and tiny.num_features == 768
    assert model.norm.eps == 1e-6 and all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    dpr = [getattr(blk.drop_path1, "drop_prob", 0.0) for st in model.layers for blk in st.blocks]
    assert dpr == pytest.approx(np.linspace(0, 0.1, 12).tolist())  # EsViT's linear stochastic-depth rule
    assert (tiny.grid(224), tiny.grid(96)) == (7, 3)  # N = 49 regions per global view, 9 per local view
    nano = create_swin(SwinShape("nano", 7)).eval()  # Swin-T's 4-stage geometry, 1/6 of the width
    with torch.no_grad():
        for size, n in ((224, 49), (96, 9)):
            z, regions = forward_tokens(nano, torch.randn(2, 3, size, size))
            assert regions.shape == (2, n, 128) and torch.equal(z, regions.mean(1))
        images = torch.randn(2, 3, 224, 224)  # the eval feature: timm's avg-pooled final-norm tokens
        assert torch.allclose(nano.forward_features(images).mean((1, 2)), forward_tokens(nano, images)[0], atol=1e-6)


def test_relative_position_index_and_key_mapping_match_timm():
    model = create_swin(SwinShape("nano", 7))
    for m in model.modules():
        if hasattr(m, "relative_position_index"):
            assert torch.equal(m.relative_position_index, relative_position_index(m.window_size))
    assert esvit_to_timm_key("layers.2.downsample.reduction.weight") == "layers.3.downsample.reduction.weight"
    assert esvit_to_timm_key("layers.2.blocks.1.attn.qkv.weight") == "layers.2.blocks.1.attn.qkv.weight"
    assert all(timm_to_esvit_key(esvit_to_timm_key(k)) == k for k in SWIN["esvit_swin_t_layout"])


# -- official checkpoint import ------------------------------------------------------------------------
def swin_t_release() -> dict[str, torch.Tensor]:
    """A Swin-T/W7 teacher with exactly the released key layout (recorded from the official classes)."""
    g = torch.Generator().manual_seed(0)
    teacher = {}
    for key, shape in SWIN["esvit_swin_t_layout"].items():
        if key.endswith("relative_position_index"):
            teacher[key] = relative_position_index((int(math.isqrt(shape[0])),) * 2)
        else:
            teacher[key] = torch.randn(shape, generator=g)
    return teacher


def test_import_official_maps_the_released_swin_t_layout_onto_timm():
    _, cfg, _ = resolve(EsViT, "swin_tiny_w7", {})
    teacher = swin_t_release()
    exp = EsViT.import_official({"teacher": teacher, "student": {}}, cfg)
    source = {esvit_to_timm_key(k): v for k, v in teacher.items()
              if not k.startswith("head") and not k.endswith("relative_position_index")}
    assert exp.state_dict.keys() == source.keys() and all(torch.equal(exp.state_dict[k], source[k]) for k in source)
    assert exp.label == "Swin-T/7" and exp.feature_spec.knn == "avg" and exp.feature_spec.linear_n_last_blocks == 4
    build_timm(exp.timm_name, exp.timm_kwargs).load_state_dict(exp.state_dict, strict=True)


def test_import_official_reads_teacher_or_ddp_student_from_a_saved_checkpoint(tmp_path):
    cfg = EsViTConfig(swin="nano", window_size=7)
    weights = {k: w.float() for k, w in golden_weights(SWIN["cases"][1]["param_shapes"], seed=0).items()}
    ckpt = esvit_checkpoint(weights, _windows(create_swin(cfg.shape)))
    ckpt["student"] = {k: v + 1 if v.is_floating_point() else v for k, v in ckpt["student"].items()}
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    loaded = load_external(tmp_path / "checkpoint.pth")  # weights_only=True, Namespace allow-listed
    for key, shift in (("teacher", 0), ("student", 1)):
        exp = EsViT.import_official(loaded, cfg, checkpoint_key=key)
        assert all(torch.equal(exp.state_dict[esvit_to_timm_key(k)], w + shift) for k, w in weights.items())


def test_import_official_strict_failures_are_one_line():
    nano7 = EsViTConfig(swin="nano", window_size=7)
    weights = golden_weights(SWIN["cases"][1]["param_shapes"], seed=0)
    teacher = esvit_checkpoint(weights, _windows(create_swin(nano7.shape)))["teacher"]
    bad = {k: v for k, v in teacher.items() if k != "layers.1.blocks.0.attn.qkv.weight"}
    bad["layers.1.blocks.0.attn.qkv_extra"] = torch.zeros(3)
    with pytest.raises(UserError) as err:
        EsViT.import_official(bad, nano7)
    msg = str(err.value)
    assert "\n" not in msg and "layers.1.blocks.0.attn.qkv.weight" in msg and "qkv_extra" in msg
    nano14 = EsViTConfig(swin="nano", window_size=14)
    with pytest.raises(UserError, match="relative_position_index does not match window"):
        EsViT.import_official(teacher, nano14)
    no_index = {k: v for k, v in teacher.items() if not k.endswith("relative_position_index")}
    with pytest.raises(UserError, match="shape mismatch at layers.0.blocks.0.attn.relative_position_bias_table"):
        EsViT.import_official(no_index, nano14)


# -- training-step semantics ------------------------------------------------------------------------
def test_teacher_sees_only_global_views_and_regions_follow_the_official_layout():
    model = tiny_esvit()
    batch = crops()
    with torch.no_grad():
        t = model.teacher(batch[:2])
        s = model.student(batch)
    assert t.n_regions == [16] and s.n_regions == [16, 4]  # 8x8 -> 4x4 globals; 3x3 -> 2x2 locals
    assert t.view.shape == (4, 256) and t.region.shape == (2 * 2 * 16, 256) and t.region_feature.shape == (64, 64)
    assert s.view.shape == (8, 256) and s.region.shape == (2 * 2 * 16 + 2 * 2 * 4, 256)
    with torch.no_grad():
        z, regions = forward_tokens(model.teacher.backbone, torch.cat(batch[:2]))
    assert torch.equal(t.region_feature, regions.flatten(0, 1))  # rows (view, batch, region), as official
    assert torch.equal(t.view, model.teacher.head(z))
    out = model.training_step(batch, state())
    assert set(out) == {"loss", "loss_view", "loss_region"} and out["loss"].requires_grad


def test_teacher_starts_as_student_without_drop_path_and_is_frozen():
    model = tiny_esvit()
    s, t = model.student.state_dict(), model.teacher.state_dict()
    assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    probs = {type(m.drop_path1).__name__ for m in model.teacher.backbone.modules() if hasattr(m, "drop_path1")}
    assert probs == {"Identity"}
    assert model.student.backbone.layers[1].blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    assert model.student.head_dense is not None and model.student.head.last_layer.parametrizations.weight.original0\
        .requires_grad  # norm_last_layer false (README)


def test_step_updates_heads_ema_and_freezes_last_layers_in_the_first_epoch():
    model = tiny_esvit()
    batch = crops()
    out = model.training_step(batch, state(epoch=0))
    out["loss"].backward()
    model.on_before_optimizer_step(state(epoch=0))
    for head in (model.student.head, model.student.head_dense):
        assert head.last_layer.parametrizations.weight.original1.grad is None
        assert head.mlp[0].weight.grad is not None
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    model.after_step(state(momentum=0.9))
    after = model.teacher.state_dict()
    student = model.student.state_dict()
    for k, v in before.items():
        if v.is_floating_point() and k in dict(model.teacher.named_parameters()):
            assert torch.allclose(after[k], 0.9 * v + 0.1 * student[k], atol=1e-6), k
    decay, no_decay = model.param_groups()
    assert len(decay["params"]) + len(no_decay["params"]) == sum(p.requires_grad for p in model.student.parameters())
    assert any(p is model.student.backbone.layers[0].blocks[0].attn.relative_position_bias_table
               for p in decay["params"])  # utils.get_params_groups: 2-D, so decayed


def test_loss_runs_in_float32_under_16_bit_autocast():
    model = tiny_esvit()
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            out = model.training_step(crops(), state())
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
        out["loss"].backward()


def test_export_names_esvits_layernorm_once_the_harness_can_rebuild_it(monkeypatch):
    """timm's Swin takes norm_layer as a class; an export is JSON. The export asks for "layernorm"
    (timm LayerNorm, eps 1e-6 as EsViT) only if harness.export.build_timm resolves the name."""
    plain = harness.export.build_timm

    def resolving(name, kwargs):
        kwargs = dict(kwargs)
        if isinstance(kwargs.get("norm_layer"), str):
            kwargs["norm_layer"] = get_norm_layer(kwargs["norm_layer"])
        return plain(name, kwargs)

    try:
        monkeypatch.setattr(harness.export, "build_timm", resolving)
        esvit_module.export_norm_kwargs.cache_clear()
        exp = tiny_esvit().export_backbone()
        assert exp.timm_kwargs["norm_layer"] == "layernorm"
        model = resolving(exp.timm_name, exp.timm_kwargs)
        model.load_state_dict(exp.state_dict, strict=True)
        assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}
    finally:
        monkeypatch.undo()
        esvit_module.export_norm_kwargs.cache_clear()


def test_view_only_variant_has_no_dense_head_and_uses_dino_loss():
    model = tiny_esvit(use_dense_prediction=False)
    assert model.student.head_dense is None and isinstance(model.loss, DINOLoss)
    out = model.training_step(crops(), state())
    assert set(out) == {"loss"} and torch.isfinite(out["loss"])
    assert EsViTViewOnly.presets["swin_tiny_w7"].plain()["use_dense_prediction"] is False


def test_presets_cite_sources_and_labels_match_the_paper_numbers():
    with open(PAPER_NUMBERS) as f:
        paper = {(r["method"], r["backbone"], int(r["epochs"])) for r in csv.DictReader(f)}
    for cls in (EsViT, EsViTViewOnly):
        for name, p in cls.presets.items():
            assert all(c.source for c in p.values.values()), name
            train, cfg, _ = resolve(cls, name, {})
            if name == "tiny":
                assert p.paper_recipe == "swin_tiny_w7" and cfg.shape.label == "Swin-pico/4@32"
                continue
            assert (cls.name, cfg.shape.label, train.epochs) in paper, (cls.name, name)
            assert train.batch_size == 512 and train.lr == pytest.approx(1e-3) and train.clip_mode == "per_param"
            assert (cfg.teacher_temp, cfg.warmup_teacher_temp_epochs, cfg.out_dim, cfg.norm_last_layer) == \
                (0.07, 30, 65536, False)
    assert resolve(EsViT, "swin_base_w14", {})[1].drop_path_rate == 0.2


# -- end to end -----------------------------------------------------------------------------------------
def test_tiny_esvit_pretrains_exports_a_timm_swin_and_knn_writes_a_record(tmp_path, tiny_data):
    path = write_spec(tmp_path / "spec.yaml", tiny_data / "synthetic", tmp_path / "runs",
                      [{"method": "esvit", "preset": "tiny", "seeds": [0], "evaluations": ["knn"],
                        "overrides": {"epochs": 5, "batch_size": 64}}])  # 45 steps keep the file under a minute
    cell = expand(path).cells[0]
    assert cell.pretrain.backbone == "Swin-pico/4@32"
    pre = run_stage(cell.pretrain)
    assert pre["status"] == "done" and pre["checkpoint"]["step"] == 45  # 5 epochs x 600 // 64
    metrics = read_metrics(cell.pretrain.stage_dir)
    assert all(np.isfinite([m["loss"] for m in metrics])) and "loss_region" in metrics[-1]
    backbone, spec, meta = load_export(Path(cell.pretrain.stage_dir) / "export")
    assert type(backbone).__name__ == "SwinTransformer" and meta["label"] == "Swin-pico/4@32"
    assert spec.knn == "avg" and spec.linear == "avg" and spec.linear_n_last_blocks == 4
    saved = torch.load(pre["checkpoint"]["path"], weights_only=True)["model"]
    exported = backbone.state_dict()
    assert all(torch.equal(exported[k], saved[f"teacher.backbone.{k}"]) for k in exported)  # the teacher
    run_stage(cell.evaluations[0])
    rec = read_record(cell.evaluations[0].stage_dir)
    print(f"tiny EsViT k-NN top-1 on synthetic: {rec['metrics']['top1']:.1f}% (pretrain {pre['train_seconds']:.1f}s, "
          f"loss {metrics[0]['loss']:.3f} -> {metrics[-1]['loss']:.3f})")
    assert rec["status"] == "done" and rec["protocol"] == "knn@k20,T0.07"
    assert rec["metrics"]["top1"] > 20.0  # 10 classes: chance is 10%
