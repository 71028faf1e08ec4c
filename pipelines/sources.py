"""Where (image, mask) pairs come from: synthetic scenes, CamVid, or any image/mask folders.

Pairing happens here, in the driver, on file names only (cheap); decoding happens in parallel
Ray Data tasks (``pipelines.prepare``).  Each source yields work items (plain dicts) and the
problems it already found (missing partners).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from genseg.errors import InputError
from genseg.data.classes import CAMVID, CAMVID_VOID, SYNTHETIC, ClassSpec, default_palette

IMAGE_EXTS = {".png", ".jpg", ".jpeg"}
MASK_EXTS = {".png"}


class SourceError(InputError):
    """The source itself is unusable (missing directory, bad palette file...)."""


@dataclass
class Source:
    classes: ClassSpec | None          # None: infer the class count from the masks
    items: list[dict]                  # work items for the decode UDF
    problems: list[str] = field(default_factory=list)
    # class-index masks read as they are: prepare refuses them when they hold only 0 and 255
    # (binary foreground masks, whose 255 would silently become the ignore index)
    index_masks: str | None = None


def check_val_fraction(val_fraction: float) -> None:
    if not 0 <= val_fraction < 1:   # also refuses NaN
        raise SourceError(f"--val-fraction must be at least 0 and below 1 (the share of pairs held out as val); "
                          f"got {val_fraction}")


def synthetic(num: int, size: tuple[int, int], seed: int = 0, val_fraction: float = 0.2) -> Source:
    if num < 2:
        raise SourceError(f"--num must be at least 2 (one train and one val scene); got {num}")
    check_val_fraction(val_fraction)
    n_val = min(num - 1, max(1, round(num * val_fraction)))
    items = [{"kind": "synthetic", "split": "train" if i < num - n_val else "val",
              "name": f"scene_{i:05d}", "seed": seed, "index": i, "height": size[0], "width": size[1]}
             for i in range(num)]
    return Source(SYNTHETIC, items)


def holdout_prefixes(text: str | None) -> list[str]:
    """``--holdout SEQ[,SEQ]`` -> the prefixes, in order, without blanks or repeats."""
    out: list[str] = []
    for p in (text or "").split(","):
        p = p.strip()
        if p and p not in out:
            out.append(p)
    if text is not None and not out:
        raise SourceError("--holdout needs at least one file-name prefix, e.g. --holdout 0006R0")
    return out


def _sequences(names: list[str]) -> str:
    """The sequence prefixes of ``names`` (the part before the first '_'), for an error message."""
    seqs = sorted({n.split("_")[0] for n in names})
    return ", ".join(seqs[:12]) + (f" ... ({len(seqs)} in all)" if len(seqs) > 12 else "")


def hold_out(items: list[dict], prefixes: list[str], splits: tuple[str, ...] = ("train",)) -> None:
    """Move the items of ``splits`` whose name starts with one of ``prefixes`` into the split
    ``holdout`` (in place).  A prefix that matches nothing, or a holdout that would leave the train
    split empty, is one :class:`SourceError`."""
    if not prefixes:
        return
    pool = [it for it in items if it["split"] in splits]
    for p in prefixes:
        if not any(it["name"].startswith(p) for it in pool):
            raise SourceError(f"--holdout {p}: no {'/'.join(splits)} image's name starts with {p!r} "
                              f"(their sequences: {_sequences([it['name'] for it in pool])})")
    for it in pool:
        if it["name"].startswith(tuple(prefixes)):
            it["split"] = "holdout"
    if not any(it["split"] == "train" for it in items):
        raise SourceError(f"--holdout {','.join(prefixes)} would move every training image ({len(pool)}) into "
                          f"holdout; leave at least one sequence to train on")


def _files(directory: Path, exts: set[str]) -> dict[str, Path]:
    return {p.stem: p for p in sorted(directory.iterdir()) if p.is_file() and p.suffix.lower() in exts}


def _pair(images: Path, masks: Path, split: str, label_map: dict | None, problems: list[str]) -> list[dict]:
    for d in (images, masks):
        if not d.is_dir():
            raise SourceError(f"directory {d} does not exist")
    imgs, msks = _files(images, IMAGE_EXTS), _files(masks, MASK_EXTS | IMAGE_EXTS)
    for stem in sorted(set(imgs) - set(msks)):
        problems.append(f"{imgs[stem]}: no mask with the same name in {masks}")
    for stem in sorted(set(msks) - set(imgs)):
        problems.append(f"{msks[stem]}: no image with the same name in {images}")
    return [{"kind": "files", "split": split, "name": stem, "image_path": str(imgs[stem]),
             "mask_path": str(msks[stem]), "label_map": label_map}
            for stem in sorted(set(imgs) & set(msks))]


def camvid(root: str | Path, splits: list[str], holdout: list[str] | None = None) -> Source:
    """SegNet's CamVid layout: ``<split>/`` and ``<split>annot/``; void (11) -> ignore index.
    ``holdout``: sequence prefixes (e.g. ``0006R0``) whose training frames become the split
    ``holdout``: streets the model never sees, unlike val (all of it ``0016E5``, like 204 training frames)."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"CamVid root {root} does not exist")
    problems: list[str] = []
    items: list[dict] = []
    label_map = {str(CAMVID_VOID): CAMVID.ignore_index}
    for split in splits:
        if not (root / split).is_dir():
            raise SourceError(f"CamVid root {root} has no '{split}/' directory (splits: {', '.join(splits)})")
        items += _pair(root / split, root / f"{split}annot", split, label_map, problems)
    hold_out(items, list(holdout or []))
    return Source(CAMVID, items, problems)


