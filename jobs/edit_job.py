"""``genseg edit``: object removal and background replacement on one image file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from genseg.editing import EditOptions, remove_objects, replace_background
from genseg.errors import InputError
from genseg.viz import save_png

MAX_PIXELS = 4096 * 4096


def parse_classes(text: str, names: list[str]) -> list[int]:
    """``"car,3"`` -> class ids, by name (case-insensitive) or number."""
    out = []
    lower = [n.lower() for n in names]
    for tok in (t.strip() for t in text.split(",") if t.strip()):
        if tok.isdigit() and int(tok) < len(names):
            out.append(int(tok))
        elif tok.lower() in lower:
            out.append(lower.index(tok.lower()))
        else:
            raise InputError(f"unknown class {tok!r}; the segmenter knows: {', '.join(names)}")
    if not out:
        raise InputError("no classes given")
    return out


def read_image(path: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An RGB image, refusing one over ``max_pixels`` before it is decoded."""
    try:
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise InputError(f"{path}: {im.width}x{im.height} pixels is over the limit of {max_pixels} "
                                 f"pixels (4096x4096); downscale it first")
            return np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError:
        raise InputError(f"{path}: the image is over the limit of {max_pixels} pixels (4096x4096); "
                         f"downscale it first") from None
    except (OSError, SyntaxError) as exc:
        raise InputError(f"{path}: unreadable image ({exc})") from None


def read_label_map(path: str, num_classes: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            lm = np.asarray(im)
    except (OSError, SyntaxError) as exc:
        raise InputError(f"{path}: unreadable label map ({exc})") from None
    if lm.ndim != 2:
        raise InputError(f"{path}: a label map must be a single-channel PNG of class ids")
    bad = np.unique(lm[(lm >= num_classes) & (lm != 255)])
    if bad.size:
        raise InputError(f"{path}: label values {bad[:10].tolist()} out of range 0..{num_classes - 1}")
    return lm.astype(np.int64)


def run(gen, seg, image: np.ndarray, out: str, *, remove: str | None = None, background: str | None = None,
        keep: str | None = None, opts: EditOptions = EditOptions(), sampling: dict | None = None) -> dict:
    """Edit ``image (H, W, 3) uint8`` with a loaded generator and segmenter; write ``out`` (+ mask)."""
    names = seg.names
    if gen.conditional and gen.num_classes != seg.num_classes:
        raise InputError(f"the generative model knows {gen.num_classes} classes, the segmenter "
                         f"{seg.num_classes}: they must share a label set")
    settings = gen.settings(**(sampling or {}))              # bad flags fail before any work
    if opts.resample > 1 and getattr(settings, "sampler", None) == "dpmpp":
        raise InputError("--resample > 1 needs the ddpm or ddim sampler (dpmpp keeps state between steps)")
    if remove:
        classes = parse_classes(remove, names)
        result, region, labels = remove_objects(seg, gen, image, classes, opts, settings.to_dict())
        action = {"remove": [names[c] for c in classes]}
    else:
        if not keep:
            raise InputError("--background needs --keep CLASS[,CLASS] (the foreground to keep)")
        classes = parse_classes(keep, names)
        lm = read_label_map(background, seg.num_classes) if background and background != "none" else None
        result, region, labels = replace_background(seg, gen, image, classes, lm, opts, settings.to_dict())
        action = {"keep": [names[c] for c in classes], "background": background}
    out_path = save_png(result, out)
    mask_path = save_png((region * 255).astype(np.uint8), Path(out).with_suffix(".mask.png"))
    return {"out": str(out_path), "mask": str(mask_path), **action, "edited_pixels": int(region.sum()),
            "size": list(image.shape[:2]), "options": opts.__dict__, "sampling": settings.to_dict()}


def write_summary(res: dict, out: str) -> None:
    Path(out).with_suffix(".json").write_text(json.dumps(res, indent=2, default=str))
