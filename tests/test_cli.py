"""The repro command line: KEY=VALUE overrides, presets with their sources, a help line everywhere."""

from __future__ import annotations

import argparse

import pytest

from harness.cli import build_parser, main
from harness.config import resolve
from harness.errors import UserError
from harness.matrix import expand, parse_overrides
from methods.mae import MAE
from tests.helpers import write_spec

EXP = {"method": "mae", "preset": "tiny", "seeds": [0], "evaluations": ["knn"]}


def spec(tmp_path, data=None, **exp):
    return write_spec(tmp_path / "m.yaml", data or tmp_path / "data", tmp_path / "runs", [{**EXP, **exp}])


def test_overrides_are_typed_like_the_spec_and_part_of_the_identity(tmp_path):
    over = parse_overrides(["epochs=2", "blr=1e-3", "crop_scale=[0.3, 1.0]", "norm_pix_loss=false"])
    assert over == {"epochs": 2, "blr": "1e-3", "crop_scale": [0.3, 1.0], "norm_pix_loss": False}
    train, cfg, _ = resolve(MAE, "tiny", over)
    assert train.epochs == 2 and train.blr == 1e-3 and cfg.crop_scale == (0.3, 1.0) and cfg.norm_pix_loss is False
    plain = expand(spec(tmp_path)).cells[0].pretrain
    cli = expand(spec(tmp_path), overrides={"epochs": 2}).cells[0].pretrain
    in_spec = expand(spec(tmp_path, overrides={"epochs": 2})).cells[0].pretrain
    assert cli.cell_id != plain.cell_id and cli.cell_id == in_spec.cell_id  # hashed like the spec's overrides
    assert cli.recipe_deviations["epochs"] == [1600, 2]  # the report's deviation column shows it
    # On top of the experiment's own overrides, and winning over them.
    both = expand(spec(tmp_path, overrides={"epochs": 3, "mask_ratio": 0.5}), overrides={"epochs": 2})
    assert both.cells[0].pretrain.overrides == {"epochs": 2, "mask_ratio": 0.5}


@pytest.mark.parametrize(("argv", "message"), [
    (["epoch=2"], "command-line.epoch: unknown setting for method 'mae'"),
    (["epochs=two"], "command-line.epochs: expects an integer, got 'two'"),
    (["blr=fast"], "command-line.blr: expects a number, got 'fast'"),
    (["norm_pix_loss=1"], "command-line.norm_pix_loss: expects true or false"),
    (["lr_schedule=linear"], "command-line.lr_schedule: must be one of 'cosine', 'half_cycle'"),
    (["crop_scale=[0.3]"], "command-line.crop_scale: expects 2 values"),
    (["epochs"], "override 'epochs': must be KEY=VALUE"),
])
def test_bad_overrides_are_one_line_exit_2(tmp_path, capsys, argv, message):
    assert main(["launch", str(spec(tmp_path)), "--dry-run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_dry_run_applies_overrides_given_before_or_after_options(tmp_path, capsys, tiny_data):
    path = spec(tmp_path, tiny_data / "synthetic")  # a dry run checks the data as launch does
    cell = expand(path, overrides={"epochs": 2, "batch_size": 32}).cells[0].pretrain.cell_id
    assert main(["launch", str(path), "epochs=2", "--dry-run", "batch_size=32"]) == 0
    assert f"{cell}/pretrain" in capsys.readouterr().out


def test_methods_shows_every_value_with_its_source_and_marks_paper_deviations(capsys):
    assert main(["methods", "mae", "vit_base"]) == 0
    out = capsys.readouterr().out
    assert "this preset is the paper recipe" in out
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    assert lines["epochs"] == ["1600", "", lines["epochs"][2]] and "MAE paper" in lines["epochs"][2]
    assert lines["mask_ratio"][0] == "0.75" and "mask_ratio 0.75" in lines["mask_ratio"][2]
    assert lines["eps"] == ["1e-08", "", "default of TrainConfig"]
    assert lines["(lr)"][0] == "0.0024"  # 1.5e-4 * 4096 / 256
    assert main(["methods", "mae", "tiny"]) == 0
    tiny = capsys.readouterr().out
    assert "derives from the paper recipe 'vit_base'" in tiny
    assert any(line.startswith("| epochs ") and "* 1600" in line for line in tiny.splitlines())
    assert main(["methods", "mae", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: preset: unknown preset 'nope'")


def test_every_subcommand_and_argument_has_a_help_line():
    def walk(parser: argparse.ArgumentParser, where: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, f"{where} {choice.dest}"
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{where} {name}")
            elif not isinstance(action, argparse._HelpAction):
                yield where, action

    missing = [f"{where} {a.dest}" for where, a in walk(build_parser(), "repro") if not a.help]
    assert missing == []


def test_spec_snapshot_setting_is_checked(tmp_path):
    path = spec(tmp_path)
    path.write_text(path.read_text() + "snapshot: maybe\n")
    with pytest.raises(UserError, match="^snapshot: must be true or false"):
        expand(path)
