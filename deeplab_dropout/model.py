"""DeepLabv3+ on a torchvision ResNet, with the study's regulariser sites placed from the config.

Regulariser slots are ``nn.Identity()`` child modules that the forward pass always calls; placing a regulariser
replaces one and changes no parameter path: backbone keys stay torchvision's (ImageNet weights load as is)
and checkpoints of any cell load into a model of any other cell.

Where the paper is silent this follows the authors' code: layer4 Multi-Grid (``model.multi_grid``) and BN in
the ASPP image pooling (``model.pool_norm``). config.validate checks every value (build_model calls it
first); this module trusts them.
"""
from __future__ import annotations

import textwrap
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from deeplab_dropout.config import BACKBONES, NET_ARCHS, ConfigError, one_line, validate
from deeplab_dropout.regularizers import Regularizer, make_regularizer, set_drop_p

__all__ = ["DeepLabV3Plus", "TorchvisionDeepLabV3", "SegmentationModel", "ResNetBackbone", "ImagePooling",
           "build_model", "regularizer_sites", "describe_sites", "cell_name", "placement_name", "make_regularizer",
           "in_group3", "regularize", "load_backbone_weights", "BACKBONES"]

# Dilation rate of layer2..layer4 per output stride (a stage with rate > 1 drops its stride; layer4's blocks
# further multiply it by the Multi-Grid), and the ASPP rates that keep the same field of view.
STAGE_RATES = {16: (1, 1, 2), 8: (1, 2, 4)}
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


# --- backbone ---------------------------------------------------------------------------------------------

class _SiteBasicBlock(BasicBlock):
    """torchvision BasicBlock with dilation support and two regulariser slots (same parameters and keys).

    ``drop`` regularises the block output; ``branch_drop`` sits in the residual branch after conv2-bn2
    (the BasicBlock analogue of the authors' conv2-bn2-relu site, since its ReLU comes after the add);
    ``skip_drop`` on the skip path (identity or downsample), before the addition.
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Callable[..., nn.Module] | None = None) -> None:
        # torchvision refuses dilation for BasicBlock; dilate both 3x3 convs as Bottleneck does its 3x3.
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, 1, norm_layer)
        _set_dilation(self, dilation)
        _add_slots(self)

    def forward(self, x: Tensor) -> Tensor:
        identity = self.skip_drop(x if self.downsample is None else self.downsample(x))
        out = self.branch_drop(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        return self.drop(self.relu(out + identity))


class _SiteBottleneck(Bottleneck):
    """torchvision Bottleneck with three regulariser slots: ``skip_drop`` on the skip path (before the
    addition), ``branch_drop`` after conv2-bn2-relu, ``drop`` after the block output."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _add_slots(self)

    def forward(self, x: Tensor) -> Tensor:
        identity = self.skip_drop(x if self.downsample is None else self.downsample(x))
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.branch_drop(self.relu(self.bn2(self.conv2(out))))
        return self.drop(self.relu(self.bn3(self.conv3(out)) + identity))


def _add_slots(block: nn.Module) -> None:
    """The empty regulariser slots of a residual block, registered in forward order (skip path first)."""
    block.skip_drop = nn.Identity()
    block.branch_drop = nn.Identity()
    block.drop = nn.Identity()


