"""What every architecture shares: the ``SegmentationModel`` base class, ConvBNReLU, the two weight
initialisations and the encoder-level sites of the models with an encoder of their own."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from deeplab_dropout.regularizers import Regularizer, find_regularizers, set_drop_p

__all__ = ["SegmentationModel", "ConvBNReLU", "init_head", "xavier_init", "upsample", "encoder_level_sites"]


class SegmentationModel(nn.Module):
    """What the runner relies on: children ``backbone``, ``aspp``, ``decoder`` and the regulariser sites."""

    def regularizers(self) -> dict[str, Regularizer]:
        """Placed regularisers by qualified module name, in forward order."""
        return find_regularizers(self)

    def set_drop_p(self, p: float) -> None:
        """Set the drop probability of every placed regulariser (called before each step by the ramp)."""
        set_drop_p(self, p)


class ConvBNReLU(nn.Module):
    """Bias-free conv (same padding, optional dilation and stride) + BN + ReLU, with an optional ``drop`` slot;
    ``transposed``: a transposed conv that multiplies H and W by ``stride`` instead of dividing them."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 1, dilation: int = 1, stride: int = 1,
                 transposed: bool = False) -> None:
        super().__init__()
        padding = dilation * (kernel_size // 2)
        if transposed:
            self.conv = nn.ConvTranspose2d(cin, cout, kernel_size, stride=stride, padding=padding,
                                           output_padding=stride - 1, dilation=dilation, bias=False)
        else:
            self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, dilation=dilation,
                                  bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.relu(self.bn(self.conv(x))))


def init_head(module: nn.Module) -> None:
    """Kaiming-normal (fan_out) conv weights, zero biases, unit BN scales: the DeepLab heads' initialisation."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def xavier_init(model: nn.Module) -> None:
    """Xavier-uniform conv and transposed-conv weights, zero biases (the course report's init)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def upsample(x: Tensor, size, align_corners: bool = False) -> Tensor:
    """Bilinear resize to ``size`` (H, W): every model's upsampling, ``align_corners`` from model.align_corners
    (False; the authors' code: True)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def encoder_level_sites(cfg) -> list[str]:
    """The resnet sites of a model with an encoder of its own (U-Net, course): an encoder level is both a block
    and a stage, so one site after each level of placement.resnet_stages."""
    return [f"backbone.levels.{s - 1}.drop" for s in sorted(int(s) for s in cfg.placement.resnet_stages)]
