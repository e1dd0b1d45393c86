"""Joint image/mask transforms of the paper's Table 1 (train) and the val `center` / `full` protocols.

config.validate checks the `data` values (ranges, val_crop); these transforms trust them.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from deeplab_dropout.data.voc import IGNORE_INDEX

_FILL = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}


class RandomGaussianBlur(v2.Transform):
    """With probability p blur images (not masks) with sigma = radius ~ U(lo, hi), PIL GaussianBlur semantics."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, p: float, radius: Sequence[float]) -> None:
        super().__init__()
        self.p, self.lo, self.hi = float(p), float(radius[0]), float(radius[1])

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        apply = bool(torch.rand(()) < self.p)
        radius = float(torch.empty(()).uniform_(self.lo, self.hi)) if apply else 0.0
        return {"radius": radius}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        r = params["radius"]
        if r <= 1e-3:  # sigma ~ 0 is the identity; torchvision rejects sigma <= 0
            return inpt
        k = 2 * math.ceil(3 * r) + 1  # ±3 sigma, like PIL's effective support
        return self._call_kernel(F.gaussian_blur, inpt, [k, k], [r, r])


class PadTo(v2.Transform):
    """Pad to at least (size, size): images with 0, masks with 255; centred or at the bottom/right."""

    def __init__(self, size: int, center: bool = False) -> None:
        super().__init__()
        self.size, self.center = int(size), center

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        dh, dw = max(self.size - h, 0), max(self.size - w, 0)
        if self.center:
            return {"padding": [dw // 2, dh // 2, dw - dw // 2, dh - dh // 2]}
        return {"padding": [0, 0, dw, dh]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not any(params["padding"]):
            return inpt
        fill = _FILL.get(type(inpt), 0)
        return self._call_kernel(F.pad, inpt, params["padding"], fill=fill)


class SegTransform:
    """Adapter: (PIL image, uint8 mask) -> (float 3×H×W normalised image, int64 H×W mask) via a v2 pipeline."""

    def __init__(self, pipeline: v2.Transform) -> None:
        self.pipeline = pipeline

    def __call__(self, image: Image.Image | np.ndarray | torch.Tensor,
                 mask: np.ndarray | Image.Image | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(image, Image.Image):
            img = F.pil_to_tensor(image.convert("RGB"))
        elif isinstance(image, np.ndarray):
            img = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        else:
            img = image
        m = torch.as_tensor(np.asarray(mask, dtype=np.uint8)) if not torch.is_tensor(mask) else mask
        img, m = self.pipeline(tv_tensors.Image(img), tv_tensors.Mask(m[None]))
        return img.as_subclass(torch.Tensor), m[0].as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"SegTransform({self.pipeline!r})"


def _get(cfg: Any, key: str) -> Any:
    # DictConfig and plain dicts both index; anything else (a namespace) by attribute.
    return cfg[key] if isinstance(cfg, Mapping) else getattr(cfg, key)


def _finish(cfg: Any) -> list[v2.Transform]:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
        v2.Normalize(mean=[float(x) for x in _get(cfg, "mean")], std=[float(x) for x in _get(cfg, "std")]),
    ]


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
        # Masks are rotated with NEAREST (torchvision's rotate_mask).
        # 0 adds no step, so Table 1 runs draw the same random numbers as before the option existed.
        rotate = [v2.RandomRotation(degrees, v2.InterpolationMode.BILINEAR, fill=_FILL)] if degrees > 0 else []
        steps: list[v2.Transform] = [
            # Short side uniform in [lo, hi] × base_size (RandomResize samples an int short side).
            v2.RandomResize(max(1, round(base * lo)), max(1, round(base * hi)) + 1),
            *rotate,
            PadTo(crop),
            v2.RandomCrop(crop),
            v2.RandomHorizontalFlip(float(_get(data_cfg, "flip_p"))),
            RandomGaussianBlur(float(_get(data_cfg, "blur_p")), _get(data_cfg, "blur_radius")),
        ]
    elif str(_get(data_cfg, "val_crop")) == "center":
        steps = [v2.Resize(base), PadTo(crop, center=True), v2.CenterCrop(crop)]
    else:  # full: the whole image
        steps = []
    return SegTransform(v2.Compose(steps + _finish(data_cfg)))


def denormalize(img_tensor: torch.Tensor, data_cfg: Any) -> torch.Tensor:
    """Undo Normalize for display: (..., 3, H, W) float -> uint8 in [0, 255]."""
    mean = torch.tensor([float(x) for x in _get(data_cfg, "mean")], device=img_tensor.device).view(3, 1, 1)
    std = torch.tensor([float(x) for x in _get(data_cfg, "std")], device=img_tensor.device).view(3, 1, 1)
    img = img_tensor.detach().float() * std + mean
    return (img * 255.0).round().clamp(0, 255).to(torch.uint8)
