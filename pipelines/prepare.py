"""``genseg prepare``: pair -> decode -> validate -> resize -> encode -> Parquet shards + manifest.

One streaming pass.  The driver pairs files by name (cheap) and cuts the work into chunks; each
Ray Data task (``map_batches``) decodes, validates, histograms and encodes its chunk and writes
it straight to one Parquet file per split, returning only a few numbers per pair (split, error,
class histogram, size).  Nothing is materialized: memory stays flat at any data set size, and the
manifest comes from those numbers, not from a second pass over the data.

Problems (unreadable files, missing partners, size mismatches, labels out of range) are gathered
from all files and reported together.  Output is built in a temporary directory next to ``out``
and swapped into place only when complete, so a failed run leaves any earlier output intact.
``out`` may only be new, empty, or an earlier genseg shard directory: a directory holding
anything else is refused, so nothing a user wrote is ever deleted.
"""
from __future__ import annotations

import io
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import ray
from PIL import Image

from genseg.data.classes import ClassSpec, default_palette, rgb_to_index
from genseg.data.shards import CODECS, MANIFEST, encode_row
from genseg.errors import InputError
from genseg.fsutil import swap_dir
from genseg.data.synthetic import make_scene
from pipelines.shards import FORMAT, READABLE
from pipelines.sources import Source

IGNORE = 255
MAX_LISTED = 20


class PrepareError(InputError):
    """Bad input files; the message names them (first 20)."""


class OutputError(InputError):
    """``--out`` names something genseg may not replace."""


def check_out(out: str | Path) -> None:
    """Refuse an ``out`` that holds anything but an earlier genseg shard directory.

    Replaceable: a path that does not exist, an empty directory, or a directory whose
    ``manifest.json`` names a genseg shard format and that holds nothing besides that
    manifest and its splits' ``*.parquet`` files."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise OutputError(f"--out {out} exists and is not a directory; pick another --out")
    entries = sorted(out.iterdir())
    if not entries:
        return
    hint = "pick another --out, or move its contents away (genseg only replaces its own shard directories)"
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        splits = set(manifest["splits"]) if manifest.get("format") in READABLE else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        splits = None
    if splits is None:
        raise OutputError(f"--out {out} is a non-empty directory that is not a genseg shard directory "
                          f"(no {MANIFEST} with \"format\": \"{FORMAT}\"); {hint}")
    for entry in entries:
        own = entry.name == MANIFEST and entry.is_file() or (
            entry.name in splits and entry.is_dir() and not entry.is_symlink()
            and all(f.is_file() and f.suffix == ".parquet" for f in entry.iterdir()))
        if not own:
            foreign = entry if entry.name not in splits or not entry.is_dir() else next(
                f for f in entry.iterdir() if not (f.is_file() and f.suffix == ".parquet"))
            raise OutputError(f"--out {out} is a genseg shard directory but also holds {foreign}, which genseg "
                              f"did not write; {hint}")


def _decode_one(item: dict, size: tuple[int, int] | None, num_classes: int | None):
    """-> (image, mask, source) where ``source`` is ``(format, bytes)`` of the image file when the
    image is stored unchanged (not resized), else None; raises ValueError naming the problem."""
    if item["kind"] == "synthetic":
        return (*make_scene(item["seed"], item["index"], item["height"], item["width"]), None)
    ipath, mpath = str(item["image_path"]), str(item["mask_path"])
    lm = json.loads(item["label_map"]) if item.get("label_map") else {}
    try:
        with open(ipath, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:
            source = (im.format, data)
            image = np.asarray(im.convert("RGB"))
    except Exception as exc:  # PIL raises many types for broken files
        raise ValueError(f"{ipath}: unreadable image ({type(exc).__name__}: {exc})") from None
    try:
        with Image.open(mpath) as im:
            mode = im.mode
            raw = np.asarray(im.convert("RGB") if mode in ("RGB", "RGBA", "P") and
                             "palette" in lm else im)
    except Exception as exc:
        raise ValueError(f"{mpath}: unreadable mask ({type(exc).__name__}: {exc})") from None
    if raw.shape[:2] != image.shape[:2]:
        raise ValueError(f"{mpath}: mask size {raw.shape[1]}x{raw.shape[0]} differs from image "
                         f"{ipath} size {image.shape[1]}x{image.shape[0]} (W x H)")
    if "palette" in lm:
        if raw.ndim != 3:
            raise ValueError(f"{mpath}: expected an RGB colour mask (a palette file was given), got mode {mode}")
        ids = rgb_to_index(raw, lm["palette"])
        for colour in lm.get("ignore_colors", []):
            ids[(raw == np.asarray(colour, np.uint8)).all(-1)] = IGNORE
        bad = ids < 0
        if bad.any():
            colours = sorted({tuple(int(v) for v in c) for c in raw[bad][:1000]})[:5]
            raise ValueError(f"{mpath}: {int(bad.sum())} pixels have colours not in the palette, e.g. {colours}")
        mask = ids.astype(np.uint8)
    else:
        if raw.ndim != 2:
            raise ValueError(f"{mpath}: mask must be single-channel class indices (mode L/P/I), got "
                             f"{raw.shape[2]} channels; pass --palette FILE for colour masks")
        mask = raw.astype(np.int64)
        for src, dst in lm.items():
            mask[mask == int(src)] = dst
        labels = mask[mask != IGNORE]
        if labels.size and (labels.min() < 0 or (num_classes and labels.max() >= num_classes) or labels.max() > 254):
            bad = sorted(set(np.unique(labels[(labels < 0) | (labels >= (num_classes or 255))]).tolist()))
            raise ValueError(f"{mpath}: label values {bad[:10]} out of range 0..{(num_classes or 255) - 1}")
        mask = mask.astype(np.uint8)
    if size is not None and tuple(mask.shape) != tuple(size):
        h, w = size
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
        mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
        source = None
    return image, mask, source


# a source file in one of these formats is stored as it was read under that codec: its pixels are
# exactly the decoded ones everywhere (JPEG decoders may differ by library version, so JPEG is re-encoded)
KEEP_SOURCE = {"png": "PNG", "webp": "WEBP"}


def write_chunk(items: list[dict], out_dir: str | Path, size: tuple[int, int] | None, num_classes: int | None,
                codec: str = "png") -> list[dict]:
    """Decode, validate, histogram and encode one chunk of work items, and write its good rows to
    ``out_dir/<split>/part-<first item>.parquet`` (one file per split).  -> one small record per item:
    name, split, error ("" when good), class histogram (256 int64), height, width, bytes written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: dict[str, list[dict]] = {}
    stats = []
    for item in items:
        name, split = str(item["name"]), str(item["split"])
        try:
            image, mask, source = _decode_one(item, size, num_classes)
            kept = source[1] if source is not None and source[0] == KEEP_SOURCE.get(codec) else None
            row = encode_row(name, image, mask, codec, image_bytes=kept)
            rows.setdefault(split, []).append(row)
            hist = np.bincount(mask.reshape(-1), minlength=256).astype(np.int64).tobytes()
            stats.append({"name": name, "split": split, "error": "", "hist": hist, "height": mask.shape[0],
                          "width": mask.shape[1], "bytes": len(row["image"]) + len(row["mask"])})
        except ValueError as exc:
            stats.append({"name": name, "split": split, "error": str(exc), "hist": b"", "height": 0,
                          "width": 0, "bytes": 0})
    first = int(items[0]["order"]) if items else 0
    for split, split_rows in rows.items():
        table = pa.Table.from_pylist(split_rows, schema=ROW_SCHEMA)
        (Path(out_dir) / split).mkdir(parents=True, exist_ok=True)
        # encoded bytes do not compress further; raw arrays do, cheaply
        pq.write_table(table, Path(out_dir) / split / f"part-{first:07d}.parquet",
                       compression="snappy" if codec == "raw" else "none")
    return stats


