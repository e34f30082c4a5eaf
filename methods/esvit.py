"""EsViT: Efficient Self-supervised Vision Transformers for Representation Learning (Li et al., ICLR 2022).

Algorithm (microsoft/esvit ``main_esvit.py``, ``models/swin_transformer.py``):
  1. every image gives 2 global views (224) and 8 local views (96) (DINO's multi-crop);
  2. a multi-stage Swin runs once per resolution and gives, per view, the last stage's normed token
     grid (the region features, N = 49 for 224 and 9 for 96 pixels with Swin-T) and its average z
     (the view feature); two DINO heads project them: ``head`` (views) and ``head_dense`` (regions);
  3. the teacher (same network, no drop-path, EMA of the student) sees only the 2 global views; its
     outputs are centred (``center`` for views, ``center_grid`` for regions) and sharpened with a
     temperature warmed up 0.04 -> 0.07;
  4. for every pair (teacher global view q, student view v != q):
       view loss   L_V = H(P_t(z_q), P_s(z_v)),
       region loss L_R = mean over the student's regions i of H(P_t(r_q[j*]), P_s(r_v[i])), where
                   j* = argmax_j cos(backbone feature i of v, backbone feature j of q);
     pair loss = (L_V + L_R) / 2, averaged over the batch, then over the 2 (2 + n_local) - 2 pairs;
  5. both centers <- 0.9 c + 0.1 mean of the teacher's (view | region) outputs (all-reduced);
  6. backward, per-parameter clipping, last layers frozen in the first epoch, AdamW; EMA teacher.
With ``use_dense_prediction: false`` the heads/loss are DINO's (view level only, the paper's "V").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import WindowAttention
from torch import nn

from harness.api import ExportedBackbone, FeatureSpec, StepState, preset, register_method
from harness.errors import UserError
from methods.augment import MultiCropAugmentation
from methods.dino import DINOLoss
from methods.heads import DINOHead
from methods.official import backbone_state_dict, load_strict
from methods.swin import (
    LN_EPS,
    SWIN_SIZES,
    SwinShape,
    create_swin,
    esvit_to_timm_key,
    forward_tokens,
    relative_position_index,
)
from methods.teacher import (
    Center,
    MomentumTeacherMethod,
    MultiCropDistillationConfig,
    check_multicrop_distillation,
    sharpen,
    teacher_temperature_schedule,
)

N_GLOBAL = 2  # only the 2 global views go through the teacher


# -- the network ------------------------------------------------------------------------------------
class ViewOutputs(NamedTuple):
    """What EsViT's ``SwinTransformer.forward`` returns with ``use_dense_prediction``: rows are
    view-major (view, batch) for ``view``; (view, batch, region) for the region tensors."""

    view: torch.Tensor  # head(z): (views * B, K)
    region: torch.Tensor | None  # head_dense(regions): (sum over views of B * N_view, K)
    region_feature: torch.Tensor | None  # the backbone's region features: (sum of B * N_view, C)
    n_regions: list[int]  # N per resolution group (global views first)


class MultiCropSwin(nn.Module):
    """EsViT's SwinTransformer + ``head`` + ``head_dense``: one backbone pass per run of equal-size
    crops (2 globals, then the locals), heads applied to the concatenated rows."""

    def __init__(self, shape: SwinShape, drop_path: float, cfg: EsViTConfig, norm_last_layer: bool) -> None:
        super().__init__()
        self.backbone = create_swin(shape, drop_path)
        head = functools.partial(DINOHead, shape.num_features, cfg.out_dim, hidden_dim=cfg.head_hidden_dim,
                                 bottleneck_dim=cfg.head_bottleneck_dim, nlayers=cfg.head_nlayers,
                                 norm_last_layer=norm_last_layer)
        self.head = head()
        self.head_dense = head() if cfg.use_dense_prediction else None

    def forward(self, crops: list[torch.Tensor]) -> ViewOutputs:
        views, regions, n_regions = [], [], []
        start = 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            z, r = forward_tokens(self.backbone, torch.cat(crops[start:end]))
            views.append(z)
            regions.append(r.flatten(0, 1))
            n_regions.append(r.shape[1])
            start = end
        view = self.head(torch.cat(views))
        if self.head_dense is None:
            return ViewOutputs(view, None, None, n_regions)
        feature = torch.cat(regions)
        return ViewOutputs(view, self.head_dense(feature), feature, n_regions)


# -- the loss ---------------------------------------------------------------------------------------
@torch.no_grad()
def match_regions(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """(B, N_s, C), (B, N_t, C) -> (B, N_s): for each student region, the teacher region whose backbone
    feature is most cosine-similar (``DDINOLoss``: ``region_sim_matrix.max(dim=2)[1]``). An index, so no
    gradient flows through the matching."""
    sim = F.normalize(student_feature, dim=-1) @ F.normalize(teacher_feature, dim=-1).transpose(1, 2)
    return sim.argmax(dim=2)


class DDINOLoss(nn.Module):
    """``main_esvit.DDINOLoss``: view-level + region-level self-distillation, 1/2 each, averaged over
    the (teacher global view, other student view) pairs.

    ``forward(student, teacher, epoch)`` takes ``ViewOutputs`` of the student (all crops) and of the
    teacher (2 global crops). Both centers are updated (all-reduced) after the loss used the old ones;
    the region center over all B * N teacher region rows. Returns {"loss", "loss_view", "loss_region"}
    (loss = (loss_view + loss_region) / 2, each the mean over pairs of batch means).
    """

    def __init__(self, out_dim: int, n_crops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, epochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        self.n_crops, self.student_temp = n_crops, student_temp
        self.center = Center((1, out_dim), center_momentum)
        self.center_grid = Center((1, out_dim), center_momentum)
        self.teacher_temps = teacher_temperature_schedule(warmup_teacher_temp, teacher_temp,
                                                          warmup_teacher_temp_epochs, epochs)

    def forward(self, student: ViewOutputs, teacher: ViewOutputs, epoch: int) -> dict[str, torch.Tensor]:
        temp = float(self.teacher_temps[epoch])
        batch = teacher.view.shape[0] // N_GLOBAL
        n_t = teacher.n_regions[0]
        n_s = [student.n_regions[0]] * N_GLOBAL + [student.n_regions[-1]] * (self.n_crops - N_GLOBAL)

        # Teacher targets: centred and sharpened, view and region outputs with their own centers.
        t_view = sharpen(teacher.view, self.center.center, temp).chunk(N_GLOBAL)
        t_region = sharpen(teacher.region, self.center_grid.center, temp).reshape(N_GLOBAL, batch, n_t, -1)
        t_feature = teacher.region_feature.detach().reshape(N_GLOBAL, batch, n_t, -1)
        # Student log-probabilities once per view (the official code recomputes them for every pair).
        s_view = F.log_softmax(student.view / self.student_temp, dim=-1).chunk(self.n_crops)
        rows = [batch * n for n in n_s]
        s_region = F.log_softmax(student.region / self.student_temp, dim=-1).split(rows)
        s_feature = student.region_feature.split(rows)

        view_total, region_total, n_pairs = 0.0, 0.0, 0
        for q in range(N_GLOBAL):
            for v in range(self.n_crops):
                if v == q:  # never the same view for student and teacher
                    continue
                view_total = view_total + torch.sum(-t_view[q] * s_view[v], dim=-1).mean()
                match = match_regions(s_feature[v].reshape(batch, n_s[v], -1), t_feature[q])  # (B, N_s)
                target = torch.gather(t_region[q], 1, match.unsqueeze(-1).expand(-1, -1, t_region.shape[-1]))
                per_region = torch.sum(-target * s_region[v].reshape(batch, n_s[v], -1), dim=-1)
                region_total = region_total + per_region.mean(dim=-1).mean()  # regions, then batch
                n_pairs += 1
        loss_view, loss_region = view_total / n_pairs, region_total / n_pairs
        self.center.update(teacher.view)
        self.center_grid.update(teacher.region)
        return {"loss": 0.5 * loss_view + 0.5 * loss_region, "loss_view": loss_view, "loss_region": loss_region}


# -- configuration -----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class EsViTConfig(MultiCropDistillationConfig):
    swin: str  # methods.swin.SWIN_SIZES: tiny | small | base (| pico, nano: test sizes)
    window_size: int = 7
    img_size: int = 224  # global crops (DataAugmentationDINO: RandomResizedCrop(224))
    patch_size: int = 4
    use_dense_prediction: bool = True  # False: view-level task only (DINOLoss, no head_dense)

    def __post_init__(self) -> None:
        if self.swin not in SWIN_SIZES:
            raise UserError("overrides.swin", f"unknown Swin size {self.swin!r}", f"use one of {sorted(SWIN_SIZES)}")
        check_multicrop_distillation(self, "EsViT")

    @property
    def shape(self) -> SwinShape:
        return SwinShape(self.swin, self.window_size, self.img_size, self.patch_size)

    @property
    def n_crops(self) -> int:
        return N_GLOBAL + self.local_crops_number


# -- presets -----------------------------------------------------------------------------------------
_README = "microsoft/esvit README@2d6becd"
_CODE = "microsoft/esvit main_esvit.py"
_YAML = "microsoft/esvit experiments/imagenet/swin/swin_{size}_patch4_window{w}_224.yaml"
_CMD = f"{_README} pre-training command (main_esvit.py ... --batch_size_per_gpu 32 --epochs 300 --teacher_temp 0.07 " \
       "--warmup_epochs 10 --warmup_teacher_temp_epochs 30 --norm_last_layer false --use_dense_prediction True)"
_COMMON = dict(
    epochs=(300, f"{_CMD}: --epochs 300"),
    blr=(5e-4, f"{_CODE} --lr default 0.0005 (README run names 'bl_lr0.0005')"),
    lr_batch_denom=(256, f"{_CODE}: lr = args.lr * batch_size_per_gpu * world_size / 256"),
    min_lr=(1e-6, f"{_CODE} --min_lr default 1e-6"),
    warmup_epochs=(10, f"{_CMD}: --warmup_epochs 10"),
    warmup_lr=(0.0, f"{_CODE}: utils.cosine_scheduler start_warmup_value=0"),
    lr_schedule=("cosine", f"{_CODE}: utils.cosine_scheduler (per-iteration warm-up + cosine)"),
    weight_decay=(0.04, f"{_CODE} --weight_decay default 0.04"),
    weight_decay_end=(0.4, f"{_CODE} --weight_decay_end default 0.4 (cosine, utils.cosine_scheduler)"),
    betas=((0.9, 0.999), f"{_CODE}: torch.optim.AdamW(params_groups) with PyTorch's default betas"),
    eps=(1e-8, f"{_CODE}: torch.optim.AdamW default eps"),
    clip_grad=(3.0, f"{_CODE} --clip_grad default 3.0"),
    clip_mode=("per_param", f"{_CODE}: utils.clip_gradients(student, 3.0) clips each parameter's gradient"),
    momentum_teacher=(0.996, f"{_CODE} --momentum_teacher default 0.996"),
    momentum_teacher_end=(1.0, f"{_CODE}: utils.cosine_scheduler(args.momentum_teacher, 1, ...)"),
    precision=("fp16", f"{_CODE} --use_fp16 default True (torch.cuda.amp autocast + GradScaler)"),
    patch_size=(4, f"{_YAML} MODEL.SPEC.PATCH_SIZE 4"),
    img_size=(224, "microsoft/esvit datasets/build.py DataAugmentationDINO: RandomResizedCrop(224)"),
    local_size=(96, f"{_CODE} --local_crops_size default 96"),
    local_crops_number=(8, f"{_CODE} --local_crops_number default 8"),
    global_crops_scale=((0.4, 1.0), f"{_CODE} --global_crops_scale default (0.4, 1.)"),
    local_crops_scale=((0.05, 0.4), f"{_CODE} --local_crops_scale default (0.05, 0.4)"),
    color_jitter_prob=(0.8, "microsoft/esvit datasets/build.py DataAugmentationDINO: ColorJitter p=0.8"),
    solarize_prob=(0.2, "microsoft/esvit datasets/build.py DataAugmentationDINO: Solarization(0.2), global crop 2"),
    use_dense_prediction=(True, f"{_CMD}: --use_dense_prediction True"),
    out_dim=(65536, f"{_CODE} --out_dim default 65536"),
    head_hidden_dim=(2048, "microsoft/esvit models/vision_transformer.py DINOHead hidden_dim=2048"),
    head_bottleneck_dim=(256, "microsoft/esvit models/vision_transformer.py DINOHead bottleneck_dim=256"),
    head_nlayers=(3, "microsoft/esvit models/vision_transformer.py DINOHead nlayers=3 (use_bn_in_head False)"),
    norm_last_layer=(False, f"{_CMD}: --norm_last_layer false"),
    warmup_teacher_temp=(0.04, f"{_CODE} --warmup_teacher_temp default 0.04"),
    teacher_temp=(0.07, f"{_CMD}: --teacher_temp 0.07"),
    warmup_teacher_temp_epochs=(30, f"{_CMD}: --warmup_teacher_temp_epochs 30"),
    student_temp=(0.1, f"{_CODE} DDINOLoss student_temp=0.1"),
    center_momentum=(0.9, f"{_CODE} DDINOLoss center_momentum=0.9"),
    freeze_last_layer=(1, f"{_CODE} --freeze_last_layer default 1"),
)
# How each README checkpoint was trained (its download path): batch per GPU x GPUs, and whether the
# region task ran for all 300 epochs or was switched on when resuming a view-only run.
_RESUMED = "released run resumed a view-only run at epoch {} ('{}')"
_RUNS = {
    ("tiny", 7): ("gpu16_bs32 = 512", "dense from scratch ('..._dense_multicrop_epoch300')"),
    ("small", 7): ("gpu16_bs32 = 512", "dense from scratch ('..._dense_multicrop_epoch300')"),
    ("base", 7): ("gpu16_bs32 = 512", _RESUMED.format(200, "continued_from0200_dense")),
    ("tiny", 14): ("gpu16_bs32 = 512", _RESUMED.format(200, "continued_from0200_dense")),
    ("small", 14): ("README multi-node command: 2 nodes x 16 GPUs x --batch_size_per_gpu 16 = 512",
                    _RESUMED.format(180, "continued_from0180_dense")),
    ("base", 14): ("nodes4_gpu16_bs8 = 512", _RESUMED.format(200, "continued_from_epoch0200_dense_norm_true")),
}
_DROP_PATH = {"tiny": 0.1, "small": 0.2, "base": 0.2}
_KNN = {("tiny", 7): 75.7, ("small", 7): 77.7, ("base", 7): 78.9, ("tiny", 14): 77.0, ("small", 14): 79.1,
        ("base", 14): 79.3}


def _paper_preset(size: str, window: int, dense: bool = True):
    yaml = _YAML.format(size=size, w=window)
    label = SwinShape(size, window).label
    values = dict(_COMMON)
    if dense:
        batch_note, run_note = _RUNS[(size, window)]
        about = f"V+R, README k-NN {_KNN[(size, window)]}. Note: {run_note}; this preset trains V+R for all 300 epochs"
        batch = (512, f"{_README}: 'batch size=512' for every released checkpoint ({batch_note})")
    else:
        values["use_dense_prediction"] = (False, f"{_README}: 'Please use --use_dense_prediction True, otherwise only "
                                          "the view-level task is used' (the 'V' rows)")
        about = "view-level task only (V): " + ("README 'V' checkpoint 'gpu16_bs32' = 512" if window == 7 else
                                                "EsViT paper Tab. 5 only, no released checkpoint")
        batch = (512, f"{_README} 'V' rows (W7): run names 'gpu16_bs32' = 16 GPUs x 32 = 512; W14 assumed the same")
    return preset(
        f"EsViT {label}, 300 epochs, batch 512 ({about})",
        swin=(size, f"{yaml} MODEL.SPEC (DIM_EMBED, DEPTHS, NUM_HEADS); main_esvit.py --arch swin_{size}"),
        window_size=(window, f"{yaml} MODEL.SPEC.WINDOW_SIZE {window}"),
        drop_path_rate=(_DROP_PATH[size], f"{yaml} MODEL.SPEC.DROP_PATH_RATE {_DROP_PATH[size]} (teacher: 0)"),
        batch_size=batch,
        **values,
    )


def _tiny_preset(dense: bool = True):
    keep = {k: v for k, v in _COMMON.items() if k not in {
        "epochs", "blr", "warmup_epochs", "momentum_teacher", "precision", "patch_size", "img_size", "local_size",
        "local_crops_number", "out_dim", "head_hidden_dim", "head_bottleneck_dim", "warmup_teacher_temp_epochs",
        "use_dense_prediction", "color_jitter_prob", "solarize_prob", "global_crops_scale", "teacher_temp",
        "warmup_teacher_temp", "freeze_last_layer"}}
    return preset(
        "CPU test recipe on 32x32 images: a 2-stage Swin, two global views, no colour augmentation, 20 epochs of 32 "
        "images (880 steps on the digits: the learning test took 119 s on one thread of an idle 2-core machine). It "
        "learns the digits (k-NN top-1, k=20, mean-pooled teacher features, vs the same backbone at initialisation, "
        "one torch thread): 65.0 vs 53.9, 68.9 vs 55.6, 67.5 vs 55.0 (seeds 0, 1, 2: +11.1, +13.3, +12.5; RankMe 9.2, "
        "8.6, 8.5, teacher entropy ratio 0.75-0.83, no collapse flag). Why no colour jitter or solarize: on grey "
        "digits the views they make barely agree at initialisation and the targets go uniform (DINO's tiny description"
        " measures it). The preset before (jitter and solarize on, 2 local 12x12 crops, out_dim 256, teacher 0.04 -> "
        "0.07, freeze_last_layer 1, 10 epochs of 64 at blr 5e-3) gave 49.7 vs 54.2 (issue 10); with jitter and "
        "solarize off but teacher 0.02, center momentum 0, EMA 0.95, blr 2e-3, crops (0.6, 1), 8 epochs: 56.7 vs 56.4 "
        "(features of rank 14, entropy 3.4 of log K 5.55). This recipe at blr 5e-3 with drop-path 0.1: 62.2 vs 53.9 "
        "(seed 0, +8.3; entropy ratio 0.77, RankMe 9.7). At 16 epochs (704 steps): 63.1 vs 53.9, 67.5 vs 55.6 (seeds "
        "0, 1: +9.2, +11.9). The view-only variant (esvit-v) takes the same values, not measured",
        paper_recipe="swin_tiny_w7",
        swin=("pico", "ssl-repro CPU test size (methods.swin SWIN_SIZES['pico'])"),
        window_size=(4, "8x8 patch grid of a 32x32 global crop: 4 windows, shifted in every second block"),
        drop_path_rate=(0.0, "a 2-stage model in 880 steps: 0.1 (the paper's Swin-T value) gave +8.3, 0 with blr "
                             "1e-2 +11.1 (seed 0)"),
        img_size=(32, "tiny data sets are 32x32"),
        patch_size=(4, "8x8 grid on 32x32 global crops"),
        local_size=(12, "3x3 grid: about the paper's 96/224 ratio, in whole patches (with local_crops_number > 0)"),
        local_crops_number=(0, "two global views only: the CPU budget goes to steps"),
        global_crops_scale=((0.5, 1.0), "crops of at least half a digit keep its class"),
        color_jitter_prob=(0.0, "grey digits: jittered views barely agree at initialisation (DINO tiny description)"),
        solarize_prob=(0.0, "as color_jitter_prob"),
        use_dense_prediction=(dense, "the variant under test"),
        out_dim=(128, "ssl-repro CPU test size (a 65536-way head on 1437 images is pointless)"),
        head_hidden_dim=(256, "ssl-repro CPU test size"),
        head_bottleneck_dim=(64, "ssl-repro CPU test size"),
        warmup_teacher_temp=(0.04, "held: with no warm-up the teacher is sharp from the start"),
        teacher_temp=(0.04, f"{_CODE} --teacher_temp default 0.04 (the Swin recipes warm to 0.07 over 30 epochs)"),
        warmup_teacher_temp_epochs=(0, "held at 0.04"),
        freeze_last_layer=(0, "880 steps: freezing the last layer for an epoch only delays learning"),
        epochs=(20, "ssl-repro CPU test length (as MAE's tiny preset)"),
        batch_size=(32, "twice the steps of a 64-image batch, as MAE's tiny preset"),
        blr=(1e-2, "20x the paper's 5e-4 (lr 1.25e-3 at batch 32): 5e-3 gave +8.3 (seed 0, drop-path 0.1)"),
        warmup_epochs=(1, "scaled down with the epochs"),
        momentum_teacher=(0.99, "fewer steps: 0.996 would leave the teacher near its initialisation"),
        precision=("auto", "fp32 on CPU"),
        num_workers=(2, "CI machines have 2 cores"),
        log_every=(5, "ssl-repro CPU test logging"),
        **keep,
    )


# -- the method --------------------------------------------------------------------------------------
@register_method("esvit")
class EsViT(MomentumTeacherMethod):
    config_cls = EsViTConfig
    presets = {
        **{f"swin_{size}_w{w}": _paper_preset(size, w) for w in (7, 14) for size in ("tiny", "small", "base")},
        "tiny": _tiny_preset(),
    }

    def __init__(self, cfg: EsViTConfig, train) -> None:
        super().__init__(cfg, train)
        if cfg.warmup_teacher_temp_epochs > train.epochs:
            raise UserError("overrides.warmup_teacher_temp_epochs", f"{cfg.warmup_teacher_temp_epochs} exceeds "
                            f"epochs={train.epochs}", "lower warmup_teacher_temp_epochs or raise epochs")
        self.student = MultiCropSwin(cfg.shape, cfg.drop_path_rate, cfg, cfg.norm_last_layer)
        # get_cls_model(is_teacher=True); main_esvit.py: teacher_without_ddp.load_state_dict(student...).
        self.init_teacher(MultiCropSwin(cfg.shape, 0.0, cfg, norm_last_layer=True))
        loss_cls = DDINOLoss if cfg.use_dense_prediction else DINOLoss
        self.loss = loss_cls(cfg.out_dim, cfg.n_crops, cfg.warmup_teacher_temp, cfg.teacher_temp,
                             cfg.warmup_teacher_temp_epochs, train.epochs, cfg.student_temp, cfg.center_momentum)

    @classmethod
    def build_transform(cls, cfg: EsViTConfig) -> MultiCropAugmentation:
        # datasets/build.py DataAugmentationDINO (--aug-opt dino_aug) = DINO's multi-crop augmentation.
        return MultiCropAugmentation.from_config(cfg)

    def training_step(self, batch: list[torch.Tensor], state: StepState) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            teacher_out = self.teacher(batch[:N_GLOBAL])  # only the 2 global views
        student_out = self.student(batch)
        # The loss in float32 with autocast off: the region matching's cosine similarities would
        # otherwise be rounded to 16 bits before the argmax.
        with torch.autocast(batch[0].device.type, enabled=False):
            if not self.cfg.use_dense_prediction:
                return {"loss": self.loss(student_out.view.float(), teacher_out.view.float(), state.epoch)}
            return self.loss(_float(student_out), _float(teacher_out), state.epoch)

    # on_before_optimizer_step (base class): utils.cancel_gradients_last_layer freezes head and head_dense.

    def curve_scalars(self, state: StepState) -> dict[str, float]:
        return {**super().curve_scalars(state), "teacher/temperature": float(self.loss.teacher_temps[state.epoch])}

    # -- export -------------------------------------------------------------------------------------
    @staticmethod
    def _exported(cfg: EsViTConfig, state: dict[str, torch.Tensor]) -> ExportedBackbone:
        shape = cfg.shape
        return ExportedBackbone(
            timm_name=shape.timm_name,
            timm_kwargs=shape.timm_kwargs(drop_path=0.0) | export_norm_kwargs(),
            state_dict=state,
            # eval_knn.py: avg-pooled final-norm last-stage tokens. eval_linear.py (README: --n_last_blocks 4):
            # forward_return_n_last_blocks concatenates the avg-pooled outputs of the last 4 blocks (final
            # norm on last-stage blocks only). No fine-tuning recipe in the repository: mean-pool.
            feature_spec=FeatureSpec(knn="avg", linear="avg", linear_n_last_blocks=4, finetune="avg"),
            label=shape.label,
        )

    def export_backbone(self) -> ExportedBackbone:
        """The teacher's backbone (README: eval_knn.py / eval_linear.py --checkpoint_key teacher)."""
        return self._exported(self.cfg, self.teacher_backbone_state())

    @classmethod
    def import_official(cls, checkpoint: dict[str, Any], cfg: EsViTConfig,
                        checkpoint_key: str = "teacher") -> ExportedBackbone:
        """A released EsViT checkpoint (``{"student", "teacher", ...}``, student keys ``module.``-prefixed;
        or a bare backbone state dict) -> our export. EsViT's Swin keys become timm's (PatchMerging moves
        from the end of stage i to the start of stage i+1); ``head.*``/``head_dense.*`` are dropped; the
        stored ``relative_position_index`` buffers must equal the index of the preset's window layout."""
        state = backbone_state_dict(checkpoint, checkpoint_key, drop=("head.", "head_dense."))
        model = create_swin(cfg.shape)
        windows = {name: m.window_size for name, m in model.named_modules() if isinstance(m, WindowAttention)}
        mapped = {}
        for key, value in state.items():
            name = esvit_to_timm_key(key)
            if name.endswith(".relative_position_index"):
                attn = name[: -len(".relative_position_index")]
                if attn in windows and not torch.equal(value.long(), relative_position_index(windows[attn])):
                    raise UserError("checkpoint", f"{key} does not match window {windows[attn]} of "
                                    f"{cfg.shape.label}", "check the preset's window_size against the release")
                if attn in windows:
                    continue  # a buffer timm recomputes; an unknown one stays and fails below
            mapped[name] = value
        load_strict(model, mapped, f"EsViT {checkpoint_key if checkpoint_key in checkpoint else 'backbone'} weights")
        return cls._exported(cfg, {k: v.detach().clone() for k, v in model.state_dict().items()})


