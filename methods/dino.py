"""DINO: Emerging Properties in Self-Supervised Vision Transformers (Caron et al., ICCV 2021).

Algorithm 1 of the paper (facebookresearch/dino ``main_dino.py``):
  1. every image gives 2 global views and ``local_crops_number`` local views (multi-crop);
  2. the student g_s (ViT with stochastic depth + DINO head) sees every view, the backbone run once
     per resolution; the teacher g_t (same architecture, no drop-path) sees only the 2 global views;
  3. teacher targets: softmax((g_t(x) - C) / tau_t), tau_t warmed up per epoch; student:
     log_softmax(g_s(x') / tau_s); loss = mean over pairs (teacher global view, other student view)
     of the cross-entropy;
  4. after the loss, the center C <- m C + (1 - m) mean(g_t(x)) over the whole (all-reduced) batch;
  5. backward, (per-parameter clipping), the head's last layer stays frozen for ``freeze_last_layer``
     epochs, AdamW step;
  6. teacher <- l * teacher + (1 - l) * student, l from a cosine schedule 0.996 -> 1 per iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.api import ExportedBackbone, FeatureSpec, StepState, preset, register_method
from harness.errors import UserError
from methods.augment import MultiCropAugmentation
from methods.backbones import ViTShape, create_vit, interpolate_pos_embed
from methods.heads import DINOHead
from methods.multicrop import forward_per_resolution
from methods.official import backbone_state_dict, load_strict
from methods.teacher import (
    Center,
    MomentumTeacherMethod,
    MultiCropDistillationConfig,
    check_multicrop_distillation,
    sharpen,
    teacher_temperature_schedule,
)

N_GLOBAL = 2  # DINO always uses two global views; only they go through the teacher


class DINOLoss(nn.Module):
    """``main_dino.DINOLoss``: cross-entropy between the centred, sharpened teacher distribution on
    each global view and the student distribution on every other view, averaged over the pairs.

    ``forward(student_out, teacher_out, epoch)`` takes the head outputs crop-major, as the official
    code does: student (n_crops * B, K) with the global crops first, teacher (2 * B, K). The center is
    updated (all-reduced over processes) after the loss has used the old one.
    """

    def __init__(self, out_dim: int, n_crops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, epochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9) -> None:
        super().__init__()
        self.n_crops, self.student_temp = n_crops, student_temp
        self.center = Center((1, out_dim), center_momentum)
        # One value per epoch: linear warm-up (endpoint included), then constant.
        self.teacher_temps = teacher_temperature_schedule(warmup_teacher_temp, teacher_temp,
                                                          warmup_teacher_temp_epochs, epochs)

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor, epoch: int) -> torch.Tensor:
        temp = float(self.teacher_temps[epoch])
        targets = sharpen(teacher_out, self.center.center, temp).chunk(N_GLOBAL)
        # log_softmax once per student view (the official code recomputes it for each teacher view).
        log_probs = F.log_softmax(student_out / self.student_temp, dim=-1).chunk(self.n_crops)
        total, n_terms = student_out.new_zeros(()), 0
        for iq, q in enumerate(targets):
            for v, log_p in enumerate(log_probs):
                if v == iq:  # never the same view for student and teacher
                    continue
                total = total + torch.sum(-q * log_p, dim=-1).mean()
                n_terms += 1
        loss = total / n_terms
        self.center.update(teacher_out)
        return loss


def vit_cls_token(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """DINO ``VisionTransformer.forward`` on a timm ViT: final-norm CLS token, any input size that is a
    multiple of the patch size (local crops), position embeddings interpolated as DINO does. At the
    native size it equals ``vit.forward_features(x)[:, 0]``."""
    _, _, h, w = x.shape
    ph, pw = vit.patch_embed.patch_size
    tokens = vit.patch_embed.norm(vit.patch_embed.proj(x).flatten(2).transpose(1, 2))
    tokens = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
    tokens = vit.pos_drop(tokens + interpolate_pos_embed(vit.pos_embed, h // ph, w // pw))
    tokens = vit.blocks(vit.norm_pre(vit.patch_drop(tokens)))
    return vit.norm(tokens)[:, 0]


class MultiCropNetwork(nn.Module):
    """``utils.MultiCropWrapper``: backbone once per run of equal-resolution crops, head on all rows."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        feats = forward_per_resolution(lambda x: vit_cls_token(self.backbone, x), crops)
        return self.head(torch.cat(feats))


