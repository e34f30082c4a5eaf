"""Code snapshots: the code a launch ran, frozen and content-addressed (after dora's ``git_save``).

A job may wait in a queue for days while its author keeps editing the repository. ``repro launch``
therefore copies the code it launches into ``<run folder>/code/<hash>/``: the project's tracked files
as they are in the working tree (uncommitted changes included), its untracked but not ignored files
inside the package folders, and the same for every method/evaluation plugin installed in editable
mode. The jobs start with that folder first on their import path, so what they import is what was
launched. The hash is over the files' contents, so a later launch of the same code reuses the folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from harness.atomic import write_json
from harness.errors import UserError

PACKAGES = ("harness", "methods", "evaluations", "reports")
PLUGIN_GROUPS = ("ssl_repro.methods", "ssl_repro.evaluations")
MAX_UNTRACKED_MB = 5  # an untracked file this large inside a package folder is data, not code
MANIFEST = "SNAPSHOT.json"
ENV_VAR = "SSL_REPRO_SNAPSHOT"  # set in a job's environment: the snapshot it was launched from
_SKIP_PARTS = {"__pycache__", ".git"}


@dataclass(frozen=True)
class SourceTree:
    """One importable source root: the project, or an editable plugin's package."""

    name: str  # "ssl-repro" or "plugins/<distribution>"
    root: Path  # the folder that goes on sys.path; files are relative to it
    files: tuple[str, ...]
    commit: str | None  # None outside a git checkout
    dirty: bool  # uncommitted changes or untracked files are part of the snapshot


@dataclass(frozen=True)
class CodeState:
    trees: tuple[SourceTree, ...]
    hash: str  # sha256 over every (tree, path, mode, content)
    size: int  # bytes

    @property
    def short(self) -> str:
        return self.hash[:12]

    @property
    def commit(self) -> str | None:
        return self.trees[0].commit

    @property
    def dirty(self) -> bool:
        return any(t.dirty for t in self.trees)

    def summary(self) -> dict[str, Any]:
        """What a record says about the code (``snapshot`` is filled in by the caller)."""
        return {"hash": self.short, "commit": self.commit, "dirty": self.dirty,
                "plugins": [t.name.removeprefix("plugins/") for t in self.trees[1:]]}


@dataclass(frozen=True)
class Snapshot:
    path: Path
    state: CodeState
    reused: bool

    def describe(self) -> str:
        n = sum(len(t.files) for t in self.state.trees)
        commit = (self.state.commit or "no git")[:10] + (", uncommitted changes included" if self.state.dirty else "")
        return (f"code snapshot {self.path} ({n} files, {self.state.size / 2**20:.1f} MiB; commit {commit})"
                + (" [reused]" if self.reused else ""))


def project_root() -> Path:
    """The folder the running ``harness`` package is imported from (a checkout or a snapshot)."""
    return Path(__file__).resolve().parent.parent


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _code_file(rel: str) -> bool:
    parts = rel.split("/")
    return not (_SKIP_PARTS & set(parts)) and not rel.endswith((".pyc", ".pyo"))


def source_tree(name: str, root: Path, packages: tuple[str, ...], strict: bool = True) -> SourceTree:
    """Tracked files of the checkout holding ``root`` (from the working tree, so uncommitted edits are
    in), plus untracked, not ignored files inside ``packages``; outside git, every file of ``packages``.
    A large untracked file inside a package is an error when ``strict``, else left out (it is data)."""
    root = root.resolve()
    # Run inside ``root``, ls-files lists the files below it, relative to it (also in a monorepo).
    tracked = _git(root, "ls-files", "-z", "--cached")
    # Not in git, or an installed copy that git does not track (a venv inside a checkout): the packages.
    if tracked is None or not any(f.split("/")[0] in packages for f in tracked.split("\0")):
        files = sorted(p.relative_to(root).as_posix() for pkg in packages if (root / pkg).is_dir()
                       for p in (root / pkg).rglob("*") if p.is_file())
        return SourceTree(name, root, tuple(f for f in files if _code_file(f)), None, False)
    tracked_files = set(filter(None, tracked.split("\0")))
    untracked = _git(root, "ls-files", "-z", "--others", "--exclude-standard") or ""
    extra = set()
    for rel in filter(None, untracked.split("\0")):
        if rel.split("/")[0] not in packages or not _code_file(rel):
            continue
        size = (root / rel).stat().st_size
        if size > MAX_UNTRACKED_MB * 2**20 and not strict:
            continue
        if size > MAX_UNTRACKED_MB * 2**20:
            raise UserError("snapshot", f"{root / rel} is an untracked {size / 2**20:.0f} MiB file inside the package "
                            f"folder {rel.split('/')[0]}/", "move data out of the package folders (or git-ignore "
                            "it), or launch with --no-snapshot")
        extra.add(rel)
    files = sorted(f for f in tracked_files | extra if (root / f).is_file() and _code_file(f))
    commit = (_git(root, "rev-parse", "HEAD") or "").strip() or None
    changed = bool((_git(root, "status", "--porcelain", "--untracked-files=no", "--", ".") or "").strip())
    return SourceTree(name, root, tuple(files), commit, changed or bool(extra))


