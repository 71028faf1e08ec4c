"""Reading images and label maps a user hands in (a file for the CLI, request bytes for Serve), with
the checks both need: size limits before decoding, one clear error naming what is wrong.

* :func:`read_image` -> ``(H, W, 3) uint8`` RGB.
* :func:`read_label_map` -> ``(H, W) int64`` class ids: a single-channel PNG of class ids, or an RGB
  PNG painted in the label set's palette (what a browser canvas produces).
* :func:`png_bytes` -> PNG-encoded bytes of an array.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

from genseg.data.classes import rgb_to_index
from genseg.errors import InputError

MAX_PIXELS = 4096 * 4096


class ImageError(InputError):
    """An image or label map that cannot be used: unreadable, too large, wrong shape or values."""


class ImageTooLarge(ImageError):
    """Over the pixel limit (refused before decoding; HTTP 413 in the Serve app)."""


def _open(source: bytes | str | Path):
    return Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)


def _name(source, what: str) -> str:
    return what if isinstance(source, (bytes, bytearray)) else str(source)


@contextlib.contextmanager
def _opened(source: bytes | str | Path, name: str, kind: str, max_pixels: int):
    """The PIL image of ``source``, refused over ``max_pixels`` before it is decoded; every decoding
    failure is one :class:`ImageError` naming ``name``."""
    try:
        with _open(source) as im:
            if im.width * im.height > max_pixels:
                raise ImageTooLarge(f"{name}: {im.width}x{im.height} pixels (width x height) is over the limit of "
                                 f"{max_pixels:,} pixels; downscale it first")
            yield im
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"{name}: the {kind} is over the limit of {max_pixels:,} pixels; downscale it first") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not a readable {kind} (unknown format or corrupt data)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: not a readable {kind} ({_first(exc)})") from None


def read_image(source: bytes | str | Path, *, max_pixels: int = MAX_PIXELS, what: str = "image") -> np.ndarray:
    """An RGB image from a path or bytes, refusing one over ``max_pixels`` before it is decoded."""
    with _opened(source, _name(source, what), "image", max_pixels) as im:
        return np.asarray(im.convert("RGB"))


def read_label_map(source: bytes | str | Path, num_classes: int, *, ignore_index: int = 255,
                   palette=None, max_pixels: int = MAX_PIXELS, what: str = "label map") -> np.ndarray:
    """Class ids ``(H, W) int64`` from a single-channel PNG of ids (``ignore_index`` = unknown) or,
    when ``palette`` is given, an RGB(A) PNG whose every colour is one of the palette's."""
    name = _name(source, what)
    with _opened(source, name, "label map", max_pixels) as im:
        if im.mode == "P":   # a paletted PNG: its indices are the class ids
            lm = np.asarray(im)
        elif im.mode in ("RGB", "RGBA") and palette is not None:
            rgb = np.asarray(im.convert("RGB"))
            lm = rgb_to_index(rgb, palette, ignore_index)
            if (lm < 0).any():
                raise ImageError(f"{name}: {int((lm < 0).sum())} pixels have colours that are not in the label "
                                 f"set's palette (e.g. {rgb[lm < 0][:3].tolist()}); paint with the class colours only")
        else:
            lm = np.asarray(im)
    if lm.ndim != 2:
        raise ImageError(f"{name}: a label map must be a single-channel PNG of class ids"
                         + (" or an RGB PNG in the class colours" if palette is not None else "")
                         + f", got an image of shape {lm.shape}")
    lm = lm.astype(np.int64)
    bad = np.unique(lm[(lm >= num_classes) & (lm != ignore_index)])
    if bad.size:
        raise ImageError(f"{name}: label values {bad[:10].tolist()} are out of range 0..{num_classes - 1} "
                         f"(or {ignore_index} for unknown)")
    return lm


def png_bytes(array: np.ndarray) -> bytes:
    """``(H, W)`` uint8 ids or ``(H, W, 3)`` uint8 RGB -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array.astype(np.uint8))).save(buf, format="PNG")
    return buf.getvalue()


def _first(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
