"""DINO against numbers from the official facebookresearch/dino code (tests/fixtures/golden), its
training-step semantics, official checkpoint import, and a tiny end-to-end run with k-NN."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from harness import checkpoint as ckpt
from harness.api import StepState
from harness.config import resolve
from harness.distributed import DistInfo
from harness.errors import UserError
from harness.export import build_timm, load_export
from harness.matrix import expand
from harness.records import read_record
from harness.schedules import cosine_schedule
from harness.stages import run_stage
from harness.train import clip_gradients, sync_batchnorms
from methods.augment import MultiCropAugmentation
from methods.backbones import ViTShape, create_vit, interpolate_pos_embed
from methods.dino import DINO, DINOLoss, vit_cls_token
from methods.heads import DINOHead
from methods.official import backbone_state_dict
from methods.teacher import teacher_temperature_schedule
from tests.helpers import DINO_PLUMBING, read_metrics, write_spec

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
TOL = 1e-5
MAX_ERR: dict[str, float] = {}  # largest |ours - official| per fixture, printed with -s


def _load(name: str) -> dict:
    return json.loads((GOLDEN / name).read_text())


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def _err(name: str, ours, theirs) -> float:
    err = float((torch.as_tensor(ours, dtype=torch.float64) - torch.as_tensor(theirs, dtype=torch.float64))
                .abs().max())
    MAX_ERR[name] = max(MAX_ERR.get(name, 0.0), err)
    print(f"golden {name}: max abs error {err:.3e}")
    return err


def tiny_dino(**overrides) -> DINO:
    train, cfg, _ = resolve(DINO, "tiny", {**DINO_PLUMBING, **overrides})
    torch.manual_seed(0)
    return DINO(cfg, train)


def tiny_batch(model: DINO, b: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    sizes = [cfg.img_size] * 2 + [cfg.local_size] * cfg.local_crops_number
    return [torch.randn(b, 3, s, s, generator=g) for s in sizes]


def state(epoch: int = 0, momentum: float = 0.99) -> StepState:
    return StepState(step=epoch * 9, epoch=epoch, iters_per_epoch=9, total_steps=90, lr=1e-3, weight_decay=0.04,
                     momentum=momentum)


# -- golden fixtures ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["epoch1", "epoch5"])
def test_loss_and_center_match_official(case):
    fx = _load("dino_loss.json")
    inp, out = fx["inputs"], fx["outputs"][case]
    loss_fn = DINOLoss(inp["out_dim"], inp["ncrops"], inp["warmup_teacher_temp"], inp["teacher_temp"],
                       inp["warmup_teacher_temp_epochs"], inp["nepochs"], inp["student_temp"],
                       inp["center_momentum"]).double()
    loss_fn.center.center.copy_(t64(inp[case]["center"]))
    assert float(loss_fn.teacher_temps[inp[case]["epoch"]]) == pytest.approx(out["teacher_temp"], abs=1e-15)
    loss = loss_fn(t64(inp[case]["student_output"]), t64(inp[case]["teacher_output"]), inp[case]["epoch"])
    assert _err("dino_loss.loss", loss, out["loss"]) <= TOL
    assert _err("dino_loss.center", loss_fn.center.center, out["center"]) <= TOL
    assert out["n_loss_terms"] == 2 * inp["ncrops"] - 2


def test_schedules_match_official_cosine_scheduler():
    fx = _load("dino_schedules.json")
    for name in ("lr", "wd", "momentum"):
        a = fx["inputs"][name]
        ours = cosine_schedule(a["base_value"], a["final_value"], a["epochs"], a["niter_per_ep"],
                               a["warmup_epochs"], a["start_warmup_value"])
        assert _err(f"dino_schedules.{name}", ours, fx["outputs"][name]) <= TOL
    a = fx["inputs"]["teacher_temp"]
    ours = teacher_temperature_schedule(a["warmup_teacher_temp"], a["teacher_temp"], a["warmup_teacher_temp_epochs"],
                                        a["nepochs"])
    assert _err("dino_schedules.teacher_temp", ours, fx["outputs"]["teacher_temp"]) <= TOL
    # ... and DINOLoss reads the same per-epoch values.
    loss_fn = DINOLoss(12, 6, a["warmup_teacher_temp"], a["teacher_temp"], a["warmup_teacher_temp_epochs"],
                       a["nepochs"])
    assert np.array_equal(loss_fn.teacher_temps, ours)


# Official nn.utils.weight_norm names -> torch.nn.utils.parametrizations.weight_norm names.
_WN = {"last_layer.weight_g": "last_layer.parametrizations.weight.original0",
       "last_layer.weight_v": "last_layer.parametrizations.weight.original1"}


@pytest.mark.parametrize("case", ["norm_last_layer_true", "norm_last_layer_false"])
def test_head_matches_official(case):
    fx = _load("dino_head.json")
    inp, out = fx["inputs"], fx["outputs"][case]
    c = inp[case]
    head = DINOHead(inp["in_dim"], inp["out_dim"], hidden_dim=inp["hidden_dim"], bottleneck_dim=inp["bottleneck_dim"],
                    nlayers=inp["nlayers"], norm_last_layer=c["norm_last_layer"])
    head.load_state_dict({_WN.get(k, k): torch.tensor(v) for k, v in c["state_dict"].items()}, strict=True)
    grads = {n: p.requires_grad for n, p in head.named_parameters()}
    assert grads == {_WN.get(k, k): v for k, v in c["requires_grad"].items()}
    x = t64(inp["x"])
    with torch.no_grad():
        assert _err("dino_head.float32", head(x.float()), out["output_float32"]) <= TOL
        assert _err("dino_head.float64", head.double()(x), out["output_float64"]) <= TOL


def test_batchnorm_head_matches_official_in_train_and_eval_mode():
    # main_dino.py --use_bn_in_head: BatchNorm1d after each hidden Linear, same module indices (mlp.1, mlp.4).
    fx = _load("dino_head_bn.json")
    inp, out = fx["inputs"], fx["outputs"]
    head = DINOHead(inp["in_dim"], inp["out_dim"], hidden_dim=inp["hidden_dim"], bottleneck_dim=inp["bottleneck_dim"],
                    nlayers=inp["nlayers"], norm_last_layer=inp["norm_last_layer"], use_bn=inp["use_bn"])
    head.load_state_dict({_WN.get(k, k): torch.tensor(v) for k, v in inp["state_dict"].items()}, strict=True)
    head.double().train()  # the teacher too runs in train mode (main_dino.py never calls teacher.eval())
    x = t64(inp["x"])
    with torch.no_grad():
        assert _err("dino_head_bn.train", head(x), out["output_train_float64"]) <= TOL
        state = head.state_dict()
        for k, v in out["running_after_train"].items():
            assert _err(f"dino_head_bn.{k}", state[k], v) <= TOL
        assert _err("dino_head_bn.eval", head.eval()(x), out["output_eval_float64"]) <= TOL


def test_batchnorm_head_is_synchronised_on_several_gpus_only():
    # main_dino.py converts the BatchNorms to SyncBatchNorm; a linear probe's BatchNorm stays per GPU
    # (MAE main_linprobe.py). The conversion itself runs on CPU modules; SyncBatchNorm's forward needs CUDA.
    def on(world: int, kind: str) -> DistInfo:
        return DistInfo(rank=0, local_rank=0, world_size=world, device=torch.device(kind))

    def kinds(module: torch.nn.Module) -> set[type]:
        return {type(m) for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}

    model = tiny_dino(use_bn_in_head=True)
    params = [id(p) for p in model.parameters()]
    synced = sync_batchnorms(model, on(2, "cuda"))
    assert kinds(synced) == {torch.nn.SyncBatchNorm} and [id(p) for p in synced.parameters()] == params
    assert kinds(sync_batchnorms(tiny_dino(use_bn_in_head=True), on(1, "cuda"))) == {torch.nn.BatchNorm1d}
    assert kinds(sync_batchnorms(tiny_dino(use_bn_in_head=True), on(2, "cpu"))) == {torch.nn.BatchNorm1d}
    probe = torch.nn.Sequential(torch.nn.BatchNorm1d(8, affine=False), torch.nn.Linear(8, 2))
    assert kinds(sync_batchnorms(probe, on(2, "cuda"))) == {torch.nn.BatchNorm1d}


def test_per_parameter_clipping_matches_official():
    fx = _load("dino_clip.json")
    inp, out = fx["inputs"], fx["outputs"]
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).double()
    params = dict(model.named_parameters())
    assert list(params) == inp["param_names"]
    for name, p in params.items():
        p.data.copy_(t64(inp["params"][name]))
        p.grad = t64(inp["grads_before"][name])
    norms = [float(p.grad.norm(2)) for p in params.values()]
    assert _err("dino_clip.norms", norms, out["norms"]) <= TOL
    clip_gradients(list(params.values()), inp["clip"], "per_param")
    for name, p in params.items():
        assert _err("dino_clip.grads", p.grad, out["grads_after"][name]) <= TOL


# -- training-step semantics ----------------------------------------------------------------------------
def test_backbone_matches_timm_at_native_size_and_interpolates_like_dino():
    vit = create_vit(ViTShape("pico", 32, 4)).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(vit_cls_token(vit, x), vit.forward_features(x)[:, 0], atol=1e-6)
    pos = torch.randn(1, 1 + 8 * 8, 16)
    assert interpolate_pos_embed(pos, 8, 8) is pos
    small = interpolate_pos_embed(pos, 4, 4)
    assert small.shape == (1, 1 + 16, 16) and torch.equal(small[:, 0], pos[:, 0])
    # DINO's scale factor (4 + 0.1) / 8, not the target size: differs from a size-based resize.
    grid = pos[:, 1:].reshape(1, 8, 8, 16).permute(0, 3, 1, 2)
    by_size = nn.functional.interpolate(grid, size=(4, 4), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 16, 16)
    assert not torch.allclose(small[:, 1:], by_size)


def test_teacher_sees_only_global_views_and_backbone_runs_once_per_resolution():
    model = tiny_dino()
    calls: dict[str, list[tuple]] = {"student": [], "teacher": []}
    for name in calls:
        getattr(model, name).backbone.blocks.register_forward_hook(
            lambda _m, inp, _o, name=name: calls[name].append(tuple(inp[0].shape)))
    batch = tiny_batch(model, b=4)
    out = model.training_step(batch, state())
    # tokens: 1 CLS + 8x8 patches for the 32px globals, 1 + 4x4 for the 16px locals
    assert calls["teacher"] == [(8, 65, 64)]
    assert calls["student"] == [(8, 65, 64), (8, 17, 64)]
    out["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.student.backbone.cls_token.grad is not None


def test_teacher_starts_as_student_without_drop_path_and_is_frozen():
    model = tiny_dino()
    s, t = model.student.state_dict(), model.teacher.state_dict()
    assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    dp = [b.drop_path1.drop_prob for b in model.student.backbone.blocks if hasattr(b.drop_path1, "drop_prob")]
    assert dp and max(dp) == pytest.approx(0.1)  # linearly increasing up to drop_path_rate
    assert all(isinstance(b.drop_path1, nn.Identity) for b in model.teacher.backbone.blocks)


def test_ema_update_follows_the_momentum_for_every_parameter():
    model = tiny_dino()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    t0 = {k: v.clone() for k, v in model.teacher.named_parameters()}
    s0 = dict(model.student.named_parameters())
    model.after_step(state(momentum=0.9))
    for name, p in model.teacher.named_parameters():  # incl. the frozen weight-norm gain
        assert torch.allclose(p, 0.9 * t0[name] + 0.1 * s0[name], atol=1e-6), name
    model.after_step(state(momentum=1.0))
    t1 = dict(model.teacher.named_parameters())
    assert all(torch.allclose(t1[k], 0.9 * t0[k] + 0.1 * s0[k], atol=1e-6) for k in t0)


def test_last_layer_is_frozen_during_freeze_last_layer_epochs():
    model = tiny_dino()
    for epoch, frozen in ((0, True), (1, False)):
        model.zero_grad(set_to_none=True)
        model.training_step(tiny_batch(model), state(epoch))["loss"].backward()
        model.on_before_optimizer_step(state(epoch))
        for name, p in model.student.named_parameters():
            if not p.requires_grad:
                continue
            if "last_layer" in name:
                assert (p.grad is None) == frozen, (epoch, name)
            else:
                assert p.grad is not None, name


def test_center_is_updated_after_the_loss_used_the_old_one():
    model = tiny_dino()
    batch = tiny_batch(model)
    before = model.loss.center.center.clone()
    with torch.no_grad():
        teacher_out = model.teacher(batch[:2])
    model.training_step(batch, state())
    expected = 0.9 * before + 0.1 * teacher_out.mean(dim=0, keepdim=True)
    assert torch.allclose(model.loss.center.center, expected, atol=1e-6)


def test_param_groups_follow_get_params_groups():
    for norm_last_layer in (True, False):
        model = tiny_dino(norm_last_layer=norm_last_layer)
        groups = model.param_groups()
        ids = [{id(p) for p in g["params"]} for g in groups]
        names = {id(p): n for n, p in model.student.named_parameters()}
        decay, no_decay = ({names[i] for i in s} for s in ids)
        assert groups[1]["weight_decay"] == 0.0 and groups[0]["apply_wd"] and not groups[1]["apply_wd"]
        assert all(n.endswith(".bias") or "norm" in n for n in no_decay)
        assert {"backbone.cls_token", "backbone.pos_embed", "head.mlp.0.weight"} <= decay
        g = "head.last_layer.parametrizations.weight.original0"
        assert (g in decay) == (not norm_last_layer)  # shape (K, 1): 2-D, so regularised when trained
        teacher_ids = {id(p) for p in model.teacher.parameters()}
        assert not (ids[0] | ids[1]) & teacher_ids


def test_presets_match_the_papers_backbones_and_cite_sources():
    for name, label in (("vit_small", "ViT-S/16"), ("vit_base", "ViT-B/16")):
        train, cfg, _ = resolve(DINO, name, {})
        assert cfg.shape.label == label and train.lr_schedule == "cosine" and train.clip_mode == "per_param"
        assert all(c.source for c in DINO.presets[name].values.values())
    s, _, _ = resolve(DINO, "vit_small", {})
    b, _, _ = resolve(DINO, "vit_base", {})
    assert (s.epochs, s.batch_size, s.lr, b.epochs, b.lr) == (800, 1024, 2e-3, 400, 3e-3)
    with pytest.raises(UserError, match="warmup_teacher_temp_epochs"):
        tiny_dino(warmup_teacher_temp_epochs=11)


def test_colour_jitter_and_solarize_probabilities_default_to_dino_and_switch_the_transforms():
    _, cfg, _ = resolve(DINO, "vit_small", {})
    assert (cfg.color_jitter_prob, cfg.solarize_prob) == (0.8, 0.2)  # DataAugmentationDINO
    white, grey = Image.new("RGB", (32, 32), (255, 255, 255)), Image.new("RGB", (32, 32), (128, 128, 128))

    def views(img, jitter, solarize):
        random.seed(0)
        torch.manual_seed(0)
        return MultiCropAugmentation(32, 16, 0, (1.0, 1.0), (0.05, 0.25), jitter, solarize)(img)

    # A white image stays white through crop, flip and blur; solarize (second global crop) turns it black.
    assert views(white, 0.0, 1.0)[1].max() < views(white, 0.0, 0.0)[1].min()
    assert torch.equal(views(white, 0.0, 1.0)[0], views(white, 0.0, 0.0)[0])
    assert not torch.equal(views(grey, 1.0, 0.0)[0], views(grey, 0.0, 0.0)[0])  # brightness/contrast jitter
    with pytest.raises(UserError, match="overrides.solarize_prob"):
        tiny_dino(solarize_prob=1.5)


# -- official checkpoints -------------------------------------------------------------------------------
def dino_vit_key_names(depth: int) -> set[str]:
    """The parameter names of DINO's ``vision_transformer.VisionTransformer`` (num_classes=0)."""
    names = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
             "norm.bias"}
    for i in range(depth):
        for sub in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            names |= {f"blocks.{i}.{sub}.weight", f"blocks.{i}.{sub}.bias"}
    return names


