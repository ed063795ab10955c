"""Segmentation metrics from a confusion matrix: per-class IoU, mIoU, pixel accuracy.

The matrix is accumulated with ``torch.bincount`` (rows: ground truth, columns: prediction;
pixels labelled ``ignore_index`` are skipped) and summed across DDP ranks with one all-reduce
before the scores are taken, as torchvision's segmentation reference does.

Classes absent from both the labels and the predictions have no IoU (0 / 0): their IoU is
NaN and mIoU averages over the other classes only, so a split that lacks a class is not
penalised for it. A class that is predicted but never labelled has IoU 0 and counts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .losses import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates a (K, K) int64 confusion matrix over batches."""

    def __init__(self, num_classes: int, *, ignore_index: int = IGNORE_INDEX, device=None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """pred, target: integer label maps of the same shape (predictions: argmax of logits)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(target.shape)}")
        K = self.num_classes
        target = target.to(self.mat.device).long().flatten()
        pred = pred.to(self.mat.device).long().flatten()
        keep = target != self.ignore_index
        target, pred = target[keep], pred[keep]
        if target.numel() and (int(target.max()) >= K or int(target.min()) < 0):
            raise ValueError(f"label values must be in [0, {K}) or {self.ignore_index}")
        if pred.numel() and (int(pred.max()) >= K or int(pred.min()) < 0):
            raise ValueError(f"predicted classes must be in [0, {K})")
        self.mat += torch.bincount(target * K + pred, minlength=K * K).view(K, K)

    def all_reduce(self) -> None:
        """Sums the matrix across the ranks of the default process group (no-op without one)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat)

    def reset(self) -> None:
        self.mat.zero_()

    def iou(self) -> Tensor:
        """Per-class IoU (K,), float64; NaN for classes absent from labels and predictions."""
        mat = self.mat.double()
        tp = mat.diag()
        union = mat.sum(0) + mat.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))

    def miou(self) -> float:
        return float(self.iou().nanmean())

    def pixel_accuracy(self) -> float:
        total = self.mat.sum()
        return float(self.mat.diag().sum().double() / total) if total else float("nan")

    def summary(self) -> dict[str, object]:
        """{"miou", "pixel_accuracy", "iou": per-class list (None for NaN)}."""
        iou = self.iou().tolist()
        return {"miou": self.miou(), "pixel_accuracy": self.pixel_accuracy(),
                "iou": [None if v != v else v for v in iou]}
