"""Throughput and peak memory of one pre-training step, per method x preset x batch size.

Runs the body of the generic loop (``harness.train.PretrainRun._step``: schedules -> forward under
autocast -> backward -> clipping -> ``on_before_optimizer_step`` -> AdamW -> ``after_step``) on random
inputs shaped like the method's transform output, so the numbers cover the model, the loss and the
optimiser but not data loading. GPU: bf16 autocast (precision "auto") and fused AdamW, as the loop;
the device is synchronised only around the timed region. Peak memory: CUDA max allocated on GPU, the
process's max RSS on CPU (each configuration runs in its own subprocess unless --in-process).

    python benchmarks/pretrain_step.py --methods mae dino --presets tiny --batch-sizes 64 --steps 10 --device cpu

Methods come from the registry, so new plugins are picked up without changes here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness.api import METHODS, Method, StepState  # noqa: E402
from harness.config import resolve  # noqa: E402
from harness.train import Schedules, autocast_dtype, optimisation_step, to_device  # noqa: E402


def _random_like(x: Any, gen: torch.Generator) -> Any:
    """Random values in the collated structure: floating tensors get N(0, 1), others are kept (masks)."""
    if isinstance(x, torch.Tensor):
        return torch.randn(x.shape, generator=gen, dtype=x.dtype) if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_random_like(v, gen) for v in x)
    if isinstance(x, dict):
        return {k: _random_like(v, gen) for k, v in x.items()}
    return x


def make_batch(method_cls: type[Method], cfg: Any, batch_size: int, seed: int = 0) -> Any:
    """One real transform output (from a random 320x320 image), collated to ``batch_size`` and filled
    with random values: the shapes and structure (lists of crops, masks) the loader would give."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (320, 320, 3), dtype=np.uint8))
    sample = method_cls.build_transform(cfg)(img)
    return _random_like(default_collate([sample] * batch_size), torch.Generator().manual_seed(seed))


def _shapes(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return "x".join(map(str, x.shape))
    if isinstance(x, (list, tuple)):
        shapes = [_shapes(v) for v in x]
        # collapse runs of equal shapes: "2 x 64x3x224x224"
        out, i = [], 0
        while i < len(shapes):
            j = i
            while j < len(shapes) and shapes[j] == shapes[i]:
                j += 1
            out.append(f"{j - i}*{shapes[i]}" if j - i > 1 else shapes[i])
            i = j
        return "[" + ", ".join(map(str, out)) + "]"
    if isinstance(x, dict):
        return {k: _shapes(v) for k, v in x.items()}
    return type(x).__name__


def bench(method: str, preset: str, batch_size: int, steps: int, warmup: int, device: torch.device,
          precision: str | None = None) -> dict[str, Any]:
    method_cls = METHODS.get(method, "method")
    overrides: dict[str, Any] = {"batch_size": batch_size}
    if precision:
        overrides["precision"] = precision
    t, cfg, _ = resolve(method_cls, preset, overrides)
    torch.manual_seed(0)
    model = method_cls(cfg, t).to(device)
    model.train()
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.param_groups(), lr=t.lr, betas=t.betas, eps=t.eps,
                                  weight_decay=t.weight_decay, fused=fused)
    amp = autocast_dtype(t.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    batch = to_device(make_batch(method_cls, cfg, batch_size), device)
    # Time steps in the middle of training: past the warm-ups and the freeze-last-layer epochs.
    ipe = warmup + steps
    sched = Schedules.build(t, ipe)
    epoch = t.epochs // 2
    params = [p for p in model.parameters() if p.requires_grad]

    def step(i: int) -> torch.Tensor:
        s = epoch * ipe + i
        st = StepState(step=s, epoch=epoch, iters_per_epoch=ipe, total_steps=t.epochs * ipe, lr=float(sched.lr[s]),
                       weight_decay=float(sched.wd[s]), momentum=float(sched.momentum[s]))
        return optimisation_step(model, model, optimizer, scaler, t, st, batch, amp)["loss"]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    losses = [step(warmup + i) for i in range(steps)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "host_max_rss"
    final = float(losses[-1])
    return {"method": method, "preset": preset, "backbone": method_cls.backbone_label(cfg),
            "batch_size": batch_size, "device": str(device), "precision": str(amp).replace("torch.", "") if amp
            else "fp32", "steps": steps, "seconds": elapsed, "img_per_s": batch_size * steps / elapsed,
            "ms_per_step": 1000 * elapsed / steps, "peak_mem_mb": peak, "peak_mem_kind": kind,
            "params_m": sum(p.numel() for p in params) / 1e6, "final_loss": final,
            "input": _shapes(batch), "threads": torch.get_num_threads()}


def _configs(args) -> list[tuple[str, str, int]]:
    methods = args.methods or METHODS.names()
    out = []
    for m in methods:
        cls = METHODS.get(m, "method")
        presets = args.presets or sorted(cls.presets)
        for p in presets:
            if p not in cls.presets:
                print(f"# skip {m}/{p}: no such preset (has {', '.join(sorted(cls.presets))})", file=sys.stderr)
                continue
            for b in args.batch_sizes or [resolve(cls, p, {})[0].batch_size]:
                out.append((m, p, b))
    return out


def _row(r: dict[str, Any]) -> str:
    return (f"{r['method']:<8} {r['preset']:<10} {r['backbone']:<14} {r['batch_size']:>6} {r['precision']:>5} "
            f"{r['img_per_s']:>10.1f} {r['ms_per_step']:>10.1f} {r['peak_mem_mb']:>10.0f} {r['peak_mem_kind']:<19} "
            f"{r['params_m']:>8.2f}  {r['input']}")


HEADER = (f"{'method':<8} {'preset':<10} {'backbone':<14} {'batch':>6} {'prec':>5} {'img/s':>10} {'ms/step':>10} "
          f"{'peak MiB':>10} {'peak kind':<19} {'params M':>8}  input")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="*", help="registered method names (default: all)")
    ap.add_argument("--presets", nargs="*", help="preset names (default: every preset of each method)")
    ap.add_argument("--batch-sizes", nargs="*", type=int, help="per-process batch sizes (default: the preset's)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], help="override the preset's")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--in-process", action="store_true", help="run every configuration in this process")
    ap.add_argument("--json", type=Path, help="also write the results here (JSON lines)")
    ap.add_argument("--single", nargs=3, metavar=("METHOD", "PRESET", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args.single:  # child of the isolated mode: one configuration, one JSON line on stdout
        m, p, b = args.single
        print("RESULT " + json.dumps(bench(m, p, int(b), args.steps, args.warmup, device, args.precision)))
        return 0

    print(HEADER, flush=True)
    results = []
    for m, p, b in _configs(args):
        try:
            if args.in_process:
                r = bench(m, p, b, args.steps, args.warmup, device, args.precision)
            else:
                r = _isolated(m, p, b, args)
        except Exception as e:  # noqa: BLE001 - report and go on with the other configurations
            msg = str(e).strip().splitlines()
            print(f"{m:<8} {p:<10} {'':<14} {b:>6} FAILED: {msg[-1] if msg else type(e).__name__}", flush=True)
            continue
        results.append(r)
        print(_row(r), flush=True)
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in results))
    return 0


def _isolated(method: str, preset: str, batch: int, args) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--single", method, preset, str(batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
    if args.precision:
        cmd += ["--precision", args.precision]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    raise RuntimeError(tail[-1] if tail else f"exit code {proc.returncode}")


if __name__ == "__main__":
    raise SystemExit(main())
