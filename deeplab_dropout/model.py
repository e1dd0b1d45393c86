"""DeepLabv3+ on a torchvision ResNet, with the study's regulariser sites placed from the config.

Regulariser slots are registered as empty (``None``) child modules where the forward pass consults them, so
placing a regulariser changes no parameter path: backbone keys stay torchvision's (ImageNet weights load
as is) and checkpoints of any cell load into a model of any other cell.

Where the paper is silent this follows the authors' code: layer4 Multi-Grid (``model.multi_grid``) and BN in
the ASPP image pooling (``model.pool_norm``). config.validate checks these values; this module trusts them.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from deeplab_dropout.regularizers import Regularizer, make_regularizer

__all__ = ["DeepLabV3Plus", "TorchvisionDeepLabV3", "SegmentationModel", "ResNetBackbone", "ImagePooling",
           "build_model", "regularizer_sites", "describe_sites", "cell_name", "placement_name", "make_regularizer", "load_backbone_weights",
           "BACKBONES"]

# Blocks per layer of each torchvision ResNet (and whether it uses Bottleneck blocks).
BACKBONES: dict[str, tuple[list[int], bool]] = {
    "resnet18": ([2, 2, 2, 2], False),
    "resnet34": ([3, 4, 6, 3], False),
    "resnet50": ([3, 4, 6, 3], True),
    "resnet101": ([3, 4, 23, 3], True),
    "resnet152": ([3, 8, 36, 3], True),
}
# Dilation rate of layer2..layer4 per output stride (a stage with rate > 1 drops its stride; layer4's blocks
# further multiply it by the Multi-Grid), and the ASPP rates that keep the same field of view.
STAGE_RATES = {16: (1, 1, 2), 8: (1, 2, 4)}
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}
ARCHS = ("deeplabv3plus", "torchvision_deeplabv3")
RESNET_SITES = ("blocks", "stages", "first_block")
SPP_SITES = ("output", "branches")


def _invalid(key: str, value, allowed) -> ValueError:
    return ValueError(f"{key}={value!r} is invalid: expected one of {', '.join(map(str, allowed))}")


# --- backbone ---------------------------------------------------------------------------------------------

class _SiteBasicBlock(BasicBlock):
    """torchvision BasicBlock with dilation support and two regulariser slots (same parameters and keys).

    ``drop`` regularises the block output; ``branch_drop`` sits in the residual branch after conv2-bn2
    (the BasicBlock analogue of the authors' conv2-bn2-relu site, since its ReLU comes after the add).
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Callable[..., nn.Module] | None = None) -> None:
        # torchvision refuses dilation for BasicBlock; dilate both 3x3 convs as Bottleneck does its 3x3.
        super().__init__(inplanes, planes, stride, downsample, groups, base_width, 1, norm_layer)
        _set_dilation(self, dilation)
        self.register_module("branch_drop", None)
        self.register_module("drop", None)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.branch_drop is not None:
            out = self.branch_drop(out)
        out = self.relu(out + identity)
        return out if self.drop is None else self.drop(out)


class _SiteBottleneck(Bottleneck):
    """torchvision Bottleneck with two regulariser slots: ``branch_drop`` after conv2-bn2-relu, ``drop``
    after the block output."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_module("branch_drop", None)
        self.register_module("drop", None)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        if self.branch_drop is not None:
            out = self.branch_drop(out)
        out = self.relu(self.bn3(self.conv3(out)) + identity)
        return out if self.drop is None else self.drop(out)


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
        if name not in BACKBONES:
            raise _invalid("model.backbone", name, BACKBONES)
        if output_stride not in STAGE_RATES:
            raise _invalid("model.output_stride", output_stride, sorted(STAGE_RATES))
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
            self.register_module(f"layer{i}_drop", None)  # the `stages` site
        self.low_channels = 64 * block.expansion
        self.high_channels = 512 * block.expansion

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = None
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            drop = getattr(self, f"layer{i}_drop")
            if drop is not None:
                x = drop(x)
            if i == 1:
                low = x
        return low, x


# --- head -------------------------------------------------------------------------------------------------

class ConvBNReLU(nn.Module):
    """Bias-free conv (same padding, optional dilation) + BN + ReLU, with an optional ``drop`` slot."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=dilation * (kernel_size // 2), dilation=dilation,
                              bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.register_module("drop", None)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn(self.conv(x)))
        return x if self.drop is None else self.drop(x)


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
        self.register_module("bn", nn.BatchNorm2d(cout) if pool_norm == "bn" else None)
        self.relu = nn.ReLU(inplace=True)
        self.register_module("drop", None)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(self.pool(x))
        y = self.relu(y if self.bn is None else self.bn(y))
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return y if self.drop is None else self.drop(y)


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
        self.register_module("drop", None)  # the `spp output` site (no built-in dropout, unlike the peers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.project(torch.cat([b(x) for b in self.branches], dim=1))
        return x if self.drop is None else self.drop(x)


