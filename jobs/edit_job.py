"""``genseg edit``: object removal, background replacement and outpainting on one image file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from genseg import imageio
from genseg.data.classes import class_ids
from genseg.editing import SIDES, EditOptions, outpaint, remove_objects, replace_background
from genseg.errors import InputError
from genseg.viz import save_png


def parse_extend(text: str) -> dict[str, int]:
    """``left=64,right=64`` -> ``{"left": 64, "right": 64}``; one line naming what is wrong otherwise."""
    out: dict[str, int] = {}
    for part in [p for p in text.split(",") if p.strip()]:
        side, _, value = part.partition("=")
        side = side.strip()
        if side not in SIDES or not value.strip().isdigit():
            raise InputError(f"--extend {text!r}: expected SIDE=PIXELS[,SIDE=PIXELS] with SIDE one of "
                             f"{', '.join(SIDES)} (e.g. left=64,right=64)")
        out[side] = int(value)
    if not any(out.values()):
        raise InputError(f"--extend {text!r}: at least one side must grow by 1 pixel or more")
    return out


def run(gen, seg, image: np.ndarray, out: str, *, remove: str | None = None, background: str | None = None,
        keep: str | None = None, extend: str | None = None, label_map: str | None = None,
        opts: EditOptions = EditOptions(), sampling: dict | None = None) -> dict:
    """Edit ``image (H, W, 3) uint8`` with a loaded generator and segmenter; write ``out`` (+ mask)."""
    names = seg.names
    if gen.conditional and gen.num_classes != seg.num_classes:
        raise InputError(f"the generative model knows {gen.num_classes} classes, the segmenter "
                         f"{seg.num_classes}: they must share a label set")
    settings = gen.settings(**(sampling or {}))              # bad flags fail before any work
    if opts.resample > 1 and getattr(settings, "sampler", None) == "dpmpp":
        raise InputError("--resample > 1 needs the ddpm or ddim sampler (dpmpp keeps state between steps)")
    if extend:
        sides = parse_extend(extend)
        factor = getattr(gen, "factor", 1)
        odd = {k: v for k, v in sides.items() if v % factor}
        if odd:
            raise InputError(f"--extend {extend}: {', '.join(f'{k}={v}' for k, v in odd.items())} is not a multiple "
                             f"of the latent model's autoencoder factor {factor}")
        lm = None
        if label_map:
            h, w = image.shape[0] + sides.get("top", 0) + sides.get("bottom", 0), \
                image.shape[1] + sides.get("left", 0) + sides.get("right", 0)
            lm = imageio.read_label_map(label_map, seg.num_classes)
            if lm.shape != (h, w):
                raise InputError(f"{label_map}: a {lm.shape[0]}x{lm.shape[1]} label map; the extended canvas is "
                                 f"{h}x{w}")
        result, region, labels = outpaint(seg, gen, image, sides, lm, opts, settings.to_dict())
        action = {"extend": sides, "label_map": label_map}
    elif remove:
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
            "size": list(image.shape[:2]), "out_size": list(result.shape[:2]), "boundary": boundary(result, region),
            "options": opts.__dict__, "sampling": settings.to_dict()}


def boundary(result: np.ndarray, region: np.ndarray) -> dict:
    """The edited region's seam (genseg.metrics.generation.boundary_contrast) on the result."""
    import torch

    from genseg.metrics.generation import boundary_contrast

    x = torch.from_numpy(np.array(result)).permute(2, 0, 1)[None].double() / 255
    return boundary_contrast(x, torch.from_numpy(np.array(region))[None, None])


def write_summary(res: dict, out: str) -> None:
    Path(out).with_suffix(".json").write_text(json.dumps(res, indent=2, default=str))
