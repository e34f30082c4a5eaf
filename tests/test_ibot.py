"""iBOT against numbers from the official bytedance/ibot code (tests/fixtures/golden), its model
plumbing, official-checkpoint import, and a tiny end-to-end run through the spine."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.api import StepState
from harness.config import resolve
from harness.errors import UserError
from harness.matrix import expand
from harness.records import read_record
from harness.schedules import cosine_schedule
from harness.stages import run_stage
from methods.backbones import interpolate_pos_embed
from methods.ibot import IBOT, IBOTHead, IBOTLoss, encode, feature_spec
from tests.helpers import write_spec

ROOT = Path(__file__).parent.parent
GOLDEN = ROOT / "tests" / "fixtures" / "golden"


def _load(name: str) -> dict:
    return json.loads((GOLDEN / name).read_text())


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# The plumbing tests below build the tiny model in the paper's multi-crop shape (the tiny preset itself drops local
# crops, drop-path and the frozen last layer to learn on the CPU): 8x8 patch grid, 2 local crops, 6 epochs.
PLUMBING = {"patch_size": 4, "local_crops_number": 2, "drop_path_rate": 0.1, "freeze_last_layer": 1, "epochs": 6}


def _tiny(**overrides) -> IBOT:
    train, cfg, _ = resolve(IBOT, "tiny", {**PLUMBING, **overrides})
    torch.manual_seed(0)
    return IBOT(cfg, train)


def _state(epoch: int = 0, momentum: float = 0.99) -> StepState:
    return StepState(step=0, epoch=epoch, iters_per_epoch=9, total_steps=54, lr=1e-3, weight_decay=0.04,
                     momentum=momentum)


# -- golden: loss, head, schedules --------------------------------------------------------------------

@pytest.mark.parametrize("case", [0, 1, 2])
def test_loss_and_centers_match_official(case):
    fx = _load("ibot_loss.json")
    inp, out = fx["inputs"]["cases"][case], fx["outputs"]["cases"][case]
    loss = IBOTLoss(**inp["params"]).double()
    loss.center.center.copy_(t64(inp["center"]))
    loss.center2.center.copy_(t64(inp["center2"]))
    masks = [torch.tensor(m, dtype=torch.bool) for m in inp["student_mask"]]
    terms = loss((t64(inp["student_cls"]), t64(inp["student_patch"])),
                 (t64(inp["teacher_cls"]), t64(inp["teacher_patch"])), t64(inp["student_local_cls"]), masks,
                 inp["epoch"])
    for key in ("cls", "patch", "loss"):
        assert abs(terms[key].item() - out[key]) <= 1e-10, key
    assert torch.allclose(loss.center.center, t64(out["center"]), rtol=0, atol=1e-12)
    assert torch.allclose(loss.center2.center, t64(out["center2"]), rtol=0, atol=1e-12)
    assert loss.teacher_temp_schedule[inp["epoch"]] == out["teacher_temp"]
    assert loss.teacher_temp2_schedule[inp["epoch"]] == out["teacher_temp2"]


def _golden_head(dtype: torch.dtype) -> IBOTHead:
    fx = _load("ibot_head.json")
    p = fx["inputs"]["params"]
    head = IBOTHead(p["in_dim"], p["out_dim"], patch_out_dim=p["patch_out_dim"], shared_head=p["shared_head"],
                    hidden_dim=p["hidden_dim"], bottleneck_dim=p["bottleneck_dim"], nlayers=p["nlayers"],
                    norm_last_layer=p["norm_last_layer"])
    # The official legacy weight_norm names (weight_g, weight_v) -> torch.nn.utils.parametrizations.
    rename = {".weight_g": ".parametrizations.weight.original0", ".weight_v": ".parametrizations.weight.original1"}
    state = {}
    for key, value in fx["inputs"]["state_dict"].items():
        for old, new in rename.items():
            key = key.replace(old, new)
        state[key] = torch.tensor(value, dtype=torch.float32)
    head.load_state_dict(state, strict=True)
    return head.to(dtype)


def test_head_matches_official_ibot_head():
    fx = _load("ibot_head.json")
    out, out32 = fx["outputs"], fx["outputs_float32"]
    tokens, x2d = t64(fx["inputs"]["tokens"]), t64(fx["inputs"]["x2d"])
    head = _golden_head(torch.float32)
    assert head.last_layer2 is head.last_layer  # shared head: same prototypes for [CLS] and patches
    cls, patch = head(tokens.float())
    assert torch.allclose(cls.double(), t64(out32["cls"]), rtol=0, atol=1e-6)
    assert torch.allclose(patch.double(), t64(out32["patch"]), rtol=0, atol=1e-6)
    assert torch.allclose(head(x2d.float()).double(), t64(out32["out2d"]), rtol=0, atol=1e-6)
    head = _golden_head(torch.float64)
    cls, patch = head(tokens)
    assert cls.shape == (2, 10) and patch.shape == (2, 4, 10)
    assert torch.allclose(cls, t64(out["cls"]), rtol=0, atol=1e-6)
    assert torch.allclose(patch, t64(out["patch"]), rtol=0, atol=1e-6)
    assert torch.allclose(head(x2d), t64(out["out2d"]), rtol=0, atol=1e-6)
    assert torch.allclose(head.last_layer.weight, t64(out["last_layer_effective_weight"]), rtol=0, atol=1e-12)


def test_teacher_temperature_schedules_match_official():
    fx = _load("ibot_schedules.json")
    for inp, out in zip(fx["inputs"]["teacher_temp_cases"], fx["outputs"]["teacher_temp_cases"], strict=True):
        loss = IBOTLoss(10, 10, 2, 0, inp["warmup_teacher_temp"], inp["teacher_temp"], inp["warmup_teacher_temp2"],
                        inp["teacher_temp2"], inp["warmup_teacher_temp_epochs"], inp["nepochs"],
                        mim_start_epoch=inp["mim_start_epoch"])
        assert loss.teacher_temp_schedule.tolist() == out["teacher_temp_schedule"]
        assert loss.teacher_temp2_schedule.tolist() == out["teacher_temp2_schedule"]
    # The per-iteration lr / wd / momentum schedules the loop builds for iBOT (utils.cosine_scheduler).
    for inp, out in zip(fx["inputs"]["cosine_scheduler_cases"], fx["outputs"]["cosine_scheduler_cases"], strict=True):
        ours = cosine_schedule(inp["base_value"], inp["final_value"], inp["epochs"], inp["niter_per_ep"],
                               inp.get("warmup_epochs", 0), inp.get("start_warmup_value", 0.0))
        assert np.abs(ours - np.array(out)).max() <= 1e-15


def test_temperature_warmup_longer_than_training_is_a_one_line_error():
    with pytest.raises(UserError, match="exceed epochs") as err:
        _tiny(warmup_teacher_temp_epochs=5, pred_start_epoch=2)  # 7 > 6 epochs (official: negative dims)
    assert "\n" not in str(err.value)


# -- model plumbing -----------------------------------------------------------------------------------

def test_masked_patches_are_replaced_by_the_mask_embedding_before_position_embedding():
    model = _tiny()
    vit = model.student["backbone"]
    with torch.no_grad():
        vit.masked_embed.normal_()
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[0, 2:5, 1:3] = True
    mask[1, 7, 7] = True
    seen = {}
    hook = vit.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    with torch.no_grad():
        encode(vit, images, mask)
    hook.remove()
    x = seen["x"][:, 1:] - vit.pos_embed[:, 1:]  # the patch tokens before position embedding
    flat = mask.flatten(1)
    assert torch.allclose(x[flat], vit.masked_embed.expand(int(flat.sum()), -1), atol=1e-6)
    assert torch.allclose(x[~flat], vit.patch_embed(images)[~flat], atol=1e-6)
    # Without a mask, encode is timm's own forward_features (and the exported model's).
    vit.eval()
    with torch.no_grad():
        assert torch.allclose(encode(vit, images), vit.forward_features(images), atol=1e-6)


def test_local_crops_get_interpolated_position_embeddings():
    model = _tiny()
    vit = model.teacher["backbone"]
    pos = vit.pos_embed
    assert interpolate_pos_embed(pos, 8, 8) is pos
    small = interpolate_pos_embed(pos, 4, 4)
    assert small.shape == (1, 17, pos.shape[-1]) and torch.equal(small[:, 0], pos[:, 0])
    with torch.no_grad():
        assert encode(vit, torch.randn(3, 3, 16, 16)).shape == (3, 17, pos.shape[-1])


def test_teacher_starts_as_the_student_without_mask_embedding_or_drop_path():
    model = _tiny()
    student, teacher = model.student.state_dict(), model.teacher.state_dict()
    assert set(student) - set(teacher) == {"backbone.masked_embed"}
    assert all(torch.equal(student[k], teacher[k]) for k in teacher)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert torch.count_nonzero(model.student["backbone"].masked_embed) == 0  # zeros init, as official
    assert model.student["backbone"].blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert all(isinstance(b.drop_path1, torch.nn.Identity) for b in model.teacher["backbone"].blocks)
    # Recipe heads: shared [CLS]/patch prototypes, trainable norms in the student (norm_last_layer false).
    assert model.student["head"].last_layer2 is model.student["head"].last_layer
    assert model.teacher["head"].last_layer2 is model.teacher["head"].last_layer
    assert model.student["head"].last_layer.parametrizations.weight.original0.requires_grad


def test_param_groups_follow_get_params_groups():
    model = _tiny()
    groups = model.param_groups()
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert {"student.backbone.masked_embed", "student.backbone.cls_token", "student.backbone.pos_embed",
            "student.head.last_layer.parametrizations.weight.original0"} <= decay
    assert "student.backbone.norm.weight" in no_decay and "student.head.mlp.0.bias" in no_decay
    assert not any(n.startswith("teacher.") for n in decay | no_decay)


def _batch(b: int = 4, n_local: int = 2):
    gen = torch.Generator().manual_seed(0)
    crops = [torch.randn(b, 3, 32, 32, generator=gen) for _ in range(2)]
    crops += [torch.randn(b, 3, 16, 16, generator=gen) for _ in range(n_local)]
    masks = [torch.rand(b, 8, 8, generator=gen) < 0.3 for _ in range(2)]
    masks[0][0] = False  # an unmasked image
    return crops, masks


def test_training_step_backward_freeze_and_ema():
    model = _tiny()
    out = model.training_step(_batch(), _state())
    assert set(out) == {"cls", "patch", "loss"} and torch.isfinite(out["loss"])
    assert torch.allclose(out["loss"], out["cls"] + out["patch"])
    out["loss"].backward()
    assert model.student["backbone"].masked_embed.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())
    model.on_before_optimizer_step(_state(epoch=1))  # after freeze_last_layer epochs: kept
    assert model.student["head"].last_layer.parametrizations.weight.original1.grad is not None
    model.on_before_optimizer_step(_state(epoch=0))  # first epoch: prototypes frozen
    assert all(p.grad is None for n, p in model.student.named_parameters() if "last_layer" in n)

    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.5)
    before = {n: p.clone() for n, p in model.teacher.named_parameters()}
    model.after_step(_state(momentum=0.9))
    students = dict(model.student.named_parameters())
    for name, p in model.teacher.named_parameters():
        assert torch.allclose(p, 0.9 * before[name] + 0.1 * students[name], atol=1e-6), name
    # The step left new centers behind (updated after the loss, from the teacher's outputs).
    assert model.ibot_loss.center.center.abs().sum() > 0 and model.ibot_loss.center2.center.abs().sum() > 0


def test_unmasked_batch_has_zero_patch_loss_and_no_local_crops_work():
    model = _tiny(local_crops_number=0)
    crops, masks = _batch(n_local=0)
    out = model.training_step((crops, [torch.zeros_like(m) for m in masks]), _state())
    assert out["patch"].item() == 0.0 and out["cls"].item() > 0


def test_feature_specs_follow_run_sh():
    small, base = feature_spec("small"), feature_spec("base")
    assert (small.knn, small.linear, small.linear_n_last_blocks) == ("cls", "cls", 4)
    assert (base.knn, base.linear, base.linear_n_last_blocks) == ("cls", "cls+avg", 1)
    assert small.finetune == base.finetune == "cls"  # run_class_finetuning.py --use_cls


def test_presets_resolve_and_match_paper_number_rows():
    with (ROOT / "reports" / "data" / "paper_numbers.csv").open() as f:
        rows = {(r["method"], r["backbone"], int(r["epochs"])) for r in csv.DictReader(f)}
    for name in IBOT.presets:
        train, cfg, _ = resolve(IBOT, name, {})
        assert all(v.source for v in IBOT.presets[name].values.values())
        if name != "tiny":
            assert ("ibot", cfg.shape.label, train.epochs) in rows, name
    train, cfg, _ = resolve(IBOT, "vit_small", {})
    assert (cfg.shape.label, train.epochs, train.batch_size, train.lr) == ("ViT-S/16", 800, 1024, 2e-3)
    assert cfg.pred_ratio == (0.0, 0.3) and cfg.pred_ratio_var == (0.0, 0.2) and cfg.local_crops_number == 10
    assert IBOT.presets["tiny"].paper_recipe == "vit_small"


def test_bad_config_is_a_one_line_error():
    for overrides, field in [({"pred_shape": "grid"}, "overrides.pred_shape"),
                             ({"pred_ratio": [0.1, 0.3], "pred_ratio_var": [0.2, 0.2]}, "overrides.pred_ratio"),
                             ({"local_size": 18}, "overrides.local_size")]:
        with pytest.raises(UserError) as err:
            resolve(IBOT, "tiny", overrides)
        assert err.value.field == field and "\n" not in str(err.value)


# -- official checkpoints -----------------------------------------------------------------------------

def _official_layouts(model: IBOT) -> dict[str, dict]:
    """The three layouts of iBOT's releases, built from a model (the official ViT's keys are timm's)."""
    teacher = model.teacher["backbone"].state_dict()
    student = model.student["backbone"].state_dict()
    head = {"mlp.0.weight": torch.zeros(2, 2), "last_layer.weight_g": torch.ones(4, 1),
            "last_layer.weight_v": torch.zeros(4, 2)}
    return {
        "checkpoint_teacher.pth": {"state_dict": dict(teacher)},
        "checkpoint_student.pth": {"state_dict": dict(student)},  # has masked_embed
        "checkpoint.pth": {
            "student": {**{f"module.backbone.{k}": v for k, v in student.items()},
                        **{f"module.head.{k}": v for k, v in head.items()}},
            "teacher": {**{f"backbone.{k}": v for k, v in teacher.items()},
                        **{f"head.{k}": v for k, v in head.items()}},
            "epoch": 800, "ibot_loss": {"center": torch.zeros(1, 4)},
        },
    }


