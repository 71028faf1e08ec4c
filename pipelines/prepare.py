"""``genseg prepare``: pair -> decode -> validate -> resize -> Parquet shards + manifest.

Decoding runs in parallel Ray Data tasks (``map_batches``), never in the driver.  Problems
(unreadable files, missing partners, size mismatches, labels out of range) are gathered from
all files and reported together.  Output is built in a temporary directory next to ``out``
and swapped into place only when complete, so a failed run leaves any earlier output intact.
``out`` may only be new, empty, or an earlier genseg shard directory: a directory holding
anything else is refused, so nothing a user wrote is ever deleted.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from PIL import Image

from genseg.data.classes import ClassSpec, default_palette, rgb_to_index
from genseg.data.shards import MANIFEST, encode_row
from genseg.errors import InputError
from genseg.fsutil import swap_dir
from genseg.data.synthetic import make_scene
from pipelines.shards import FORMAT
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
    ``manifest.json`` says ``"format": "genseg-shards/1"`` and that holds nothing besides that
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
        splits = set(manifest["splits"]) if manifest.get("format") == FORMAT else None
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
    """-> (image, mask) arrays, or raises ValueError naming the problem."""
    if item["kind"] == "synthetic":
        return make_scene(item["seed"], item["index"], item["height"], item["width"])
    ipath, mpath = str(item["image_path"]), str(item["mask_path"])
    lm = json.loads(item["label_map"]) if item.get("label_map") else {}
    try:
        with Image.open(ipath) as im:
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
    return image, mask


def decode_batch(batch: dict, size: tuple[int, int] | None, num_classes: int | None) -> dict:
    """Ray Data UDF: work items -> encoded rows (or an ``error`` string per failed item)."""
    rows = []
    n = len(batch["name"])
    for i in range(n):
        item = {k: batch[k][i] for k in batch}
        try:
            image, mask = _decode_one(item, size, num_classes)
            row = encode_row(str(item["name"]), image, mask)
            row["error"] = ""
            row["hist"] = np.bincount(mask.reshape(-1), minlength=256).astype(np.int64).tobytes()
        except ValueError as exc:
            row = {"name": str(item["name"]), "height": 0, "width": 0, "image": b"", "mask": b"",
                   "error": str(exc), "hist": b""}
        row["split"] = str(item["split"])
        rows.append(row)
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


def format_problems(problems: list[str]) -> str:
    head = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return f"{head}{more}"


def prepare(source: Source, out: str | Path, size: tuple[int, int] | None = None,
            skip_bad: bool = False, num_classes: int | None = None, description: dict | None = None,
            batch_size: int = 8) -> dict:
    """Run the pipeline and return the manifest.  Ray must already be initialised."""
    out = Path(out).resolve()
    check_out(out)
    start = time.perf_counter()
    problems = list(source.problems)
    if not source.items:
        raise PrepareError("no image/mask pairs found" + (":\n" + format_problems(problems) if problems else ""))
    k_given = num_classes or (source.classes.num_classes if source.classes else None)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # nested label maps travel as JSON text so every item has the same flat Arrow schema
    items = [{**it, "label_map": json.dumps(it["label_map"]) if it.get("label_map") else ""}
             for it in source.items]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 64)))
    ds = ds.map_batches(decode_batch, batch_size=batch_size, batch_format="numpy",
                        fn_kwargs={"size": size, "num_classes": k_given}).materialize()

    # one cheap pass over the small columns: problems, counts, histogram, sizes
    decode_problems: list[str] = []
    hist = np.zeros(256, np.int64)
    split_hist: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    sizes: set[tuple[int, int]] = set()
    skipped = []
    for batch in ds.select_columns(["name", "split", "error", "hist", "height", "width"]).iter_batches(
            batch_size=256, batch_format="numpy"):
        for name, split, err, h, hh, ww in zip(batch["name"], batch["split"], batch["error"],
                                               batch["hist"], batch["height"], batch["width"]):
            if err:
                decode_problems.append(str(err))
                continue
            hist += np.frombuffer(h, np.int64)
            split_hist.setdefault(str(split), np.zeros(256, np.int64))[:] += np.frombuffer(h, np.int64)
            counts[str(split)] = counts.get(str(split), 0) + 1
            sizes.add((int(hh), int(ww)))
    problems += sorted(decode_problems)   # blocks finish in any order; report in a stable one
    if problems and not skip_bad:
        raise PrepareError(f"{len(problems)} bad input file(s); nothing was written "
                           f"(rerun with --skip-bad to skip them):\n{format_problems(problems)}")
    if problems:
        skipped = sorted(problems)
    if not counts:
        raise PrepareError("every input was bad; nothing was written:\n" + format_problems(problems))
    check_labels(hist, source.index_masks)

    classes = source.classes
    if classes is None:   # index masks without --num-classes: K = largest label + 1
        k = int(np.nonzero(hist[:IGNORE])[0].max()) + 1
        classes = ClassSpec(tuple(f"class_{i}" for i in range(k)), default_palette(k))
    k = classes.num_classes
    manifest = {
        "format": "genseg-shards/1",
        "classes": classes.to_dict(),
        "num_classes": k,
        "ignore_index": IGNORE,
        "splits": {s: {"count": n, "class_pixels": split_hist[s][:k].tolist(),
                       "ignored_pixels": int(split_hist[s][IGNORE])} for s, n in sorted(counts.items())},
        "sizes": sorted([list(s) for s in sizes]),
        "size": list(next(iter(sizes))) if len(sizes) == 1 else None,
        "class_pixels": hist[:k].tolist(),
        "ignored_pixels": int(hist[IGNORE]),
        "skipped": skipped,
        "source": description or {},
        "seconds": None,
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    check_out(out)   # again: the user may have put something there while we decoded
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for split in counts:
            part = ds.filter(expr=f"error == '' and split == '{split}'").drop_columns(["error", "hist", "split"])
            part.write_parquet(str(tmp / split))
        manifest["seconds"] = round(time.perf_counter() - start, 3)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        swap_dir(tmp, out)       # the old shard directory survives until the new one is complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


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