def _chunk_task(batch: dict, out_dir: str, size, num_classes, codec) -> dict:
    """Ray Data UDF around :func:`write_chunk`: a columnar batch of work items -> columnar stats."""
    n = len(batch["name"])
    items = [{k: batch[k][i] for k in batch} for i in range(n)]
    stats = write_chunk(items, out_dir, size, num_classes, codec)
    return {k: [s[k] for s in stats] for k in STAT_KEYS}


STAT_KEYS = ("name", "split", "error", "hist", "height", "width", "bytes")


def _row_schema():
    import pyarrow as pa

    return pa.schema([("name", pa.string()), ("height", pa.int64()), ("width", pa.int64()),
                      ("image", pa.binary()), ("mask", pa.binary()), ("codec", pa.string())])


ROW_SCHEMA = _row_schema()


def work_items(source: Source) -> list[dict]:
    """The source's items as flat records: nested label maps travel as JSON text so every item has
    the same Arrow schema, and ``order`` numbers them (it names the chunk files)."""
    return [{**it, "order": i, "label_map": json.dumps(it["label_map"]) if it.get("label_map") else ""}
            for i, it in enumerate(source.items)]


# Pairs per task (and per file): big enough that a task's fixed cost is small against its decoding,
# small enough that every core gets work early and a task holds a few MB (bench/README.md, 'Prepare')
CHUNK = 32


class Tally:
    """The manifest's numbers, added up from the per-item stats as they stream in."""

    def __init__(self):
        self.problems: list[str] = []
        self.hist = np.zeros(256, np.int64)
        self.split_hist: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.sizes: set[tuple[int, int]] = set()
        self.bytes = 0

    def add(self, batch: dict) -> int:
        n = len(batch["name"])
        for name, split, err, h, hh, ww, nb in zip(*(batch[k] for k in STAT_KEYS)):
            if err:
                self.problems.append(str(err))
                continue
            h = np.frombuffer(h, np.int64)
            self.hist += h
            self.split_hist.setdefault(str(split), np.zeros(256, np.int64))[:] += h
            self.counts[str(split)] = self.counts.get(str(split), 0) + 1
            self.sizes.add((int(hh), int(ww)))
            self.bytes += int(nb)
        return n