def test_import_official_round_trip():
    model = _tiny()
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(torch.randn_like(p))  # teacher != student
    exported = model.export_backbone()
    for name, ckpt in _official_layouts(model).items():
        imported = IBOT.import_official(ckpt, model.cfg)
        source = model.student if name == "checkpoint_student.pth" else model.teacher
        expected = {k: v for k, v in source["backbone"].state_dict().items() if k != "masked_embed"}
        assert set(imported.state_dict) == set(expected), name
        assert all(torch.equal(imported.state_dict[k], expected[k]) for k in expected), name
        assert (imported.timm_kwargs, imported.label, imported.feature_spec) == (
            exported.timm_kwargs, exported.label, exported.feature_spec)
    full = _official_layouts(model)["checkpoint.pth"]
    student = IBOT.import_official(full, model.cfg, checkpoint_key="student")
    assert torch.equal(student.state_dict["norm.weight"], model.student["backbone"].norm.weight)


def test_import_official_is_strict():
    model = _tiny()
    ckpt = _official_layouts(model)["checkpoint_teacher.pth"]
    missing = {"state_dict": {k: v for k, v in ckpt["state_dict"].items() if k != "norm.weight"}}
    with pytest.raises(UserError, match="missing backbone keys norm.weight") as err:
        IBOT.import_official(missing, model.cfg)
    assert "\n" not in str(err.value)
    extra = {"state_dict": {**ckpt["state_dict"], "blocks.9.attn.qkv.weight": torch.zeros(3, 3)}}
    with pytest.raises(UserError, match="unexpected keys blocks.9.attn.qkv.weight"):
        IBOT.import_official(extra, model.cfg)
    _, other, _ = resolve(IBOT, "tiny", {"patch_size": 8})
    with pytest.raises(UserError, match="shape mismatch"):
        IBOT.import_official(ckpt, other)


