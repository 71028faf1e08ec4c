"""A trained segmenter, ready to use: the typed object that ``eval seg``, ``edit``, ``eval gen`` and
Serve hold (built by :func:`genseg.loading.load`)."""
from __future__ import annotations

import numpy as np
import torch

from genseg.data.transforms import to_tensors
from genseg.engine import predict_logits


class Segmenter:
    kind = "segmenter"

    def __init__(self, model: torch.nn.Module, cfg, classes: dict | None = None, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        self.config = cfg
        self.device = torch.device(device)
        self.num_classes = cfg.num_classes
        self.ignore_index = cfg.ignore_index
        self.classes = classes or {}
        self.names = list(self.classes.get("names") or [f"class_{i}" for i in range(cfg.num_classes)])

    @torch.no_grad()
    def logits(self, images: torch.Tensor, out_size: tuple[int, int] | None = None,
               infer_scale: float | None = None) -> torch.Tensor:
        """Normalised ``images (B, 3, H, W)`` -> logits ``(B, K, *out_size)`` (default: the input size),
        resized as logits before any argmax (the evaluation protocol)."""
        scale = self.config.infer_scale if infer_scale is None else infer_scale
        size = tuple(out_size or images.shape[-2:])
        return predict_logits(self.model, images, size, scale, self.device).cpu()

    def segment(self, image: np.ndarray, infer_scale: float | None = None) -> np.ndarray:
        """``image (H, W, 3) uint8`` -> class ids ``(H, W) int64``."""
        x = to_tensors(image)[None]
        return self.logits(x, image.shape[:2], infer_scale).argmax(1)[0].numpy().astype(np.int64)

    def segment_batch(self, images: np.ndarray) -> np.ndarray:
        """``images (N, H, W, 3) uint8`` (one size) -> ``(N, H, W) int64``."""
        x = torch.stack([to_tensors(im) for im in images])
        return self.logits(x).argmax(1).numpy().astype(np.int64)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``images (N, H, W, 3) uint8`` -> pooled encoder features ``(N, D)`` (generation metrics)."""
        x = torch.stack([to_tensors(im.numpy()) for im in images]).to(self.device)
        return self.model.encode(x).cpu()
