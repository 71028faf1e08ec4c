"""Pictures for people: class-coloured masks and image | truth | prediction strips."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from genseg.data.classes import colorize
from genseg.data.transforms import denormalize


def triptych(image, mask, pred, palette, ignore_index: int = 255, gap: int = 2) -> np.ndarray:
    """Rows of ``image | ground truth | prediction`` for each (image, mask, pred) triple.

    ``image`` is a normalised ``(3, H, W)`` tensor or ``(H, W, 3)`` uint8, masks ``(H, W)``."""
    img = image if isinstance(image, np.ndarray) else denormalize(image)
    m = np.asarray(mask)
    p = np.asarray(pred)
    h, w = m.shape
    out = np.full((h, 3 * w + 2 * gap, 3), 255, np.uint8)
    out[:, :w] = img
    out[:, w + gap: 2 * w + gap] = colorize(m, palette, ignore_index)
    out[:, 2 * w + 2 * gap:] = colorize(p, palette, ignore_index)
    return out


def error_map(image, mask, pred, ignore_index: int = 255) -> np.ndarray:
    """The image dimmed to grey where the prediction is right, red where it is wrong, black where the
    label is ignored: ``(H, W, 3) uint8``."""
    img = image if isinstance(image, np.ndarray) else denormalize(image)
    m, p = np.asarray(mask), np.asarray(pred)
    grey = (img.astype(np.float32).mean(axis=2, keepdims=True) * 0.45).astype(np.uint8).repeat(3, axis=2)
    out = grey.copy()
    out[(p != m) & (m != ignore_index)] = (230, 30, 30)
    out[m == ignore_index] = 0
    return out


def quad(image, mask, pred, palette, ignore_index: int = 255, gap: int = 2) -> np.ndarray:
    """``image | ground truth | prediction | error map`` (see :func:`error_map`) in one row."""
    row = triptych(image, mask, pred, palette, ignore_index, gap)
    h = row.shape[0]
    return np.concatenate([row, np.full((h, gap, 3), 255, np.uint8),
                           error_map(image, mask, pred, ignore_index)], axis=1)


def stack_rows(rows: list[np.ndarray], gap: int = 2) -> np.ndarray:
    width = max(r.shape[1] for r in rows)
    parts = []
    for r in rows:
        pad = np.full((r.shape[0], width, 3), 255, np.uint8)
        pad[:, : r.shape[1]] = r
        parts += [pad, np.full((gap, width, 3), 255, np.uint8)]
    return np.concatenate(parts[:-1], axis=0)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def upscale(array: np.ndarray, min_width: int) -> np.ndarray:
    """Enlarge ``(H, W, 3)`` by the smallest whole factor that makes it at least ``min_width`` wide
    (NEAREST: every model pixel stays a crisp square a person can see)."""
    factor = max(1, -(-min_width // array.shape[1]))
    return array if factor == 1 else np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def overlay(image: np.ndarray, labels: np.ndarray, palette, ignore_index: int = 255, alpha: float = 0.5) -> np.ndarray:
    """``image (H, W, 3) uint8`` with the class colours of ``labels (H, W)`` blended over it
    (``alpha`` of colour; ignored pixels keep the image)."""
    colours = colorize(labels, palette, ignore_index).astype(np.float32)
    out = image.astype(np.float32) * (1 - alpha) + colours * alpha
    out = np.where((labels == ignore_index)[..., None], image, np.rint(out))
    return out.clip(0, 255).astype(np.uint8)
