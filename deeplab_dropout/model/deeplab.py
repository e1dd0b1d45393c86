"""DeepLabv3+ on the ResNet backbone (ASPP, decoder, their sites), and torchvision's DeepLabv3 for the paper's
``pretrained-base`` row.

Where the paper is silent this follows the authors' code: layer4 Multi-Grid (``model.multi_grid``) and BN in
the ASPP image pooling (``model.pool_norm``); not in ``align_corners`` of the bilinear upsamplings
(``model.align_corners``: False, as torchvision; the authors' code: True).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.segmentation import DeepLabV3_ResNet101_Weights, deeplabv3_resnet101

from deeplab_dropout.model.backbone import (
    ResNetBackbone,
    download,
    file_state_dict,
    load_backbone_weights,
    load_strict,
    resnet_sites,
)
from deeplab_dropout.model.base import ConvBNReLU, SegmentationModel, init_head, upsample

__all__ = ["ASPP_RATES", "ImagePooling", "ASPP", "Decoder", "DeepLabV3Plus", "TorchvisionDeepLabV3",
           "build_torchvision_deeplabv3", "build", "regularizer_sites"]

# ASPP rates per output stride: the same field of view at either (backbone.STAGE_RATES dilates the stages).
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


class ImagePooling(nn.Module):
    """ASPP image-level branch: global average pool -> 1x1 conv -> BN -> ReLU -> bilinear to H x W.

    BN (``pool_norm="bn"``) is the default for fidelity: the authors' code, the reimplementation the paper
    builds on and torchvision all use it. On the 1x1 pooled map it sees one value per channel per sample, so
    training with batch size 1 fails (config.validate says so in one line); ``pool_norm="none"`` (1x1 conv
    with bias -> ReLU) allows it. ``align_corners`` changes nothing here (a 1x1 map upsamples to a constant);
    it is passed for consistency.
    """

    def __init__(self, cin: int, cout: int, pool_norm: str = "bn", align_corners: bool = False) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.pool = nn.AdaptiveAvgPool2d(1)
        # Same child names as ConvBNReLU (conv, bn), but that one's drop would act before the upsampling.
        self.conv = nn.Conv2d(cin, cout, 1, bias=pool_norm != "bn")
        self.bn = nn.BatchNorm2d(cout) if pool_norm == "bn" else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn(self.conv(self.pool(x))))
        return self.drop(upsample(y, x.shape[-2:], self.align_corners))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1 + three 3x3 atrous + image pooling, concat, 1x1 projection."""

    def __init__(self, cin: int, channels: int = 256, rates: tuple[int, int, int] = (6, 12, 18),
                 pool_norm: str = "bn", align_corners: bool = False) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [ConvBNReLU(cin, channels, 1)]
            + [ConvBNReLU(cin, channels, 3, dilation=r) for r in rates]
            + [ImagePooling(cin, channels, pool_norm, align_corners)]
        )
        self.project = ConvBNReLU(len(self.branches) * channels, channels, 1)
        self.drop = nn.Identity()  # the `spp output` site (no built-in dropout, unlike the peers)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.project(torch.cat([b(x) for b in self.branches], dim=1)))


class Decoder(nn.Module):
    """DeepLabv3+ decoder: 1x1 low-level projection, concat with upsampled ASPP, two 3x3 convs, classifier."""

    def __init__(self, low_in: int, low_channels: int, aspp_channels: int, num_classes: int,
                 align_corners: bool = False) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.low_proj = ConvBNReLU(low_in, low_channels, 1)
        self.conv1 = ConvBNReLU(low_channels + aspp_channels, aspp_channels, 3)
        self.drop1 = nn.Identity()
        self.conv2 = ConvBNReLU(aspp_channels, aspp_channels, 3)
        self.drop2 = nn.Identity()
        self.classifier = nn.Conv2d(aspp_channels, num_classes, 1)

    def forward(self, low: Tensor, aspp: Tensor, size: tuple[int, int]) -> Tensor:
        low = self.low_proj(low)
        aspp = upsample(aspp, low.shape[-2:], self.align_corners)
        x = self.drop1(self.conv1(torch.cat([aspp, low], dim=1)))
        x = self.drop2(self.conv2(x))
        return upsample(self.classifier(x), size, self.align_corners)


