"""The shard row format, shared by the Ray Data writer and every reader.

A row holds one (image, mask) pair:

    name: str, height: int, width: int, codec: str,
    image: bytes, mask: bytes (class ids, ignore = 255)

``codec`` says how the two byte columns hold their pixels:

- ``raw``: the arrays themselves (H*W*3 uint8 RGB, H*W uint8): no decoding when read, the
  largest shards.  Shards of format ``genseg-shards/1`` have no codec column and are all raw.
- ``png``: lossless PNG images and masks (a source PNG that needs no change is kept as it was
  read, so nothing is encoded twice); 0.6x of raw on CamVid, a few ms per image to decode.
- ``webp``: lossless WebP images, PNG masks; smaller again, and faster to encode than PNG.

Every codec is lossless: the decoded pixels are the ones ``genseg prepare`` validated and
histogrammed.  A shard directory holds ``<split>/*.parquet`` plus ``manifest.json``.

Latent shards (``genseg encode``, pipelines/latents.py) use the same row with codec ``latent``:
``height``/``width`` are the latent grid's, ``image`` holds the autoencoder's latents as float16
``(C, h, w)`` and ``mask`` the label map on that grid (raw uint8); :func:`decode_row` returns the
latents as a float32 ``(C, h, w)`` array in place of the image.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from genseg.errors import InputError

MANIFEST = "manifest.json"
COLUMNS = ("name", "height", "width", "image", "mask", "codec")
CODECS = ("raw", "png", "webp")
LATENT = "latent"


class DecodeError(InputError):
    """A shard cell whose bytes are not the image its row says (a damaged or foreign shard): one
    line on the command line, like every other bad input."""


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _webp(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="WEBP", lossless=True, quality=0, method=0)
    return buf.getvalue()


def encode_row(name: str, image: np.ndarray, mask: np.ndarray, codec: str = "raw",
               image_bytes: bytes | None = None) -> dict:
    """One shard row.  ``image_bytes``: the source file's bytes, kept as they are when ``codec``
    is not raw (the caller vouches that they decode to ``image``)."""
    h, w = mask.shape
    assert image.shape == (h, w, 3) and image.dtype == np.uint8 and mask.dtype == np.uint8
    if codec == "raw":
        img, msk = image.tobytes(), mask.tobytes()
    elif codec in ("png", "webp"):
        img = image_bytes if image_bytes is not None else (_png if codec == "png" else _webp)(image)
        msk = _png(mask)
    else:
        raise ValueError(f"unknown shard codec {codec!r} (known: {', '.join(CODECS)})")
    return {"name": name, "height": h, "width": w, "image": img, "mask": msk, "codec": codec}


def _decode_image(data: bytes, shape: tuple[int, ...], what: str, name: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            array = np.asarray(im.convert("RGB") if len(shape) == 3 else im)
    except Exception as exc:  # PIL raises many types for broken bytes
        raise DecodeError(f"row {name!r}: its {what} bytes do not decode ({type(exc).__name__}: {exc}); "
                          f"the shard is damaged: prepare the shards again") from None
    if array.shape != shape:
        raise DecodeError(f"row {name!r}: its {what} decodes to {array.shape}, not {shape}; "
                          f"the shard is damaged: prepare the shards again")
    return array


def encode_latent_row(name: str, latents: np.ndarray, mask: np.ndarray) -> dict:
    """One latent shard row: ``latents (C, h, w)`` (stored as float16), ``mask (h, w) uint8``."""
    c, h, w = latents.shape
    assert mask.shape == (h, w) and mask.dtype == np.uint8
    return {"name": name, "height": h, "width": w, "image": latents.astype(np.float16).tobytes(),
            "mask": np.ascontiguousarray(mask).tobytes(), "codec": LATENT}


def decode_row(row: dict) -> tuple[np.ndarray, np.ndarray]:
    """-> ``image (H, W, 3) uint8``, ``mask (H, W) uint8``; for a latent row ``latents (C, h, w) float32``
    and ``mask (h, w) uint8``."""
    h, w = int(row["height"]), int(row["width"])
    codec = row.get("codec") or "raw"
    if codec == LATENT:
        data, name = row["image"], str(row.get("name"))
        if h < 1 or w < 1 or len(data) % (2 * h * w) or len(row["mask"]) != h * w:
            raise DecodeError(f"row {name!r}: {len(data)} latent bytes and {len(row['mask'])} mask bytes do not "
                              f"fit a {h}x{w} grid; the shard is damaged: encode the shards again")
        latents = np.frombuffer(data, dtype=np.float16).reshape(-1, h, w).astype(np.float32)
        return latents, np.frombuffer(row["mask"], dtype=np.uint8).reshape(h, w)
    if codec == "raw":
        image = np.frombuffer(row["image"], dtype=np.uint8).reshape(h, w, 3)
        mask = np.frombuffer(row["mask"], dtype=np.uint8).reshape(h, w)
        return image, mask
    name = str(row.get("name"))
    return (_decode_image(row["image"], (h, w, 3), "image", name),
            _decode_image(row["mask"], (h, w), "mask", name))


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
    (name, image and mask pixels, whatever the codec), hashed row by row and combined in name order so it does not
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
    columns = [c for c in COLUMNS if c in ds.schema.names]
    for rb in ds.to_batches(columns=columns, batch_size=64):
        for row in rb.to_pylist():     # pixels, not bytes: the same data in any codec agrees
            image, mask = decode_row(row)
            h = hashlib.sha256(row["name"].encode())
            h.update(np.ascontiguousarray(image).tobytes())
            h.update(np.ascontiguousarray(mask).tobytes())
            rows.append((row["name"], h.hexdigest()))
    digest = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    for name, h in sorted(rows):
        digest.update(h.encode())
    src = m.get("source") or {}
    desc = (f"{src.get('source', '?')} {m['num_classes']} classes, "
            + ", ".join(f"{s} {v['count']}" for s, v in m["splits"].items()))
    return digest.hexdigest(), desc
