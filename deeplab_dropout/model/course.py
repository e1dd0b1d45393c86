"""The VOC 2007 course report's baseline encoder-decoder (``model=course_fcn``, section 3.1), with its sites."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from deeplab_dropout.model.base import ConvBNReLU, SegmentationModel, encoder_level_sites, xavier_init

__all__ = ["COURSE_CHANNELS", "CourseEncoder", "CourseBridge", "CourseDecoder", "CourseFCN", "build",
           "regularizer_sites"]

COURSE_CHANNELS = (32, 64, 128, 256, 512)  # the course report's encoder widths (3.1); the decoder mirrors them


class CourseEncoder(nn.Module):
    """conv1..conv5 of the report (3x3 conv stride 2 -> BN -> ReLU, then the level's ``drop`` slot): each
    halves H and W."""

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        pairs = zip([3, *channels[:-1]], channels, strict=True)
        self.levels = nn.ModuleList(ConvBNReLU(cin, cout, 3, stride=2) for cin, cout in pairs)

    def forward(self, x: Tensor) -> Tensor:
        for level in self.levels:
            x = level(x)
        return x


class CourseBridge(nn.Module):
    """Between encoder and decoder: no layers, only the slot where the report put its dropout (the spp site)."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(x)


class CourseDecoder(nn.Module):
    """deconv1..deconv5 (3x3 transposed conv x2 up -> BN -> ReLU -> ``drop`` slot; the encoder's widths
    backwards, the first keeping the deepest), then the 1x1 classifier."""

    def __init__(self, channels: list[int], num_classes: int) -> None:
        super().__init__()
        widths = [channels[-1], *reversed(channels)]  # 512 -> 512 -> 256 -> ... -> 32 for the report's widths
        pairs = zip(widths[:-1], widths[1:], strict=True)
        self.levels = nn.ModuleList(ConvBNReLU(cin, cout, 3, stride=2, transposed=True) for cin, cout in pairs)
        self.classifier = nn.Conv2d(channels[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        for level in self.levels:
            x = level(x)
        return self.classifier(x)


class CourseFCN(SegmentationModel):
    """The VOC 2007 course report's baseline (section 3.1): 5 x (3x3 conv stride 2 -> BN -> ReLU), 5 x (3x3
    transposed conv x2 -> BN -> ReLU), 1x1 classifier; Xavier init. The input is zero-padded to a multiple of
    2^5 and the logits cropped back, so any H x W works. Children ``backbone`` (encoder), ``aspp`` (the empty
    bridge), ``decoder``."""

    def __init__(self, num_classes: int = 21, channels: tuple[int, ...] = COURSE_CHANNELS) -> None:
        super().__init__()
        self.backbone = CourseEncoder(list(channels))
        self.aspp = CourseBridge()
        self.decoder = CourseDecoder(list(channels), num_classes)
        xavier_init(self)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        m = 2 ** len(self.backbone.levels)  # every stride-2 conv then halves exactly and every deconv doubles back
        return self.decoder(self.aspp(self.backbone(F.pad(x, (0, -w % m, 0, -h % m)))))[..., :h, :w]


def build(m) -> CourseFCN:
    """The course encoder-decoder of cfg.model ``m`` (random init only)."""
    return CourseFCN(int(m.num_classes), tuple(int(c) for c in m.channels))


def regularizer_sites(cfg) -> list[str]:
    """The course model's sites of cfg.placement in forward order: after each selected encoder block (1..4;
    the 5th block's output is the bridge), the encoder -> decoder bridge (spp), after each transposed-conv block."""
    sites = encoder_level_sites(cfg) if cfg.placement.resnet else []
    if cfg.placement.spp:
        sites.append("aspp.drop")
    if cfg.placement.decoder:
        sites += [f"decoder.levels.{i}.drop" for i in range(len(cfg.model.channels))]
    return sites
