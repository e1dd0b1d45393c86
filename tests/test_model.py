"""DeepLabv3+ architecture (Multi-Grid, image pooling), Table 2 placements, weight loading (no downloads)."""
from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import compose_cfg, counting_backend

from deeplab_dropout.config import ConfigError
from deeplab_dropout.model import build_model, regularizer_sites
from deeplab_dropout.model.backbone import ResNetBackbone
from deeplab_dropout.model.deeplab import DeepLabV3Plus, ImagePooling
from deeplab_dropout.regularizers import (
    ChannelDropout,
    DropBlock,
    Regularizer,
    UOut,
    describe_sites,
    place_regularizers,
)

CELL_DIR = Path(__file__).resolve().parents[1] / "conf" / "cell"
CELLS = sorted(p.stem for p in CELL_DIR.glob("*.yaml"))
TYPES = {"chandrop": ChannelDropout, "dropblock": DropBlock, "uout": UOut}
R18 = ["model=deeplabv3plus_resnet18", "model.pretrained=none"]
R101 = ["model=deeplabv3plus_resnet101", "model.pretrained=none"]


def build_meta(cfg) -> DeepLabV3Plus:
    """Build without allocating or initialising real weights (enough for counting modules/parameters)."""
    with torch.device("meta"):
        return build_model(cfg)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tv_blocks(name: str) -> list[int]:
    with torch.device("meta"):
        net = torchvision.models.get_model(name)
    return [len(getattr(net, f"layer{i}")) for i in range(1, 5)]


def convs3x3(block: torch.nn.Module) -> list[torch.nn.Conv2d]:
    """A residual block's 3x3 convs, found by kernel size (Bottleneck: one; BasicBlock: two)."""
    return [m for m in block.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]


def block_rates(layer: torch.nn.Module) -> list[int]:
    """Per block, the dilation of its 3x3 convs (each equal to its padding, the same within a block)."""
    rates = []
    for block in layer:
        seen = {(c.dilation, c.padding) for c in convs3x3(block)}
        assert len(seen) == 1 and all(d == p and d[0] == d[1] for d, p in seen), seen
        rates.append(next(iter(seen))[0][0])
    return rates


def dilate_by_hand(tv: torch.nn.Module, rates: dict[int, list[int]]) -> None:
    """Make a plain torchvision ResNet the expected dilated one: no stride in those stages, given rates."""
    for stage, per_block in rates.items():
        layer = getattr(tv, f"layer{stage}")
        layer[0].downsample[0].stride = (1, 1)
        for block, r in zip(layer, per_block, strict=True):
            for conv in convs3x3(block):
                conv.stride, conv.dilation, conv.padding = (1, 1), (r, r), (r, r)


# --- architecture -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("model,os,size", [("resnet18", 16, (97, 131)), ("resnet18", 8, (97, 131)),
                                           ("resnet50", 16, (49, 67)), ("resnet50", 8, (49, 67))])
def test_output_shape_any_size_and_output_stride(compose_config, model, os, size):
    torch.manual_seed(0)
    cfg = compose_config([f"model=deeplabv3plus_{model}", "model.pretrained=none", f"model.output_stride={os}"])
    net = build_model(cfg).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, *size)).shape == (2, 21, *size)
        low, high = net.backbone(torch.randn(1, 3, 128, 128))
    assert low.shape[-1] == 128 // 4 and high.shape[-1] == 128 // os
    assert net.aspp.branches[1].conv.dilation == ((6, 6) if os == 16 else (12, 12))