def _set_dilation(block: nn.Module, rate: int) -> None:
    """Dilate a residual block's 3x3 conv(s) (Bottleneck: conv2; BasicBlock: both); sizes are kept."""
    convs = (block.conv2,) if isinstance(block, Bottleneck) else (block.conv1, block.conv2)
    for conv in convs:
        conv.dilation, conv.padding = (rate, rate), (rate, rate)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without avgpool/fc, dilated to output stride 16 or 8; returns (layer1, layer4).

    layer4's block j is dilated by its stage rate x ``multi_grid[j]`` (extra entries unused). Parameter
    names equal torchvision's, so its state dicts (minus ``fc.*``) load directly.
    """

    def __init__(self, name: str = "resnet101", output_stride: int = 16,
                 multi_grid: tuple[int, ...] = (1, 2, 4)) -> None:
        super().__init__()
        layers, bottleneck = BACKBONES[name]
        block = _SiteBottleneck if bottleneck else _SiteBasicBlock
        rates = STAGE_RATES[output_stride]
        net = ResNet(block, layers, replace_stride_with_dilation=[r > 1 for r in rates])
        # torchvision leaves the first block of a dilated stage at the previous rate; DeepLabv3 and the
        # authors dilate every block, so set each one (layer4 with the Multi-Grid).
        for i, rate in zip((2, 3, 4), rates, strict=True):
            grid = multi_grid if i == 4 else (1,) * layers[i - 1]
            for j, blk in enumerate(getattr(net, f"layer{i}")):
                _set_dilation(blk, rate * grid[j])
        self.name, self.output_stride, self.multi_grid = name, output_stride, tuple(multi_grid)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        for i in range(1, 5):
            self.add_module(f"layer{i}", getattr(net, f"layer{i}"))
            self.add_module(f"layer{i}_drop", nn.Identity())  # the `stages` site
        self.low_channels = 64 * block.expansion
        self.high_channels = 512 * block.expansion

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = x = self.layer1_drop(self.layer1(x))
        for i in range(2, 5):
            x = getattr(self, f"layer{i}_drop")(getattr(self, f"layer{i}")(x))
        return low, x


# --- head -------------------------------------------------------------------------------------------------

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


class ImagePooling(nn.Module):
    """ASPP image-level branch: global average pool -> 1x1 conv -> BN -> ReLU -> bilinear to H x W.

    BN (``pool_norm="bn"``) is the default for fidelity: the authors' code, the reimplementation the paper
    builds on and torchvision all use it. On the 1x1 pooled map it sees one value per channel per sample, so
    training with batch size 1 fails (config.validate says so in one line); ``pool_norm="none"`` (1x1 conv
    with bias -> ReLU) allows it.
    """

    def __init__(self, cin: int, cout: int, pool_norm: str = "bn") -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        # Same child names as ConvBNReLU (conv, bn), but that one's drop would act before the upsampling.
        self.conv = nn.Conv2d(cin, cout, 1, bias=pool_norm != "bn")
        self.bn = nn.BatchNorm2d(cout) if pool_norm == "bn" else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn(self.conv(self.pool(x))))
        return self.drop(F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1 + three 3x3 atrous + image pooling, concat, 1x1 projection."""

    def __init__(self, cin: int, channels: int = 256, rates: tuple[int, int, int] = (6, 12, 18),
                 pool_norm: str = "bn") -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [ConvBNReLU(cin, channels, 1)]
            + [ConvBNReLU(cin, channels, 3, dilation=r) for r in rates]
            + [ImagePooling(cin, channels, pool_norm)]
        )
        self.project = ConvBNReLU(len(self.branches) * channels, channels, 1)
        self.drop = nn.Identity()  # the `spp output` site (no built-in dropout, unlike the peers)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.project(torch.cat([b(x) for b in self.branches], dim=1)))


class Decoder(nn.Module):
    """DeepLabv3+ decoder: 1x1 low-level projection, concat with upsampled ASPP, two 3x3 convs, classifier."""

    def __init__(self, low_in: int, low_channels: int, aspp_channels: int, num_classes: int) -> None:
        super().__init__()
        self.low_proj = ConvBNReLU(low_in, low_channels, 1)
        self.conv1 = ConvBNReLU(low_channels + aspp_channels, aspp_channels, 3)
        self.drop1 = nn.Identity()
        self.conv2 = ConvBNReLU(aspp_channels, aspp_channels, 3)
        self.drop2 = nn.Identity()
        self.classifier = nn.Conv2d(aspp_channels, num_classes, 1)

    def forward(self, low: Tensor, aspp: Tensor, size: tuple[int, int]) -> Tensor:
        low = self.low_proj(low)
        aspp = F.interpolate(aspp, size=low.shape[-2:], mode="bilinear", align_corners=False)
        x = self.drop1(self.conv1(torch.cat([aspp, low], dim=1)))
        x = self.drop2(self.conv2(x))
        return F.interpolate(self.classifier(x), size=size, mode="bilinear", align_corners=False)