class DeepLabV3Plus(SegmentationModel):
    """DeepLabv3+ (Chen et al. 2018) on a torchvision ResNet; children ``backbone``, ``aspp``, ``decoder``.

    Returns logits (N, num_classes, H, W) at the input's size, for any H x W.
    """

    def __init__(self, backbone: str = "resnet101", num_classes: int = 21, output_stride: int = 16,
                 aspp_channels: int = 256, low_level_channels: int = 48,
                 multi_grid: tuple[int, ...] = (1, 2, 4), pool_norm: str = "bn", align_corners: bool = False) -> None:
        super().__init__()
        self.backbone = ResNetBackbone(backbone, output_stride, multi_grid)
        self.aspp = ASPP(self.backbone.high_channels, aspp_channels, ASPP_RATES[output_stride], pool_norm,
                         align_corners)
        self.decoder = Decoder(self.backbone.low_channels, low_level_channels, aspp_channels, num_classes,
                               align_corners)
        init_head(self.aspp)
        init_head(self.decoder)

    def forward(self, x: Tensor) -> Tensor:
        low, high = self.backbone(x)
        return self.decoder(low, self.aspp(high), x.shape[-2:])


class TorchvisionDeepLabV3(SegmentationModel):
    """torchvision's DeepLabv3 (no aux head), split into ``backbone``, ``aspp`` and ``decoder`` (the 3x3
    conv-BN-ReLU and classifier after the ASPP), for evaluating its COCO-with-VOC-labels weights.
    ``align_corners`` is its final upsampling's (torchvision's own ASPP pooling upsamples a 1x1 map: a constant
    either way)."""

    def __init__(self, tv_model: nn.Module, align_corners: bool = False) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.backbone = tv_model.backbone
        self.aspp = tv_model.classifier[0]
        self.aspp.project[-1] = nn.Identity()  # torchvision's built-in Dropout(0.5): no dropout unless placed
        self.decoder = nn.Sequential(*list(tv_model.classifier)[1:])

    def forward(self, x: Tensor) -> Tensor:
        y = self.decoder(self.aspp(self.backbone(x)["out"]))
        return upsample(y, x.shape[-2:], self.align_corners)


def build_torchvision_deeplabv3(m) -> TorchvisionDeepLabV3:
    """torchvision's DeepLabv3-ResNet101 of cfg.model ``m`` with ``coco_with_voc_labels`` weights (weights API),
    a state dict file of that model, or random init (none). It has no regulariser sites."""
    tv = deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=int(m.num_classes), aux_loss=True)
    pretrained, align_corners = str(m.pretrained), bool(m.align_corners)
    if pretrained.lower() in ("none", ""):
        return TorchvisionDeepLabV3(tv, align_corners)
    if pretrained == "coco_with_voc_labels":
        weights = DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1
        state = download(weights, pretrained, "deeplabv3_resnet101_coco")
    else:
        state = file_state_dict(pretrained)
    tv.aux_classifier = None  # unused (TorchvisionDeepLabV3 keeps no aux head): its weights may be absent
    load_strict(tv, {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}, pretrained,
                "deeplabv3_resnet101")
    return TorchvisionDeepLabV3(tv, align_corners)


def build(m) -> SegmentationModel:
    """The DeepLab of cfg.model ``m``, weights loaded: DeepLabv3+, or torchvision's DeepLabv3 for its arch."""
    if m.arch == "torchvision_deeplabv3":
        return build_torchvision_deeplabv3(m)
    model = DeepLabV3Plus(m.backbone, int(m.num_classes), int(m.output_stride), int(m.aspp_channels),
                          int(m.low_level_channels), tuple(m.multi_grid), m.pool_norm, bool(m.align_corners))
    load_backbone_weights(model.backbone, m.pretrained)
    return model


def regularizer_sites(cfg) -> list[str]:
    """DeepLabv3+'s sites of cfg.placement in forward order: ResNet blocks (or stages), ASPP output (or
    branches), after each decoder 3x3 conv. torchvision's DeepLabv3 has none."""
    if cfg.model.arch == "torchvision_deeplabv3":
        return []
    pl = cfg.placement
    sites = resnet_sites(cfg) if pl.resnet else []
    if pl.spp:
        sites += [f"aspp.branches.{i}.drop" for i in range(5)] if pl.spp_sites == "branches" else ["aspp.drop"]
    if pl.decoder:
        sites += ["decoder.drop1", "decoder.drop2"]
    return sites
