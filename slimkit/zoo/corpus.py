"""The stdlib corpus: Python's own standard library source, present on every machine.

Files: every ``*.py`` under the running interpreter's stdlib directory, except
``site-packages``, test suites (``test/``, ``tests/``, ``idle_test/``) and
``pydoc_data`` (a generated dict of help text, not code).

Split: each file goes to one split by its relative POSIX path alone, so the
assignment never depends on file order or on which other files exist:
``bucket = int(sha256(path)[:8], 16) % 20``; bucket 0-1 -> ``eval`` (10%),
bucket 2 -> ``calibration`` (5%), the rest -> ``train`` (85%).
Calibration and eval are disjoint, and eval is never used for training or
early stopping (the training script stops on the calibration split).
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

SPLITS = ("train", "calibration", "eval")
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "pydoc_data", "__pycache__"}
_N_BUCKETS = 20


def stdlib_root() -> Path:
    """The directory holding the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
    """The split ("train", "calibration" or "eval") a stdlib file belongs to, from its path alone."""
    bucket = int(hashlib.sha256(relative_path.encode("utf-8")).hexdigest()[:8], 16) % _N_BUCKETS
    if bucket < 2:
        return "eval"
    if bucket == 2:
        return "calibration"
    return "train"


@dataclass(frozen=True)
class CorpusFile:
    """One stdlib source file: its path relative to the stdlib root and its split."""

    path: str
    split: str

    def read(self) -> str:
        """The file's text (undecodable bytes replaced, so odd encodings never stop a run)."""
        return (stdlib_root() / self.path).read_text(encoding="utf-8", errors="replace")


@lru_cache(maxsize=1)
def list_files() -> tuple[CorpusFile, ...]:
    """Every corpus file, sorted by path."""
    root = stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _EXCLUDED_DIRS for part in rel.parts[:-1]):
            continue
        posix = rel.as_posix()
        files.append(CorpusFile(posix, split_of(posix)))
    files.sort(key=lambda f: f.path)
    return tuple(files)


def load_split(split: str) -> list[str]:
    """The texts of one split, one string per file, sorted by path."""
    if split not in SPLITS:
        raise ValueError(f"unknown corpus split {split!r}; choose one of {', '.join(SPLITS)}")
    return [f.read() for f in list_files() if f.split == split]


def split_sizes() -> dict[str, tuple[int, int]]:
    """For each split: (number of files, characters of text)."""
    sizes = {s: [0, 0] for s in SPLITS}
    for f in list_files():
        sizes[f.split][0] += 1
        sizes[f.split][1] += len(f.read())
    return {s: (n, c) for s, (n, c) in sizes.items()}
