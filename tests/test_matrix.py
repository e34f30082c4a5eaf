"""Matrix specs: expansion, identity, and one-line errors for bad input."""

from __future__ import annotations

import pytest

from harness.errors import UserError
from harness.matrix import expand
from tests.helpers import write_spec

EXP = {"method": "mae", "preset": "tiny", "seeds": [0, 1], "evaluations": ["knn"], "floor": False}


def spec(tmp_path, experiments, **kw):
    return write_spec(tmp_path / "m.yaml", tmp_path / "data", tmp_path / "runs", experiments, **kw)


def test_expansion_gives_cells_per_seed_with_stages(tmp_path):
    m = expand(spec(tmp_path, [EXP]))
    assert [c.pretrain.seed for c in m.cells] == [0, 1]
    assert [[s.stage for s in c.stages] for c in m.cells] == [["pretrain", "knn"]] * 2
    knn = m.cells[0].evaluations[0]
    assert knn.protocol == "knn@k20,T0.07" and knn.headline_metric == "top1"
    assert knn.pretrain_dir == m.cells[0].pretrain.stage_dir


def test_cell_id_is_a_hash_of_the_resolved_config(tmp_path):
    a = expand(spec(tmp_path, [EXP])).cells[0].pretrain.cell_id
    assert expand(spec(tmp_path, [EXP])).cells[0].pretrain.cell_id == a  # stable
    # An override equal to the preset's value resolves to the same config: same cell.
    same = expand(spec(tmp_path, [{**EXP, "overrides": {"epochs": 20}}])).cells[0].pretrain.cell_id
    assert same == a
    other = expand(spec(tmp_path, [{**EXP, "overrides": {"epochs": 21}}])).cells[0].pretrain.cell_id
    assert other != a
    # Bookkeeping (workers, logging) does not change what is computed, nor the identity.
    quiet = expand(spec(tmp_path, [{**EXP, "overrides": {"num_workers": 0, "log_every": 1}}]))
    assert quiet.cells[0].pretrain.cell_id == a


def test_duplicate_cells_are_merged(tmp_path):
    m = expand(spec(tmp_path, [EXP, {**EXP, "seeds": [1, 2]}]))
    assert [c.pretrain.seed for c in m.cells] == [0, 1, 2]


def test_deviations_from_the_paper_recipe(tmp_path):
    p = expand(spec(tmp_path, [EXP])).cells[0].pretrain
    assert p.paper_recipe == "vit_base"
    assert p.recipe_deviations["epochs"] == [1600, 20]
    assert p.recipe_deviations["batch_size"] == [4096, 32]
    assert p.recipe_deviations["mask_ratio"] == [0.75, 0.5]
    assert "num_workers" not in p.recipe_deviations and "norm_pix_loss" not in p.recipe_deviations
    paper = expand(spec(tmp_path, [{**EXP, "preset": "vit_base"}])).cells[0].pretrain
    # The preset runs bf16 where MAE's recipe is fp16 + GradScaler: a deviation, though the preset is the paper's.
    assert paper.recipe_deviations == {"precision": ["fp16", "bf16"]}
    assert paper.backbone == "ViT-B/16" and paper.epochs == 1600


@pytest.mark.parametrize(("exp", "field"), [
    ({**EXP, "method": "nope"}, "experiments[0].method"),
    ({**EXP, "preset": "nope"}, "experiments[0].preset"),
    ({**EXP, "evaluations": ["nope"]}, "experiments[0].evaluations"),
    ({**EXP, "overrides": {"epoch": 3}}, "experiments[0].overrides.epoch"),
    ({**EXP, "overrides": {"batch_size": 0}}, "overrides.batch_size"),
    ({**EXP, "overrides": {"epochs": -1}}, "overrides.epochs"),
    ({**EXP, "overrides": {"mask_ratio": 1.5}}, "overrides.mask_ratio"),
    ({**EXP, "seeds": [-1]}, "experiments[0].seeds"),
    ({**EXP, "eval_overrides": {"knn": {"ks": [0]}}}, "knn.ks"),
    ({**EXP, "eval_overrides": {"knn": {"k": [10]}}}, "experiments[0].eval_overrides.knn.k"),
    ({"preset": "tiny"}, "experiments[0].method"),
])
def test_bad_fields_are_named(tmp_path, exp, field):
    with pytest.raises(UserError) as err:
        expand(spec(tmp_path, [exp]))
    msg = str(err.value)
    assert msg.startswith(field + ":"), msg
    assert "\n" not in msg and ";" in msg  # one line, with a fix


def test_malformed_yaml_and_missing_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiments: [\n  - method: mae\n")
    with pytest.raises(UserError, match=r"^spec: .* not valid YAML at line"):
        expand(bad)
    with pytest.raises(UserError, match=r"^spec: .* does not exist"):
        expand(tmp_path / "absent.yaml")
    (tmp_path / "nodata.yaml").write_text("experiments: [{method: mae, preset: tiny}]\n")
    with pytest.raises(UserError, match=r"^data.pretrain: missing"):
        expand(tmp_path / "nodata.yaml")
    with pytest.raises(UserError, match=r"^resources.pretrain.gpus_per_node"):
        expand(spec(tmp_path, [EXP], resources={"pretrain": {"gpus_per_node": -1}}))