class Decoder(nn.Module):
    """DeepLabv3+ decoder: 1x1 low-level projection, concat with upsampled ASPP, two 3x3 convs, classifier."""

    def __init__(self, low_in: int, low_channels: int, aspp_channels: int, num_classes: int) -> None:
        super().__init__()
        self.low_proj = ConvBNReLU(low_in, low_channels, 1)
        self.conv1 = ConvBNReLU(low_channels + aspp_channels, aspp_channels, 3)
        self.register_module("drop1", None)
        self.conv2 = ConvBNReLU(aspp_channels, aspp_channels, 3)
        self.register_module("drop2", None)
        self.classifier = nn.Conv2d(aspp_channels, num_classes, 1)

    def forward(self, low: Tensor, aspp: Tensor, size: tuple[int, int]) -> Tensor:
        low = self.low_proj(low)
        aspp = F.interpolate(aspp, size=low.shape[-2:], mode="bilinear", align_corners=False)
        x = self.conv1(torch.cat([aspp, low], dim=1))
        if self.drop1 is not None:
            x = self.drop1(x)
        x = self.conv2(x)
        if self.drop2 is not None:
            x = self.drop2(x)
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
        for m in self.regularizers().values():
            m.p = p


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
    backbone = cfg.model.backbone
    if backbone not in BACKBONES:
        raise _invalid("model.backbone", backbone, BACKBONES)
    pl, dropout = cfg.placement, cfg.dropout.name
    if dropout not in ("none", "channel", "dropblock", "uout"):
        raise _invalid("dropout.name", dropout, ("none", "channel", "dropblock", "uout"))
    if pl.resnet_sites not in RESNET_SITES:
        raise _invalid("placement.resnet_sites", pl.resnet_sites, RESNET_SITES)
    if pl.spp_sites not in SPP_SITES:
        raise _invalid("placement.spp_sites", pl.spp_sites, SPP_SITES)
    stages = [int(s) for s in pl.resnet_stages]
    if not stages or not set(stages) <= {1, 2, 3, 4} or len(set(stages)) != len(stages):
        raise ValueError(f"placement.resnet_stages={stages} is invalid: expected a non-empty list of distinct "
                         "stages from 1, 2, 3, 4")
    if pl.resnet and pl.resnet_sites == "first_block" and 1 not in stages:
        raise ValueError(f"placement.resnet_sites=first_block is inside layer1 but placement.resnet_stages="
                         f"{stages} excludes stage 1")
    if dropout == "none":
        return []
    sites: list[str] = []
    if pl.resnet:
        if pl.resnet_sites == "blocks":
            blocks = BACKBONES[backbone][0]
            sites += [f"backbone.layer{s}.{j}.drop" for s in sorted(stages) for j in range(blocks[s - 1])]
        elif pl.resnet_sites == "stages":
            sites += [f"backbone.layer{s}_drop" for s in sorted(stages)]
        else:
            sites.append("backbone.layer1.0.branch_drop")
    if pl.spp:
        sites += [f"aspp.branches.{i}.drop" for i in range(5)] if pl.spp_sites == "branches" else ["aspp.drop"]
    if pl.decoder:
        sites += ["decoder.drop1", "decoder.drop2"]
    return sites


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
        if leaf not in parent._modules or parent._modules[leaf] is not None:
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
        parts.append(f"{part}: {len(names)} x {kind} [{shown}]")
    return "; ".join(parts)


# --- weights ----------------------------------------------------------------------------------------------

def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _imagenet_state_dict(name: str) -> dict[str, Tensor]:
    # IMAGENET1K_V1: the original torchvision weights, as available to the study (2019).
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True)
    except Exception as err:  # no network, proxy, corrupt download: all end the same way for the user
        raise _weights_failure("imagenet", name, err) from err