@register_method("esvit-v")
class EsViTViewOnly(EsViT):
    """EsViT with the view-level task only (the README's 'V' rows): DINO's loss on a Swin."""

    presets = {
        **{f"swin_{size}_w{w}": _paper_preset(size, w, dense=False) for w in (7, 14)
           for size in ("tiny", "small", "base")},
        "tiny": _tiny_preset(dense=False),
    }


def _float(out: ViewOutputs) -> ViewOutputs:
    return ViewOutputs(out.view.float(), out.region.float(), out.region_feature.float(), out.n_regions)


@functools.cache
def export_norm_kwargs() -> dict[str, str]:
    """timm's SwinTransformer takes ``norm_layer`` as a class, but an export's kwargs are JSON. Where the
    harness resolves a norm name when rebuilding (``timm.layers.get_norm_layer("layernorm")`` = timm's
    LayerNorm, eps 1e-6 = EsViT's), the export says so; otherwise evaluations run timm's default
    nn.LayerNorm (eps 1e-5: features differ by ~1e-5 relative)."""
    from harness.export import build_timm

    shape = SwinShape("pico", 4, 32, 4)
    try:
        model = build_timm(shape.timm_name, shape.timm_kwargs() | {"norm_layer": "layernorm"})
    except Exception:  # noqa: BLE001 - the harness passes the string on to timm, which cannot call it
        return {}
    return {"norm_layer": "layernorm"} if model.norm.eps == LN_EPS else {}