def official_layouts(model: DINO) -> tuple[dict, dict]:
    """A full training checkpoint and a backbone-only state dict, as the DINO releases store them."""
    def head_official(sd):
        return {k.replace(".parametrizations.weight.original0", ".weight_g")
                 .replace(".parametrizations.weight.original1", ".weight_v"): v for k, v in sd.items()}

    teacher = head_official(model.teacher.state_dict())  # teacher: not DDP-wrapped for ViTs
    student = {f"module.{k}": v for k, v in head_official(model.student.state_dict()).items()}
    full = {"student": student, "teacher": teacher, "optimizer": {"state": {}, "param_groups": []}, "epoch": 800,
            "args": argparse.Namespace(arch="vit_small", patch_size=16), "dino_loss": {"center": torch.zeros(1, 8)}}
    backbone_only = {k: v.clone() for k, v in model.teacher.backbone.state_dict().items()}
    return full, backbone_only


def test_dino_vit_names_are_timm_names():
    assert set(create_vit(ViTShape("pico", 32, 4)).state_dict()) == dino_vit_key_names(4)
    assert set(create_vit(ViTShape("small", 224, 16)).state_dict()) == dino_vit_key_names(12)


def test_import_official_round_trips_both_layouts(tmp_path):
    model = tiny_dino()
    with torch.no_grad():  # make teacher and student differ
        for p in model.student.parameters():
            p.add_(1.0)
    full, backbone_only = official_layouts(model)
    torch.save(full, tmp_path / "full.pth")
    loaded = ckpt.load_external(tmp_path / "full.pth")  # weights_only=True, Namespace allow-listed
    for release, key, net in ((loaded, "teacher", model.teacher), (loaded, "student", model.student),
                              (backbone_only, "teacher", model.teacher)):
        exp = DINO.import_official(release, model.cfg, key)  # as harness.stages calls it
        ref = net.backbone.state_dict()
        assert exp.state_dict.keys() == ref.keys() and all(torch.equal(exp.state_dict[k], ref[k]) for k in ref)
        assert exp.label == model.cfg.shape.label and exp.feature_spec.knn == "cls"
        timm_model = build_timm(exp.timm_name, exp.timm_kwargs)
        timm_model.load_state_dict(exp.state_dict, strict=True)


