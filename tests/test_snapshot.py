"""Code snapshots at launch, the identity check at job start, and the code hash of records."""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
from pathlib import Path

import pytest

from harness import matrix as matrix_mod
from harness.api import METHODS, Cited
from harness.errors import UserError
from harness.launch import launch
from harness.matrix import expand, verify_identity
from harness.records import read_record, write_record
from harness.snapshot import MANIFEST, code_state, job_python, make_snapshot, project_root
from harness.stages import run_stage
from tests.helpers import write_spec

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]


def git_tree(root: Path) -> Path:
    """A small project: package folders, an ignored folder, committed."""
    for rel, text in {"harness/a.py": "A = 1\n", "methods/m.py": "M = 1\n", "README.md": "r\n",
                      ".gitignore": "/data/\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    subprocess.run([*GIT, "init", "-q"], cwd=root, check=True)
    subprocess.run([*GIT, "add", "-A"], cwd=root, check=True)
    subprocess.run([*GIT, "commit", "-qm", "init"], cwd=root, check=True)
    return root


def files_of(snapshot_dir: Path) -> set[str]:
    return {p.relative_to(snapshot_dir).as_posix() for p in snapshot_dir.rglob("*") if p.is_file()} - {MANIFEST}


def test_snapshot_is_content_addressed_reused_and_holds_uncommitted_code(tmp_path):
    root = git_tree(tmp_path / "repo")
    runs = tmp_path / "runs"
    clean = code_state(root, plugins=False)
    assert not clean.dirty and clean.commit and len(clean.commit) == 40
    first = make_snapshot(runs, clean)
    assert not first.reused and first.path == runs / "code" / clean.short
    assert files_of(first.path) == {"harness/a.py", "methods/m.py", "README.md", ".gitignore"}
    assert make_snapshot(runs, code_state(root, plugins=False)).reused  # same code, same folder

    (root / "methods/m.py").write_text("M = 2\n")  # an uncommitted edit
    (root / "methods/new.py").write_text("N = 1\n")  # a new module, not yet added
    (root / "notes.txt").write_text("outside the packages\n")
    (root / "data").mkdir()
    (root / "data/big.bin").write_bytes(b"0" * 100)  # ignored
    edited = code_state(root, plugins=False)
    assert edited.hash != clean.hash and edited.dirty and edited.commit == clean.commit
    second = make_snapshot(runs, edited)
    assert files_of(second.path) == {"harness/a.py", "methods/m.py", "methods/new.py", "README.md", ".gitignore"}
    assert (second.path / "methods/m.py").read_text() == "M = 2\n"
    manifest = json.loads((second.path / MANIFEST).read_text())
    assert manifest["hash"] == edited.short and manifest["dirty"] is True and manifest["commit"] == clean.commit
    assert "uncommitted changes included" in second.describe() and str(second.path) in second.describe()


def test_a_large_untracked_file_inside_a_package_is_refused(tmp_path):
    root = git_tree(tmp_path / "repo")
    (root / "methods/weights.npy").write_bytes(b"\0" * (6 * 2**20))
    with pytest.raises(UserError) as err:
        code_state(root, plugins=False)
    msg = str(err.value)
    assert msg.startswith("snapshot:") and "methods/weights.npy" in msg and "--no-snapshot" in msg
    assert "\n" not in msg


def test_a_job_started_with_the_snapshot_python_imports_the_snapshot_not_the_checkout(tmp_path):
    snap = make_snapshot(tmp_path / "runs")
    cmd = shlex.split(job_python(snap)) + ["-c", "import harness, methods; print(harness.__file__); "
                                                 "print(methods.__file__)"]
    # Started from inside the checkout, where a plain 'python -m ...' would import the working tree.
    out = subprocess.run(cmd, cwd=project_root(), capture_output=True, text=True, timeout=120, check=True)
    assert all(Path(line).is_relative_to(snap.path) for line in out.stdout.split()), out.stdout


def test_identity_check_names_the_settings_a_code_change_altered(tmp_path, monkeypatch):
    path = write_spec(tmp_path / "s.yaml", tmp_path / "data", tmp_path / "runs",
                      [{"method": "mae", "preset": "tiny", "evaluations": ["knn"]}])
    pre, knn = expand(path).cells[0].stages
    verify_identity(pre)  # same code: nothing to say
    verify_identity(knn)
    tiny = METHODS.get("mae").presets["tiny"]
    edited = dataclasses.replace(tiny, values={**tiny.values, "blr": Cited(3e-3, "edited after launch")})
    monkeypatch.setitem(METHODS.get("mae").presets, "tiny", edited)
    for stage in (pre, knn):  # an evaluation's id follows from its cell's
        with pytest.raises(UserError, match=r"^identity: .* launched with other settings .*: blr 0\.006→0\.003;"):
            verify_identity(stage)
    monkeypatch.setitem(METHODS.get("mae").presets, "tiny", tiny)
    monkeypatch.setattr(matrix_mod, "CODE_VERSION", matrix_mod.CODE_VERSION + 1)
    with pytest.raises(UserError, match=r"CODE_VERSION 1→2"):
        verify_identity(knn)


def test_a_stage_whose_config_changed_stops_before_any_compute(tmp_path, tiny_data, monkeypatch):
    path = write_spec(tmp_path / "s.yaml", tiny_data / "synthetic", tmp_path / "runs",
                      [{"method": "mae", "preset": "tiny", "overrides": {"epochs": 1}}])
    stage = expand(path).cells[0].pretrain
    monkeypatch.setattr(matrix_mod, "CODE_VERSION", matrix_mod.CODE_VERSION + 1)
    with pytest.raises(UserError):
        run_stage(stage)
    rec = read_record(stage.stage_dir)
    assert rec["status"] == "failed" and rec["error"].startswith("UserError: identity:")
    assert "CODE_VERSION 1→2" in rec["error"]
    assert not (Path(stage.stage_dir) / "ckpt").exists() and not (Path(stage.stage_dir) / "metrics.jsonl").exists()


def test_relaunch_counts_finished_records_from_other_code_without_rerunning_them(tmp_path, tiny_data):
    path = write_spec(tmp_path / "s.yaml", tiny_data / "synthetic", tmp_path / "runs",
                      [{"method": "mae", "preset": "tiny", "seeds": [0, 1, 2]}])
    matrix = expand(path)
    current = code_state().short
    for stage, code in zip(matrix.stages(), [{"hash": current}, {"hash": "0123456789ab"}, None], strict=True):
        write_record(stage.stage_dir, {"cell_id": stage.cell_id, "stage_id": stage.stage_id, "stage": stage.stage,
                                       "status": "done", "method": "mae", "preset": "tiny", "backbone": "b",
                                       "epochs": 4, "evaluation": None, "protocol": "pretrain", "metrics": {},
                                       "seed": stage.seed, **({"code": code} if code else {})})
    result = launch(matrix, "slurm")  # everything is done: nothing is submitted, nothing snapshotted
    assert result.submitted == {} and result.snapshot is None and len(result.skipped_done) == 3
    assert result.code_hash == current and result.other_code == [s.key for s in matrix.stages()[1:]]


def test_report_shows_the_code_hash_per_row_on_request():
    import pandas as pd

    from reports import comparison_table, expected_frame, load_paper_numbers, with_code_column

    common = dict(method="mae", preset="tiny", backbone="b", epochs=4, paper_recipe=None, recipe_deviations={},
                  stage="pretrain", evaluation=None, protocol=None, headline_metric=None)
    rows = [dict(common, cell_id=f"c{s}", stage_id=f"c{s}", seed=s) for s in (0, 1)]
    records = pd.DataFrame([dict(r, status="done", code=code, created_at="t")
                            for r, code in zip(rows, [{"hash": "aaa", "dirty": True}, None], strict=True)])
    table = comparison_table(expected_frame(rows), records, load_paper_numbers())
    assert "code" not in table.columns
    assert list(with_code_column(table, expected_frame(rows), records)["code"]) == ["aaa+dirty, unknown"]


def test_an_editable_plugin_is_snapshotted_and_imported_from_the_snapshot(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "outside_pkg").mkdir(parents=True)
    (site / "outside_pkg" / "__init__.py").write_text("VALUE = 1\n")
    dist = site / "outside_pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: outside-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ssl_repro.methods]\noutside = outside_pkg\n")
    (dist / "direct_url.json").write_text(json.dumps({"url": site.as_uri(), "dir_info": {"editable": True}}))
    monkeypatch.syspath_prepend(str(site))
    state = code_state()
    assert [t.name for t in state.trees] == ["ssl-repro", "plugins/outside-pkg"]
    assert state.trees[1].files == ("outside_pkg/__init__.py",) and state.summary()["plugins"] == ["outside-pkg"]
    snap = make_snapshot(tmp_path / "runs", state)
    (site / "outside_pkg" / "__init__.py").write_text("VALUE = 2\n")  # edited after the launch
    monkeypatch.setenv("PYTHONPATH", str(site))  # where the plugin is installed
    cmd = shlex.split(job_python(snap)) + ["-c", "import outside_pkg; print(outside_pkg.VALUE, outside_pkg.__file__)"]
    value, where = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert value == "1" and Path(where).is_relative_to(snap.path / "plugins" / "outside-pkg")


def test_without_a_snapshot_a_large_untracked_file_is_left_out_of_the_code_hash(tmp_path):
    root = git_tree(tmp_path / "repo")
    clean = code_state(root, plugins=False)
    (root / "methods/weights.npy").write_bytes(b"\0" * (6 * 2**20))
    assert code_state(root, plugins=False, strict=False).hash == clean.hash
