"""ResNet-FPN semantic segmentation (``model=fpn_resnet101``, the DropBlock paper's VOC model), with its sites."""
from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork

from deeplab_dropout.config import BACKBONES
from deeplab_dropout.model.backbone import ResNetBackbone, load_backbone_weights, resnet_sites, set_dilation
from deeplab_dropout.model.base import ConvBNReLU, SegmentationModel, init_head, upsample

__all__ = ["FPN_HEAD_CONVS", "FPNBackbone", "FPNContext", "SemanticHead", "FPN", "build", "regularizer_sites"]

FPN_HEAD_CONVS = (1, 1, 2, 3)  # semantic-FPN head: 3x3 convs on P2..P5, each but P2's followed by a x2 up


class FPNBackbone(ResNetBackbone):
    """backbone.ResNetBackbone without dilation (output stride 32, as FPN's); returns C2..C5."""

    def __init__(self, name: str = "resnet101") -> None:
        super().__init__(name, 16, (1,) * BACKBONES[name][0][3])
        # Output stride 16 only dilated layer4 (its first block kept the stride-1 downsample): restore the
        # stride and rate 1; the parameters (and their names) are the same either way.
        first = self.layer4[0]
        strided = first.conv2 if BACKBONES[name][1] else first.conv1  # where torchvision puts the stride
        strided.stride = first.downsample[0].stride = (2, 2)
        for block in self.layer4:
            set_dilation(block, 1)
        self.channels = [self.low_channels * 2 ** i for i in range(4)]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}_drop")(getattr(self, f"layer{i}")(x))
            feats.append(x)
        return feats


class FPNContext(nn.Module):
    """torchvision's FeaturePyramidNetwork (lateral 1x1 + top-down + 3x3 output convs), a slot per output."""

    def __init__(self, in_channels: list[int], channels: int) -> None:
        super().__init__()
        self.fpn = FeaturePyramidNetwork(in_channels, channels)
        self.drops = nn.ModuleList(nn.Identity() for _ in in_channels)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        pyramid = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))
        return [drop(p) for drop, p in zip(self.drops, pyramid.values(), strict=True)]


class SemanticHead(nn.Module):
    """Semantic-FPN head (Kirillov et al. 2019): per level 3x3 conv-BN-ReLU stacks, each conv of P3..P5
    followed by a x2 bilinear up (to the next finer level's size), summed at 1/4, then a 1x1 classifier."""

    def __init__(self, cin: int, channels: int, num_classes: int, align_corners: bool = False) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.levels = nn.ModuleList(
            nn.ModuleList(ConvBNReLU(cin if k == 0 else channels, channels, 3) for k in range(n))
            for n in FPN_HEAD_CONVS)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, pyramid: list[Tensor]) -> Tensor:
        sizes = [p.shape[-2:] for p in pyramid]
        out = 0
        for level, (convs, x) in enumerate(zip(self.levels, pyramid, strict=True)):
            for k, conv in enumerate(convs):
                x = conv(x)
                if level:
                    x = upsample(x, sizes[level - 1 - k], self.align_corners)
            out = out + x
        return self.classifier(out)


class FPN(SegmentationModel):
    """ResNet-FPN semantic segmentation, as the DropBlock paper's VOC model (its open-source RetinaNet code
    with a segmentation head). Children: ``backbone`` (ResNet), ``aspp`` (FPN), ``decoder`` (head)."""

    def __init__(self, backbone: str = "resnet101", num_classes: int = 21, fpn_channels: int = 256,
                 head_channels: int = 128, align_corners: bool = False) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.backbone = FPNBackbone(backbone)
        self.aspp = FPNContext(self.backbone.channels, fpn_channels)
        self.decoder = SemanticHead(fpn_channels, head_channels, num_classes, align_corners)
        init_head(self.decoder)

    def forward(self, x: Tensor) -> Tensor:
        return upsample(self.decoder(self.aspp(self.backbone(x))), x.shape[-2:], self.align_corners)


def build(m) -> FPN:
    """The FPN of cfg.model ``m``, backbone weights loaded."""
    model = FPN(m.backbone, int(m.num_classes), int(m.fpn_channels), int(m.head_channels), bool(m.align_corners))
    load_backbone_weights(model.backbone, str(m.pretrained))
    return model


def regularizer_sites(cfg) -> list[str]:
    """FPN's sites of cfg.placement in forward order: the backbone's (as DeepLabv3+), each pyramid output
    P2..P5 (spp), after each semantic-head conv."""
    sites = resnet_sites(cfg) if cfg.placement.resnet else []
    if cfg.placement.spp:
        sites += [f"aspp.drops.{i}" for i in range(len(FPN_HEAD_CONVS))]
    if cfg.placement.decoder:
        sites += [f"decoder.levels.{lv}.{k}.drop" for lv, n in enumerate(FPN_HEAD_CONVS) for k in range(n)]
    return sites
