"""The `loss` config group: per-pixel cross-entropy over valid pixels, reduced as the study's code did.

The authors' code (and the PyTorch reimplementation it builds on) divides the pixel mean once more by the
batch size; the study's learning rates (7e-3 / 7e-2) and its Loss column (0.02-0.08) are on that scale.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def pixel_loss_sum(logits: Tensor, target: Tensor, ignore_index: int = 255) -> tuple[Tensor, int]:
    """Per-pixel cross-entropy summed over valid pixels (computed in fp32), and the number of valid pixels."""
    loss = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    return loss, int((target != ignore_index).sum())


def reduce_loss(loss_sum: Tensor | float, n_pixels: int, batch_size: int, loss_cfg) -> Tensor | float:
    """The configured loss from a pixel sum: the mean over valid pixels, divided once more by the batch size
    when ``loss.batch_average`` (the authors' code), else the plain pixel mean."""
    mean = loss_sum / max(n_pixels, 1)
    return mean / batch_size if loss_cfg.batch_average else mean