@pytest.mark.parametrize("name,os,rates", [
    ("resnet18", 16, {4: [2, 4]}),
    ("resnet50", 8, {3: [2] * 6, 4: [4, 8, 16]}),
])
def test_backbone_computes_what_torchvision_computes(compose_config, name, os, rates):
    """Same weights, same features as torchvision's ResNet dilated by hand to the Multi-Grid rates: the block
    rewrite (regulariser slots, dilation) does not change the maths."""
    torch.manual_seed(0)
    tv = torchvision.models.get_model(name)
    dilate_by_hand(tv, rates)
    net = build_model(compose_config([f"model=deeplabv3plus_{name}", "model.pretrained=none",
                                      f"model.output_stride={os}", "cell=all-uout"])).eval()
    net.backbone.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")})
    tv.eval()
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        low, high = net.backbone(x)
        ref_low = tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x)))))
        torch.testing.assert_close(low, ref_low)
        torch.testing.assert_close(high, tv.layer4(tv.layer3(tv.layer2(ref_low))))
    assert high.shape[-2:] == (64 // os, 80 // os)


@pytest.mark.parametrize("name,os,grid,layer3,layer4", [
    ("resnet101", 16, "[1,2,4]", [1] * 23, [2, 4, 8]),
    ("resnet101", 8, "[1,2,4]", [2] * 23, [4, 8, 16]),  # every layer3 block, the first included
    ("resnet101", 16, "[1,1,1]", [1] * 23, [2, 2, 2]),
    ("resnet18", 16, "[1,2,4]", [1, 1], [2, 4]),  # the third entry is unused
    ("resnet18", 8, "[1,2]", [2, 2], [4, 8]),
])
def test_multi_grid_dilations(compose_config, name, os, grid, layer3, layer4):
    cfg = compose_config([f"model=deeplabv3plus_{name}", "model.pretrained=none", f"model.output_stride={os}",
                          f"model.multi_grid={grid}"])
    backbone = build_meta(cfg).backbone
    blocks = tv_blocks(name)
    assert [len(convs3x3(b)) for b in backbone.layer4] == [2 if name == "resnet18" else 1] * blocks[3]
    assert block_rates(backbone.layer1) == [1] * blocks[0] and block_rates(backbone.layer2) == [1] * blocks[1]
    assert block_rates(backbone.layer3) == layer3
    assert block_rates(backbone.layer4) == layer4


def test_standalone_defaults_are_the_config_defaults(compose_config):
    """From Python, DeepLabV3Plus()/ResNetBackbone() default to Multi-Grid (1, 2, 4), BN in image pooling."""
    with torch.device("meta"):
        net = DeepLabV3Plus("resnet18")
        backbone = ResNetBackbone("resnet101")
    configured = build_meta(compose_config(R18))
    assert block_rates(net.backbone.layer4) == block_rates(configured.backbone.layer4) == [2, 4]
    assert block_rates(backbone.layer4) == [2, 4, 8]
    assert net.state_dict().keys() == configured.state_dict().keys()
    assert isinstance(net.aspp.branches[4].bn, torch.nn.BatchNorm2d)


@pytest.mark.parametrize("os", [8, 16])
def test_output_size_odd_input_with_multi_grid(compose_config, os):
    torch.manual_seed(0)
    cfg = compose_config(R18 + [f"model.output_stride={os}", "model.multi_grid=[1,2,4]"])
    net = build_model(cfg).eval()
    x = torch.randn(2, 3, 65, 65)
    with torch.no_grad():
        assert net(x).shape == (2, 21, 65, 65)
        _, high = net.backbone(x)
    size = 65
    for _ in range({16: 4, 8: 3}[os]):  # stem conv, maxpool, layer2 (and layer3 at OS16) halve, rounding up
        size = (size - 1) // 2 + 1
    assert high.shape[-2:] == (size, size)


def test_batch_of_one_trains_without_pooling_bn(compose_config):
    net = build_model(compose_config(R18 + ["cell=all-dropblock", "model.pool_norm=none"])).train()
    out = net(torch.randn(1, 3, 65, 71))
    assert out.shape == (1, 21, 65, 71)
    out.mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_batch_of_one_with_pooling_bn_evaluates_but_cannot_train(compose_config):
    torch.manual_seed(0)
    net = build_model(compose_config(R18)).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 65, 65)).shape == (1, 21, 65, 65)
    # Why config.validate rejects trainer.batch_size=1 with model.pool_norm=bn.
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        net.train()(torch.randn(1, 3, 65, 65))


