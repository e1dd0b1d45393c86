"""FCN-ResNet (``model=fcn_resnet101``): torchvision's FCN head on the ResNet backbone, with its sites."""
from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.segmentation import FCN_ResNet101_Weights
from torchvision.models.segmentation.fcn import FCNHead

from deeplab_dropout.config import BACKBONES
from deeplab_dropout.model.backbone import (
    ResNetBackbone,
    download,
    file_state_dict,
    load_backbone_weights,
    load_strict,
    resnet_sites,
    set_dilation,
)
from deeplab_dropout.model.base import SegmentationModel, upsample

__all__ = ["FCN", "build", "regularizer_sites"]


class FCN(SegmentationModel):
    """torchvision's FCN-ResNet (no aux head, its Dropout(0.1) slot empty) on backbone.ResNetBackbone.

    Parameter names are torchvision's fcn_resnet101 ones with ``classifier.`` -> ``decoder.``.
    ``freeze_backbone``: backbone weights get no gradient and its BatchNorm statistics stay fixed
    (placed backbone regularisers still act).
    """

    def __init__(self, backbone: str = "resnet101", num_classes: int = 21, output_stride: int = 8,
                 freeze_backbone: bool = False, align_corners: bool = False) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.backbone = ResNetBackbone(backbone, output_stride, (1,) * BACKBONES[backbone][0][3])
        # torchvision keeps the first block of a dilated stage at the previous rate (its COCO weights were
        # trained so); ResNetBackbone dilates every block as DeepLabv3 does.
        rate = 1
        for i in (2, 3, 4):
            first = getattr(self.backbone, f"layer{i}")[0]
            set_dilation(first, rate)
            rate = max(rate, getattr(self.backbone, f"layer{i}")[-1].conv2.dilation[0])
        self.decoder = FCNHead(self.backbone.high_channels, num_classes)
        self.decoder[3] = nn.Identity()  # the built-in Dropout(0.1): the `decoder` site, empty unless placed
        self.freeze_backbone = freeze_backbone

    def forward(self, x: Tensor) -> Tensor:
        # (layer1, layer4): FCN reads layer4
        return upsample(self.decoder(self.backbone(x)[1]), x.shape[-2:], self.align_corners)

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
        state = download(FCN_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1, pretrained, "fcn_resnet101_coco")
    else:
        state = file_state_dict(pretrained)
        if not any(k.startswith("classifier.") for k in state):  # a ResNet state dict: the backbone only
            load_backbone_weights(model.backbone, pretrained)
            return
    state = {("decoder." + k[len("classifier."):] if k.startswith("classifier.") else k): v
             for k, v in state.items() if not k.startswith("aux_classifier.")}
    load_strict(model, state, pretrained, "fcn_resnet101")


def build(m) -> FCN:
    """The FCN of cfg.model ``m``, weights loaded, the backbone frozen if ``m.freeze_backbone``."""
    model = FCN(m.backbone, int(m.num_classes), int(m.output_stride), bool(m.freeze_backbone), bool(m.align_corners))
    _fcn_weights(model, str(m.pretrained))
    for p in model.backbone.parameters() if model.freeze_backbone else ():
        p.requires_grad_(False)  # SGD skips parameters without a gradient
    return model


def regularizer_sites(cfg) -> list[str]:
    """FCN's sites of cfg.placement in forward order: the backbone's (as DeepLabv3+), then the head's dropout
    slot after its 3x3 conv. No context module, so no spp sites (config.validate refuses them)."""
    sites = resnet_sites(cfg) if cfg.placement.resnet else []
    if cfg.placement.decoder:
        sites.append("decoder.3")
    return sites
