"""The one way the trainer writes a file or a directory: into a temporary sibling, fsynced, then renamed.

rename(2) is atomic within one filesystem, so a crash at any moment leaves either the old version or the new one,
never a half-written one. Every writer of the run directory (checkpoints, ``latest``, rank files, recipe.yaml,
summary.json, eval.json, adapter/ and model/) goes through :func:`write_atomic`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

TMP_MARK = ".tmp-"  # in the names of the temporary siblings (``.<name>.tmp-<pid>``), so leftovers can be swept
OLD_MARK = ".old-"  # a directory moved aside while its replacement is renamed in


def _fsync(path: Path) -> None:
    """fsync a file, or a directory's entries (a directory's own fd makes its renames durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a temporary sibling of ``path`` (a file, or a directory it creates), which then replaces
    ``path``. A directory that already exists is moved aside first (rename cannot replace a non-empty directory)
    and removed after. Returns ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    try:
        write(tmp)
        for child in (tmp.iterdir() if tmp.is_dir() else ()):
            _fsync(child)
        _fsync(tmp)
    except BaseException:  # a full disk or a kill: give back the half-written copy's space, keep the old version
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    old = path.with_name(f".{path.name}{OLD_MARK}{os.getpid()}")
    if tmp.is_dir() and path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def sweep_leftovers(root: Path, name_glob: str) -> None:
    """Remove the temporary and moved-aside siblings a killed process left for names matching ``name_glob``."""
    for leftover in [*root.glob(f".{name_glob}{TMP_MARK}*"), *root.glob(f".{name_glob}{OLD_MARK}*")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
