"""The ResNet backbone shared by DeepLabv3+, FCN and FPN: torchvision's ResNet with empty regulariser slots,
dilation and Multi-Grid, its resnet sites, and its weights (every loading failure a ConfigError naming
model.pretrained).

Parameter names stay torchvision's, so its state dicts (minus ``fc.*``) load as they are.
"""
from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from deeplab_dropout.config import BACKBONES, ConfigError, one_line

__all__ = ["ResNetBackbone", "STAGE_RATES", "set_dilation", "resnet_sites", "download", "file_state_dict",
           "load_strict", "load_backbone_weights"]

# Dilation rate of layer2..layer4 per output stride (a stage with rate > 1 drops its stride; layer4's blocks
# further multiply it by the Multi-Grid).
STAGE_RATES = {16: (1, 1, 2), 8: (1, 2, 4)}


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
        set_dilation(self, dilation)
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


def set_dilation(block: nn.Module, rate: int) -> None:
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
                set_dilation(blk, rate * grid[j])
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


def resnet_sites(cfg) -> list[str]:
    """The backbone sites of ``placement.resnet_sites`` in the selected stages, in forward order (the same
    module names in every model built on ResNetBackbone)."""
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


# --- weights: every failure is a ConfigError naming model.pretrained --------------------------------------

def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {one_line(err)}"


def download(weights, what: str, name: str) -> dict[str, Tensor]:
    """A state dict from torchvision's weights API (cached under torch.hub's directory)."""
    try:
        return weights.get_state_dict(progress=True)
    except Exception as err:  # no network, proxy, corrupt download: all end the same way for the user
        raise ConfigError(
            f"model.pretrained={what}: could not get {name} weights ({_reason(err)}); the download cache is "
            f"{torch.hub.get_dir()}/checkpoints -- offline, copy the file there or use "
            f"model.pretrained=/path/to/{name}.pth (a torchvision state dict) or model.pretrained=none") from err


def file_state_dict(path: str) -> dict[str, Tensor]:
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


def load_strict(module: nn.Module, state: dict[str, Tensor], pretrained: str, name: str) -> None:
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
        state = download(weights, "imagenet", backbone.name)
    else:
        state = file_state_dict(pretrained)
    load_strict(backbone, {k: v for k, v in state.items() if not k.startswith("fc.")}, pretrained, backbone.name)
