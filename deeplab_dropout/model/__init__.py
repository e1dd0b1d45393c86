"""The study's segmentation models: ``build_model`` from a composed config, and ``regularizer_sites``, the one
answer to where a config puts dropout. One module per architecture family; ``backbone`` is the ResNet that
DeepLabv3+, FCN and FPN share.

Regulariser slots are ``nn.Identity()`` children that the forward pass always calls; placing a regulariser
replaces one and changes no parameter path: backbone keys stay torchvision's (ImageNet weights load as is)
and checkpoints of any cell load into a model of any other cell.
"""
from __future__ import annotations

from types import ModuleType

from deeplab_dropout import config
from deeplab_dropout.model import course, deeplab, fcn, fpn, unet
from deeplab_dropout.model.base import SegmentationModel
from deeplab_dropout.regularizers import regularize

__all__ = ["build_model", "regularizer_sites", "SegmentationModel", "FAMILIES"]

# model.arch -> its family's module: build(cfg.model) (architecture and weights) and regularizer_sites(cfg).
# Every model has ``backbone`` (trained at optim.lr; the rest at optim.lr x optim.head_lr_mult) and a context
# child named ``aspp`` (the role name DeepLabv3+ gives it), so the placement words keep their meaning:
# | model         | resnet                        | spp                       | decoder                          |
# | deeplabv3plus | every block (or stage) output | ASPP output (or branches) | after each 3x3 conv              |
# | fcn           | as DeepLabv3+                 | none: no context module   | after the FCN head's 3x3 conv    |
# | unet          | after each encoder level      | after the bottleneck      | after each decoder level         |
# | fpn           | as DeepLabv3+                 | each FPN output P2..P5    | after each semantic-head conv    |
# | encdec        | after encoder blocks 1..4     | encoder -> decoder bridge | after each transposed-conv block |
# torchvision_deeplabv3 has none. config.validate refuses placements a model lacks (config.ARCH_PARTS).
FAMILIES: dict[str, ModuleType] = {"deeplabv3plus": deeplab, "torchvision_deeplabv3": deeplab, "fcn": fcn,
                                   "unet": unet, "fpn": fpn, "encdec": course}


def regularizer_sites(cfg) -> list[str]:
    """Qualified module names of the regulariser sites a composed config places, in forward order (empty for
    dropout none); build_model places exactly these."""
    if cfg.dropout.name == "none":
        return []
    return FAMILIES[cfg.model.arch].regularizer_sites(cfg)


def build_model(cfg, *, validate: bool = True) -> SegmentationModel:
    """The model of a composed config: cfg.model (architecture, weights), cfg.dropout at cfg.placement's sites.

    ``validate``: check the whole config first (config.validate); the apps, which did so at start-up, pass False.
    """
    if validate:
        config.validate(cfg)
    model = FAMILIES[cfg.model.arch].build(cfg.model)
    regularize(model, cfg.dropout, regularizer_sites(cfg))
    return model
