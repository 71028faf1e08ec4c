"""``genseg eval seg``: evaluate a segmenter on a shard split at each mask's own resolution."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from genseg import engine
from genseg.data.shards import read_manifest
from genseg.errors import InputError
from pipelines.shards import iter_split


def run(seg, data: str, split: str = "val", infer_scale: float | None = None, limit: int | None = None,
        flip: bool = False, scales: tuple[float, ...] | None = None, pictures: str | None = None,
        pictures_num: int = 4) -> dict:
    """Evaluate a loaded :class:`genseg.segmenter.Segmenter` on a shard split.  ``flip``/``scales``:
    test-time augmentation, averaged in logit space (off by default; the JSON says which was used).
    ``pictures``: a PNG of ``image | truth | prediction | error map`` for the first ``pictures_num``
    images."""
    manifest = read_manifest(data)
    cfg = seg.config
    if manifest["num_classes"] != cfg.num_classes:
        raise InputError(f"{data}: shards have {manifest['num_classes']} classes but the model predicts "
                         f"{cfg.num_classes}")
    scale = cfg.infer_scale if infer_scale is None else infer_scale
    t0 = time.perf_counter()
    count = [0]

    def counted():
        for sample in engine.eval_samples(iter_split(data, split, limit=limit)):
            count[0] += 1
            yield sample

    scales = tuple(scales or (1.0,))
    for v in scales:
        if not (v > 0 and math.isfinite(v)):
            raise InputError(f"--tta-scales: every scale must be a number > 0, got {v}")
    cm, kept = engine.evaluate(seg.model, counted(), cfg.num_classes, cfg.ignore_index, scale, seg.device,
                               keep=pictures_num if pictures else 0, flip=flip, scales=scales)
    if count[0] == 0:
        raise InputError(f"{data} [{split}] holds no images to evaluate")
    if int(cm.mat.sum()) == 0:
        raise InputError(f"{data} [{split}]: every pixel is the ignore index {cfg.ignore_index}; nothing to score")
    res = cm.compute()
    names = manifest["classes"]["names"]
    if pictures and kept:
        from genseg.viz import quad, save_png, stack_rows

        Path(pictures).parent.mkdir(parents=True, exist_ok=True)
        save_png(stack_rows([quad(i, m, p, manifest["classes"]["palette"], cfg.ignore_index) for i, m, p in kept]),
                 pictures)
    return {
        "model_path": str(seg.path), "model_epoch": seg.epoch, "data": str(Path(data).resolve()), "split": split,
        "images": count[0], "pixels": int(cm.mat.sum()),
        "miou": res["miou"], "pixel_acc": res["pixel_acc"], "mean_acc": res["mean_acc"],
        "per_class_iou": {n: _clean(v) for n, v in zip(names, res["iou"])},
        "per_class_acc": {n: _clean(v) for n, v in zip(names, res["class_acc"])},
        "protocol": {"resolution": "each mask's own", "logits_resized_before_argmax": True,
                     "ignored_index": cfg.ignore_index, "infer_scale": scale,
                     "tta": {"flip": bool(flip), "scales": list(scales)}},
        "seconds": round(time.perf_counter() - t0, 3),
    }


def check_picture_path(path: str) -> None:
    """``--pictures``: a .png whose directory exists (or can be made) and is writable; one line if not."""
    import os

    p = Path(path)
    if p.suffix.lower() != ".png":
        raise InputError(f"--pictures {path}: the picture is written as PNG; give a path ending in .png")
    parent = p.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise InputError(f"--pictures {path}: cannot write under {parent}")
    if p.is_dir():
        raise InputError(f"--pictures {path} is a directory; give a file name ending in .png")


def _clean(v: float):
    return None if math.isnan(v) else v


def format_table(res: dict) -> str:
    lines = [f"{'class':<14}{'IoU':>8}{'acc':>8}"]
    for name, iou in res["per_class_iou"].items():
        acc = res["per_class_acc"][name]
        lines.append(f"{name:<14}{_pct(iou):>8}{_pct(acc):>8}")
    lines.append("-" * 30)
    lines.append(f"{'mIoU':<14}{_pct(res['miou']):>8}")
    lines.append(f"{'pixel acc':<14}{_pct(res['pixel_acc']):>8}")
    lines.append(f"{'mean acc':<14}{_pct(res['mean_acc']):>8}")
    return "\n".join(lines)


def _pct(v) -> str:
    return "   n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def write_json(res: dict, path: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(res, indent=2, allow_nan=False))
