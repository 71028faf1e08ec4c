"""``genseg edit``: object removal and background replacement on one image file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from genseg import checkpoint as ckpt_lib
from genseg.config import SegConfig
from genseg.diffusion.schedules import make_train_scheduler
from genseg.editing import EditOptions, remove_objects, replace_background
from genseg.errors import InputError
from genseg.viz import save_png
from jobs.sample_job import load_diffusion

MAX_PIXELS = 4096 * 4096


def load_segmenter(model_dir: Path):
    ck = ckpt_lib.load(model_dir)
    if not isinstance(ck.config, SegConfig):
        raise InputError(f"{model_dir} is a {type(ck.config).__name__} checkpoint, not a segmenter")
    return ck, ckpt_lib.build_model(ck)


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


def read_image(path: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise InputError(f"{path}: {im.width}x{im.height} is larger than the {MAX_PIXELS} pixel limit")
            return np.asarray(im.convert("RGB"))
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


def run(diffusion_dir: Path, segmenter_dir: Path, image_path: str, out: str, *, remove: str | None = None,
        background: str | None = None, keep: str | None = None, opts: EditOptions = EditOptions(),
        device: str = "cpu") -> dict:
    dck, diffusion, _ = load_diffusion(diffusion_dir)
    sck, segmenter = load_segmenter(segmenter_dir)
    names = list((sck.meta.get("classes") or {}).get("names") or [str(i) for i in range(sck.config.num_classes)])
    if dck.config.cond == "mask" and dck.config.num_classes != sck.config.num_classes:
        raise InputError(f"the diffusion model knows {dck.config.num_classes} classes, the segmenter "
                         f"{sck.config.num_classes}: they must share a label set")
    image = read_image(image_path)
    noise = make_train_scheduler(dck.config)
    diffusion.to(device)
    if remove:
        classes = parse_classes(remove, names)
        result, region, labels = remove_objects(segmenter, diffusion, noise, dck.config, image, classes, opts, device)
        action = {"remove": [names[c] for c in classes]}
    else:
        if not keep:
            raise InputError("--background needs --keep CLASS[,CLASS] (the foreground to keep)")
        classes = parse_classes(keep, names)
        lm = read_label_map(background, sck.config.num_classes) if background and background != "none" else None
        result, region, labels = replace_background(segmenter, diffusion, noise, dck.config, image, classes, lm,
                                                    opts, device)
        action = {"keep": [names[c] for c in classes], "background": background}
    out_path = save_png(result, out)
    mask_path = save_png((region * 255).astype(np.uint8), Path(out).with_suffix(".mask.png"))
    res = {"out": str(out_path), "mask": str(mask_path), **action, "edited_pixels": int(region.sum()),
           "size": list(image.shape[:2]), "options": opts.__dict__}
    Path(out).with_suffix(".json").write_text(json.dumps(res, indent=2))
    return res
