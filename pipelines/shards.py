"""Reading prepared shards without Ray (evaluation, sampling, serving, tests)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow.dataset as pads

from genseg.data.shards import read_manifest
from genseg.errors import InputError


def iter_split(shard_dir: str | Path, split: str, batch_size: int = 16,
               limit: int | None = None) -> Iterator[dict]:
    """Yield columnar batches (dict of lists) of a split, in file order."""
    manifest = read_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise InputError(f"{shard_dir} has no '{split}' split (has: {', '.join(manifest['splits'])})")
    ds = pads.dataset(str(Path(shard_dir) / split), format="parquet")
    seen = 0
    for rb in ds.to_batches(batch_size=batch_size):
        batch = rb.to_pydict()
        if limit is not None:
            batch = {k: v[: limit - seen] for k, v in batch.items()}
        seen += len(batch["name"])
        if batch["name"]:
            yield batch
        if limit is not None and seen >= limit:
            return
