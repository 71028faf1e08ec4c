"""Mask-driven editing: segment -> select a region -> inpaint it with a generative model.

Works with any :class:`genseg.generation.Generator` (its ``inpaint``) and a
:class:`genseg.segmenter.Segmenter`; sampling settings are the generator's unless overridden.

* :func:`remove_objects` - segment with the segmenter, select the given classes, dilate, fill the
  hole (label-guided when the diffusion model is label-conditioned: the hole's labels are grown in
  from the surrounding classes, e.g. road under a removed car).
* :func:`replace_background` - keep the chosen foreground classes, synthesize everything else from
  a label map (or unconditionally).
* :func:`outpaint` - grow the canvas by the given margins and fill the new pixels, conditioned on
  the segmenter's labels grown outwards (or a given label map).

The model works at its own size.  By default the whole image is resized to it; ``crop`` ("only the
region") cuts the region's bounding box plus a margin, grown to the model's aspect ratio, so a small
region is filled at the model's full resolution and pasted back in place.  The result is
composited with the original inside a feathered mask: pixels outside the edited region are
bit-identical to the input.
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
    crop: bool = False       # "only the region": fill a box around it at the model's size, paste it back
    margin: int = 16         # context around the region's bounding box in crop mode, in pixels


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


def model_inputs(image: np.ndarray, region: np.ndarray, labels: np.ndarray | None, size: tuple[int, int]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Image ``(1, h, w, 3) uint8``, hole ``(1, h, w) bool`` and labels ``(1, h, w)`` (or None) at the
    model's ``size``, ready for ``Generator.inpaint``.  A model pixel is part of the hole when any
    image pixel under it is: a nearest-sampled mask would leave pixels half-covered by the removed
    object "known", and their colour would bleed back into the fill."""
    x = from_uint8(torch.from_numpy(np.array(image))[None])
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    m = F.interpolate(torch.from_numpy(region.astype(np.float32))[None, None], size=size, mode="area") > 0
    lab = None
    if labels is not None:
        lab = F.interpolate(torch.from_numpy(labels).float()[None, None], size=size, mode="nearest-exact")[0].long()
    return to_uint8(x), m[:, 0], lab


def paste(image: np.ndarray, generated: torch.Tensor, region: np.ndarray, feather: int) -> np.ndarray:
    """The model-size result ``generated (1, h, w, 3) uint8`` upsampled to the image and composited
    inside ``region``: pixels outside it are the input's, bit for bit."""
    h, w = image.shape[:2]
    up = F.interpolate(from_uint8(generated), size=(h, w), mode="bilinear", align_corners=False)
    return composite(image, to_uint8(up)[0].numpy(), region, feather)