def _pooling_branch(net: DeepLabV3Plus) -> torch.nn.Module:
    def pools(branch: torch.nn.Module) -> bool:
        return any(isinstance(m, torch.nn.AdaptiveAvgPool2d) for m in branch.modules())

    pooling = [b for b in net.aspp.branches if pools(b)]
    assert len(pooling) == 1
    return pooling[0]


@pytest.mark.parametrize("pool_norm", ["bn", "none"])
def test_image_pooling_norm(compose_config, pool_norm):
    branch = _pooling_branch(build_meta(compose_config(R18 + [f"model.pool_norm={pool_norm}"])))
    bns = [m for m in branch.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    (conv,) = [m for m in branch.modules() if isinstance(m, torch.nn.Conv2d)]
    assert conv.kernel_size == (1, 1)
    if pool_norm == "bn":
        assert len(bns) == 1 and isinstance(bns[0], torch.nn.BatchNorm2d) and conv.bias is None
    else:
        assert bns == [] and conv.bias is not None


@pytest.mark.parametrize("pool_norm", ["bn", "none"])
def test_image_pooling_computes_pool_conv_norm_relu(pool_norm):
    torch.manual_seed(0)
    branch = ImagePooling(8, 4, pool_norm).eval()
    for t in branch.parameters():
        torch.nn.init.normal_(t)
    if pool_norm == "bn":
        branch.bn.running_mean.normal_()
        branch.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 8, 5, 7)
    y = branch.conv.weight.flatten(1) @ x.mean(dim=(2, 3)).T  # (4, 2): the 1x1 conv on the global mean
    if pool_norm == "bn":
        bn = branch.bn
        y = (y - bn.running_mean[:, None]) / (bn.running_var[:, None] + bn.eps).sqrt()
        y = y * bn.weight[:, None] + bn.bias[:, None]
    else:
        y = y + branch.conv.bias[:, None]
    expected = y.T.relu()[:, :, None, None].expand(2, 4, 5, 7)  # constant over H x W
    with torch.no_grad():
        torch.testing.assert_close(branch(x), expected)


