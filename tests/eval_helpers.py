"""EvalInputs for evaluation tests: a real stage folder, one process, any backbone."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from harness.api import EvalInputs, FeatureSpec
from harness.distributed import DistInfo
from harness.matrix import StageSpec


class IdentityBackbone(nn.Module):
    """Raw pixels as features: ``forward_features`` flattens the image."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def eval_inputs(tmp: Path, data_root: Path, backbone: nn.Module, stage: str = "linear", seed: int = 0,
                feature_spec: FeatureSpec | None = None, img_size: int = 32, build=None) -> EvalInputs:
    stage_dir = tmp / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    spec = StageSpec(stage=stage, cell_id="c0", stage_id=f"s-{stage}", method="test", preset="tiny", seed=seed,
                     overrides={}, data_root=str(data_root), stage_dir=str(stage_dir), pretrain_dir=str(tmp / "pre"))
    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    return EvalInputs(backbone=backbone.eval(), feature_spec=feature_spec or FeatureSpec(), data_root=Path(data_root),
                      img_size=img_size, device=dist.device, num_workers=0, seed=seed, stage_dir=stage_dir,
                      spec=spec, dist=dist, build_backbone=build, export_sha256="identity",
                      cache_dir=tmp / "feature_cache")
