"""Class weights for the segmentation loss, from a shard manifest's pixel counts (plain Python).

``none`` | ``median-freq`` (SegNet's median-frequency balancing) | ``inv-sqrt`` (1/sqrt of the
frequency, a milder balance) | ``dataset`` (the class spec's suggested weights), each optionally
capped as ``NAME:CAP``.
"""
from __future__ import annotations

import numpy as np

from genseg.config import ConfigError


def _train_frequencies(manifest: dict) -> np.ndarray:
    """Each class's share of the labelled training pixels (the whole data set's where a manifest
    lacks per-split counts)."""
    counts = (manifest.get("splits", {}).get("train") or {}).get("class_pixels") or manifest["class_pixels"]
    freq = np.asarray(counts, dtype=np.float64)
    return freq / max(freq.sum(), 1)


def median_frequency_weights(manifest: dict) -> tuple[float, ...]:
    """SegNet's median-frequency balancing from the training pixels' class histogram (never the
    val or holdout pixels)."""
    freq = _train_frequencies(manifest)
    present = freq > 0
    med = np.median(freq[present]) if present.any() else 1.0
    w = np.where(present, med / np.where(present, freq, 1), 0.0)
    return tuple(round(float(v), 4) for v in w)


def inverse_sqrt_weights(manifest: dict) -> tuple[float, ...]:
    """``1 / sqrt(frequency)`` of the training pixels, scaled to mean 1 over the classes present: a
    milder balance than median frequency (a class 100x rarer weighs 10x, not 100x)."""
    freq = _train_frequencies(manifest)
    present = freq > 0
    w = np.where(present, 1 / np.sqrt(np.where(present, freq, 1)), 0.0)
    w = w / w[present].mean() if present.any() else w
    return tuple(round(float(v), 4) for v in w)


WEIGHTINGS = ("none", "median-freq", "inv-sqrt", "dataset")


def parse_class_weights(text: str | None) -> tuple[str | None, float | None]:
    """``NAME`` or ``NAME:CAP`` (a weighting whose weights are clipped to at most CAP) -> (name, cap)."""
    if text is None or isinstance(text, (tuple, list)):
        return text, None
    try:                                 # a list of weights, one per class: the config checks it
        [float(v) for v in str(text).split(",")]
        return text, None
    except ValueError:
        pass
    name, _, cap = str(text).partition(":")
    if name not in WEIGHTINGS:
        raise ConfigError(f"--class-weights {text}: unknown weighting {name!r}; choose one of "
                                     f"{', '.join(WEIGHTINGS)}, optionally capped as NAME:CAP (e.g. median-freq:5)")
    if not cap:
        return name, None
    try:
        value = float(cap)
    except ValueError:
        value = float("nan")
    if not (value > 0 and np.isfinite(value)) or name == "none":
        raise ConfigError(f"--class-weights {text}: the cap must be a number > 0 after a weighting "
                                     f"(e.g. median-freq:5)")
    return name, value
