"""``genseg edit``: object removal and background replacement on one image file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from genseg import imageio
from genseg.data.classes import class_ids
from genseg.editing import EditOptions, remove_objects, replace_background
from genseg.errors import InputError
from genseg.viz import save_png


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
        classes = class_ids(remove, names)
        result, region, labels = remove_objects(seg, gen, image, classes, opts, settings.to_dict())
        action = {"remove": [names[c] for c in classes]}
    else:
        if not keep:
            raise InputError("--background needs --keep CLASS[,CLASS] (the foreground to keep)")
        classes = class_ids(keep, names)
        lm = imageio.read_label_map(background, seg.num_classes) if background and background != "none" else None
        result, region, labels = replace_background(seg, gen, image, classes, lm, opts, settings.to_dict())
        action = {"keep": [names[c] for c in classes], "background": background}
    out_path = save_png(result, out)
    mask_path = save_png((region * 255).astype(np.uint8), Path(out).with_suffix(".mask.png"))
    return {"out": str(out_path), "mask": str(mask_path), **action, "edited_pixels": int(region.sum()),
            "size": list(image.shape[:2]), "options": opts.__dict__, "sampling": settings.to_dict()}


def write_summary(res: dict, out: str) -> None:
    Path(out).with_suffix(".json").write_text(json.dumps(res, indent=2, default=str))
