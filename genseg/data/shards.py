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


def fingerprint(shard_dir: str | Path, split: str) -> tuple[str, str]:
    """-> (hex digest, short description) identifying the data a model was scored on.

    The digest covers the class set (names, count, ignore index), the image sizes, every split's
    count, the class pixel histogram of the whole data set, and the content of ``split``'s rows
    (name, image and mask bytes), hashed row by row and combined in name order so it does not
    depend on file names or block order.  Two preparations of the same data agree; data that
    differs in any scored pixel does not."""
    import hashlib

    import pyarrow.dataset as pads

    shard_dir = Path(shard_dir)
    m = read_manifest(shard_dir)
    head = {"classes": m["classes"].get("names"), "num_classes": m["num_classes"],
            "ignore_index": m["ignore_index"], "sizes": m.get("sizes"),
            "splits": {s: v["count"] for s, v in m["splits"].items()}, "class_pixels": m.get("class_pixels"),
            "scored": split}
    rows = []
    ds = pads.dataset(str(shard_dir / split), format="parquet")
    for rb in ds.to_batches(columns=["name", "image", "mask"], batch_size=64):
        for name, image, mask in zip(*(rb.column(c).to_pylist() for c in ("name", "image", "mask"))):
            h = hashlib.sha256(name.encode())
            h.update(image)
            h.update(mask)
            rows.append((name, h.hexdigest()))
    digest = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    for name, h in sorted(rows):
        digest.update(h.encode())
    src = m.get("source") or {}
    desc = (f"{src.get('source', '?')} {m['num_classes']} classes, "
            + ", ".join(f"{s} {v['count']}" for s, v in m["splits"].items()))
    return digest.hexdigest(), desc