def test_import_official_strict_key_errors_are_one_line():
    model = tiny_dino()
    _, backbone_only = official_layouts(model)
    bad = {k: v for k, v in backbone_only.items() if k != "blocks.0.attn.qkv.weight"}
    bad["blocks.0.attn.relative_position_bias"] = torch.zeros(3)
    with pytest.raises(UserError) as err:
        DINO.import_official(bad, model.cfg)
    msg = str(err.value)
    assert "\n" not in msg and "blocks.0.attn.qkv.weight" in msg and "relative_position_bias" in msg
    _, other_cfg, _ = resolve(DINO, "tiny", {**DINO_PLUMBING, "img_size": 48, "local_size": 24})
    with pytest.raises(UserError, match="shape mismatch at pos_embed"):
        DINO.import_official(backbone_only, other_cfg)
    with pytest.raises(UserError, match="no 'student' entry"):
        backbone_state_dict({"teacher": backbone_only}, "student")


# -- end to end -----------------------------------------------------------------------------------------
def test_tiny_dino_pretrains_exports_and_knn_writes_a_record(tmp_path, tiny_data):
    path = write_spec(tmp_path / "spec.yaml", tiny_data / "synthetic", tmp_path / "runs",
                      [{"method": "dino", "preset": "tiny", "seeds": [0], "evaluations": ["knn"],
                        "overrides": {"epochs": 2, "warmup_teacher_temp_epochs": 1}}])
    cell = expand(path).cells[0]
    assert cell.pretrain.backbone == "ViT-pico/8@32"
    pre = run_stage(cell.pretrain)
    assert pre["status"] == "done" and pre["checkpoint"]["step"] == 36  # 2 epochs x 600 // 32
    losses = [m["loss"] for m in read_metrics(cell.pretrain.stage_dir)]
    assert all(np.isfinite(losses))
    backbone, spec, meta = load_export(Path(cell.pretrain.stage_dir) / "export")
    assert spec.knn == "cls" and spec.linear_n_last_blocks == 4 and meta["label"] == "ViT-pico/8@32"
    state = torch.load(pre["checkpoint"]["path"], weights_only=True)["model"]
    exported = backbone.state_dict()
    assert all(torch.equal(exported[k], state[f"teacher.backbone.{k}"]) for k in exported)  # the teacher
    run_stage(cell.evaluations[0])
    rec = read_record(cell.evaluations[0].stage_dir)
    print(f"tiny DINO k-NN top-1 on synthetic: {rec['metrics']['top1']:.1f}% "
          f"(pretrain {pre['train_seconds']:.1f}s, loss {losses[0]:.3f} -> {losses[-1]:.3f})")
    assert rec["status"] == "done" and rec["protocol"] == "knn@k20,T0.07"
    assert rec["metrics"]["top1"] > 10.0  # 10 classes: chance is 10%
