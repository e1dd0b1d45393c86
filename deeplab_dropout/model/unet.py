"""U-Net (``model=unet``, Ronneberger et al. 2015, with BN as the VOC 2007 course report), with its sites."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deeplab_dropout.model.base import ConvBNReLU, SegmentationModel, encoder_level_sites, xavier_init

__all__ = ["UNET_LEVELS", "DoubleConv", "UNetEncoder", "UNetBottleneck", "UNetDecoder", "UNet", "build",
           "regularizer_sites"]

UNET_LEVELS = 5  # Ronneberger et al.: 4 encoder levels + the bottleneck, channels base x 2^i


class DoubleConv(nn.Module):
    """One U-Net level: (3x3 conv -> BN -> ReLU) x 2, then the level's regulariser slot ``drop``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU(cin, cout, 3)
        self.conv2 = ConvBNReLU(cout, cout, 3)
        self.drop = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.conv2(self.conv1(x)))


class UNetEncoder(nn.Module):
    """The U-Net's contracting path above the bottleneck; returns each level's output (the skips)."""

    def __init__(self, base: int) -> None:
        super().__init__()
        widths = [base * 2 ** i for i in range(UNET_LEVELS - 1)]
        self.levels = nn.ModuleList(DoubleConv(cin, cout) for cin, cout in zip([3, *widths[:-1]], widths, strict=True))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> list[Tensor]:
        skips = []
        for i, level in enumerate(self.levels):
            x = level(x if i == 0 else self.pool(x))
            skips.append(x)
        return skips


class UNetBottleneck(nn.Module):
    """2x2 max-pool and the deepest level (base x 16 channels); its ``drop`` is the U-Net's spp site."""

    def __init__(self, base: int) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.level = DoubleConv(base * 2 ** (UNET_LEVELS - 2), base * 2 ** (UNET_LEVELS - 1))
        self.drop = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.level(self.pool(x)))


class UNetDecoder(nn.Module):
    """Expanding path: 2x2 transposed conv (halving channels), concat the skip, DoubleConv; 1x1 classifier."""

    def __init__(self, base: int, num_classes: int) -> None:
        super().__init__()
        widths = [base * 2 ** i for i in range(UNET_LEVELS - 1, 0, -1)]  # 16b, 8b, 4b, 2b
        self.ups = nn.ModuleList(nn.ConvTranspose2d(c, c // 2, 2, stride=2) for c in widths)
        self.levels = nn.ModuleList(DoubleConv(c, c // 2) for c in widths)
        self.classifier = nn.Conv2d(base, num_classes, 1)

    def forward(self, x: Tensor, skips: list[Tensor]) -> Tensor:
        for up, level, skip in zip(self.ups, self.levels, reversed(skips), strict=True):
            x = level(torch.cat([skip, up(x)], dim=1))  # skip first, as Ronneberger et al.
        return self.classifier(x)


class UNet(SegmentationModel):
    """U-Net (Ronneberger et al. 2015) with BN, as the VOC 2007 course report: 5 levels of base..16 x base
    channels, same-padded convs; the input is zero-padded to a multiple of 16 and the logits cropped back,
    so any H x W works. Children: ``backbone`` (encoder), ``aspp`` (bottleneck), ``decoder``. Xavier init."""

    def __init__(self, num_classes: int = 21, base_channels: int = 64) -> None:
        super().__init__()
        self.backbone = UNetEncoder(base_channels)
        self.aspp = UNetBottleneck(base_channels)
        self.decoder = UNetDecoder(base_channels, num_classes)
        xavier_init(self)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        m = 2 ** (UNET_LEVELS - 1)  # every max-pool halves exactly, so every skip matches its upsampled map
        x = F.pad(x, (0, -w % m, 0, -h % m))
        skips = self.backbone(x)
        return self.decoder(self.aspp(skips[-1]), skips)[..., :h, :w]


def build(m) -> UNet:
    """The U-Net of cfg.model ``m`` (random init only)."""
    return UNet(int(m.num_classes), int(m.unet_base_channels))


def regularizer_sites(cfg) -> list[str]:
    """U-Net's sites of cfg.placement in forward order: after each selected encoder level, after the
    bottleneck (spp), after each decoder level."""
    sites = encoder_level_sites(cfg) if cfg.placement.resnet else []
    if cfg.placement.spp:
        sites.append("aspp.drop")
    if cfg.placement.decoder:
        sites += [f"decoder.levels.{i}.drop" for i in range(UNET_LEVELS - 1)]
    return sites
