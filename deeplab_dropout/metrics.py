"""Segmentation metrics: a dataset-level confusion matrix plus each image's per-class intersection and union
counts (from which the dataset and per-image mIoU both follow), computed on the tensors' device.

mIoU (dataset and per image) averages IoU over the classes present in the ground truth or the prediction,
so a class absent from both does not count as 0 or 1. Pixels labelled ``ignore_index`` are left out.
"""
from __future__ import annotations

import math

import torch


def iou_from_confusion(conf: torch.Tensor) -> torch.Tensor:
    """Per-class IoU from (..., K, K) confusion matrices (rows = truth); NaN where a class is in neither."""
    conf = conf.double()
    tp = conf.diagonal(dim1=-2, dim2=-1)
    union = conf.sum(-1) + conf.sum(-2) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))


def iou_from_counts(intersection: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """Per-class IoU from (..., K) intersection and union pixel counts; NaN where the union is empty."""
    intersection, union = torch.as_tensor(intersection).double(), torch.as_tensor(union).double()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.full_like(union, math.nan))


def miou_from_counts(intersection: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """mIoU over the last axis of (..., K) counts, classes with an empty union left out (NaN if all are).

    Summing per-image counts over images first gives the dataset mIoU; this is how ``compute`` gets it, so a
    recount from saved per-image counts is exactly equal.
    """
    return torch.nanmean(iou_from_counts(intersection, union), dim=-1)


class SegmentationMetrics:
    """Accumulates ``update(pred, target)`` over (N, H, W) label maps; ``compute()`` returns a plain dict."""

    def __init__(self, num_classes: int = 21, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self.confusion: torch.Tensor | None = None
        self._image_counts: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted and ground-truth label maps, both (N, H, W) (or (H, W)) integer tensors."""
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.dim() == 2:
            pred, target = pred[None], target[None]
        k = self.num_classes
        n = pred.shape[0]
        pred = pred.reshape(n, -1).long()
        target = target.reshape(n, -1).long()
        valid = target != self.ignore_index
        if bool(((target < 0) | (target >= k))[valid].any()):
            raise ValueError(f"target labels must be in [0, {k}) or {self.ignore_index}")
        if bool(((pred < 0) | (pred >= k)).any()):
            raise ValueError(f"predicted labels must be in [0, {k})")
        # One bincount for the whole batch: bin = image * K² + truth * K + prediction.
        image = torch.arange(n, device=pred.device)[:, None].expand_as(pred)
        bins = (image * k * k + target * k + pred)[valid]
        per_image = torch.bincount(bins, minlength=n * k * k).reshape(n, k, k)
        batch = per_image.sum(0)
        self.confusion = batch if self.confusion is None else self.confusion + batch
        tp = per_image.diagonal(dim1=-2, dim2=-1)
        union = per_image.sum(-1) + per_image.sum(-2) - tp
        self._image_counts.append(torch.stack([tp, union], dim=-1).cpu())

    @property
    def image_counts(self) -> torch.Tensor:
        """int64 (N, K, 2), the images in update order: [..., 0] intersection, [..., 1] union pixels."""
        if not self._image_counts:
            return torch.zeros(0, self.num_classes, 2, dtype=torch.long)
        return torch.cat(self._image_counts)

    @property
    def image_miou(self) -> torch.Tensor:
        """mIoU of every image seen, in update order (NaN for an image with only ignored pixels)."""
        counts = self.image_counts
        return miou_from_counts(counts[..., 0], counts[..., 1])

    def compute(self) -> dict:
        """``miou``, ``pixel_acc``, ``class_iou`` (None for classes absent from truth and prediction) and
        ``per_image_miou`` {mean, std (population), min, median, max} over images with valid pixels."""
        k = self.num_classes
        conf = self.confusion if self.confusion is not None else torch.zeros(k, k, dtype=torch.long)
        # Through the per-image counts and the same functions a reader of per_image.npz uses, so that a
        # recount from that file gives these numbers bit for bit.
        counts = self.image_counts.sum(0)
        iou = iou_from_counts(counts[..., 0], counts[..., 1])
        total = conf.sum().item()
        per_image = self.image_miou
        return {
            "miou": miou_from_counts(counts[..., 0], counts[..., 1]).item(),
            "pixel_acc": conf.diagonal().sum().item() / total if total else math.nan,
            "class_iou": [None if math.isnan(v) else v for v in iou.tolist()],
            "per_image_miou": image_stats(per_image),
        }


def image_stats(image_miou: torch.Tensor) -> dict[str, float]:
    """{mean, std (population), min, median, max} of per-image mIoUs, NaN (no class present) left out."""
    values = image_miou[~image_miou.isnan()]
    if not values.numel():
        return dict.fromkeys(("mean", "std", "min", "median", "max"), math.nan)
    return {
        "mean": values.mean().item(),
        "std": values.std(correction=0).item(),
        "min": values.min().item(),
        # The average of the two middle values, like numpy (torch.median returns the lower one).
        "median": values.quantile(0.5).item(),
        "max": values.max().item(),
    }