def editable_plugins() -> list[tuple[str, Path, str]]:
    """(distribution, import root, top-level package) of each plugin installed in editable mode."""
    found: dict[tuple[str, str], Path] = {}
    for group in PLUGIN_GROUPS:
        for ep in entry_points(group=group):
            dist = ep.dist
            if dist is None or dist.metadata["Name"] == "ssl-repro":
                continue
            direct = json.loads(dist.read_text("direct_url.json") or "{}")
            if not direct.get("dir_info", {}).get("editable"):
                continue
            top = ep.value.split(":")[0].split(".")[0]
            spec = importlib.util.find_spec(top)
            if spec is None:
                continue
            where = Path(next(iter(spec.submodule_search_locations))) if spec.submodule_search_locations \
                else Path(spec.origin)
            found[(dist.metadata["Name"], top)] = where.parent
    return [(name, root, top) for (name, top), root in sorted(found.items())]


def code_state(root: Path | None = None, plugins: bool = True, strict: bool = True) -> CodeState:
    """The code this process imports, file by file, with its content hash (``strict``: see source_tree)."""
    root = root or project_root()
    trees = [source_tree("ssl-repro", root, PACKAGES, strict)]
    if plugins:
        for dist, plugin_root, top in editable_plugins():
            trees.append(source_tree(f"plugins/{dist}", plugin_root, (top,), strict))
    h, size = hashlib.sha256(), 0
    for tree in trees:
        for rel in tree.files:
            path = tree.root / rel
            data = path.read_bytes()
            size += len(data)
            executable = os.access(path, os.X_OK)
            h.update(f"{tree.name}\0{rel}\0{int(executable)}\0".encode())
            h.update(hashlib.sha256(data).digest())
    return CodeState(tuple(trees), h.hexdigest(), size)


def make_snapshot(run_dir: Path, state: CodeState | None = None) -> Snapshot:
    """Copy the code into ``run_dir/code/<hash>`` (atomically: a temp folder renamed into place)."""
    state = state or code_state()
    dest = Path(run_dir) / "code" / state.short
    if (dest / MANIFEST).exists():
        return Snapshot(dest, state, reused=True)
    tmp = dest.parent / f".tmp-{state.short}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for tree in state.trees:
        base = tmp if tree.name == "ssl-repro" else tmp / tree.name
        for rel in tree.files:
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(tree.root / rel, base / rel)
    write_json(tmp / MANIFEST, {**state.summary(), "full_hash": state.hash, "size": state.size,
                                "trees": [{"name": t.name, "source": str(t.root), "commit": t.commit,
                                           "dirty": t.dirty, "files": len(t.files)} for t in state.trees]})
    try:
        tmp.rename(dest)
    except OSError:  # another launch of the same code got there first: same content
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / MANIFEST).exists():
            raise
        return Snapshot(dest, state, reused=True)
    return Snapshot(dest, state, reused=False)


def import_paths(snapshot_dir: Path) -> list[str]:
    manifest = json.loads((snapshot_dir / MANIFEST).read_text())
    return [str(snapshot_dir)] + [str(snapshot_dir / t["name"]) for t in manifest["trees"][1:]]


def job_python(snapshot: Snapshot) -> str:
    """The python command submitit runs a job with: the snapshot first on the import path, and no
    implicit current-directory entry (``PYTHONSAFEPATH``), which would otherwise be the checkout a job
    was submitted from. The environment passes on to every process the job starts."""
    paths = import_paths(snapshot.path)
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return shlex.join(["env", f"PYTHONPATH={os.pathsep.join(paths)}", "PYTHONSAFEPATH=1",
                       f"{ENV_VAR}={snapshot.path}", sys.executable])


@cache
def running_code() -> dict[str, Any]:
    """Which code this process runs, for its records: the snapshot it was launched from, or (without
    one) the state of the checkout it imports."""
    snap = os.environ.get(ENV_VAR)
    if snap and project_root() == Path(snap).resolve():
        manifest = json.loads((Path(snap) / MANIFEST).read_text())
        return {**{k: manifest[k] for k in ("hash", "commit", "dirty", "plugins")}, "snapshot": snap}
    return {**code_state(strict=False).summary(), "snapshot": None, **({"launched_snapshot": snap} if snap else {})}


def verify_snapshot(code: dict[str, Any]) -> None:
    """A job launched from a snapshot that imports other code is refused: its record would claim code
    it did not run."""
    if code.get("launched_snapshot"):
        raise UserError("snapshot", f"the job imports the harness from {project_root()}, not from its snapshot "
                        f"{code['launched_snapshot']}", "check PYTHONPATH in the job's environment")


def commit_label(code: dict[str, Any]) -> str:
    """The record's ``git_commit``: the commit, with '+dirty' when uncommitted changes ran too."""
    return (code.get("commit") or "unknown") + ("+dirty" if code.get("dirty") else "")