def _pair(cfg_overrides: list[str]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The model of ``cfg_overrides`` with model.align_corners false and true, the same weights, in eval mode."""
    torch.manual_seed(0)
    off = build_model(compose_cfg([*cfg_overrides, "model.align_corners=false"])).eval()
    on = build_model(compose_cfg([*cfg_overrides, "model.align_corners=true"])).eval()
    on.load_state_dict(off.state_dict())
    return off, on


def test_align_corners_reaches_the_decoder_and_final_upsampling():
    off, on = _pair(R18)
    x = torch.randn(2, 3, 65, 81)
    seen: dict[str, torch.Tensor] = {}
    on.aspp.register_forward_hook(lambda m, i, o: seen.__setitem__("aspp", o))
    on.decoder.conv1.register_forward_pre_hook(lambda m, i: seen.__setitem__("concat", i[0]))
    on.decoder.classifier.register_forward_hook(lambda m, i, o: seen.__setitem__("logits", o))
    with torch.no_grad():
        out_off, out_on = off(x), on(x)
    low_size = seen["concat"].shape[-2:]
    aspp_up = seen["concat"][:, :seen["aspp"].shape[1]]
    # The decoder's x4 (ASPP to the low-level map) and the final upsampling are align_corners=True ones.
    assert torch.equal(aspp_up, F.interpolate(seen["aspp"], size=low_size, mode="bilinear", align_corners=True))
    assert torch.equal(out_on, F.interpolate(seen["logits"], size=(65, 81), mode="bilinear", align_corners=True))
    assert out_on.shape == out_off.shape and not torch.allclose(out_on, out_off)
    # The image-pooling branch upsamples a 1x1 map: the same constant either way.
    assert on.aspp.branches[4].align_corners and not off.aspp.branches[4].align_corners


@pytest.mark.parametrize("overrides,bilinear", [
    (["model=fcn_resnet101", "model.backbone=resnet18"], True),
    (["model=fpn_resnet101", "model.backbone=resnet18", "model.fpn_channels=16", "model.head_channels=8"], True),
    (["model=unet", "model.unet_base_channels=4"], False),
    (["model=course_fcn", "model.channels=[4,4,4,4,4]"], False),
])
def test_align_corners_in_every_bilinear_model(overrides, bilinear):
    """Every model with a bilinear upsampling takes model.align_corners; U-Net and the course model have none."""
    off, on = _pair([*overrides, "model.pretrained=none"])
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        out_off, out_on = off(x), on(x)
    assert out_on.shape == out_off.shape == (2, 21, 45, 61)
    assert torch.equal(out_on, out_off) != bilinear


@pytest.mark.parametrize("pool_norm,expected", [("bn", 59_344_309), ("none", 59_344_053)])
def test_resnet101_parameter_count(compose_config, pool_norm, expected):
    net = build_meta(compose_config(R101 + ["cell=all-uout", f"model.pool_norm={pool_norm}"]))
    with torch.device("meta"):
        tv = torchvision.models.resnet101()
    c, a, low, k, lowin = 2048, 256, 48, 21, 256  # layer4 / ASPP / low-level / classes / layer1 channels

    def conv_bn(cin: int, cout: int, ks: int) -> int:  # bias-free conv + BN weight and bias
        return cin * cout * ks * ks + 2 * cout

    backbone = n_params(tv) - n_params(tv.fc)  # dilation adds no parameters
    pooling = conv_bn(c, a, 1) if pool_norm == "bn" else c * a + a  # 1x1 conv + BN, or 1x1 conv with bias
    aspp = conv_bn(c, a, 1) + 3 * conv_bn(c, a, 3) + pooling + conv_bn(5 * a, a, 1)
    decoder = conv_bn(lowin, low, 1) + conv_bn(low + a, a, 3) + conv_bn(a, a, 3) + (a * k + k)
    assert n_params(net.backbone) == backbone
    assert n_params(net.aspp) == aspp
    assert n_params(net.decoder) == decoder
    total = n_params(net)
    print(f"DeepLabv3+ ResNet-101 OS16, 21 classes, pool_norm={pool_norm}: {total:,} parameters")
    assert total == backbone + aspp + decoder == expected  # bn: the reimplementation's count
    assert abs(total - 59.3e6) < 0.1e6  # DESIGN's ballpark for two decoder convs
    assert {n.split(".")[0] for n, _ in net.named_parameters()} == {"backbone", "aspp", "decoder"}


def test_no_dropout_anywhere_by_default(compose_config):
    net = build_meta(compose_config(R101))
    assert not any(isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in net.modules())
    assert net.regularizers() == {} and regularizer_sites(compose_config(R101)) == []


@pytest.mark.parametrize("model", sorted(p.stem for p in (CELL_DIR.parent / "model").glob("*.yaml")))
def test_every_model_preset_builds(compose_config, model):
    """Every model option builds through the one public builder, with the runner's children."""
    net = build_meta(compose_config([f"model={model}", "model.pretrained=none"]))
    assert {"backbone", "decoder"} <= {n for n, _ in net.named_children()}
    assert net.regularizers() == {}


# --- Table 2 placement ------------------------------------------------------------------------------------

def test_the_sixteen_cells_exist():
    parts, kinds = ("resnet", "spp", "decoder", "upper", "all"), ("chandrop", "dropblock", "uout")
    assert set(CELLS) == {"none"} | {f"{p}-{k}" for p in parts for k in kinds}


@pytest.mark.parametrize("cell", CELLS)
def test_cell_places_table2_sites(compose_config, cell):
    cfg = compose_config(R101 + [f"cell={cell}"])
    net = build_meta(cfg)
    regs = net.regularizers()
    where, _, kind = cell.partition("-")
    counts = {part: sum(n.startswith(part + ".") for n in regs) for part in ("backbone", "aspp", "decoder")}
    expected = {
        "backbone": sum(tv_blocks("resnet101")) if where in ("resnet", "all") else 0,
        "aspp": 1 if where in ("spp", "upper", "all") else 0,
        "decoder": 2 if where in ("decoder", "upper", "all") else 0,
    }
    assert counts == expected
    assert len(regs) == sum(expected.values())
    assert all(type(m) is TYPES[kind] for m in regs.values())
    assert all(m.p == cfg.dropout.p for m in regs.values())
    # Every place a Regularizer sits (a module shared by two sites would show at both) is a listed site.
    placed = [n for n, m in net.named_modules(remove_duplicate=False) if isinstance(m, Regularizer)]
    assert placed == list(regs) == regularizer_sites(cfg)


@pytest.mark.parametrize("overrides,part,count", [
    (["placement.resnet_sites=stages"], "backbone", 4),
    (["placement.resnet_sites=first_block"], "backbone", 1),
    (["placement.resnet_stages=[3,4]"], "backbone", sum(tv_blocks("resnet101")[2:])),
    (["placement.spp_sites=branches"], "aspp", 5),
])
def test_site_options(compose_config, overrides, part, count):
    cfg = compose_config(R101 + ["cell=all-dropblock"] + overrides)
    regs = build_meta(cfg).regularizers()
    assert sum(n.startswith(part + ".") for n in regs) == count
    assert list(regs) == regularizer_sites(cfg)


def test_dropout_none_places_nothing_even_if_placement_says_so(compose_config):
    cfg = compose_config(R18 + ["dropout=none", "placement=all"])
    assert regularizer_sites(cfg) == [] and build_model(cfg).regularizers() == {}


@pytest.mark.parametrize("overrides,message", [
    # Built unchecked, these would fail later and differently: reading the file, a KeyError on the stride.
    (["model.pretrained=/nope/r18.pth"], "model.pretrained='/nope/r18.pth' is invalid: expected imagenet, none or "
                                         "an existing file"),
    (["model.pretrained=none", "model.output_stride=32"], "model.output_stride=32 is invalid: expected one of 8, 16"),
    (["model.pretrained=none", "trainer.batch_size=1"], "trainer.batch_size=1 is invalid with model.pool_norm=bn"),
])
def test_build_model_validates_the_config_first(compose_config, overrides, message):
    """Notebook users get config.validate's one-line error before any work: no weight was initialised (the
    global RNG is untouched)."""
    cfg = compose_config(["model=deeplabv3plus_resnet18", *overrides])
    rng = torch.random.get_rng_state()
    with pytest.raises(ConfigError) as err:
        build_model(cfg)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_build_model_validate_false_skips_the_check(compose_config):
    """The apps validate once at start-up and pass validate=False: a value only training cares about (batch 1
    with image-pooling BN) no longer stops the build."""
    cfg = compose_config(R18 + ["trainer.batch_size=1", "cell=all-uout"])
    with pytest.raises(ConfigError, match="trainer.batch_size=1 is invalid"):
        build_meta(cfg)
    with torch.device("meta"):
        net = build_model(cfg, validate=False)
    assert list(net.regularizers()) == regularizer_sites(cfg)


def test_empty_slots_are_identities_and_placing_fills_only_them(compose_config):
    net = build_meta(compose_config(R18 + ["model.pool_norm=none"]))
    slots = regularizer_sites(compose_config(R18 + ["cell=all-uout", "placement.spp_sites=branches"]))
    slots += ["backbone.layer1.0.branch_drop"] + [f"backbone.layer{i}_drop" for i in range(1, 5)]
    assert all(type(net.get_submodule(s)) is torch.nn.Identity for s in slots)
    x = torch.randn(3, 4)
    assert net.get_submodule(slots[0])(x) is x
    place_regularizers(net, ["decoder.drop2"], lambda: UOut(0.1))
    assert list(net.regularizers()) == ["decoder.drop2"]
    for site in ("decoder.drop2", "decoder.classifier", "decoder.nodrop"):  # filled, a layer, no such child
        with pytest.raises(ValueError, match=f"{site} is not an empty regulariser slot"):
            place_regularizers(net, [site], lambda: UOut(0.1))


def _anchor(net, site: str):
    """(module, 'in'|'out', which tensor): the regulariser at `site` must see/produce exactly that tensor."""
    parent, _, leaf = site.rpartition(".")
    if site.startswith("decoder.drop"):
        return net.get_submodule(f"decoder.conv{site[-1]}"), "in", "output"
    if site == "aspp.drop":
        return net.aspp.project, "in", "output"
    if leaf == "branch_drop":  # BasicBlock: input of the residual add is bn2's output
        return net.get_submodule(parent).bn2, "in", "output"
    if site.endswith("_drop"):  # backbone.layerN_drop
        return net.get_submodule(site[:-len("_drop")]), "in", "output"
    return net.get_submodule(parent), "out", "output"  # block / branch outputs pass through their drop last


@pytest.mark.parametrize("overrides", [
    ["cell=decoder-chandrop"], ["cell=spp-chandrop"], ["cell=spp-chandrop", "placement.spp_sites=branches"],
    ["cell=resnet-chandrop"], ["cell=resnet-chandrop", "placement.resnet_sites=stages"],
    ["cell=resnet-chandrop", "placement.resnet_sites=first_block"],
])
def test_regularisers_are_in_the_forward_path(compose_config, overrides):
    torch.manual_seed(0)
    cfg = compose_config(R18 + overrides + ["dropout.p=0.5"])
    net = build_model(cfg).train()
    regs = net.regularizers()
    assert regs
    seen: dict[str, list] = {n: [] for n in regs}
    anchors: dict[str, list] = {n: [] for n in regs}
    hooks = []
    for name, reg in regs.items():
        hooks.append(reg.register_forward_hook(lambda m, i, o, n=name: seen[n].append((i[0], o))))
        mod, _, _ = _anchor(net, name)
        hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: anchors[n].append(o)))
    x = torch.randn(2, 3, 65, 65)
    torch.manual_seed(1)
    active = net(x)
    for h in hooks:
        h.remove()
    for name in regs:
        assert len(seen[name]) == 1, f"{name} ran {len(seen[name])} times"
        (reg_in, reg_out), which = seen[name][0], _anchor(net, name)[1]
        assert (reg_in if which == "in" else reg_out) is anchors[name][-1], f"{name} is not where it claims"
    net.set_drop_p(0.0)
    assert all(m.p == 0.0 for m in regs.values())
    torch.manual_seed(1)
    off = net(x)
    assert not torch.allclose(active, off)
    torch.manual_seed(1)
    assert torch.equal(net(x), off)  # train-mode BN is deterministic: the difference is the regulariser


