"""The self-distillation family under DDP: two CPU processes (gloo), spawned with torch.multiprocessing.

- ``Center.update`` all-reduces: ranks with different batches end with the same center, equal to what
  one process computes on the concatenation of both ranks' rows (DINO ``update_center``).
- A DINO training step through DDP (the harness loop body: forward via DDP, backward, per-parameter
  clipping, freeze-last-layer, AdamW, EMA) leaves both ranks with identical student and teacher weights
  and centers, although each rank saw different images.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from harness.api import StepState
from harness.config import resolve
from harness.distributed import destroy, init_distributed
from harness.train import clip_gradients
from methods.dino import DINO
from methods.teacher import Center
from tests.helpers import DINO_PLUMBING

WORLD = 2
K = 16


def _rows(rank: int) -> torch.Tensor:
    # Different per rank (values and seed), same count: as DINO's equal per-GPU batches.
    return torch.randn(6, K, generator=torch.Generator().manual_seed(100 + rank)) * (rank + 1)


def _batch(model: DINO, rank: int, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    cfg = model.cfg
    sizes = [cfg.img_size] * 2 + [cfg.local_size] * cfg.local_crops_number
    return [torch.randn(4, 3, s, s, generator=g) for s in sizes]


def _worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    info = init_distributed()  # gloo on CPU
    assert info.world_size == WORLD and info.rank == rank
    try:
        # 1. Center.update all-reduces the batch mean.
        center = Center((1, K), momentum=0.9)
        center.update(_rows(rank))

        # 2. DINO steps through DDP, as harness.train.PretrainRun._step runs them.
        train, cfg, _ = resolve(DINO, "tiny", {**DINO_PLUMBING, "clip_grad": 0.5})
        torch.manual_seed(0)  # same initial weights on every rank (the harness seeds the same way)
        model = DINO(cfg, train)
        ddp = DistributedDataParallel(model, broadcast_buffers=False)
        optimizer = torch.optim.AdamW(model.param_groups(), lr=1e-3, weight_decay=0.04)
        losses = []
        for step, epoch in enumerate((0, 1)):  # epoch 0: last layer frozen; epoch 1: trained
            st = StepState(step=step, epoch=epoch, iters_per_epoch=1, total_steps=2, lr=1e-3, weight_decay=0.04,
                           momentum=0.9, world_size=WORLD)
            torch.manual_seed(7 * rank + step)  # drop-path masks differ per rank, as in the harness
            out = ddp(_batch(model, rank, step), st)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            clip_gradients([p for p in model.parameters() if p.requires_grad], train.clip_grad, train.clip_mode)
            model.on_before_optimizer_step(st)
            optimizer.step()
            model.after_step(st)
            losses.append(float(out["loss"].detach()))
        torch.save({"center": center.center, "rows": _rows(rank), "losses": losses,
                    "student": model.student.state_dict(), "teacher": model.teacher.state_dict(),
                    "dino_center": model.loss.center.center}, Path(folder) / f"rank{rank}.pt")
    finally:
        destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_center_all_reduce_and_dino_step_keep_ranks_identical(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))

    # Center: identical on both ranks, = one process on the concatenated rows.
    assert not torch.equal(r0["rows"], r1["rows"])
    assert torch.equal(r0["center"], r1["center"])
    single = Center((1, K), momentum=0.9)
    single.update(torch.cat([r0["rows"], r1["rows"]]))
    assert torch.allclose(r0["center"], single.center, atol=1e-6)
    assert torch.allclose(r0["center"], 0.1 * torch.cat([r0["rows"], r1["rows"]]).mean(0, keepdim=True), atol=1e-6)

    # DINO step: different data (different losses), same weights and centers afterwards.
    assert r0["losses"] != r1["losses"]
    for net in ("student", "teacher"):
        a, b = r0[net], r1[net]
        assert a.keys() == b.keys()
        diff = {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.equal(a[k], b[k])}
        assert not diff or max(diff.values()) < 1e-6, f"{net} differs across ranks: {diff}"
    assert torch.allclose(r0["dino_center"], r1["dino_center"], atol=1e-7)
    assert r0["dino_center"].abs().sum() > 0
    # ... and training did move them: the student changed, the teacher followed it by EMA.
    torch.manual_seed(0)
    train, cfg, _ = resolve(DINO, "tiny", {**DINO_PLUMBING, "clip_grad": 0.5})
    init = DINO(cfg, train).student.state_dict()
    moved = [k for k in init if not torch.equal(init[k], r0["student"][k])]
    assert "backbone.cls_token" in moved and "head.last_layer.parametrizations.weight.original1" in moved