def _init_head(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SegmentationModel(nn.Module):
    """What the runner relies on: children ``backbone``, ``aspp``, ``decoder`` and the regulariser sites."""

    def regularizers(self) -> dict[str, Regularizer]:
        """Placed regularisers by qualified module name, in forward order."""
        return {name: m for name, m in self.named_modules() if isinstance(m, Regularizer)}

    def set_drop_p(self, p: float) -> None:
        """Set the drop probability of every placed regulariser (called before each step by the ramp)."""
        set_drop_p(self, p)


class DeepLabV3Plus(SegmentationModel):
    """DeepLabv3+ (Chen et al. 2018) on a torchvision ResNet; children ``backbone``, ``aspp``, ``decoder``.

    Returns logits (N, num_classes, H, W) at the input's size, for any H x W.
    """

    def __init__(self, backbone: str = "resnet101", num_classes: int = 21, output_stride: int = 16,
                 aspp_channels: int = 256, low_level_channels: int = 48,
                 multi_grid: tuple[int, ...] = (1, 2, 4), pool_norm: str = "bn") -> None:
        super().__init__()
        self.backbone = ResNetBackbone(backbone, output_stride, multi_grid)
        self.aspp = ASPP(self.backbone.high_channels, aspp_channels, ASPP_RATES[output_stride], pool_norm)
        self.decoder = Decoder(self.backbone.low_channels, low_level_channels, aspp_channels, num_classes)
        _init_head(self.aspp)
        _init_head(self.decoder)

    def forward(self, x: Tensor) -> Tensor:
        low, high = self.backbone(x)
        return self.decoder(low, self.aspp(high), x.shape[-2:])


class TorchvisionDeepLabV3(SegmentationModel):
    """torchvision's DeepLabv3 (no aux head), split into ``backbone``, ``aspp`` and ``decoder`` (the 3x3
    conv-BN-ReLU and classifier after the ASPP), for evaluating its COCO-with-VOC-labels weights."""

    def __init__(self, tv_model: nn.Module) -> None:
        super().__init__()
        self.backbone = tv_model.backbone
        self.aspp = tv_model.classifier[0]
        self.aspp.project[-1] = nn.Identity()  # torchvision's built-in Dropout(0.5): no dropout unless placed
        self.decoder = nn.Sequential(*list(tv_model.classifier)[1:])

    def forward(self, x: Tensor) -> Tensor:
        y = self.decoder(self.aspp(self.backbone(x)["out"]))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


# --- placement --------------------------------------------------------------------------------------------

def regularizer_sites(cfg) -> list[str]:
    """Qualified module names of the regulariser sites a composed config places (empty for dropout none).

    The one answer to "where does this config put dropout"; build_model places exactly these, in this order.
    """
    if cfg.model.get("arch") in NET_ARCHS:  # FCN, U-Net, FPN: deeplab_dropout.nets
        from deeplab_dropout import nets

        return nets.regularizer_sites(cfg)
    pl = cfg.placement
    if cfg.dropout.name == "none":
        return []
    sites = _resnet_sites(cfg) if pl.resnet else []
    if pl.spp:
        sites += [f"aspp.branches.{i}.drop" for i in range(5)] if pl.spp_sites == "branches" else ["aspp.drop"]
    if pl.decoder:
        sites += ["decoder.drop1", "decoder.drop2"]
    return sites


def _resnet_sites(cfg) -> list[str]:
    """The backbone sites of ``placement.resnet_sites`` in the selected stages, in forward order."""
    stages = sorted(int(s) for s in cfg.placement.resnet_stages)
    how = cfg.placement.resnet_sites
    if how == "stages":
        return [f"backbone.layer{s}_drop" for s in stages]
    if how == "first_block":
        return ["backbone.layer1.0.branch_drop"]
    blocks = BACKBONES[cfg.model.backbone][0]
    # blocks_and_skips: the skip path (before the addition) too, as the DropBlock paper's Figure 4 does.
    slots = ("skip_drop", "drop") if how == "blocks_and_skips" else ("drop",)
    return [f"backbone.layer{s}.{j}.{slot}" for s in stages for j in range(blocks[s - 1]) for slot in slots]


def in_group3(site: str) -> bool:
    """Whether a site lies in ResNet group 3 (torchvision's layer3, or right after it): the sites the
    DropBlock paper gave a 4x smaller gamma."""
    return any(part in ("layer3", "layer3_drop") for part in site.split("."))


def regularize(model: nn.Module, cfg) -> None:
    """Place cfg.dropout's regulariser at every site of ``regularizer_sites(cfg)``, those in ResNet group 3
    with dropout.group3_gamma_scale as their ``rate_scale`` (the DropBlock paper's smaller gamma there)."""
    # .get: configs saved before the key existed (resumed runs, eval of old checkpoints) mean 1.0
    scale = float(cfg.dropout.get("group3_gamma_scale", 1.0))
    for site in regularizer_sites(cfg):
        place_regularizers(model, [site], partial(make_regularizer, cfg.dropout, scale if in_group3(site) else 1.0))


DROPOUT_SHORT = {"channel": "chandrop", "dropblock": "dropblock", "uout": "uout"}
PLACEMENT_NAMES = {(True, False, False): "resnet", (False, True, False): "spp", (False, False, True): "decoder",
                   (False, True, True): "upper", (True, True, True): "all"}


def placement_name(cfg) -> str:
    """Where the config regularises, in Table 2 words (``upper`` = spp + decoder), ``none`` if nowhere."""
    sites = (bool(cfg.placement.resnet), bool(cfg.placement.spp), bool(cfg.placement.decoder))
    if cfg.dropout.name == "none" or not any(sites):
        return "none"
    return PLACEMENT_NAMES.get(sites) or "+".join(n for n, on in zip(("resnet", "spp", "decoder"), sites, strict=True) if on)


def cell_name(cfg) -> str:
    """The Table 2 name of what the config regularises (e.g. ``upper-dropblock``), from the values used;
    torchvision's COCO-trained DeepLabv3 is the paper's ``pretrained-base`` row."""
    if cfg.model.get("arch") == "torchvision_deeplabv3":
        return "pretrained-base"
    where = placement_name(cfg)
    return "none" if where == "none" else f"{where}-{DROPOUT_SHORT[cfg.dropout.name]}"


def place_regularizers(model: nn.Module, sites: list[str], factory: Callable[[], nn.Module]) -> None:
    """Fill each named slot with a fresh regulariser from ``factory``; the slot must exist and be empty."""
    for site in sites:
        parent_name, _, leaf = site.rpartition(".")
        parent = model.get_submodule(parent_name)
        if not isinstance(parent._modules.get(leaf), nn.Identity):
            raise ValueError(f"{site} is not an empty regulariser slot of {type(model).__name__}")
        setattr(parent, leaf, factory())


def describe_sites(model: DeepLabV3Plus) -> str:
    """One-line summary of the placed regularisers per part, e.g. for start-up logging."""
    regs = model.regularizers()
    if not regs:
        return "none placed"
    parts = []
    for part in ("backbone", "aspp", "decoder"):
        names = [n for n in regs if n.startswith(part + ".")]
        if not names:
            continue
        kinds = sorted({repr(regs[n]) for n in names})
        kind = kinds[0] if len(kinds) == 1 else "(" + ", ".join(kinds) + ")"
        shown = ", ".join(names) if len(names) <= 3 else f"{names[0]} ... {names[-1]}"
        skips = sum(n.endswith(".skip_drop") for n in names)
        shown += f"; {skips} on skip paths" if skips else ""
        parts.append(f"{part}: {len(names)} x {kind} [{shown}]")
    return "; ".join(parts)


# --- weights: every failure is a ConfigError naming model.pretrained --------------------------------------

def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {one_line(err)}"


def _download(weights, what: str, name: str) -> dict[str, Tensor]:
    """A state dict from torchvision's weights API (cached under torch.hub's directory)."""
    try:
        return weights.get_state_dict(progress=True)
    except Exception as err:  # no network, proxy, corrupt download: all end the same way for the user
        raise ConfigError(
            f"model.pretrained={what}: could not get {name} weights ({_reason(err)}); the download cache is "
            f"{torch.hub.get_dir()}/checkpoints -- offline, copy the file there or use "
            f"model.pretrained=/path/to/{name}.pth (a torchvision state dict) or model.pretrained=none") from err


def _file_state_dict(path: str) -> dict[str, Tensor]:
    """A state dict file, also nested under ``state_dict``/``model`` or saved from DataParallel."""
    try:
        obj = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"model.pretrained={path}: not a readable state dict ({_reason(err)})") from err
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConfigError(f"model.pretrained={path}: expected a state dict of tensors, got {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _load_strict(module: nn.Module, state: dict[str, Tensor], pretrained: str, name: str) -> None:
    """load_state_dict(strict=True); its error (missing/unexpected keys, size mismatches) in one line."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        details = [" ".join(ln.split()) for ln in str(err).splitlines()[1:] if ln.strip()]
        shown = "; ".join(textwrap.shorten(d, 300, placeholder=" ...") for d in details[:3])
        more = f" (+{len(details) - 3} more)" if len(details) > 3 else ""
        raise ConfigError(f"model.pretrained={pretrained} does not fit torchvision {name}: {shown}{more}") from err


def load_backbone_weights(backbone: ResNetBackbone, pretrained: str | None) -> None:
    """Load ``imagenet`` (torchvision weights API), a torchvision-format state dict file, or nothing (none)."""
    pretrained = str(pretrained)
    if pretrained.lower() in ("none", ""):
        return
    if pretrained == "imagenet":  # IMAGENET1K_V1: the original torchvision weights, as the study had them (2019)
        weights = torchvision.models.get_model_weights(backbone.name).IMAGENET1K_V1
        state = _download(weights, "imagenet", backbone.name)
    else:
        state = _file_state_dict(pretrained)
    _load_strict(backbone, {k: v for k, v in state.items() if not k.startswith("fc.")}, pretrained, backbone.name)


def build_torchvision_deeplabv3(cfg) -> TorchvisionDeepLabV3:
    """torchvision's DeepLabv3-ResNet101 with ``coco_with_voc_labels`` weights (weights API), a state dict
    file of that model, or random init (none). It has no regulariser sites."""
    from torchvision.models.segmentation import DeepLabV3_ResNet101_Weights, deeplabv3_resnet101

    tv = deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=int(cfg.model.num_classes),
                             aux_loss=True)
    pretrained = str(cfg.model.pretrained)
    if pretrained.lower() in ("none", ""):
        return TorchvisionDeepLabV3(tv)
    if pretrained == "coco_with_voc_labels":
        weights = DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1
        state = _download(weights, pretrained, "deeplabv3_resnet101_coco")
    else:
        state = _file_state_dict(pretrained)
    tv.aux_classifier = None  # unused (TorchvisionDeepLabV3 keeps no aux head): its weights may be absent
    _load_strict(tv, {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}, pretrained,
                 "deeplabv3_resnet101")
    return TorchvisionDeepLabV3(tv)


def build_model(cfg) -> SegmentationModel:
    """The model of a composed config (validated first): cfg.model (architecture, weights), cfg.dropout +
    cfg.placement."""
    if cfg.model.get("arch") in NET_ARCHS:  # FCN, U-Net, FPN: deeplab_dropout.nets
        from deeplab_dropout import nets

        return nets.build(cfg)
    validate(cfg)
    m = cfg.model
    if m.arch == "torchvision_deeplabv3":
        return build_torchvision_deeplabv3(cfg)
    model = DeepLabV3Plus(m.backbone, int(m.num_classes), int(m.output_stride), int(m.aspp_channels),
                          int(m.low_level_channels), tuple(m.multi_grid), m.pool_norm)
    load_backbone_weights(model.backbone, m.pretrained)
    regularize(model, cfg)
    return model
