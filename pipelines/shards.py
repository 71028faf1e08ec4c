"""Reading prepared shards without Ray (evaluation, sampling, serving, tests), and the cheap
checks every command runs on a shard directory before it starts any work."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genseg.data.shards import MANIFEST, decode_row
from genseg.errors import InputError

FORMAT = "genseg-shards/2"          # what `genseg prepare` writes: rows carry a codec column
READABLE = ("genseg-shards/1", FORMAT)   # /1: raw arrays, no codec column


class ShardError(InputError):
    """A shard directory that is missing, incomplete, corrupted, or holds nothing to learn from."""


def load_manifest(shard_dir: str | Path) -> dict:
    """The manifest of a shard directory, or a ShardError naming what is wrong with it."""
    d = Path(shard_dir)
    if not d.is_dir():
        raise ShardError(f"shard directory {d} does not exist" if not d.exists() else f"{d} is not a directory")
    path = d / MANIFEST
    if not path.is_file():
        raise ShardError(f"{d} holds no {MANIFEST}: it is not a shard directory; make one with `genseg prepare`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(f"{path} is unreadable ({type(exc).__name__}: {exc}); prepare the shards again") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if isinstance(fmt, str) and fmt.startswith("genseg-shards/") and fmt not in READABLE:
        raise ShardError(f"{path}: shard format {fmt!r} is newer than this genseg reads ({', '.join(READABLE)}); "
                         f"upgrade genseg, or prepare the shards again with this one")
    if fmt not in READABLE or "splits" not in manifest:
        raise ShardError(f"{path} is not a genseg manifest (no \"format\": \"{FORMAT}\"); prepare the shards again")
    return manifest


def shard_files(shard_dir: str | Path, split: str) -> list[Path]:
    """The Parquet files of a split, in name order (the order every reader uses)."""
    d = Path(shard_dir) / split
    return sorted(d.glob("*.parquet")) if d.is_dir() else []


def check_files(shard_dir: str | Path, split: str, manifest: dict | None = None) -> int:
    """Read every shard file's footer (cheap: no data pages) -> the split's row count.

    Catches truncated or overwritten files before a job starts, naming the file, and a split whose
    files do not add up to the rows the manifest promises (files deleted or added by hand)."""
    manifest = manifest if manifest is not None else load_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise ShardError(f"{shard_dir} has no '{split}' split (has: {', '.join(manifest['splits']) or 'none'})")
    files = shard_files(shard_dir, split)
    if not files:
        raise ShardError(f"split '{split}' of {shard_dir} is empty: {Path(shard_dir) / split} holds no .parquet "
                         f"files; prepare the shards again")
    rows = 0
    for f in files:
        try:
            rows += pq.ParquetFile(f).metadata.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise ShardError(f"{f}: corrupted shard file ({_first_line(exc)}); prepare the shards again") from None
    expected = manifest["splits"][split].get("count")
    if expected is not None and rows != expected:
        raise ShardError(f"split '{split}' of {shard_dir} holds {rows} rows but its manifest says {expected}: "
                         f"files were removed or added; prepare the shards again")
    return rows


def labelled_pixels(shard_dir: str | Path, split: str, manifest: dict) -> int:
    """Pixels of a split that carry a class (not the ignore index): from the manifest when it
    records them per split, else counted from the mask column."""
    entry = manifest["splits"][split]
    if "class_pixels" in entry:
        return int(sum(entry["class_pixels"]))
    ignore = int(manifest.get("ignore_index", 255))
    total = 0
    for f in shard_files(shard_dir, split):
        for rb in _batches(f, None, 64):
            for row in rb.to_pylist():
                total += int(np.count_nonzero(decode_row(row)[1] != ignore))
    return total


def check_split(shard_dir: str | Path, split: str, need_labels: bool = True) -> dict:
    """Everything a job needs from one split, checked before it starts -> the manifest.

    The split exists, its files are intact Parquet, it has rows and, when ``need_labels``, at
    least one pixel that is not the ignore index (else every metric is 0/0)."""
    manifest = load_manifest(shard_dir)
    rows = check_files(shard_dir, split, manifest)
    if rows == 0:
        raise ShardError(f"split '{split}' of {shard_dir} has 0 rows; prepare the shards again")
    if need_labels and labelled_pixels(shard_dir, split, manifest) == 0:
        raise ShardError(f"every mask pixel of split '{split}' of {shard_dir} is the ignore index "
                         f"{manifest.get('ignore_index', 255)}: there is nothing to train or score on "
                         f"(binary 0/255 masks? prepare them with --binary-masks)")
    return manifest


def iter_split(shard_dir: str | Path, split: str, batch_size: int = 16,
               limit: int | None = None) -> Iterator[dict]:
    """Yield columnar batches (dict of lists) of a split, in file order."""
    manifest = load_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise ShardError(f"{shard_dir} has no '{split}' split (has: {', '.join(manifest['splits'])})")
    seen = 0
    for f in shard_files(shard_dir, split):
        for rb in _batches(f, None, batch_size):
            batch = rb.to_pydict()
            if limit is not None:
                batch = {k: v[: limit - seen] for k, v in batch.items()}
            seen += len(batch["name"])
            if batch["name"]:
                yield batch
            if limit is not None and seen >= limit:
                return


def _batches(path: Path, columns: list[str] | None, batch_size: int) -> Iterator[pa.RecordBatch]:
    """Record batches of one file; a broken file is a ShardError naming it, not an Arrow traceback."""
    try:
        pf = pq.ParquetFile(path)
        yield from pf.iter_batches(batch_size=batch_size, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise ShardError(f"{path}: corrupted shard file ({_first_line(exc)}); prepare the shards again") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
