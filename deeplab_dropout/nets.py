"""FCN-ResNet, U-Net, ResNet-FPN and the VOC 2007 course report's encoder-decoder (``model=fcn_resnet101 |
unet | fpn_resnet101 | course_fcn``) with the study's regulariser sites; model.build_model and
model.regularizer_sites hand these architectures over to here."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn
from torchvision.models.segmentation.fcn import FCNHead
from torchvision.ops import FeaturePyramidNetwork

from deeplab_dropout.config import BACKBONES, NET_ARCHS, OWN_ENCODER_ARCHS, validate
from deeplab_dropout.model import (
    ConvBNReLU,
    ResNetBackbone,
    SegmentationModel,
    _download,
    _file_state_dict,
    _init_head,
    _load_strict,
    _set_dilation,
    load_backbone_weights,
    regularize,
)
from deeplab_dropout.model import regularizer_sites as deeplab_sites

__all__ = ["ARCHS", "FCN", "UNet", "FPN", "CourseFCN", "build", "regularizer_sites", "UNET_LEVELS", "FPN_HEAD_CONVS",
           "COURSE_CHANNELS"]

ARCHS = NET_ARCHS
UNET_LEVELS = 5               # Ronneberger et al.: 4 encoder levels + the bottleneck, channels base x 2^i
FPN_HEAD_CONVS = (1, 1, 2, 3)  # semantic-FPN head: 3x3 convs on P2..P5, each but P2's followed by a x2 up
COURSE_CHANNELS = (32, 64, 128, 256, 512)  # the course report's encoder widths (3.1); the decoder mirrors them


def _up(x: Tensor, size) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


# --- FCN --------------------------------------------------------------------------------------------------

class FCN(SegmentationModel):
    """torchvision's FCN-ResNet (no aux head, its Dropout(0.1) slot empty) on model.py's ResNetBackbone.

    Parameter names are torchvision's fcn_resnet101 ones with ``classifier.`` -> ``decoder.``.
    ``freeze_backbone``: backbone weights get no gradient and its BatchNorm statistics stay fixed
    (placed backbone regularisers still act).
    """

    def __init__(self, backbone: str = "resnet101", num_classes: int = 21, output_stride: int = 8,
                 freeze_backbone: bool = False) -> None:
        super().__init__()
        self.backbone = ResNetBackbone(backbone, output_stride, (1,) * BACKBONES[backbone][0][3])
        # torchvision keeps the first block of a dilated stage at the previous rate (its COCO weights were
        # trained so); ResNetBackbone dilates every block as DeepLabv3 does.
        rate = 1
        for i in (2, 3, 4):
            first = getattr(self.backbone, f"layer{i}")[0]
            _set_dilation(first, rate)
            rate = max(rate, getattr(self.backbone, f"layer{i}")[-1].conv2.dilation[0])
        self.decoder = FCNHead(self.backbone.high_channels, num_classes)
        self.decoder[3] = nn.Identity()  # the built-in Dropout(0.1): the `decoder` site, empty unless placed
        self.freeze_backbone = freeze_backbone

    def forward(self, x: Tensor) -> Tensor:
        return _up(self.decoder(self.backbone(x)[1]), x.shape[-2:])  # (layer1, layer4): FCN reads layer4

    def train(self, mode: bool = True) -> FCN:
        """nn.Module.train, keeping a frozen backbone's BatchNorm layers in eval mode."""
        super().train(mode)
        if self.freeze_backbone:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def _fcn_weights(model: FCN, pretrained: str) -> None:
    """none | imagenet (backbone) | coco_with_voc_labels (whole model) | a ResNet or fcn_resnet101 file."""
    if pretrained in ("none", "imagenet"):
        load_backbone_weights(model.backbone, pretrained)
        return
    if pretrained == "coco_with_voc_labels":
        from torchvision.models.segmentation import FCN_ResNet101_Weights

        state = _download(FCN_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1, pretrained, "fcn_resnet101_coco")
    else:
        state = _file_state_dict(pretrained)
        if not any(k.startswith("classifier.") for k in state):  # a ResNet state dict: the backbone only
            load_backbone_weights(model.backbone, pretrained)
            return
    state = {("decoder." + k[len("classifier."):] if k.startswith("classifier.") else k): v
             for k, v in state.items() if not k.startswith("aux_classifier.")}
    _load_strict(model, state, pretrained, "fcn_resnet101")


# --- U-Net ------------------------------------------------------------------------------------------------

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
        _xavier_init(self)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        m = 2 ** (UNET_LEVELS - 1)  # every max-pool halves exactly, so every skip matches its upsampled map
        x = F.pad(x, (0, -w % m, 0, -h % m))
        skips = self.backbone(x)
        return self.decoder(self.aspp(skips[-1]), skips)[..., :h, :w]


# --- ResNet-FPN -------------------------------------------------------------------------------------------

class FPNBackbone(ResNetBackbone):
    """model.py's ResNetBackbone without dilation (output stride 32, as FPN's); returns C2..C5."""

    def __init__(self, name: str = "resnet101") -> None:
        super().__init__(name, 16, (1,) * BACKBONES[name][0][3])
        # Output stride 16 only dilated layer4 (its first block kept the stride-1 downsample): restore the
        # stride and rate 1; the parameters (and their names) are the same either way.
        first = self.layer4[0]
        strided = first.conv2 if BACKBONES[name][1] else first.conv1  # where torchvision puts the stride
        strided.stride = first.downsample[0].stride = (2, 2)
        for block in self.layer4:
            _set_dilation(block, 1)
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

    def __init__(self, cin: int, channels: int, num_classes: int) -> None:
        super().__init__()
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
                    x = _up(x, sizes[level - 1 - k])
            out = out + x
        return self.classifier(out)


