"""Seeded synthetic street-like scenes with exact masks.

Each scene has sky / ground / road bands and textured objects (buildings, trees, cars, people)
drawn on top, so a segmenter has something real to learn: classes differ in colour *and*
texture and shape, and objects occlude each other.  Same ``(seed, index, size)`` -> same bytes.
"""
from __future__ import annotations

import numpy as np

from genseg.data.classes import SYNTHETIC

SKY, GROUND, ROAD, BUILDING, TREE, CAR, PERSON = range(7)
_BASE = np.asarray(SYNTHETIC.palette, dtype=np.float32)


def _texture(rng: np.random.Generator, h: int, w: int, kind: int) -> np.ndarray:
    """A per-class texture in [-1, 1] of shape (h, w)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    f = rng.uniform(0.3, 0.6)
    if kind == BUILDING:   # windows grid
        return np.sign(np.sin(xx * f) * np.sin(yy * f)) * 0.5
    if kind == TREE:       # blotchy noise
        return rng.standard_normal((h, w)).astype(np.float32) * 0.6
    if kind == ROAD:       # horizontal streaks
        return np.sin(yy * 1.3) * 0.25
    if kind == GROUND:
        return rng.standard_normal((h, w)).astype(np.float32) * 0.3
    if kind == SKY:        # smooth vertical gradient
        return (yy / max(h, 1) - 0.5) * 0.6
    return np.zeros((h, w), np.float32)


def make_scene(seed: int, index: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``image (H, W, 3) uint8`` and ``mask (H, W) uint8`` with class ids 0..6."""
    rng = np.random.default_rng([seed, index])
    h, w = height, width
    mask = np.empty((h, w), np.uint8)
    horizon = int(h * rng.uniform(0.3, 0.5))
    road_top = int(horizon + (h - horizon) * rng.uniform(0.25, 0.6))
    mask[:horizon] = SKY
    mask[horizon:road_top] = GROUND
    mask[road_top:] = ROAD
    yy, xx = np.mgrid[0:h, 0:w]

    # buildings stand on the horizon, trees beside them
    for _ in range(rng.integers(1, 4)):
        bw = int(w * rng.uniform(0.1, 0.3))
        bh = int(h * rng.uniform(0.15, 0.35))
        x0 = int(rng.integers(0, max(1, w - bw)))
        mask[max(0, horizon - bh): horizon + 2, x0: x0 + bw] = BUILDING
    for _ in range(rng.integers(0, 3)):
        cx, cy = rng.integers(0, w), horizon - rng.integers(0, max(2, h // 8))
        r = max(2, int(min(h, w) * rng.uniform(0.06, 0.12)))
        mask[(xx - cx) ** 2 + ((yy - cy) * 1.3) ** 2 <= r * r] = TREE
    # cars on the road (rounded boxes), people on the ground or road (thin ellipses)
    for _ in range(rng.integers(0, 3)):
        cw, ch = int(w * rng.uniform(0.12, 0.25)), int(h * rng.uniform(0.06, 0.12))
        cx = int(rng.integers(0, max(1, w - cw)))
        cy = int(rng.integers(road_top, max(road_top + 1, h - ch)))
        mask[cy: cy + ch, cx: cx + cw] = CAR
    for _ in range(rng.integers(0, 3)):
        cx, cy = rng.integers(0, w), rng.integers(horizon, h)
        rx, ry = max(1, w // 60 + 1), max(2, int(h * rng.uniform(0.05, 0.1)))
        mask[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1] = PERSON

    # colour each class with a jittered base colour plus its own texture
    image = np.zeros((h, w, 3), np.float32)
    for cls in range(len(_BASE)):
        sel = mask == cls
        if not sel.any():
            continue
        colour = _BASE[cls] + rng.uniform(-20, 20, 3)
        tex = _texture(rng, h, w, cls)[sel][:, None] * 40.0
        image[sel] = colour + tex
    image += rng.standard_normal((h, w, 3)).astype(np.float32) * 6.0  # sensor noise
    return np.clip(image, 0, 255).astype(np.uint8), mask