def removal_region(labels: np.ndarray, classes: list[int], opts: EditOptions, conditional: bool
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """-> (the region to regenerate: the classes' pixels, dilated; the labels to condition the fill
    on: the surrounding classes grown into the region, or None for an unconditional model)."""
    region = dilate(np.isin(labels, classes), opts.dilate)
    return region, (fill_labels(labels, region) if conditional and region.any() else None)


def background_region(labels: np.ndarray, keep: list[int], label_map: np.ndarray | None, conditional: bool
                      ) -> tuple[np.ndarray, np.ndarray | None]:
    """-> (everything but the ``keep`` classes; the labels to synthesize it from: ``label_map``
    (resized to the image with NEAREST) outside the kept pixels, or None = unconditional)."""
    foreground = np.isin(labels, keep)
    cond_labels = None
    if label_map is not None and conditional:
        lm = F.interpolate(torch.from_numpy(label_map.astype(np.float32))[None, None], size=labels.shape,
                           mode="nearest-exact")[0, 0].numpy().astype(np.int64)
        cond_labels = np.where(foreground, labels, lm)
    return ~foreground, cond_labels


def crop_box(region: np.ndarray, size: tuple[int, int], margin: int) -> tuple[int, int, int, int]:
    """-> ``(top, left, height, width)``: the bounding box of ``region`` plus ``margin`` pixels, grown to
    the aspect ratio of the model's ``size`` (so the fill is not stretched) and kept inside the
    image; as large as the image in a direction where it cannot fit."""
    ys, xs = np.nonzero(region)
    big_h, big_w = region.shape
    y0, y1 = ys.min() - margin, ys.max() + 1 + margin
    x0, x1 = xs.min() - margin, xs.max() + 1 + margin
    h, w = y1 - y0, x1 - x0
    aspect = size[0] / size[1]
    if h / w < aspect:
        h = int(np.ceil(w * aspect))
    else:
        w = int(np.ceil(h / aspect))
    h, w = min(h, big_h), min(w, big_w)
    top = int(round((ys.min() + ys.max() + 1) / 2 - h / 2))
    left = int(round((xs.min() + xs.max() + 1) / 2 - w / 2))
    return min(max(top, 0), big_h - h), min(max(left, 0), big_w - w), h, w


def _fill(gen, image: np.ndarray, region: np.ndarray, labels: np.ndarray | None, opts: EditOptions,
          sampling: dict | None = None) -> np.ndarray:
    """Regenerate ``region`` of ``image`` at the model's size, then composite at full size (in crop
    mode: a box around the region, pasted back where it was cut)."""
    labels = labels if gen.conditional else None
    if opts.crop:
        top, left, h, w = crop_box(region, tuple(gen.image_size), opts.margin)
        box = (slice(top, top + h), slice(left, left + w))
        sub = _fill(gen, image[box], region[box], None if labels is None else labels[box],
                    EditOptions(**{**opts.__dict__, "crop": False}), sampling)
        out = image.copy()
        out[box] = sub
        return out
    x, hole, lab = model_inputs(image, region, labels, tuple(gen.image_size))
    out = gen.inpaint(x, hole, lab, opts.seed, resample=opts.resample, **(sampling or {}))
    return paste(image, out, region, opts.feather)


SIDES = ("top", "bottom", "left", "right")


def extend_canvas(image: np.ndarray, extend: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """-> (the image on a canvas grown by ``extend`` pixels per side, its border replicated into the new
    pixels; the new pixels ``(H', W') bool``)."""
    t, b, l, r = (int(extend.get(k, 0)) for k in SIDES)
    canvas = np.pad(image, ((t, b), (l, r), (0, 0)), mode="edge")
    new = np.ones(canvas.shape[:2], bool)
    new[t: t + image.shape[0], l: l + image.shape[1]] = False
    return canvas, new


def outpaint(segmenter, gen, image: np.ndarray, extend: dict[str, int], label_map: np.ndarray | None = None,
             opts: EditOptions = EditOptions(), sampling: dict | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grow ``image`` by ``extend`` (``{"left": 64, ...}``) and fill the new pixels.  A conditioned model
    follows ``label_map`` (the grown canvas's size) or else the segmenter's labels of the image grown
    outwards.  The original pixels come back unchanged.  -> (canvas, new pixels, labels)."""
    bad = sorted(set(extend) - set(SIDES))
    if bad or any(int(v) < 0 for v in extend.values()) or not any(int(v) > 0 for v in extend.values()):
        raise ValueError(f"extend needs pixels >= 0 for {', '.join(SIDES)}, at least one > 0; got {extend}")
    canvas, new = extend_canvas(image, extend)
    labels = None
    if gen.conditional:
        if label_map is not None:
            if label_map.shape != new.shape:
                raise ValueError(f"the label map is {label_map.shape[0]}x{label_map.shape[1]}, the extended canvas "
                                 f"{new.shape[0]}x{new.shape[1]}")
            labels = label_map.astype(np.int64)
        else:
            t, l = int(extend.get("top", 0)), int(extend.get("left", 0))
            grown = np.zeros(new.shape, np.int64)
            grown[t: t + image.shape[0], l: l + image.shape[1]] = segment(segmenter, image)
            labels = fill_labels(grown, new)
    out = _fill(gen, canvas, new, labels, EditOptions(**{**opts.__dict__, "crop": True}), sampling)
    return out, new, labels if labels is not None else np.zeros(new.shape, np.int64)


def remove_objects(segmenter, gen, image: np.ndarray, classes: list[int], opts: EditOptions = EditOptions(),
                   sampling: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (edited image, edited region (H, W) bool, segmentation (H, W))."""
    labels = segment(segmenter, image)
    region, fill = removal_region(labels, classes, opts, gen.conditional)
    if not region.any():
        return image.copy(), region, labels
    return _fill(gen, image, region, fill, opts, sampling), region, labels


def replace_background(segmenter, gen, image: np.ndarray, keep: list[int], label_map: np.ndarray | None,
                       opts: EditOptions = EditOptions(), sampling: dict | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep pixels of the ``keep`` classes; synthesize the rest from ``label_map (H, W)`` (resized to
    the image with NEAREST) or unconditionally when it is None."""
    labels = segment(segmenter, image)
    region, cond_labels = background_region(labels, keep, label_map, gen.conditional)
    return _fill(gen, image, region, cond_labels, opts, sampling), region, labels
