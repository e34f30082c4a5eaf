"""Per-iteration schedules, precomputed as arrays (index = global step)."""

from __future__ import annotations

import math

import numpy as np


def cosine_schedule(base: float, final: float, epochs: int, iters_per_epoch: int,
                    warmup_epochs: float = 0, start_warmup: float = 0.0) -> np.ndarray:
    """DINO/iBOT/EsViT ``utils.cosine_scheduler``: linear warm-up from ``start_warmup`` to ``base``
    over ``warmup_epochs``, then cosine from ``base`` to ``final`` over the remaining iterations."""
    warmup_iters = int(warmup_epochs * iters_per_epoch)
    warmup = np.linspace(start_warmup, base, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(epochs * iters_per_epoch - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * iters_per_epoch
    return schedule


def half_cycle_schedule(base: float, final: float, epochs: int, iters_per_epoch: int,
                        warmup_epochs: float = 0, start_warmup: float = 0.0) -> np.ndarray:
    """MAE ``util/lr_sched.adjust_learning_rate``, evaluated at fractional epoch step/iters_per_epoch:
    linear warm-up from 0, then half-cycle cosine to ``final``. (``start_warmup`` is unused by MAE.)"""
    out = np.empty(epochs * iters_per_epoch)
    for step in range(len(out)):
        e = step / iters_per_epoch
        if e < warmup_epochs:
            out[step] = base * e / warmup_epochs
        else:
            t = (e - warmup_epochs) / (epochs - warmup_epochs)
            out[step] = final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * t))
    return out


def epoch_cosine_schedule(base: float, final: float, epochs: int, iters_per_epoch: int,
                          warmup_epochs: float = 0, start_warmup: float = 0.0) -> np.ndarray:
    """``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=epochs, eta_min=final)`` stepped once per epoch
    (DINO ``eval_linear.py``): constant within an epoch. Optional linear warm-up over whole epochs."""
    e = np.arange(epochs * iters_per_epoch) // iters_per_epoch
    out = final + 0.5 * (base - final) * (1 + np.cos(np.pi * e / epochs))
    if warmup_epochs:
        warm = e < warmup_epochs
        out[warm] = start_warmup + (base - start_warmup) * e[warm] / warmup_epochs
    return out


SCHEDULES = {"cosine": cosine_schedule, "half_cycle": half_cycle_schedule, "epoch_cosine": epoch_cosine_schedule}


def _after_step_updates(values: np.ndarray) -> np.ndarray:
    """timm ``Scheduler.step_update(g)`` runs after optimiser step g (SimMIM/ROPIM ``train_one_epoch``), so
    step g uses the value for g - 1; step 0 uses the initial (warm-up start) value."""
    return np.concatenate([values[:1], values[:-1]])


def timm_cosine_schedule(base: float, final: float, epochs: int, iters_per_epoch: int,
                         warmup_epochs: float = 0, start_warmup: float = 0.0) -> np.ndarray:
    """SimMIM/ROPIM ``lr_scheduler.build_scheduler`` "cosine": timm ``CosineLRScheduler(t_initial=all steps,
    warmup_t, warmup_lr_init, cycle_limit=1, t_in_epochs=False)``. Unlike ``cosine_schedule`` the cosine
    phase is not shifted by the warm-up: at step t >= warmup it is final + (base - final)(1 + cos(pi t / T)) / 2."""
    total, warmup = epochs * iters_per_epoch, int(warmup_epochs * iters_per_epoch)
    t = np.arange(total, dtype=np.float64)
    values = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / total))
    if warmup:
        values[:warmup] = start_warmup + t[:warmup] * (base - start_warmup) / warmup
    return _after_step_updates(values)


def multistep_schedule(base: float, final: float, epochs: int, iters_per_epoch: int,
                       warmup_epochs: float = 0, start_warmup: float = 0.0,
                       milestones: tuple[float, ...] = (), gamma: float = 0.1) -> np.ndarray:
    """SimMIM ``MultiStepLRScheduler`` (ViT-B 800-epoch recipe): linear warm-up from ``start_warmup``, then
    ``base * gamma ** (number of milestone epochs passed)``; ``final`` is unused."""
    total, warmup = epochs * iters_per_epoch, int(warmup_epochs * iters_per_epoch)
    t = np.arange(total, dtype=np.float64)
    steps = np.array([m * iters_per_epoch for m in milestones], dtype=np.float64)
    values = base * gamma ** np.searchsorted(steps, t, side="right")
    if warmup:
        values[:warmup] = start_warmup + t[:warmup] * (base - start_warmup) / warmup
    return _after_step_updates(values)


SCHEDULES.update(timm_cosine=timm_cosine_schedule, multistep=multistep_schedule)
