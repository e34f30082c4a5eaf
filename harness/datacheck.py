"""Launch-time scan of an ImageFolder split: every image's header (and, for JPEG and PNG, its end
marker) is read once, so an unreadable file fails the launch in one line instead of a job hours in.

Reading headers of a large set takes a while, so each result is cached under the run folder (never in
the dataset, which may be read-only or shared), keyed by the split's file list: names, sizes and
modification times. A changed, added or removed file changes the key and the split is scanned again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from harness.atomic import write_json

CACHE_VERSION = 1
_TAIL_BYTES = 64  # JPEG end-of-image (FFD9) may be followed by a few padding bytes
_SHOWN = 3  # bad files named in a message


@dataclass(frozen=True)
class SplitScan:
    """What a split holds: images per class folder, and the files that cannot be read (path, reason)."""

    path: str
    classes: dict[str, int]
    bad: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return sum(self.classes.values())

    @property
    def n_readable(self) -> int:
        return self.n_images - len(self.bad)

    def empty_classes(self) -> list[str]:
        return [c for c, n in self.classes.items() if n == 0]

    def describe_bad(self) -> str:
        shown = "; ".join(f"{p} ({reason})" for p, reason in self.bad[:_SHOWN])
        more = f" and {len(self.bad) - _SHOWN} more" if len(self.bad) > _SHOWN else ""
        return f"{len(self.bad)} unreadable image(s) in {self.path}: {shown}{more}"


def _listing(split_dir: Path) -> tuple[dict[str, list[tuple[str, int, int]]], str]:
    """class -> [(relative path, size, mtime_ns)] by torchvision's rule, and a key over all of it."""
    classes: dict[str, list[tuple[str, int, int]]] = {}
    for cls in sorted(e.name for e in os.scandir(split_dir) if e.is_dir()):
        files = []
        for dirpath, _, names in sorted(os.walk(split_dir / cls, followlinks=True)):
            for name in sorted(names):
                if name.lower().endswith(IMG_EXTENSIONS):
                    full = os.path.join(dirpath, name)
                    st = os.stat(full)
                    files.append((os.path.relpath(full, split_dir), st.st_size, st.st_mtime_ns))
        classes[cls] = files
    h = hashlib.sha256(f"v{CACHE_VERSION}|{split_dir.resolve()}".encode())
    for cls, files in classes.items():
        h.update(json.dumps([cls, files]).encode())
    return classes, h.hexdigest()[:20]


def image_problem(path: str | os.PathLike) -> str | None:
    """Why the file is not a readable image (one phrase), or None. Headers and end markers only."""
    try:
        with Image.open(path) as im:
            fmt = im.format
        if fmt in ("JPEG", "PNG"):
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - _TAIL_BYTES))
                tail = f.read()
            marker = b"\xff\xd9" if fmt == "JPEG" else b"IEND"
            if marker not in tail:
                return f"truncated {fmt}: no end marker"
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"[:200]
    return None


def scan_split(split_dir: str | os.PathLike, cache_dir: str | os.PathLike | None) -> SplitScan:
    """Scan ``ROOT/SPLIT`` (cached in ``cache_dir`` when given)."""
    split_dir = Path(split_dir)
    classes, key = _listing(split_dir)
    cache = Path(cache_dir) / f"{key}.json" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        try:
            cached = json.loads(cache.read_text())
            return SplitScan(path=cached["path"], classes=cached["classes"],
                             bad=[tuple(b) for b in cached["bad"]])
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is only a cache miss
    bad = []
    for files in classes.values():
        for rel, _, _ in files:
            reason = image_problem(split_dir / rel)
            if reason:
                bad.append((str(split_dir / rel), reason))
    result = SplitScan(path=str(split_dir), classes={c: len(f) for c, f in classes.items()}, bad=bad)
    if cache is not None:
        try:
            write_json(cache, asdict(result))
        except OSError:
            pass  # a read-only run folder must not stop the scan; launch reports it on its own
    return result


def cache_dir_for(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "launch" / "datacheck"


def run_dir_of(stage_dir: str | os.PathLike) -> Path:
    """``RUN/cells/<cell>/<stage>`` -> ``RUN`` (see harness.matrix)."""
    return Path(stage_dir).parents[2]