def _file_state_dict(path: str) -> dict[str, Tensor]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"model.pretrained={path}: no such file (expected a torchvision ResNet state dict, "
                                "or use imagenet / none)")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"model.pretrained={path}: not a readable state dict ({_one_line(err)})") from err
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"model.pretrained={path}: expected a state dict of tensors, got {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_backbone_weights(backbone: ResNetBackbone, pretrained: str | None) -> None:
    """Load ``imagenet`` (torchvision weights API), a torchvision-format state dict file, or nothing (none)."""
    if pretrained is None or str(pretrained).lower() in ("none", ""):
        return
    pretrained = str(pretrained)
    state = _imagenet_state_dict(backbone.name) if pretrained == "imagenet" else _file_state_dict(pretrained)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        raise ValueError(f"model.pretrained={pretrained} does not fit torchvision {backbone.name}: "
                         f"missing keys [{few(missing)}], unexpected keys [{few(unexpected)}]")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"model.pretrained={pretrained} does not fit torchvision {backbone.name}: shape "
                         f"mismatch in {'; '.join(wrong[:5])}")
    backbone.load_state_dict(state)


def _weights_failure(what: str, name: str, err: BaseException) -> RuntimeError:
    return RuntimeError(
        f"model.pretrained={what}: could not get {name} weights ({_one_line(err)}); the download cache is "
        f"{torch.hub.get_dir()}/checkpoints -- offline, copy the file there or use "
        f"model.pretrained=/path/to/{name}.pth (a torchvision state dict) or model.pretrained=none")


def build_torchvision_deeplabv3(cfg) -> TorchvisionDeepLabV3:
    """torchvision's DeepLabv3-ResNet101 with ``coco_with_voc_labels`` weights (weights API), a state dict
    file of that model, or random init (none). It has no regulariser sites."""
    from torchvision.models.segmentation import DeepLabV3_ResNet101_Weights, deeplabv3_resnet101

    m = cfg.model
    if m.backbone != "resnet101" or int(m.output_stride) != 8:
        raise ValueError(f"model.arch=torchvision_deeplabv3 is torchvision's resnet101 at output stride 8, got "
                         f"model.backbone={m.backbone}, model.output_stride={m.output_stride}")
    if regularizer_sites(cfg):
        raise ValueError("model.arch=torchvision_deeplabv3 has no regulariser sites: use placement=none or "
                         "dropout=none (cell=none)")
    tv = deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=int(m.num_classes), aux_loss=True)
    pretrained = str(m.pretrained)
    if pretrained == "coco_with_voc_labels":
        try:
            state = DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1.get_state_dict(progress=True)
        except Exception as err:  # no network, proxy, corrupt download
            raise _weights_failure(pretrained, "deeplabv3_resnet101_coco", err) from err
    elif pretrained.lower() not in ("none", ""):
        state = _file_state_dict(pretrained)
    else:
        state = None
    if state is not None:
        result = tv.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("aux_classifier.")]
        if missing or result.unexpected_keys:
            raise ValueError(f"model.pretrained={pretrained} does not fit torchvision deeplabv3_resnet101: "
                             f"missing keys {missing[:5]}, unexpected keys {result.unexpected_keys[:5]}")
    return TorchvisionDeepLabV3(tv)


def build_model(cfg) -> SegmentationModel:
    """The model of a composed config: cfg.model (architecture, weights), cfg.dropout + cfg.placement."""
    m = cfg.model
    arch = m.get("arch", "deeplabv3plus")
    if arch not in ARCHS:
        raise _invalid("model.arch", arch, ARCHS)
    if arch == "torchvision_deeplabv3":
        return build_torchvision_deeplabv3(cfg)
    sites = regularizer_sites(cfg)  # validates placement before any weights are fetched
    model = DeepLabV3Plus(m.backbone, int(m.num_classes), int(m.output_stride), int(m.aspp_channels),
                          int(m.low_level_channels), tuple(m.multi_grid), m.pool_norm)
    load_backbone_weights(model.backbone, m.pretrained)
    if sites:
        make_regularizer(cfg.dropout)  # validate p / block_size once, with a clear message
        place_regularizers(model, sites, lambda: make_regularizer(cfg.dropout))
    return model
