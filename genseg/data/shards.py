"""The shard row format, shared by the Ray Data writer and every reader.

A row holds one (image, mask) pair as raw arrays so readers never decode PNGs again:

    name: str, height: int, width: int,
    image: bytes (H*W*3 uint8, RGB), mask: bytes (H*W uint8 class ids, ignore = 255)

A shard directory holds ``<split>/*.parquet`` plus ``manifest.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
COLUMNS = ("name", "height", "width", "image", "mask")


def encode_row(name: str, image: np.ndarray, mask: np.ndarray) -> dict:
    h, w = mask.shape
    assert image.shape == (h, w, 3) and image.dtype == np.uint8 and mask.dtype == np.uint8
    return {"name": name, "height": h, "width": w, "image": image.tobytes(), "mask": mask.tobytes()}


def decode_row(row: dict) -> tuple[np.ndarray, np.ndarray]:
    """-> ``image (H, W, 3) uint8``, ``mask (H, W) uint8``."""
    h, w = int(row["height"]), int(row["width"])
    image = np.frombuffer(row["image"], dtype=np.uint8).reshape(h, w, 3)
    mask = np.frombuffer(row["mask"], dtype=np.uint8).reshape(h, w)
    return image, mask


def decode_batch(batch: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """A columnar batch (dict of arrays, as Ray Data yields) -> list of (image, mask)."""
    return [decode_row({k: batch[k][i] for k in COLUMNS if k in batch}) for i in range(len(batch["name"]))]


def read_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{shard_dir} holds no {MANIFEST}: prepare it with `genseg prepare` first")
    return json.loads(path.read_text())