# -- end to end ---------------------------------------------------------------------------------------

# One epoch of 6 steps keeps the test fast; the full tiny preset (6 epochs) is measured outside the suite.
E2E = {"epochs": 1, "warmup_teacher_temp_epochs": 1, "batch_size": 100, "num_workers": 2, "log_every": 2}


@pytest.mark.slow
def test_tiny_pretrains_exports_and_knn_writes_a_record(tmp_path, tiny_data):
    spec = write_spec(tmp_path / "spec.yaml", tiny_data / "synthetic", tmp_path / "runs",
                      [{"method": "ibot", "preset": "tiny", "overrides": E2E, "evaluations": ["knn"]}])
    cell = expand(spec).cells[0]
    run_stage(cell.pretrain)
    pre = read_record(cell.pretrain.stage_dir)
    assert pre["status"] == "done" and pre["backbone"] == "ViT-pico/8@32" and pre["paper_recipe"] == "vit_small"
    assert {"cls", "patch", "loss"} <= set(pre["metrics"]) and np.isfinite(pre["metrics"]["loss"])
    assert pre["recipe_deviations"]["epochs"] == [800, 1]
    run_stage(cell.evaluations[0])
    knn = read_record(cell.evaluations[0].stage_dir)
    assert knn["status"] == "done" and knn["protocol"] == "knn@k20,T0.07"
    assert knn["metrics_extra"]["pool"] == "cls"
    print(f"iBOT tiny (1 epoch) k-NN top-1 {knn['metrics']['top1']:.1f}%")
    assert 10.0 < knn["metrics"]["top1"] <= 100.0  # above chance on 10 classes
