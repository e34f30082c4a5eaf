"""Throughput of the evaluations: feature extraction (img/s), linear-probe steps (steps/s with N heads,
one per lr, over one feature batch vs one head), fine-tuning steps (img/s).

Random inputs, no data loading; each step goes through ``harness.train.optimisation_step`` exactly as the
generic loop runs it (schedules, autocast, clipping, optimiser). GPU: bf16 autocast, channels-last input,
fused AdamW/SGD; the device is synchronised only around each timed region.

    python benchmarks/eval_step.py --arch vit_small_patch16_224 --img-size 224 --batch-size 64 --device cuda
    python benchmarks/eval_step.py --img-size 32 --patch-size 4 --depth 4 --dim 192 --batch-size 64 --device cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from evaluations.features import spec_features  # noqa: E402
from evaluations.finetune import FinetuneConfig, FinetuneNet, Finetuner  # noqa: E402
from evaluations.linear import RECIPES, LinearProbe  # noqa: E402
from harness.api import StepState  # noqa: E402
from harness.config import TrainConfig  # noqa: E402
from harness.optim import build_optimizer  # noqa: E402
from harness.train import autocast_dtype, optimisation_step  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def _train_steps(model, optimizer_name: str, batch, t: TrainConfig, device, steps: int, warmup: int) -> float:
    opt = build_optimizer(optimizer_name, model.param_groups(), t.lr, t.weight_decay, device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    state = StepState(step=0, epoch=0, iters_per_epoch=1, total_steps=1, lr=t.lr, weight_decay=t.weight_decay,
                      momentum=0.0)
    amp = autocast_dtype("auto", device)
    return _timed(lambda: optimisation_step(model, model, opt, scaler, t, state, batch, amp), steps, warmup, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_tiny_patch16_224")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--patch-size", type=int, default=4)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--heads", type=int, default=8, help="lrs swept at once by the probe")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    kwargs = {"img_size": args.img_size, "patch_size": args.patch_size}
    if args.depth:
        kwargs["depth"] = args.depth
    if args.dim:
        kwargs.update(embed_dim=args.dim, num_heads=max(1, args.dim // 64))
    build = lambda dp=0.0: timm.create_model(args.arch, pretrained=False, num_classes=0, drop_path_rate=dp,  # noqa: E731
                                             **kwargs).to(device)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device).to(memory_format=fmt)
    y = torch.randint(0, args.classes, (args.batch_size,), device=device)
    amp = autocast_dtype("auto", device)
    out: dict[str, float | str] = {"arch": args.arch, "device": str(device), "batch_size": args.batch_size}

    backbone = build().eval().requires_grad_(False)

    def extract():
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return spec_features(backbone, x, "cls")

    out["extract_img_per_s"] = args.batch_size / _timed(extract, args.steps, args.warmup, device)
    feats = extract().float().clone()
    t = TrainConfig(epochs=1, batch_size=args.batch_size, blr=1.0, lr_batch_denom=args.batch_size, weight_decay=0.0)
    for n in (1, args.heads):
        probe = LinearProbe(None, feats.shape[1], args.classes, RECIPES["dino"], tuple([0.01] * n)).to(device)
        out[f"probe_steps_per_s_{n}_heads"] = 1 / _train_steps(probe, "sgd", (feats, y), t, device, args.steps * 5,
                                                               args.warmup)
    cfg = FinetuneConfig(preset="mae", mixup=0.8, cutmix=1.0)
    ft = Finetuner(FinetuneNet(build(0.1).train(), "avg", args.classes).to(device), cfg, args.classes)
    t_ft = TrainConfig(epochs=1, batch_size=args.batch_size, blr=5e-4, weight_decay=0.05)
    out["finetune_img_per_s"] = args.batch_size / _train_steps(ft, "adamw", (x, y), t_ft, device, args.steps,
                                                               args.warmup)
    if device.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
