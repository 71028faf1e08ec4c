"""Segmentation metrics from a confusion matrix (torchvision references style).

Rows are the true class, columns the predicted class.  Pixels whose label is the ignore
index are not counted.  A class absent from both labels and predictions has an undefined IoU
(0/0 -> NaN) and is left out of the means, as in the usual CamVid / VOC protocol.
"""
from __future__ import annotations

import torch


class ConfusionMatrix:
    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add ``pred`` and ``target`` of the same shape (class ids, any leading dims)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(target.shape)}")
        pred = pred.reshape(-1).to("cpu", torch.int64)
        target = target.reshape(-1).to("cpu", torch.int64)
        keep = (target != self.ignore_index) & (target >= 0) & (target < self.num_classes)
        k = self.num_classes
        idx = target[keep] * k + pred[keep].clamp(0, k - 1)
        self.mat += torch.bincount(idx, minlength=k * k).reshape(k, k)

    def reset(self) -> None:
        self.mat.zero_()

    def reduce(self) -> None:
        """Sum the matrix over all processes of an initialised ``torch.distributed`` group."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            m = self.mat.to(device)
            dist.all_reduce(m)
            self.mat = m.cpu()

    def compute(self) -> dict:
        """``pixel_acc``, ``mean_acc``, ``iou`` (list, NaN for undefined) and ``miou``."""
        m = self.mat.double()
        tp = m.diag()
        label_count = m.sum(1)
        pred_count = m.sum(0)
        total = m.sum()
        nan = float("nan")
        pixel_acc = (tp.sum() / total).item() if total > 0 else nan
        acc = tp / label_count                        # NaN where a class has no label pixels
        iou = tp / (label_count + pred_count - tp)   # NaN where a class is absent on both sides
        return {
            "pixel_acc": pixel_acc,
            "mean_acc": _nanmean(acc),
            "iou": [float(v) for v in iou],
            "class_acc": [float(v) for v in acc],
            "miou": _nanmean(iou),
        }


def _nanmean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else float("nan")