def load_palette(path: str | Path) -> tuple[ClassSpec, list[list[int]]]:
    """A palette file: JSON ``{"classes": [{"name": "sky", "color": [r, g, b]}, ...],
    "ignore_colors": [[0, 0, 0]]}``."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        classes = doc["classes"]
        names = tuple(str(c["name"]) for c in classes)
        palette = tuple(tuple(int(v) for v in c["color"]) for c in classes)
        ignore = [list(map(int, c)) for c in doc.get("ignore_colors", [])]
        if not names or any(len(c) != 3 for c in palette):
            raise ValueError("each class needs a name and an [r, g, b] color")
    except FileNotFoundError:
        raise SourceError(f"palette file {path} does not exist") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise SourceError(f"palette file {path} is not valid: {exc}") from None
    return ClassSpec(names, palette), ignore


def folder(images: str | Path, masks: str | Path, num_classes: int | None = None,
           palette_file: str | Path | None = None, val_fraction: float = 0.2, seed: int = 0,
           binary_masks: bool = False, holdout: list[str] | None = None) -> Source:
    """Pairs by file stem.  Masks are class-index PNGs, or RGB colour PNGs with a palette file.
    ``binary_masks``: single-channel 0/255 (or 0/1) foreground masks; 255 becomes class 1.
    ``holdout``: file-name prefixes whose pairs all become the split ``holdout``; val is drawn
    from the rest."""
    check_val_fraction(val_fraction)
    problems: list[str] = []
    label_map = None
    classes = None
    if binary_masks and (palette_file or num_classes not in (None, 2)):
        raise SourceError("--binary-masks means two classes (background, foreground): "
                          "drop --palette / --num-classes")
    if binary_masks:
        label_map = {"255": 1}
        classes = ClassSpec(("background", "foreground"), default_palette(2))
    elif palette_file:
        classes, ignore = load_palette(palette_file)
        label_map = {"palette": [list(c) for c in classes.palette], "ignore_colors": ignore}
    elif num_classes:
        classes = ClassSpec(tuple(f"class_{i}" for i in range(num_classes)), default_palette(num_classes))
    items = _pair(Path(images), Path(masks), "train", label_map, problems)
    hold_out(items, list(holdout or []))
    held = [it for it in items if it["split"] == "holdout"]
    items = [it for it in items if it["split"] != "holdout"]
    # a deterministic split by name: every 1/val_fraction-th pair (after a seeded shuffle) is val
    import random

    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = min(len(items) - 1, max(1, round(len(items) * val_fraction))) if len(items) > 1 and val_fraction > 0 else 0
    for i in order[:n_val]:
        items[i]["split"] = "val"
    items += held
    return Source(classes, items, problems, index_masks=None if (palette_file or binary_masks) else str(masks))
