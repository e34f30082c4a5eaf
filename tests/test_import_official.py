"""Released weights evaluated beside our reproductions: the 'checkpoint:' key of an experiment."""

from __future__ import annotations

import pytest
import torch

from harness.errors import UserError
from harness.launch import launch
from harness.matrix import expand
from harness.records import read_record
from methods.mae import MAE
from tests.helpers import write_spec


def _mae_release(path, drop: str | None = None):
    """A checkpoint in the layout of MAE's visualisation release: {"model": encoder + decoder}."""
    cfg = MAE.config_cls(vit="pico", img_size=32, patch_size=4, decoder_embed_dim=32, decoder_depth=1,
                         decoder_num_heads=4)
    model = MAE(cfg, train=None)
    state = {**model.encoder.state_dict(),
             **{k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}}
    if drop:
        state.pop(drop)
    torch.save({"model": state, "epoch": 1599}, path)
    return model


def test_released_weights_are_imported_and_evaluated(tmp_path, tiny_data):
    model = _mae_release(tmp_path / "mae_release.pth")
    spec = write_spec(tmp_path / "s.yaml", tiny_data / "digits", tmp_path / "runs",
                      [{"method": "mae", "preset": "tiny", "checkpoint": "mae_release.pth", "evaluations": ["knn"]}])
    matrix = expand(spec)
    result = launch(matrix, "local")
    assert not result.failed, result.failed
    pre, knn = matrix.cells[0].stages
    rec = read_record(pre.stage_dir)
    assert rec["protocol"] == "import" and rec["preset"] == "tiny (official weights)"
    assert rec["checkpoint"]["path"].endswith("mae_release.pth") and len(rec["checkpoint"]["sha256"]) == 64
    assert rec["recipe_deviations"] == {}
    from harness.export import load_export

    vit, _, _ = load_export(f"{pre.stage_dir}/export")
    assert torch.equal(vit.state_dict()["blocks.0.attn.qkv.weight"], model.encoder.blocks[0].attn.qkv.weight)
    assert read_record(knn.stage_dir)["status"] == "done"


def test_a_release_that_does_not_fit_is_a_one_line_error(tmp_path, tiny_data):
    _mae_release(tmp_path / "broken.pth", drop="blocks.1.mlp.fc1.weight")
    spec = write_spec(tmp_path / "s.yaml", tiny_data / "digits", tmp_path / "runs",
                      [{"method": "mae", "preset": "tiny", "checkpoint": "broken.pth"}])
    matrix = expand(spec)
    result = launch(matrix, "local")
    (error,) = result.failed.values()
    assert error.startswith("UserError: checkpoint:") and "missing backbone keys blocks.1.mlp.fc1.weight" in error
    with pytest.raises(UserError, match=r"^experiments\[0\]\.checkpoint: .* does not exist"):
        expand(write_spec(tmp_path / "t.yaml", tiny_data / "digits", tmp_path / "runs",
                          [{"method": "mae", "preset": "tiny", "checkpoint": "absent.pth"}]))
