"""TensorBoard logging for a run: scalars, image | truth | prediction strips in the VOC palette, HParams."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from deeplab_dropout.data.voc import VOC_PALETTE

# The metrics the HParams tab compares; each is also written as a scalar under the same tag.
HPARAM_METRICS = ("hparams/best_miou", "hparams/best_per_image_miou_mean")


def colorize(mask: torch.Tensor) -> torch.Tensor:
    """(H, W) integer labels -> (3, H, W) uint8 in the VOC palette (255 = void is its cream colour)."""
    palette = torch.tensor(VOC_PALETTE, dtype=torch.uint8).reshape(256, 3)
    return palette[mask.long().clamp(0, 255).cpu()].permute(2, 0, 1)


def overlay(image: torch.Tensor, mask: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    """The VOC colours of ``mask`` blended over a uint8 (3, H, W) image; background (0) is left clear."""
    blend = (1 - alpha) * image.float() + alpha * colorize(mask).float()
    return torch.where((mask.cpu() != 0)[None], blend.round(), image.float()).to(torch.uint8)


def strip(image: torch.Tensor, target: torch.Tensor, pred: torch.Tensor, min_height: int = 192) -> torch.Tensor:
    """uint8 (3, H, W): image | ground truth overlay | prediction overlay, side by side with white gaps,
    enlarged (nearest) to at least ``min_height`` so that small crops stay readable in TensorBoard."""
    image = image.cpu()
    sep = torch.full((3, image.shape[-2], 4), 255, dtype=torch.uint8)
    out = torch.cat([image, sep, overlay(image, target), sep, overlay(image, pred)], dim=-1)
    scale = -(-min_height // out.shape[-2])  # ceil
    return out.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1) if scale > 1 else out


class TBLogger:
    """A SummaryWriter under ``<run>/tb`` that declares the run's hyper-parameters once, at the start."""

    def __init__(self, log_dir: Path, hparam_dict: dict) -> None:
        self.writer = SummaryWriter(log_dir=str(log_dir))
        # Written at the start (not via add_hparams at the end) so running and failed runs show in the
        # HParams tab too, and into this run's own event file rather than a timestamped sub-run.
        exp, ssi, sei = hparams(hparam_dict, dict.fromkeys(HPARAM_METRICS, 0.0))
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, img: torch.Tensor, step: int) -> None:
        self.writer.add_image(tag, img, step, dataformats="CHW")

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def close(self) -> None:
        self.writer.close()