@dataclass(frozen=True, kw_only=True)
class DINOConfig(MultiCropDistillationConfig):
    vit: str  # ViT size name (methods.backbones.VIT_SIZES)
    img_size: int = 224  # global crops (main_dino.py DataAugmentationDINO)
    patch_size: int = 16
    use_bn_in_head: bool = False

    def __post_init__(self) -> None:
        check_multicrop_distillation(self, "DINO")

    @property
    def shape(self) -> ViTShape:
        return ViTShape(self.vit, self.img_size, self.patch_size)

    @property
    def n_crops(self) -> int:
        return N_GLOBAL + self.local_crops_number


_ARGS_S = "dino_deitsmall16_pretrain/args.txt"
_ARGS_B = "dino_vitbase16_pretrain/args.txt"
_CODE = "facebookresearch/dino main_dino.py"
_PAPER = "DINO paper (arXiv 2104.14294) §4.1 implementation details"
_COMMON = dict(
    lr_batch_denom=(256, f"{_CODE} --lr help: 'specified here for a reference batch size of 256' (linear scaling)"),
    warmup_epochs=(10, f"{_ARGS_S} / {_ARGS_B}: warmup_epochs 10 (= {_CODE} default; {_PAPER})"),
    warmup_lr=(0.0, "utils.cosine_scheduler start_warmup_value=0 (main_dino.py passes none)"),
    lr_schedule=("cosine", "utils.cosine_scheduler: per-iteration linear warm-up then cosine"),
    weight_decay=(0.04, f"{_ARGS_S} / {_ARGS_B} weight_decay 0.04 ({_PAPER}: cosine 0.04 -> 0.4)"),
    weight_decay_end=(0.4, f"{_ARGS_S} / {_ARGS_B} weight_decay_end 0.4"),
    betas=((0.9, 0.999), f"{_CODE}: torch.optim.AdamW(params_groups) with PyTorch's default betas"),
    eps=(1e-8, f"{_CODE}: torch.optim.AdamW default eps"),
    clip_mode=("per_param", "utils.clip_gradients clips each parameter's gradient norm separately"),
    momentum_teacher=(0.996, f"{_ARGS_S} / {_ARGS_B} momentum_teacher 0.996"),
    momentum_teacher_end=(1.0, f"{_CODE}: utils.cosine_scheduler(args.momentum_teacher, 1, ...)"),
    patch_size=(16, "ViT-S/16 and ViT-B/16 releases (args.txt patch_size 16)"),
    img_size=(224, f"{_CODE} DataAugmentationDINO: RandomResizedCrop(224) for the global crops"),
    local_size=(96, f"{_CODE} DataAugmentationDINO: RandomResizedCrop(96) for the local crops"),
    local_crops_number=(10, f"{_ARGS_S} / {_ARGS_B} local_crops_number 10"),
    global_crops_scale=((0.25, 1.0), f"{_ARGS_S} / {_ARGS_B} global_crops_scale (0.25, 1.0)"),
    local_crops_scale=((0.05, 0.25), f"{_ARGS_S} / {_ARGS_B} local_crops_scale (0.05, 0.25)"),
    color_jitter_prob=(0.8, f"{_CODE} DataAugmentationDINO: RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8)"),
    solarize_prob=(0.2, f"{_CODE} DataAugmentationDINO: utils.Solarization(0.2) on the second global crop"),
    drop_path_rate=(0.1, f"{_ARGS_S} / {_ARGS_B} drop_path_rate 0.1 (student only)"),
    out_dim=(65536, f"{_ARGS_S} / {_ARGS_B} out_dim 65536"),
    head_hidden_dim=(2048, "vision_transformer.DINOHead hidden_dim=2048"),
    head_bottleneck_dim=(256, "vision_transformer.DINOHead bottleneck_dim=256"),
    head_nlayers=(3, "vision_transformer.DINOHead nlayers=3"),
    use_bn_in_head=(False, f"{_CODE} --use_bn_in_head default False (no BatchNorm in the projection head)"),
    warmup_teacher_temp=(0.04, f"{_ARGS_S} / {_ARGS_B} warmup_teacher_temp 0.04"),
    teacher_temp=(0.07, f"{_ARGS_S} / {_ARGS_B} teacher_temp 0.07 (README 'Boosting DINO performance')"),
    student_temp=(0.1, f"{_CODE} DINOLoss student_temp=0.1; {_PAPER}"),
    center_momentum=(0.9, f"{_CODE} DINOLoss center_momentum=0.9"),
)


