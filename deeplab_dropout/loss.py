"""The `loss` config group: per-pixel cross-entropy (or focal loss) over valid pixels, optionally class-weighted,
reduced as the study's code did.

The authors' code (and the PyTorch reimplementation it builds on) divides the pixel mean once more by the
batch size; the study's learning rates (7e-3 / 7e-2) and its Loss column (0.02-0.08) are on that scale.
With class weights w the mean is PyTorch's weighted mean, Σ w[y]·ℓ / Σ w[y] over valid pixels (what
``F.cross_entropy(weight=w)`` returns), so the pixel count becomes the weight sum.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def pixel_loss_sum(logits: Tensor, target: Tensor, ignore_index: int = 255, weight: Tensor | None = None,
                   gamma: float = 0.0) -> tuple[Tensor, float]:
    """Σ w[y]·ℓ over valid pixels (computed in fp32) and Σ w[y] (the valid pixel count when ``weight`` is
    None). ℓ = −(1−p_t)^γ·log p_t: cross-entropy at γ = 0, focal loss (Lin et al. 2017) for γ > 0."""
    logits = logits.float()
    valid = target != ignore_index
    if gamma == 0:
        loss = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction="sum")
    else:
        safe = torch.where(valid, target, 0)[:, None]  # any class index: the term is masked out below
        log_pt = F.log_softmax(logits, dim=1).gather(1, safe)[:, 0]
        # Clamped: at p_t = 1 a γ < 1 power has an infinite slope, and inf·0 would make the gradient NaN.
        focal = -(1 - log_pt.exp()).clamp_min(torch.finfo(torch.float32).tiny).pow(gamma) * log_pt
        if weight is not None:
            focal = focal * weight[safe[:, 0]]
        loss = torch.where(valid, focal, 0).sum()
    if weight is None:
        return loss, int(valid.sum())
    # Per-class pixel counts · weights in float64: exact enough over any number of pixels and steps.
    counts = torch.bincount(target[valid], minlength=weight.numel())
    return loss, float((counts.double() * weight.double()).sum())


def reduce_loss(loss_sum: Tensor | float, n_pixels: float, batch_size: int, loss_cfg) -> Tensor | float:
    """The configured loss from a pixel sum and its weight sum ``n_pixels`` (the valid pixel count when
    unweighted): the weighted mean over valid pixels, divided once more by the batch size when
    ``loss_cfg.batch_average`` (the authors' code), else the plain mean (``loss_cfg``: the loss group or a
    Criterion)."""
    mean = loss_sum / n_pixels if n_pixels > 0 else loss_sum * 0.0
    return mean / batch_size if loss_cfg.batch_average else mean


@dataclass(frozen=True, eq=False)
class Criterion:
    """The configured per-pixel loss: ``criterion(logits, target)`` -> (loss sum, weight sum) as
    ``pixel_loss_sum``; ``weight`` already holds loss.alpha and lives on the model's device. ``reduce`` turns
    sums into the configured loss (loss.batch_average over ``batch_size``, trainer.batch_size)."""

    ignore_index: int = 255
    weight: Tensor | None = None
    gamma: float = 0.0
    batch_average: bool = True
    batch_size: int = 1

    def __call__(self, logits: Tensor, target: Tensor) -> tuple[Tensor, float]:
        return pixel_loss_sum(logits, target, self.ignore_index, self.weight, self.gamma)

    def reduce(self, loss_sum: Tensor | float, n_pixels: float, batch_size: int | None = None) -> Tensor | float:
        """``reduce_loss`` of a loss sum and its weight sum, over ``batch_size`` (default: the configured one)."""
        return reduce_loss(loss_sum, n_pixels, batch_size or self.batch_size, self)


def make_criterion(cfg, device: torch.device | str, class_weights: list[float] | None = None) -> Criterion:
    """The criterion of ``cfg.loss`` on ``device``: ``class_weights`` (see deeplab_dropout.class_weights) and,
    for loss=focal, γ and α. α (the balanced variant, RetinaNet's foreground weight) weighs the object classes
    1..K-1 by α and the background (class 0) by 1−α, on top of the class weights."""
    loss_cfg, k = cfg.loss, int(cfg.model.num_classes)
    gamma = float(loss_cfg.gamma) if loss_cfg.name == "focal" else 0.0
    alpha = loss_cfg.get("alpha") if loss_cfg.name == "focal" else None
    reduction = {"batch_average": bool(loss_cfg.batch_average), "batch_size": int(cfg.trainer.batch_size)}
    if class_weights is None and alpha is None:
        return Criterion(int(cfg.data.ignore_index), None, gamma, **reduction)
    weight = torch.ones(k, dtype=torch.float64) if class_weights is None else torch.tensor(class_weights,
                                                                                            dtype=torch.float64)
    if alpha is not None:
        weight = weight * torch.tensor([1 - float(alpha)] + [float(alpha)] * (k - 1), dtype=torch.float64)
    return Criterion(int(cfg.data.ignore_index), weight.to(device, torch.float32), gamma, **reduction)
