"""Mask-driven editing: segment -> select a region -> inpaint it with the diffusion model.

* :func:`remove_objects` - segment with the segmenter, select the given classes, dilate, fill the
  hole (label-guided when the diffusion model is label-conditioned: the hole's labels are grown in
  from the surrounding classes, e.g. road under a removed car).
* :func:`replace_background` - keep the chosen foreground classes, synthesize everything else from
  a label map (or unconditionally).

The result is composited with the original outside a feathered mask: pixels outside the edited
region are bit-identical to the input.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from genseg.diffusion.conditioning import encode_labels, null_condition
from genseg.diffusion.inpaint import composite, inpaint
from genseg.diffusion.sampling import from_uint8, to_uint8
from genseg.data.transforms import to_tensors
from genseg.engine import predict_logits


@dataclass(frozen=True)
class EditOptions:
    sampler: str = "ddim"
    steps: int = 25
    resample: int = 1
    guidance: float = 1.0
    dilate: int = 3          # grow the selected region by this many pixels (at image resolution)
    feather: int = 2         # soft edge inside the region, in pixels
    seed: int = 0


def segment(segmenter, image: np.ndarray, infer_scale: float = 1.0) -> np.ndarray:
    """``image (H, W, 3) uint8`` -> class ids ``(H, W)``."""
    x = to_tensors(image)[None]
    logits = predict_logits(segmenter.eval(), x, image.shape[:2], infer_scale)
    return logits.argmax(1)[0].numpy().astype(np.int64)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0:
        return mask.copy()
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.max_pool2d(m, 2 * radius + 1, 1, radius)[0, 0].numpy() > 0


def fill_labels(labels: np.ndarray, hole: np.ndarray, max_iters: int = 10_000) -> np.ndarray:
    """Grow the labels around ``hole`` into it (nearest surrounding class), one ring at a time."""
    out = labels.copy()
    known = ~hole
    if not known.any():
        return out
    lab = torch.from_numpy(out)
    kn = torch.from_numpy(known)
    h, w = out.shape
    for _ in range(max_iters):
        if bool(kn.all()):
            break
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            # shift without wrap-around: pad with "unknown" on the side we shift in from
            src_lab = F.pad(lab[None, None].float(), (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))[0, 0]
            src_kn = F.pad(kn[None, None].float(), (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)))[0, 0]
            src_lab = src_lab[max(-dy, 0): max(-dy, 0) + h, max(-dx, 0): max(-dx, 0) + w].long()
            src_kn = src_kn[max(-dy, 0): max(-dy, 0) + h, max(-dx, 0): max(-dx, 0) + w] > 0
            take = (~kn) & src_kn
            lab = torch.where(take, src_lab, lab)
            kn = kn | take
    return lab.numpy()


def _to_model(image: np.ndarray, mask: np.ndarray, labels: np.ndarray | None, size: tuple[int, int]):
    """Image, hole and labels at the model's size.  A model pixel is part of the hole when any image
    pixel under it is: a nearest-sampled mask would leave pixels half-covered by the removed object
    "known", and their colour would bleed back into the fill."""
    x = from_uint8(torch.from_numpy(np.array(image))[None])
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    m = (F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=size, mode="area") > 0).float()
    lab = None
    if labels is not None:
        lab = F.interpolate(torch.from_numpy(labels).float()[None, None], size=size, mode="nearest")[0].long()
    return x, m, lab


def _fill(diffusion, train_scheduler, cfg, image: np.ndarray, region: np.ndarray, labels: np.ndarray | None,
          opts: EditOptions, device="cpu") -> np.ndarray:
    """Regenerate ``region`` of ``image`` at the model's size, then composite at full size."""
    size = tuple(cfg.image_size)
    x, m, lab = _to_model(image, region, labels, size)
    cond, w = None, opts.guidance
    if cfg.cond == "mask":
        if lab is not None:
            cond = encode_labels(lab, cfg.num_classes, cfg.ignore_index)
        else:
            cond, w = null_condition(torch.zeros(1, cfg.num_classes + 1, *size)), 0.0
    gen = torch.Generator().manual_seed(opts.seed)
    out = inpaint(diffusion, train_scheduler, x, m, cond=cond, w=w, sampler=opts.sampler, steps=opts.steps,
                  resample=opts.resample, generator=gen, device=device)
    h, w_ = image.shape[:2]
    up = F.interpolate(out, size=(h, w_), mode="bilinear", align_corners=False)
    generated = to_uint8(up)[0].numpy()
    return composite(image, generated, region, opts.feather)


def remove_objects(segmenter, diffusion, train_scheduler, cfg, image: np.ndarray, classes: list[int],
                   opts: EditOptions = EditOptions(), device="cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (edited image, edited region (H, W) bool, segmentation (H, W))."""
    labels = segment(segmenter, image)
    region = dilate(np.isin(labels, classes), opts.dilate)
    if not region.any():
        return image.copy(), region, labels
    fill = fill_labels(labels, region) if cfg.cond == "mask" else None
    return _fill(diffusion, train_scheduler, cfg, image, region, fill, opts, device), region, labels


def replace_background(segmenter, diffusion, train_scheduler, cfg, image: np.ndarray, keep: list[int],
                       label_map: np.ndarray | None, opts: EditOptions = EditOptions(), device="cpu"
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep pixels of the ``keep`` classes; synthesize the rest from ``label_map (H, W)`` (resized to
    the image with NEAREST) or unconditionally when it is None."""
    labels = segment(segmenter, image)
    foreground = np.isin(labels, keep)
    region = ~foreground
    cond_labels = None
    if label_map is not None and cfg.cond == "mask":
        lm = F.interpolate(torch.from_numpy(label_map.astype(np.float32))[None, None], size=labels.shape,
                           mode="nearest")[0, 0].numpy().astype(np.int64)
        cond_labels = np.where(foreground, labels, lm)
    return _fill(diffusion, train_scheduler, cfg, image, region, cond_labels, opts, device), region, labels
