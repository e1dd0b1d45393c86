"""Joint image/mask transforms of the paper's Table 1 (train) and the val `center` / `full` protocols.

Plain steps on (uint8 (3, H, W) image, uint8 (1, H, W) mask) pairs that call torchvision's v2 kernels
(``F.resize_image``, ``F.resize_mask``, ...) directly, as torchvision's `references/segmentation` does: the
same kernels and the same random draws, in the same order, as the equivalent ``v2.Compose`` (a test
compares them pixel for pixel), without v2's per-transform dispatch, which took half of a demo sample's time.
config.validate checks the `data` values (ranges, val_crop); these transforms trust them.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from deeplab_dropout.data.voc import IGNORE_INDEX

Pair = tuple[torch.Tensor, torch.Tensor]  # uint8 (3, H, W) image, uint8 (1, H, W) mask


@dataclass(frozen=True)
class Resize:
    """Short side to ``size`` (bilinear with antialias for the image, nearest for the mask)."""

    size: int

    def __call__(self, img: torch.Tensor, mask: torch.Tensor) -> Pair:
        return (F.resize_image(img, [self.size], InterpolationMode.BILINEAR, antialias=True),
                F.resize_mask(mask, [self.size]))


@dataclass(frozen=True)
class RandomResize:
    """Short side to an integer drawn uniformly from [lo, hi) (v2.RandomResize's draw)."""

    lo: int
    hi: int

    def __call__(self, img: torch.Tensor, mask: torch.Tensor) -> Pair:
        return Resize(int(torch.randint(self.lo, self.hi, ())))(img, mask)


@dataclass(frozen=True)
class RandomRotation:
    """Rotate by an angle ~ U(-degrees, degrees) about the centre: image bilinear, filled with 0; mask
    nearest, filled with 255 (void)."""

    degrees: float

    def __call__(self, img: torch.Tensor, mask: torch.Tensor) -> Pair:
        angle = torch.empty(1).uniform_(-self.degrees, self.degrees).item()
        return (F.rotate_image(img, angle, InterpolationMode.BILINEAR, fill=0),
                F.rotate_mask(mask, angle, fill=IGNORE_INDEX))


@dataclass(frozen=True)
class PadTo:
    """Pad to at least (size, size): images with 0, masks with ``label_fill`` (255, void; the authors' code: 0,
    background); centred or at the bottom/right."""

    size: int
    center: bool = False
    label_fill: int = IGNORE_INDEX

    def __call__(self, img: torch.Tensor, mask: torch.Tensor) -> Pair:
        h, w = img.shape[-2:]
        dh, dw = max(self.size - h, 0), max(self.size - w, 0)
        if not (dh or dw):
            return img, mask
        padding = [dw // 2, dh // 2, dw - dw // 2, dh - dh // 2] if self.center else [0, 0, dw, dh]
        return F.pad_image(img, padding, fill=0), F.pad_mask(mask, padding, fill=self.label_fill)


@dataclass(frozen=True)
class RandomCrop:
    """A size × size window at a uniformly drawn offset (top, then left; v2.RandomCrop's draws) of an input
    at least that large."""

    size: int

    def __call__(self, img: torch.Tensor, mask: torch.Tensor) -> Pair:
        h, w = img.shape[-2:]
        top = int(torch.randint(0, h - self.size + 1, size=())) if h > self.size else 0
        left = int(torch.randint(0, w - self.size + 1, size=())) if w > self.size else 0
        if h == w == self.size:
            return img, mask
        return (F.crop_image(img, top, left, self.size, self.size),
                F.crop_mask(mask, top, left, self.size, self.size))


@dataclass(frozen=True)
class CenterCrop:
    """The central size × size window."""

    size: int

    def __call__(self, img: torch.Tensor, mask: torch.Tensor) -> Pair:
        return F.center_crop_image(img, [self.size]), F.center_crop_mask(mask, [self.size])


@dataclass(frozen=True)
class RandomHorizontalFlip:
    """Mirror image and mask together with probability p."""

    p: float

    def __call__(self, img: torch.Tensor, mask: torch.Tensor) -> Pair:
        if torch.rand(1) >= self.p:
            return img, mask
        return F.horizontal_flip_image(img), F.horizontal_flip_mask(mask)


@dataclass(frozen=True)
class RandomGaussianBlur:
    """With probability p blur the image (not the mask) with sigma = radius ~ U(lo, hi), PIL GaussianBlur
    semantics."""

    p: float
    lo: float
    hi: float

    def draw(self) -> float:
        """The radius of one call: 0 when not applied."""
        apply = bool(torch.rand(()) < self.p)
        return float(torch.empty(()).uniform_(self.lo, self.hi)) if apply else 0.0

    def __call__(self, img: torch.Tensor, mask: torch.Tensor) -> Pair:
        r = self.draw()
        if r <= 1e-3:  # sigma ~ 0 is the identity; torchvision rejects sigma <= 0
            return img, mask
        k = 2 * math.ceil(3 * r) + 1  # ±3 sigma, like PIL's effective support
        return F.gaussian_blur_image(img, [k, k], [r, r]), mask


class SegTransform:
    """(PIL image | (H, W, 3) array | uint8 (3, H, W) tensor, (H, W) mask) -> (float 3×H×W normalised image,
    int64 H×W mask): ``steps`` on the uint8 pair (``geometry``), then scaled to [0, 1] and normalised."""

    def __init__(self, steps: Sequence[Any], mean: Sequence[float], std: Sequence[float]) -> None:
        self.steps, self.mean, self.std = list(steps), [float(x) for x in mean], [float(x) for x in std]

    def geometry(self, image: Image.Image | np.ndarray | torch.Tensor,
                 mask: np.ndarray | Image.Image | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The steps alone: uint8 (3, H', W') image and uint8 (H', W') mask (the val cache keeps these)."""
        if isinstance(image, Image.Image):
            img = F.pil_to_tensor(image.convert("RGB"))
        elif isinstance(image, np.ndarray):
            img = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        else:
            img = image
        m = (mask if torch.is_tensor(mask) else torch.as_tensor(np.asarray(mask, dtype=np.uint8)))[None]
        for step in self.steps:
            img, m = step(img, m)
        return img, m[0]

    def __call__(self, image: Image.Image | np.ndarray | torch.Tensor,
                 mask: np.ndarray | Image.Image | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img, m = self.geometry(image, mask)
        return F.normalize_image(F.to_dtype_image(img, torch.float32, scale=True), self.mean, self.std), m.long()

    def __repr__(self) -> str:
        return f"SegTransform({self.steps!r}, mean={self.mean}, std={self.std})"


def _get(cfg: Any, key: str) -> Any:
    # DictConfig and plain dicts both index; anything else (a namespace) by attribute.
    return cfg[key] if isinstance(cfg, Mapping) else getattr(cfg, key)


def get_transform(train: bool, data_cfg: Any) -> SegTransform:
    """Train: Table 1 augmentation; val: `data_cfg.val_crop` (`center` or `full`). Random draws use torch's RNG."""
    crop = int(_get(data_cfg, "crop_size"))
    base = int(_get(data_cfg, "base_size"))
    if train:
        lo, hi = (float(s) for s in _get(data_cfg, "scale_range"))
        degrees = float(_get(_get(data_cfg, "augment"), "rotation_degrees"))
        # data.augment.rotation_degrees: before the crop, so the crop draws from the rotated image and its void
        # corners (label 255, image 0 as the pad) are only where the rotated frame does not reach, not four cut
        # corners in every crop; after the resize (the two commute) it works on the scaled image the crop sees.
        # 0 adds no step, so Table 1 runs draw the same random numbers as before the option existed.
        rotate = [RandomRotation(degrees)] if degrees > 0 else []
        radius = _get(data_cfg, "blur_radius")
        steps = [
            # Short side uniform in [lo, hi] × base_size (an integer short side, upper end included).
            RandomResize(max(1, round(base * lo)), max(1, round(base * hi)) + 1),
            *rotate,
            # data.label_pad: 255 (ignored) | 0 (the authors' code: the padding is trained as background).
            PadTo(crop, label_fill=int(_get(data_cfg, "label_pad"))),
            RandomCrop(crop),
            RandomHorizontalFlip(float(_get(data_cfg, "flip_p"))),
            RandomGaussianBlur(float(_get(data_cfg, "blur_p")), float(radius[0]), float(radius[1])),
        ]
    elif str(_get(data_cfg, "val_crop")) == "center":
        steps = [Resize(base), PadTo(crop, center=True), CenterCrop(crop)]
    else:  # full: the whole image
        steps = []
    return SegTransform(steps, _get(data_cfg, "mean"), _get(data_cfg, "std"))


def denormalize(img_tensor: torch.Tensor, data_cfg: Any) -> torch.Tensor:
    """Undo Normalize for display: (..., 3, H, W) float -> uint8 in [0, 255]."""
    mean = torch.tensor([float(x) for x in _get(data_cfg, "mean")], device=img_tensor.device).view(3, 1, 1)
    std = torch.tensor([float(x) for x in _get(data_cfg, "std")], device=img_tensor.device).view(3, 1, 1)
    img = img_tensor.detach().float() * std + mean
    return (img * 255.0).round().clamp(0, 255).to(torch.uint8)
