"""Training curves in TensorBoard, beside each training stage's ``metrics.jsonl`` (``<stage>/tb``).

Rank 0 writes what the loop already read at its log interval (loss terms, lr, weight decay, img/s,
the method's own schedule values such as the teacher momentum and temperature): no extra host sync.
A resumed run writes into the same folder with ``purge_step`` = the resumed step + 1, so TensorBoard
drops anything the interrupted run logged after its checkpoint: one curve, no duplicate or backwards
steps. The cell's key settings go in as hparams, so the HParams tab compares cells and seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.api import StepState

TB_DIR = "tb"
_KEY_SETTINGS = ("epochs", "batch_size", "blr", "weight_decay", "warmup_epochs", "precision")


class TrainingCurves:
    def __init__(self, log_dir: Path, resumed_from_step: int | None, hparams: dict[str, Any] | None,
                 method_scalars=None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported here: rank 0 of a training stage only

        self.method_scalars = method_scalars  # StepState -> {tag: float}, host-side values
        self.writer = SummaryWriter(str(log_dir), purge_step=None if resumed_from_step is None
                                    else resumed_from_step + 1)
        if hparams and resumed_from_step is None:
            from torch.utils.tensorboard.summary import hparams as hparams_summary

            for summary in hparams_summary(hparams, {"train/loss": None}):
                self.writer.file_writer.add_summary(summary)

    @classmethod
    def for_run(cls, run: Any) -> TrainingCurves:
        """The curves of a ``TrainRun`` (its stage folder, resume step, cell settings, and the method's own
        scalars when the model is a method plugin; an evaluation's model has none)."""
        spec = run.spec
        hparams = {"method": spec.method, "preset": spec.preset, "seed": spec.seed, "backbone": spec.backbone,
                   "cell_id": spec.cell_id, "lr": run.train.lr,
                   **{k: getattr(run.train, k) for k in _KEY_SETTINGS}}
        hparams.update({f"override/{k}": v for k, v in spec.overrides.items()})
        return cls(run.stage_dir / TB_DIR, run.resumed_from_step, _plain(hparams),
                   getattr(run.model, "curve_scalars", None))

    def log(self, entry: dict[str, Any], state: StepState) -> None:
        """One log interval: ``entry`` is the metrics.jsonl line (its loss terms averaged over the interval),
        ``state`` the schedules at the interval's last step."""
        step = int(entry["step"])
        scalars = {k if k.startswith("health/") else f"train/{k}": v for k, v in entry.items()
                   if k not in {"step", "epoch", "lr", "img_per_s"}}
        scalars.update({"opt/lr": entry["lr"], "opt/weight_decay": state.weight_decay,
                        "perf/img_per_s": entry["img_per_s"], "progress/epoch": entry["epoch"]})
        if self.method_scalars is not None:
            scalars.update(self.method_scalars(state))
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()  # a preempted job loses nothing it logged before its checkpoint

    def close(self) -> None:
        self.writer.close()


def _plain(values: dict[str, Any]) -> dict[str, int | float | str | bool]:
    """hparams take numbers, strings and booleans only."""
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in values.items()}