def format_problems(problems: list[str]) -> str:
    head = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return f"{head}{more}"


def prepare(source: Source, out: str | Path, size: tuple[int, int] | None = None,
            skip_bad: bool = False, num_classes: int | None = None, description: dict | None = None,
            codec: str = "png", chunk: int | None = None, progress: bool = False,
            on_rows: Callable[[int], None] | None = None) -> dict:
    """Run the pipeline and return the manifest.  Ray must already be initialised.

    ``progress`` shows a bar; ``on_rows(n)`` is called as each chunk's ``n`` pairs are done."""
    if codec not in CODECS:
        raise PrepareError(f"--codec {codec}: expected one of {', '.join(CODECS)}")
    out = Path(out).resolve()
    check_out(out)
    start = time.perf_counter()
    if not source.items:
        problems = list(source.problems)
        raise PrepareError("no image/mask pairs found" + (":\n" + format_problems(problems) if problems else ""))
    k_given = num_classes or (source.classes.num_classes if source.classes else None)
    ray.data.DataContext.get_current().enable_progress_bars = False
    items = work_items(source)
    per_task = max(1, chunk or CHUNK)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / per_task)))
        # one CPU per task: on a local Ray, which counts twice the cores, that keeps 2 tasks per core
        # busy (measured: faster than 1 per core, and than 4 per core); bench/README.md, 'Prepare'
        ds = ds.map_batches(_chunk_task, batch_size=per_task, batch_format="numpy", num_cpus=1,
                            fn_kwargs={"out_dir": str(tmp), "size": size, "num_classes": k_given, "codec": codec})
        tally = Tally()
        bar = _bar(len(items), progress)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            done = tally.add(batch)
            bar.update(done)
            if on_rows is not None:
                on_rows(done)
        bar.close()
        manifest = _manifest(source, tally, skip_bad, description, codec)
        manifest["seconds"] = round(time.perf_counter() - start, 3)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        check_out(out)   # again: the user may have put something there while we decoded
        swap_dir(tmp, out)       # the old shard directory survives until the new one is complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _bar(total: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="prepare", unit="pair", disable=not show, file=sys.stdout,
                mininterval=0.5, leave=False)


def _manifest(source: Source, tally: Tally, skip_bad: bool, description: dict | None, codec: str) -> dict:
    problems = list(source.problems) + sorted(tally.problems)   # tasks finish in any order: a stable one
    if problems and not skip_bad:
        raise PrepareError(f"{len(problems)} bad input file(s); nothing was written "
                           f"(rerun with --skip-bad to skip them):\n{format_problems(problems)}")
    if not tally.counts:
        raise PrepareError("every input was bad; nothing was written:\n" + format_problems(problems))
    check_labels(tally.hist, source.index_masks)
    classes = source.classes
    if classes is None:   # index masks without --num-classes: K = largest label + 1
        k = int(np.nonzero(tally.hist[:IGNORE])[0].max()) + 1
        classes = ClassSpec(tuple(f"class_{i}" for i in range(k)), default_palette(k))
    k = classes.num_classes
    hist, split_hist, sizes = tally.hist, tally.split_hist, tally.sizes
    return {
        "format": FORMAT,
        "codec": codec,
        "classes": classes.to_dict(),
        "num_classes": k,
        "ignore_index": IGNORE,
        "splits": {s: {"count": n, "class_pixels": split_hist[s][:k].tolist(),
                       "ignored_pixels": int(split_hist[s][IGNORE])} for s, n in sorted(tally.counts.items())},
        "sizes": sorted([list(s) for s in sizes]),
        "size": list(next(iter(sizes))) if len(sizes) == 1 else None,
        "class_pixels": hist[:k].tolist(),
        "ignored_pixels": int(hist[IGNORE]),
        "bytes": tally.bytes,
        "skipped": sorted(problems) if problems else [],
        "source": description or {},
        "seconds": None,
    }


def check_labels(hist: np.ndarray, index_masks: str | None) -> None:
    """Refuse data with no class at all, and binary 0/255 masks read as class indices (their 255
    is the ignore index, so the foreground would silently vanish from training and scores)."""
    labels = set(np.nonzero(hist[:IGNORE])[0].tolist())
    if index_masks and hist[IGNORE] > 0 and labels <= {0}:
        found = "only 0 and 255" if labels else "only 255"
        raise PrepareError(f"the masks in {index_masks} hold {found}; 255 is the ignore index, so they would "
                           f"make a data set without foreground. If they are binary foreground masks, rerun with "
                           f"--binary-masks (255 -> class 1 'foreground', 0 -> 'background')")
    if not labels:
        raise PrepareError("no mask pixel carries a class (all are the ignore index 255); nothing was written")


