"""Durable directory replacement, shared by checkpoints and shard directories.

A directory is never deleted before its replacement is in place: the old one is moved aside, the
complete new one renamed in, the parent directory fsynced, and only then the aside copy removed.
A crash in between leaves an aside copy (``.NAME.old-<ns>-<pid>``) that :func:`asides` finds, so
a reader can recover it (see :func:`genseg.checkpoint.load`).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path


def swap_dir(tmp: Path, path: Path) -> None:
    """Rename the complete directory ``tmp`` to ``path``, replacing what was there without a
    moment in which neither exists on disk.  On failure ``tmp`` is removed and ``path`` restored."""
    tmp, path = Path(tmp), Path(path)
    aside = None
    if path.exists():
        aside = path.with_name(f".{path.name}.old-{time.time_ns()}-{os.getpid()}")
        path.rename(aside)
    try:
        tmp.rename(path)
    except BaseException:
        if aside is not None and not path.exists():
            aside.rename(path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync(path.parent)
    for old in asides(path):          # ours, and any left by an earlier crash
        shutil.rmtree(old, ignore_errors=True)


def asides(path: Path) -> list[Path]:
    """Aside copies of ``path`` left by :func:`swap_dir`, oldest first."""
    path = Path(path)
    found = []
    for p in path.parent.glob(f".{path.name}.old-*"):
        stamp = p.name[len(f".{path.name}.old-"):].split("-")[0]
        if p.is_dir() and stamp.isdigit():
            found.append((int(stamp), p))
    return [p for _, p in sorted(found)]


def fsync(p: Path) -> None:
    """fsync a file or directory (a directory: so that a rename in it is durable)."""
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
