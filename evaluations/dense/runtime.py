"""The parts of an mmengine config that segmentation and detection share: optimizer, hooks, environment."""

from __future__ import annotations

from typing import Any

from evaluations.dense.openmmlab import CONSTRUCTOR


def optim_wrapper(lr: float, weight_decay: float, betas: tuple[float, float], layer_decay: float,
                  amp: bool) -> dict[str, Any]:
    """AdamW over the layer-decay groups; bf16 autocast on GPU (the papers ran apex fp16)."""
    wrapper: dict[str, Any] = dict(type="AmpOptimWrapper", dtype="bfloat16") if amp else dict(type="OptimWrapper")
    return wrapper | dict(optimizer=dict(type="AdamW", lr=lr, betas=tuple(betas), weight_decay=weight_decay),
                          constructor=CONSTRUCTOR, paramwise_cfg=dict(layer_decay=layer_decay))


def warmup(ratio: float, iters: int) -> dict[str, Any]:
    """Linear warm-up by iteration, chained with the main schedule (mmengine multiplies their factors, as
    mmcv 1.x applied warm-up on top of its policy)."""
    return dict(type="LinearLR", start_factor=ratio, by_epoch=False, begin=0, end=iters)


def runtime(work_dir: str, seed: int, scope: str, log_interval: int, checkpoint_interval: int, by_epoch: bool,
            visualizer: str) -> dict[str, Any]:
    """Hooks, environment and logging. Checkpoints keep the last two (``resume=True`` reads the newest)."""
    return dict(
        val_cfg=dict(type="ValLoop"),
        test_cfg=dict(type="TestLoop"),
        default_scope=scope,
        work_dir=work_dir,
        randomness=dict(seed=seed, deterministic=False),
        env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="nccl")),
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=log_interval, log_metric_by_epoch=by_epoch),
            param_scheduler=dict(type="ParamSchedulerHook"),
            checkpoint=dict(type="CheckpointHook", by_epoch=by_epoch, interval=checkpoint_interval,
                            max_keep_ckpts=2, save_last=True),
            sampler_seed=dict(type="DistSamplerSeedHook"),
        ),
        log_processor=dict(by_epoch=by_epoch),
        log_level="INFO",
        visualizer=dict(type=visualizer, vis_backends=[dict(type="LocalVisBackend")]),
        load_from=None,
        resume=False,
    )
