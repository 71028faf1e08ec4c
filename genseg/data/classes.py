"""Class specs: names, colours and the ignore index of a label set."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = 255


@dataclass(frozen=True)
class ClassSpec:
    names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = IGNORE_INDEX
    weights: tuple[float, ...] | None = None   # suggested loss weights, one per class

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict:
        return {"names": list(self.names), "palette": [list(c) for c in self.palette],
                "ignore_index": self.ignore_index,
                "weights": list(self.weights) if self.weights else None}

    @classmethod
    def from_dict(cls, d: dict) -> "ClassSpec":
        return cls(tuple(d["names"]), tuple(tuple(int(v) for v in c) for c in d["palette"]),
                   int(d.get("ignore_index", IGNORE_INDEX)),
                   tuple(d["weights"]) if d.get("weights") else None)


# SegNet's CamVid split: 11 classes, 11 = void (mapped to the ignore index).
CAMVID = ClassSpec(
    names=("sky", "building", "pole", "road", "pavement", "tree", "signsymbol", "fence", "car",
           "pedestrian", "bicyclist"),
    palette=((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
             (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0),
             (0, 128, 192)),
    weights=(0.2595, 0.1826, 4.5640, 0.1417, 0.9051, 0.3826, 9.6446, 1.8418, 0.6823, 6.2478, 7.3614),
)
CAMVID_VOID = 11

SYNTHETIC = ClassSpec(
    names=("sky", "ground", "road", "building", "tree", "car", "person"),
    palette=((135, 190, 235), (110, 160, 70), (90, 90, 95), (170, 80, 60), (30, 110, 40),
             (220, 200, 30), (200, 40, 160)),
)


def default_palette(num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """Distinct, deterministic colours for a label set that brought none."""
    rng = np.random.default_rng(12345)
    return tuple(tuple(int(v) for v in rng.integers(40, 256, 3)) for _ in range(num_classes))


def colorize(mask: np.ndarray, palette, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 colours; ignored pixels are black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    out = lut[mask.astype(np.uint8)]
    out[mask == ignore_index] = 0
    return out


def rgb_to_index(rgb: np.ndarray, palette, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(H, W, 3) colour mask -> (H, W) class ids; colours not in the palette -> ``-1``."""
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    out = np.full(codes.shape, -1, dtype=np.int64)
    for idx, (r, g, b) in enumerate(palette):
        out[codes == ((r << 16) | (g << 8) | b)] = idx
    return out


def class_ids(spec, names: list[str] | tuple[str, ...]) -> list[int]:
    """Class names (case-insensitive) or ids -> ids: ``"car,3"`` or ``["car", 3]``.  Raises
    :class:`genseg.errors.InputError` naming an unknown class and the ones that exist."""
    from genseg.errors import InputError

    tokens = spec.split(",") if isinstance(spec, str) else list(spec or [])
    lower = [n.lower() for n in names]
    out: list[int] = []
    for tok in tokens:
        if isinstance(tok, bool) or not isinstance(tok, (str, int)):
            raise InputError(f"a class must be a name or an id, got {tok!r}")
        text = str(tok).strip()
        if not text:
            continue
        if text.isdigit() and int(text) < len(names):
            out.append(int(text))
        elif text.lower() in lower:
            out.append(lower.index(text.lower()))
        else:
            raise InputError(f"unknown class {text!r}; the segmenter knows: {', '.join(names)}")
    if not out:
        raise InputError("no classes given")
    return out