def test_placement_keeps_state_dict_keys_and_eval_output(compose_config):
    torch.manual_seed(0)
    plain = build_model(compose_config(R18)).eval()
    placed = build_model(compose_config(R18 + ["cell=all-dropblock"])).eval()
    assert placed.state_dict().keys() == plain.state_dict().keys()
    placed.load_state_dict(plain.state_dict())
    tv_keys = {k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")}
    assert set(placed.backbone.state_dict()) == tv_keys
    x = torch.randn(2, 3, 45, 53)
    with torch.no_grad():
        assert torch.equal(placed(x), plain(x))


def test_describe_sites(compose_config):
    net = build_meta(compose_config(R101 + ["cell=all-dropblock"]))
    text = describe_sites(net)
    assert "backbone: 33 x DropBlock(p=0.2, block_size=7)" in text
    assert "backbone.layer1.0.drop ... backbone.layer4.2.drop" in text
    assert "aspp: 1 x" in text and "decoder: 2 x" in text and "decoder.drop1, decoder.drop2" in text
    assert describe_sites(build_meta(compose_config(R101))) == "none placed"


# --- pretrained weights -----------------------------------------------------------------------------------

def _saved_resnet(tmp_path: Path, name: str = "resnet18", wrap: str | None = None) -> tuple[Path, dict]:
    torch.manual_seed(42)
    state = torchvision.models.get_model(name).state_dict()
    path = tmp_path / f"{name}.pth"
    torch.save({wrap: state} if wrap else state, path)
    return path, state


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_pretrained_from_local_state_dict(compose_config, tmp_path, wrap):
    path, state = _saved_resnet(tmp_path, wrap=wrap)
    net = build_model(compose_config(["model=deeplabv3plus_resnet18", f"model.pretrained={path}",
                                      "cell=all-uout"]))
    loaded = net.backbone.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


def test_pretrained_wrong_file_lists_keys(compose_config, tmp_path):
    path, _ = _saved_resnet(tmp_path, "resnet34")
    with pytest.raises(ConfigError, match=r"model\.pretrained=.*resnet34\.pth does not fit torchvision resnet18: "
                       r"Unexpected key\(s\) in state_dict: \"layer1\.2\.") as err:
        build_model(compose_config(["model=deeplabv3plus_resnet18", f"model.pretrained={path}"]))
    assert "\n" not in str(err.value) and len(str(err.value)) < 500  # the first keys, not all 96
    state = torchvision.models.resnet18().state_dict()
    del state["layer2.0.bn1.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ConfigError, match=r'Missing key\(s\) in state_dict: "layer2\.0\.bn1\.weight"'):
        build_model(compose_config(["model=deeplabv3plus_resnet18", f"model.pretrained={tmp_path}/partial.pth"]))
    state = torchvision.models.resnet18().state_dict()
    state["layer3.1.conv2.weight"] = torch.zeros(256, 256, 1, 1)
    torch.save(state, tmp_path / "reshaped.pth")
    with pytest.raises(ConfigError, match=r"size mismatch for layer3\.1\.conv2\.weight") as err:
        build_model(compose_config(["model=deeplabv3plus_resnet18", f"model.pretrained={tmp_path}/reshaped.pth"]))
    assert "\n" not in str(err.value)
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pth: not a readable state dict") as err:
        build_model(compose_config(["model=deeplabv3plus_resnet18", f"model.pretrained={tmp_path}/junk.pth"]))
    assert "\n" not in str(err.value)


def test_pretrained_imagenet_offline_error(compose_config, tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    def never(*args, **kwargs):
        raise AssertionError("tests must never download")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", offline)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", never)
    with pytest.raises(ConfigError) as err:
        build_model(compose_config(["model=deeplabv3plus_resnet18", "model.pretrained=imagenet"]))
    msg = str(err.value)
    assert "\n" not in msg
    assert torch.hub.get_dir() in msg and str(tmp_path) in msg
    assert "model.pretrained=none" in msg and "model.pretrained=/path/to/" in msg


# --- DropBlock paper options: skip-connection sites, group-3 rate scale, p as a buffer ----------------------

def residual_blocks(net, stages) -> dict[str, torch.nn.Module]:
    """The residual blocks of the given stages, by qualified name, found in the module tree."""
    kinds = (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck)
    return {n: m for n, m in net.named_modules()
            if isinstance(m, kinds) and n.split(".")[1] in {f"layer{s}" for s in stages}}


@pytest.mark.parametrize("model,stages", [(R101, [3, 4]), (R18, [1, 2, 3, 4])])
def test_blocks_and_skips_adds_one_skip_site_per_selected_block(compose_config, model, stages):
    cfg = compose_config(model + ["cell=resnet-dropblock", "placement.resnet_sites=blocks_and_skips",
                                  f"placement.resnet_stages=[{','.join(map(str, stages))}]"])
    net = build_meta(cfg)
    regs = net.regularizers()
    blocks = residual_blocks(net, stages)
    assert blocks and {n for n in regs if n.endswith(".skip_drop")} == {f"{b}.skip_drop" for b in blocks}
    assert {n for n in regs if n.endswith(".drop")} == {f"{b}.drop" for b in blocks}
    assert len(regs) == 2 * len(blocks)
    placed = [n for n, m in net.named_modules(remove_duplicate=False) if isinstance(m, Regularizer)]
    assert placed == list(regs) == regularizer_sites(cfg)
    assert f"{len(blocks)} on skip paths" in describe_sites(net)


@pytest.mark.parametrize("model", [R18, ["model=deeplabv3plus_resnet50", "model.pretrained=none"]])
def test_skip_sites_change_only_the_skip_term(compose_config, model):
    torch.manual_seed(0)
    cfg = compose_config(model + ["cell=resnet-chandrop", "placement.resnet_sites=blocks_and_skips",
                                  "placement.resnet_stages=[1,2]", "dropout.p=0.5"])
    net = build_model(cfg).train()
    for name, reg in net.regularizers().items():
        if name.endswith(".drop"):
            reg.p = 0.0  # only the skip sites act
    blocks = residual_blocks(net, [1, 2])
    seen: dict[str, dict] = {n: {} for n in blocks}
    hooks = [b.register_forward_hook(lambda m, i, o, n=n: seen[n].update(x=i[0], out=o)) for n, b in blocks.items()]
    hooks += [b.skip_drop.register_forward_hook(lambda m, i, o, n=n: seen[n].update(s_in=i[0], s_out=o))
              for n, b in blocks.items()]
    with torch.no_grad():
        net(torch.randn(2, 3, 33, 33))
        for h in hooks:
            h.remove()
        changed = 0
        for name, block in blocks.items():
            s = seen[name]
            skip = s["x"] if block.downsample is None else block.downsample(s["x"])
            torch.testing.assert_close(s["s_in"], skip)  # the site sits on the skip path ...
            branch = _residual_branch(block, s["x"])  # ... and the branch is untouched: out = relu(branch + skip')
            torch.testing.assert_close(s["out"], torch.relu(branch + s["s_out"]))
            changed += not torch.allclose(s["s_out"], s["s_in"])
    assert changed == len(blocks)


def _residual_branch(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A residual block's branch before the addition, recomputed from its layers (train-mode BN)."""
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, torchvision.models.resnet.Bottleneck):
        return block.bn3(block.conv3(block.relu(block.bn2(block.conv2(out)))))
    return block.bn2(block.conv2(out))


@pytest.mark.parametrize("sites", ["blocks_and_skips", "stages"])
def test_group3_gamma_scale_only_in_layer3(compose_config, sites):
    cfg = compose_config(R101 + ["cell=all-dropblock", f"placement.resnet_sites={sites}",
                                 "dropout.group3_gamma_scale=0.25"])
    regs = build_meta(cfg).regularizers()
    in3 = {n for n in regs if n.startswith(("backbone.layer3.", "backbone.layer3_drop"))}
    assert in3 and all(regs[n].rate_scale == 0.25 for n in in3)
    assert all(m.rate_scale == 1.0 for n, m in regs.items() if n not in in3)
    net = build_meta(cfg)
    net.set_drop_p(0.1)  # the ramp keeps the scale
    g3, g4 = (next(m for n, m in net.regularizers().items() if f"layer{i}" in n) for i in (3, 4))
    assert g3.p == g4.p == 0.1 and g3.gamma(33, 33) == pytest.approx(0.25 * g4.gamma(33, 33))


def test_p_buffers_stay_out_of_checkpoints(compose_config):
    net = build_model(compose_config(R18 + ["cell=all-dropblock", "placement.resnet_sites=blocks_and_skips"]))
    plain = build_model(compose_config(R18))
    assert len(list(net.buffers())) == len(list(plain.buffers())) + len(net.regularizers())
    assert net.state_dict().keys() == plain.state_dict().keys()
    net.load_state_dict(plain.state_dict())


def test_compiled_model_does_not_recompile_when_the_ramp_sets_p(compose_config):
    dynamo = pytest.importorskip("torch._dynamo")
    compiles = []

    backend = counting_backend(compiles)

    torch.manual_seed(0)
    net = build_model(compose_config(R18 + ["cell=resnet-dropblock", "placement.resnet_sites=blocks_and_skips",
                                            "placement.resnet_stages=[4]", "dropout.block_size=2"])).train()
    dynamo.reset()
    # layer4 (its blocks with skip and output sites) stands for the model: tracing all of it takes ~10 s
    compiled = torch.compile(net.backbone.layer4, backend=backend)
    x = torch.randn(2, 256, 5, 5)
    with torch.no_grad():
        net.set_drop_p(0.1)
        compiled(x)
        first = len(compiles)
        for p in (0.15, 0.3, 0.05):
            net.set_drop_p(p)
            compiled(x)
    assert first >= 1 and len(compiles) == first, "set_drop_p made torch.compile recompile"
    dynamo.reset()
