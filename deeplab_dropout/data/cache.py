"""Decode once: the training images+masks in RAM (``data.cache``) and the validation set after its
deterministic resize/crop as uint8 tensors in RAM or on the GPU (``data.val_cache``).

Cached values are the exact uint8 tensors the uncached path feeds its transforms, and normalisation runs the
same torchvision kernels per batch, so cached and uncached runs compute identical numbers.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

from deeplab_dropout.data.voc import VOCSegmentation, image_size

log = logging.getLogger("deeplab_dropout")
RAM_SHARE = 0.25  # a cache may take this share of the free RAM / GPU memory (auto)


def free_ram() -> int:
    """Bytes of RAM available now (MemAvailable; the free pages where /proc/meminfo is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def decoded_bytes(ds: VOCSegmentation) -> int:
    """The RAM the decoded images (RGB) and masks of ``ds`` take, from the JPEG headers (no decoding)."""
    total = 0
    for image_id in dict.fromkeys(ds.ids):
        width, height = image_size(ds.image_path(image_id))  # the header only
        total += width * height * 4
    return total


def cache_train(ds: VOCSegmentation, setting: str) -> bool:
    """Decode ``ds`` into RAM for data.cache=``setting`` (``auto``: when it fits in a quarter of the free
    RAM); returns whether it did. Loader workers forked later share the decoded tensors."""
    if setting == "off" or (setting == "auto" and decoded_bytes(ds) > RAM_SHARE * free_ram()):
        return False
    ds.preload()
    return True


class CachedValLoader:
    """The val set, decoded, resized and centre-cropped once, as uint8 tensors on ``device``; iterates
    (images, uint8 masks) batches in order, the images normalised on ``compute_device`` (as the uncached
    transform would). ``dataset`` is the underlying VOCSegmentation (ids, len)."""

    def __init__(self, dataset: VOCSegmentation, data_cfg: Any, batch_size: int, device: torch.device,
                 compute_device: torch.device | None = None) -> None:
        self.dataset, self.batch_size, self.device = dataset, batch_size, device
        self.data_cfg, self.compute_device = data_cfg, compute_device or device
        from deeplab_dropout.data.transforms import get_transform

        geometry = get_transform(False, data_cfg).geometry  # resized and cropped, still uint8
        first: dict[str, int] = {}  # data.val_list=per_class lists an image more than once: decode it once
        index = [first.setdefault(image_id, i) for i, image_id in enumerate(dataset.ids)]
        done = {i: [t.to(device) for t in geometry(*dataset.load_tensors(i))] for i in sorted(set(index))}
        self.images = [done[j][0] for j in index]
        self.masks = [done[j][1] for j in index]
        if batch_size > 1:  # center crops share one size: one tensor each, sliced per batch
            self.images, self.masks = torch.stack(self.images), torch.stack(self.masks)

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.dataset), self.batch_size):
            if self.batch_size == 1:
                images, masks = self.images[start][None], self.masks[start][None]
            else:
                images, masks = self.images[start:start + self.batch_size], self.masks[start:start + self.batch_size]
            yield self.normalize(images), masks

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) cached images -> normalised float32 on the compute device."""
        return normalize_batch(images.to(self.compute_device, non_blocking=True), self.data_cfg)

    def item(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Val image ``i`` as (uint8 (3, H, W), uint8 (H, W)) on the CPU."""
        img, m = (self.images[i], self.masks[i])
        return img.cpu(), m.cpu()


def val_cache_target(setting: str, n_bytes: int, device: torch.device) -> torch.device | None:
    """Where data.val_cache=``setting`` keeps ``n_bytes`` of val data: the device, the CPU, or None (off).
    ``auto``: the GPU when it fits in a quarter of its free memory, else RAM when it fits there."""
    if setting == "off":
        return None
    if setting == "device":
        return device
    if setting == "auto" and device.type == "cuda" and n_bytes <= RAM_SHARE * torch.cuda.mem_get_info(device)[0]:
        return device
    if setting == "auto" and n_bytes > RAM_SHARE * free_ram():
        return None
    return torch.device("cpu")


def val_bytes(dataset: VOCSegmentation, data_cfg: Any) -> int:
    """Bytes of the cached val set: crop_size² × 4 per image (center), or the decoded size (full)."""
    if str(data_cfg.val_crop) == "center":
        return len(dataset) * int(data_cfg.crop_size) ** 2 * 4
    return decoded_bytes(dataset)


def normalize_batch(images: torch.Tensor, data_cfg: Any) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 normalised, with the kernels of the uncached transform (same values)."""
    from torchvision.transforms.v2 import functional as F

    images = F.to_dtype(images, torch.float32, scale=True)
    return F.normalize(images, [float(x) for x in data_cfg.mean], [float(x) for x in data_cfg.std])
