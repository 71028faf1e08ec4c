"""Mask-driven editing: segment -> select a region -> inpaint it with a generative model.

Works with any :class:`genseg.generation.Generator` (its ``inpaint``) and a
:class:`genseg.segmenter.Segmenter`; sampling settings are the generator's unless overridden.

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

from genseg.diffusion.inpaint import composite
from genseg.diffusion.sampling import from_uint8, to_uint8


@dataclass(frozen=True)
class EditOptions:
    resample: int = 1        # RePaint resampling jumps per step
    dilate: int = 3          # grow the selected region by this many pixels (at image resolution)
    feather: int = 2         # soft edge inside the region, in pixels
    seed: int = 0


def segment(segmenter, image: np.ndarray) -> np.ndarray:
    """``image (H, W, 3) uint8`` -> class ids ``(H, W)``."""
    return segmenter.segment(image)


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


def _fill(gen, image: np.ndarray, region: np.ndarray, labels: np.ndarray | None, opts: EditOptions,
          sampling: dict | None = None) -> np.ndarray:
    """Regenerate ``region`` of ``image`` at the model's size, then composite at full size."""
    size = tuple(gen.image_size)
    x, m, lab = _to_model(image, region, labels if gen.conditional else None, size)
    out = gen.inpaint(to_uint8(x), m[:, 0] > 0, lab, opts.seed, resample=opts.resample, **(sampling or {}))
    h, w = image.shape[:2]
    up = F.interpolate(from_uint8(out), size=(h, w), mode="bilinear", align_corners=False)
    generated = to_uint8(up)[0].numpy()
    return composite(image, generated, region, opts.feather)


def remove_objects(segmenter, gen, image: np.ndarray, classes: list[int], opts: EditOptions = EditOptions(),
                   sampling: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (edited image, edited region (H, W) bool, segmentation (H, W))."""
    labels = segment(segmenter, image)
    region = dilate(np.isin(labels, classes), opts.dilate)
    if not region.any():
        return image.copy(), region, labels
    fill = fill_labels(labels, region) if gen.conditional else None
    return _fill(gen, image, region, fill, opts, sampling), region, labels


def replace_background(segmenter, gen, image: np.ndarray, keep: list[int], label_map: np.ndarray | None,
                       opts: EditOptions = EditOptions(), sampling: dict | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep pixels of the ``keep`` classes; synthesize the rest from ``label_map (H, W)`` (resized to
    the image with NEAREST) or unconditionally when it is None."""
    labels = segment(segmenter, image)
    foreground = np.isin(labels, keep)
    region = ~foreground
    cond_labels = None
    if label_map is not None and gen.conditional:
        lm = F.interpolate(torch.from_numpy(label_map.astype(np.float32))[None, None], size=labels.shape,
                           mode="nearest")[0, 0].numpy().astype(np.int64)
        cond_labels = np.where(foreground, labels, lm)
    return _fill(gen, image, region, cond_labels, opts, sampling), region, labels