class FPN(SegmentationModel):
    """ResNet-FPN semantic segmentation, as the DropBlock paper's VOC model (its open-source RetinaNet code
    with a segmentation head). Children: ``backbone`` (ResNet), ``aspp`` (FPN), ``decoder`` (head)."""

    def __init__(self, backbone: str = "resnet101", num_classes: int = 21, fpn_channels: int = 256,
                 head_channels: int = 128) -> None:
        super().__init__()
        self.backbone = FPNBackbone(backbone)
        self.aspp = FPNContext(self.backbone.channels, fpn_channels)
        self.decoder = SemanticHead(fpn_channels, head_channels, num_classes)
        _init_head(self.decoder)

    def forward(self, x: Tensor) -> Tensor:
        return _up(self.decoder(self.aspp(self.backbone(x))), x.shape[-2:])


# --- the VOC 2007 course report's encoder-decoder -----------------------------------------------------------

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
        _xavier_init(self)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        m = 2 ** len(self.backbone.levels)  # every stride-2 conv then halves exactly and every deconv doubles back
        return self.decoder(self.aspp(self.backbone(F.pad(x, (0, -w % m, 0, -h % m)))))[..., :h, :w]


def _xavier_init(model: nn.Module) -> None:
    """Xavier-uniform conv and transposed-conv weights, zero biases (the course report's init)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# --- building and sites -----------------------------------------------------------------------------------
# Every model has ``backbone`` (trained at optim.lr; the rest at optim.lr x optim.head_lr_mult) and empty
# ``nn.Identity`` slots that model.place_regularizers fills, so the placement words keep their meaning.
# The context module of U-Net and FPN is the child ``aspp``: the role name the start-up log and DeepLabv3+ use.
# | model | resnet                          | spp                        | decoder                         |
# | fcn   | backbone blocks (as DeepLabv3+) | none: no context module    | after the FCN head's 3x3 conv   |
# | unet  | after each encoder level        | after the bottleneck       | after each decoder level        |
# | fpn   | backbone blocks (as DeepLabv3+) | each FPN output P2..P5     | after each semantic-head conv   |
# | encdec| after encoder blocks 1..4       | encoder -> decoder (5a)    | after each transposed-conv block|
# config.validate refuses placements a model lacks (ARCH_PARTS), so this code trusts them.

def _resnet_sites(cfg) -> list[str]:
    """The ResNet sites exactly as DeepLabv3+ has them (the same backbone module names)."""
    if cfg.model.arch in OWN_ENCODER_ARCHS:  # an encoder level is both a block and a stage
        return [f"backbone.levels.{s - 1}.drop" for s in sorted(int(s) for s in cfg.placement.resnet_stages)]
    as_deeplab = OmegaConf.merge(cfg, {"model": {"arch": "deeplabv3plus"},
                                       "placement": {"resnet": True, "spp": False, "decoder": False}})
    return deeplab_sites(as_deeplab)


def regularizer_sites(cfg) -> list[str]:
    """Qualified module names of the sites a composed config places on an FCN, U-Net or FPN (forward
    order); placements the model lacks were refused by config.validate."""
    pl, arch = cfg.placement, cfg.model.arch
    if cfg.dropout.name == "none":
        return []
    sites = _resnet_sites(cfg) if pl.resnet else []
    if pl.spp:
        single = arch in OWN_ENCODER_ARCHS  # one context slot (bottleneck / bridge); FPN has one per level
        sites += ["aspp.drop"] if single else [f"aspp.drops.{i}" for i in range(len(FPN_HEAD_CONVS))]
    if pl.decoder:
        if arch == "fcn":
            sites.append("decoder.3")
        elif arch == "unet":
            sites += [f"decoder.levels.{i}.drop" for i in range(UNET_LEVELS - 1)]
        elif arch == "encdec":
            sites += [f"decoder.levels.{i}.drop" for i in range(len(cfg.model.channels))]
        else:
            sites += [f"decoder.levels.{lv}.{k}.drop" for lv, n in enumerate(FPN_HEAD_CONVS) for k in range(n)]
    return sites


def build(cfg) -> SegmentationModel:
    """The FCN, U-Net, FPN or course encoder-decoder of a composed config (validated first), weights loaded,
    regularisers placed."""
    validate(cfg)
    m = cfg.model
    if m.arch == "fcn":
        model = FCN(m.backbone, int(m.num_classes), int(m.output_stride), bool(m.freeze_backbone))
        _fcn_weights(model, str(m.pretrained))
        for p in model.backbone.parameters() if model.freeze_backbone else ():
            p.requires_grad_(False)  # SGD skips parameters without a gradient
    elif m.arch == "unet":
        model = UNet(int(m.num_classes), int(m.unet_base_channels))
    elif m.arch == "encdec":
        model = CourseFCN(int(m.num_classes), tuple(int(c) for c in m.channels))
    else:
        model = FPN(m.backbone, int(m.num_classes), int(m.fpn_channels), int(m.head_channels))
        load_backbone_weights(model.backbone, str(m.pretrained))
    regularize(model, cfg)  # as build_model does (group 3's smaller gamma on the ResNet ones)
    return model