@register_method("dino")
class DINO(MomentumTeacherMethod):
    config_cls = DINOConfig
    recipe_precision = "fp16"  # main_dino.py: --use_fp16 default True (torch.cuda.amp autocast + GradScaler)
    sync_batchnorm = True  # main_dino.py: "synchronize batch norms (if any)" (use_bn_in_head)
    presets = {
        "vit_small": preset(
            "DINO ViT-S/16, 800 epochs (the released dino_deitsmall16 checkpoint: k-NN 74.5, linear 77.0)",
            vit=("small", "vision_transformer.vit_small (384 dim, 12 blocks, 6 heads, qkv bias, LN eps 1e-6)"),
            epochs=(800, f"{_ARGS_S} epochs 800"),
            batch_size=(1024, f"{_ARGS_S}: batch_size_per_gpu 64 x world_size 16 ({_PAPER}: 1024 over 16 GPUs)"),
            blr=(5e-4, f"{_ARGS_S} lr 0.0005"),
            min_lr=(1e-5, f"{_ARGS_S} min_lr 1e-05 (code default 1e-6)"),
            clip_grad=(None, f"{_ARGS_S} clip_grad 0 (disabled; code default 3.0)"),
            norm_last_layer=(False, f"{_ARGS_S} norm_last_layer false (README: 'only safe with vit_small')"),
            warmup_teacher_temp_epochs=(30, f"{_ARGS_S} warmup_teacher_temp_epochs 30; {_PAPER}"),
            freeze_last_layer=(1, f"{_ARGS_S} freeze_last_layer 1"),
            **_COMMON,
        ),
        "vit_base": preset(
            "DINO ViT-B/16, 400 epochs (the released dino_vitbase16 checkpoint: k-NN 76.1, linear 78.2)",
            vit=("base", "vision_transformer.vit_base (768 dim, 12 blocks, 12 heads, qkv bias, LN eps 1e-6)"),
            epochs=(400, f"{_ARGS_B} epochs 400"),
            batch_size=(1024, f"{_ARGS_B}: batch_size_per_gpu 32 x world_size 32"),
            blr=(7.5e-4, f"{_ARGS_B} lr 0.00075"),
            min_lr=(2e-6, f"{_ARGS_B} min_lr 2e-06"),
            clip_grad=(0.3, f"{_ARGS_B} clip_grad 0.3"),
            norm_last_layer=(True, f"{_ARGS_B} norm_last_layer true (main_dino.py help: True with vit_base)"),
            warmup_teacher_temp_epochs=(50, f"{_ARGS_B} warmup_teacher_temp_epochs 50"),
            freeze_last_layer=(3, f"{_ARGS_B} freeze_last_layer 3"),
            **_COMMON,
        ),
        "tiny": preset(
            "CPU test recipe on 32x32 images: a 4-block ViT with 8-px patches, DINO's multi-crop with two 16-px local "
            "crops, a small head with BatchNorm (main_dino.py's --use_bn_in_head), 20 epochs of 32 images. It learns "
            "the digits (issue 10; k-NN top-1, k=20, of the teacher's CLS vs the same backbone at initialisation, one "
            "torch thread; seeds 0, 1, 2): 70.3 vs 50.0, 69.7 vs 51.7, 71.9 vs 56.4 (+20.3, +18.1, +15.6), RankMe "
            "3.1-3.2, teacher entropy ratio 0.65-0.73, no collapse flag; 110-117 s of pre-training beside another "
            "run. The head's BatchNorm is what made it learn: without local crops, 30 epochs, seed 0, 68.3 with it "
            "and 39.2 without it (vs 50.0; half the val digits then share the teacher's argmax). With BatchNorm and "
            "no local crops (seeds 0-2): 30 epochs +18.3, +20.8, +15.6 (RankMe 2.8-2.9); teacher 0.03 +20.8, +18.9, "
            "+15.6; 20 epochs +15.6, +15.3, +11.4; seed 0 with DINO's colour jitter and solarize back on (p 0.8 / "
            "0.2) +13.6 (RankMe 2.2, entropy ratio 0.85). Without BatchNorm nothing learned over sessions 1-7 (every "
            "run ended at or below its floor, or collapsed): with colour jitter the centred targets go uniform within "
            "1-2 epochs (teacher 0.01-0.07, center momentum 0-0.9, blr 5e-4 to 5e-3, crops (0.4, 1) to (0.8, 1), with "
            "or without local crops), or pass through one-hot targets at 0.01; without it (crops (0.5, 1), batch 32, "
            "out_dim 128, EMA 0.99) 4-px patches end 4-11 points below the floor and 8-px patches 5-10 below (out_dim "
            "1024, center momentum 0, no flip and blr 5e-4 among them); 150 epochs of EsViT's tiny recipe on an H200 "
            "reached only +6.4. Why, measured on 8-px patches: the first principal component of the random-init CLS "
            "features on the val digits holds 73 % of their variance and correlates 0.95 with the image's mean "
            "intensity (ink amount), which crops, flip and blur keep, so it is what the two views share after "
            "centring; DINO without BatchNorm amplified it to 95 % of the variance after 440 steps (k-NN 54.2 -> "
            "46.7), crowding out the shape directions k-NN needs. BatchNorm normalises each of the head's hidden "
            "units over the batch (the teacher's too: it runs in train mode, as in main_dino.py), which presumably "
            "keeps that one direction from dominating the head. iBOT learns without it through its masked-patch loss "
            "(its tiny description)",
            paper_recipe="vit_small",
            vit=("pico", "ssl-repro CPU test size"),
            img_size=(32, "tiny data sets are 32x32"),
            patch_size=(8, "4x4 grid on 32x32 global crops, as iBOT's tiny (4-px patches, a digit pixel each, "
                           "never learned without BatchNorm; not measured with it)"),
            local_size=(16, "2x2 grid; the paper's 96/224 ratio, rounded to whole patches"),
            local_crops_number=(2, "ssl-repro CPU test: 4 crops per image (two local crops: +20.3 vs +15.6 "
                                   "without, seed 0, 20 epochs)"),
            global_crops_scale=((0.5, 1.0), "crops that keep most of the digit, as EsViT's and iBOT's tiny"),
            color_jitter_prob=(0.0, "greyscale digits: with jitter and solarize (p 0.8 / 0.2) the margin falls "
                                    "(see the description)"),
            solarize_prob=(0.0, "as color_jitter_prob"),
            drop_path_rate=(0.0, "4 blocks: stochastic depth only slows a CPU test"),
            out_dim=(128, "ssl-repro CPU test size (a 65536-way head on 1440 images is pointless)"),
            head_hidden_dim=(256, "ssl-repro CPU test size"),
            head_bottleneck_dim=(64, "ssl-repro CPU test size"),
            use_bn_in_head=(True, f"{_CODE} --use_bn_in_head (an official option, default off): without "
                                  "it the tiny runs end at or below their floor (see the description)"),
            warmup_teacher_temp=(0.04, f"{_ARGS_S} warmup_teacher_temp 0.04"),
            teacher_temp=(0.04, f"{_CODE} --teacher_temp default 0.04 ('We recommend starting with the default "
                                "value of 0.04'); 0.03 measured alike (see the description)"),
            warmup_teacher_temp_epochs=(0, f"{_CODE} --warmup_teacher_temp_epochs default 0: the temperature is "
                                           "held"),
            epochs=(20, "ssl-repro CPU test length"),
            batch_size=(32, "ssl-repro CPU test batch: more steps for the same images"),
            blr=(5e-3, "~10x the paper's blr: few steps"),
            min_lr=(1e-5, f"{_ARGS_S} min_lr 1e-05"),
            warmup_epochs=(1, "scaled down with the epochs"),
            clip_grad=(3.0, f"{_CODE} --clip_grad default 3.0 (a guard for the high test lr)"),
            norm_last_layer=(False, f"{_ARGS_S} norm_last_layer false"),
            freeze_last_layer=(0, "few epochs: no prototype freeze"),
            momentum_teacher=(0.99, "fewer steps: 0.996 would leave the teacher near its initialisation "
                              "(main_dino.py help: raise it for small batches; here lowered for few steps)"),
            num_workers=(2, "CI machines have 2 cores"),
            log_every=(5, "ssl-repro CPU test logging"),
            **{k: v for k, v in _COMMON.items() if k not in {
                "warmup_epochs", "momentum_teacher", "patch_size", "img_size", "local_size", "local_crops_number",
                "global_crops_scale", "color_jitter_prob", "solarize_prob", "drop_path_rate", "out_dim",
                "head_hidden_dim", "head_bottleneck_dim", "use_bn_in_head", "warmup_teacher_temp", "teacher_temp"}},
        ),
    }

    def __init__(self, cfg: DINOConfig, train) -> None:
        super().__init__(cfg, train)
        if cfg.warmup_teacher_temp_epochs > train.epochs:
            raise UserError("overrides.warmup_teacher_temp_epochs", f"{cfg.warmup_teacher_temp_epochs} exceeds "
                            f"epochs={train.epochs}", "lower warmup_teacher_temp_epochs or raise epochs")
        self.student = self._network(cfg, cfg.drop_path_rate, cfg.norm_last_layer)
        self.init_teacher(self._network(cfg, 0.0, True))  # main_dino.py: teacher without drop-path
        self.loss = DINOLoss(cfg.out_dim, cfg.n_crops, cfg.warmup_teacher_temp, cfg.teacher_temp,
                             cfg.warmup_teacher_temp_epochs, train.epochs, cfg.student_temp, cfg.center_momentum)

    @staticmethod
    def _network(cfg: DINOConfig, drop_path: float, norm_last_layer: bool) -> MultiCropNetwork:
        backbone = create_vit(ViTShape(cfg.vit, cfg.img_size, cfg.patch_size, drop_path))
        # DINO's VisionTransformer draws the CLS token from trunc_normal(std .02) (timm: normal(std 1e-6));
        # everything else already matches (trunc_normal .02 Linear/pos_embed, zero biases, unit LayerNorms).
        nn.init.trunc_normal_(backbone.cls_token, std=0.02)
        head = DINOHead(backbone.embed_dim, cfg.out_dim, hidden_dim=cfg.head_hidden_dim,
                        bottleneck_dim=cfg.head_bottleneck_dim, nlayers=cfg.head_nlayers,
                        norm_last_layer=norm_last_layer, use_bn=cfg.use_bn_in_head)
        return MultiCropNetwork(backbone, head)

    @classmethod
    def build_transform(cls, cfg: DINOConfig) -> MultiCropAugmentation:
        return MultiCropAugmentation.from_config(cfg)

    def training_step(self, batch: list[torch.Tensor], state: StepState) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            teacher_out = self.teacher(batch[:N_GLOBAL])  # only the 2 global views
        student_out = self.student(batch)
        loss = self.loss(student_out.float(), teacher_out.float(), state.epoch)
        return {"loss": loss}

    def curve_scalars(self, state: StepState) -> dict[str, float]:
        return {**super().curve_scalars(state), "teacher/temperature": float(self.loss.teacher_temps[state.epoch])}

    # -- export -------------------------------------------------------------------------------------
    @staticmethod
    def _feature_spec(cfg: DINOConfig) -> FeatureSpec:
        # eval_knn.py: final-norm CLS. eval_linear.py (README): ViT-S concatenates the CLS of the last 4
        # blocks; ViT-B uses the last block's CLS + mean patch token (--avgpool_patchtokens true).
        # Fine-tuning (iBOT's BEiT-based recipe, run.sh --use_cls): the CLS token.
        if cfg.vit in ("base", "large"):
            return FeatureSpec(knn="cls", linear="cls+avg", linear_n_last_blocks=1, finetune="cls")
        return FeatureSpec(knn="cls", linear="cls", linear_n_last_blocks=4, finetune="cls")

    @staticmethod
    def _exported(cfg: DINOConfig, state: dict[str, torch.Tensor]) -> ExportedBackbone:
        shape = cfg.shape
        return ExportedBackbone(timm_name="vit_base_patch16_224",
                                timm_kwargs=shape.timm_kwargs() | {"drop_path_rate": 0.0},
                                state_dict=state, feature_spec=DINO._feature_spec(cfg), label=shape.label)

    def export_backbone(self) -> ExportedBackbone:
        """The teacher's backbone (eval_knn.py / eval_linear.py --checkpoint_key teacher)."""
        return self._exported(self.cfg, self.teacher_backbone_state())

    @classmethod
    def import_official(cls, checkpoint: dict[str, Any], cfg: DINOConfig,
                        checkpoint_key: str = "teacher") -> ExportedBackbone:
        """A released DINO checkpoint -> our export: a full training checkpoint (teacher by default) or a
        backbone-only state dict (``dino_deitsmall16_pretrain.pth`` layout). DINO's ViT names its weights
        exactly as timm's VisionTransformer, so the mapping is the identity once wrappers are stripped."""
        state = backbone_state_dict(checkpoint, checkpoint_key)
        model = create_vit(cfg.shape)
        load_strict(model, state, f"DINO {checkpoint_key if checkpoint_key in checkpoint else 'backbone'} weights")
        return cls._exported(cfg, {k: v.detach().clone() for k, v in model.state_dict().items()})
