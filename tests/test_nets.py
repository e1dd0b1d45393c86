"""FCN-ResNet101, U-Net and ResNet-101-FPN (deeplab_dropout.model.fcn, .unet, .fpn): sites per placement counted from the module
tree, 2 training steps per placement at the input's size, torchvision equivalence, frozen backbone, wrong
placements in one line, and one end-to-end run per model through the real runner."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision
from conftest import tiny_cfg
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from deeplab_dropout import train as train_mod
from deeplab_dropout.config import ConfigError, validate
from deeplab_dropout.model import build_model, regularizer_sites
from deeplab_dropout.model.fpn import FPN_HEAD_CONVS, FPNBackbone
from deeplab_dropout.model.unet import DoubleConv
from deeplab_dropout.regularizers import DropBlock, Regularizer, describe_sites

SMALL_NET = {"unet": ["model=unet", "model.unet_base_channels=8"],
             "fcn": ["model=fcn_resnet101", "model.pretrained=none"],
             "fpn": ["model=fpn_resnet101", "model.pretrained=none"]}
# Training steps on 2 CPU cores: the ResNet-based ones on ResNet-18 (the same code paths as ResNet-101).
TRAIN_NET = {arch: overrides + ([] if arch == "unet" else ["model.backbone=resnet18"])
             for arch, overrides in SMALL_NET.items()}
PLACEMENTS = {"unet": ("resnet", "spp", "decoder", "upper", "all"), "fcn": ("resnet", "decoder"),
              "fpn": ("resnet", "spp", "decoder", "upper", "all")}
PARTS = {"resnet": ("resnet",), "spp": ("spp",), "decoder": ("decoder",), "upper": ("spp", "decoder"),
         "all": ("resnet", "spp", "decoder")}


def build_meta(cfg) -> nn.Module:
    """Build without allocating real weights (enough to count modules)."""
    with torch.device("meta"):
        return build_model(cfg)


def expected_sites(net: nn.Module, arch: str) -> dict[str, int]:
    """Sites per placement word, read off an unplaced model's module tree (not from the site lists)."""
    if arch == "unet":
        levels = [m for m in net.modules() if isinstance(m, DoubleConv)]
        enc = sum(isinstance(m, DoubleConv) for m in net.backbone.modules())
        return {"resnet": enc, "spp": len(levels) - enc - sum(isinstance(m, DoubleConv)
                                                               for m in net.decoder.modules()),
                "decoder": sum(isinstance(m, DoubleConv) for m in net.decoder.modules())}
    blocks = sum(isinstance(m, Bottleneck | BasicBlock) for m in net.backbone.modules())
    head_3x3 = sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in net.decoder.modules())
    spp = len(net.aspp.fpn.layer_blocks) if arch == "fpn" else 0  # one site per pyramid output
    return {"resnet": blocks, "spp": spp, "decoder": head_3x3}


@pytest.mark.parametrize("arch", list(SMALL_NET))
def test_sites_per_placement_counted_from_the_module_tree(compose_config, arch):
    plain = build_meta(compose_config(SMALL_NET[arch]))
    assert plain.regularizers() == {} and not any(isinstance(m, nn.Dropout) for m in plain.modules())
    per_part = expected_sites(plain, arch)
    assert per_part["resnet"] == (4 if arch == "unet" else 33)  # ResNet-101: 3 + 4 + 23 + 3 blocks
    for where in PLACEMENTS[arch]:
        cfg = compose_config(SMALL_NET[arch] + [f"cell={where}-dropblock"])
        net = build_meta(cfg)
        regs = net.regularizers()
        assert len(regs) == sum(per_part[p] for p in PARTS[where]), where
        assert list(regs) == regularizer_sites(cfg)
        assert all(type(m) is DropBlock for m in regs.values())
        owner = {"resnet": "backbone.", "spp": "aspp.", "decoder": "decoder."}
        assert all(any(n.startswith(owner[p]) for p in PARTS[where]) for n in regs)


@pytest.mark.parametrize("arch,stages,count", [("fcn", "[3,4]", 23 + 3), ("fpn", "[4]", 3), ("unet", "[1,4]", 2)])
def test_resnet_stages_select_groups(compose_config, arch, stages, count):
    cfg = compose_config(SMALL_NET[arch] + ["cell=resnet-uout", f"placement.resnet_stages={stages}"])
    assert len(build_meta(cfg).regularizers()) == count


def test_resnet_sites_keep_their_deeplab_meaning(compose_config):
    cfg = compose_config(SMALL_NET["fpn"] + ["cell=resnet-chandrop", "placement.resnet_sites=stages"])
    assert list(build_meta(cfg).regularizers()) == [f"backbone.layer{i}_drop" for i in range(1, 5)]
    cfg = compose_config(SMALL_NET["fcn"] + ["cell=resnet-dropblock", "placement.resnet_sites=blocks_and_skips",
                                             "placement.resnet_stages=[3,4]", "dropout.group3_gamma_scale=0.25"])
    regs = build_meta(cfg).regularizers()
    blocks = [n for n, m in build_meta(cfg).backbone.named_modules() if isinstance(m, Bottleneck)]
    assert len(regs) == 2 * sum(n.startswith(("layer3.", "layer4.")) for n in blocks)  # output + skip path
    assert {n: m.rate_scale for n, m in regs.items()} == {n: 0.25 if ".layer3." in n else 1.0 for n in regs}


def train_two_steps(net: nn.Module, size: tuple[int, int]) -> None:
    """Two SGD steps on random data; every placed regulariser runs in each forward; output size = input."""
    calls = []
    for m in net.regularizers().values():
        m.register_forward_hook(lambda mod, args, out: calls.append(out.shape == args[0].shape))
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    net.train()
    x, y = torch.randn(2, 3, *size), torch.randint(0, 21, (2, *size))
    for _ in range(2):
        out = net(x)
        assert out.shape == (2, 21, *size)
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert len(calls) == 2 * len(net.regularizers()) and all(calls)


@pytest.mark.parametrize("arch,where", [(a, w) for a in SMALL_NET for w in PLACEMENTS[a]
                                        if w in ("resnet", "spp", "decoder")])  # upper/all: counted above
def test_trains_two_steps_with_each_placement(compose_config, arch, where):
    torch.manual_seed(0)
    net = build_model(compose_config(TRAIN_NET[arch] + [f"cell={where}-dropblock", "dropout.block_size=3"]))
    assert net.regularizers()
    train_two_steps(net, (33, 33) if arch != "unet" else (37, 29))


@pytest.mark.parametrize("size", [(16, 16), (17, 45), (1, 5)])
def test_unet_output_size_equals_input_size(compose_config, size):
    net = build_model(compose_config(SMALL_NET["unet"])).eval()
    assert net(torch.randn(1, 3, *size)).shape == (1, 21, *size)


def test_unet_is_ronneberger_shaped(compose_config):
    net = build_model(compose_config(["model=unet"]))
    widths = [lv.conv2.conv.out_channels for lv in net.backbone.levels] + [net.aspp.level.conv2.conv.out_channels]
    assert widths == [64, 128, 256, 512, 1024]
    assert [lv.conv2.conv.out_channels for lv in net.decoder.levels] == [512, 256, 128, 64]
    assert all(isinstance(u, nn.ConvTranspose2d) and u.stride == (2, 2) for u in net.decoder.ups)
    # Xavier (Glorot) uniform: every weight within +-sqrt(6 / (fan_in + fan_out))
    conv = net.backbone.levels[1].conv1.conv
    bound = (6 / (conv.in_channels * 9 + conv.out_channels * 9)) ** 0.5
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound


def test_fcn_equals_torchvision_fcn_with_its_weights_file(compose_config, tmp_path):
    """A torchvision fcn_resnet50 state dict (aux head included) loads strictly; same logits as torchvision,
    so the dilations match the ones its COCO weights were trained with."""
    torch.manual_seed(0)
    tv = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, aux_loss=True).eval()
    torch.save(tv.state_dict(), tmp_path / "fcn.pth")
    net = build_model(compose_config(["model=fcn_resnet101", "model.backbone=resnet50",
                                      f"model.pretrained={tmp_path / 'fcn.pth'}"])).eval()
    assert net.decoder[4].weight.equal(tv.classifier[4].weight)
    x = torch.randn(1, 3, 40, 33)
    with torch.no_grad():
        assert torch.allclose(net(x), tv(x)["out"], atol=1e-5)


def test_fcn_frozen_backbone_keeps_weights_and_bn_statistics(voc_root):
    cfg = tiny_cfg(voc_root, "model=fcn_resnet101", "model.freeze_backbone=true", "cell=resnet-chandrop")
    net = build_model(cfg)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = train_mod.make_optimizer(net, cfg)  # the runner's two groups; the frozen one gets no gradient
    net.train()
    out = net(torch.randn(2, 3, 33, 33))
    nn.functional.cross_entropy(out, torch.randint(0, 21, (2, 33, 33))).backward()
    opt.step()
    after = net.state_dict()
    changed = {k for k in before if not before[k].equal(after[k])}
    assert changed and all(k.startswith("decoder.") for k in changed)
    assert net.decoder[1].training and not net.backbone.bn1.training
    assert all(m.training for m in net.regularizers().values())  # backbone dropout still acts


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_fpn_backbone_is_torchvision_resnet_at_stride_32(compose_config, name):
    torch.manual_seed(0)
    tv = torchvision.models.get_model(name).eval()
    backbone = FPNBackbone(name).eval()
    backbone.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = backbone(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for i, f in enumerate(feats, start=1):
            y = getattr(tv, f"layer{i}")(y)
            assert f.shape[-2:] == (64 // 2 ** (i + 1), 96 // 2 ** (i + 1)) and torch.allclose(f, y, atol=1e-5)


@pytest.mark.parametrize("arch,cell,message", [
    ("fcn", "spp-dropblock", "model=fcn_resnet101 has no spp sites (placement.spp=true); valid placements for it: "
                             "none, resnet, decoder"),
    ("fcn", "all-uout", "model=fcn_resnet101 has no spp sites (placement.spp=true); valid placements for it: "
                        "none, resnet, decoder"),
])
def test_a_placement_the_model_lacks_fails_in_one_line(compose_config, arch, cell, message):
    with pytest.raises(ConfigError) as err:
        build_model(compose_config(SMALL_NET[arch] + [f"cell={cell}"]))
    assert str(err.value) == message


@pytest.mark.parametrize("overrides,starts", [
    (["model=unet", "model.pretrained=imagenet"], "model.pretrained='imagenet' is invalid: expected none"),
    (["model=unet", "cell=spp-chandrop", "placement.spp_sites=branches"],
     "placement.spp_sites=branches is invalid for model=unet"),
    (["model=fpn_resnet101", "cell=spp-chandrop", "placement.spp_sites=branches"],
     "placement.spp_sites=branches is invalid for model=fpn_resnet101"),
    (["model=unet", "cell=resnet-chandrop", "placement.resnet_sites=first_block"],
     "placement.resnet_sites=first_block is invalid for model=unet"),
    (["model=fcn_resnet101", "model.pretrained=coco_with_voc_labels", "model.num_classes=5"],
     "model.pretrained=coco_with_voc_labels is torchvision's fcn_resnet101 with 21 classes"),
    (["model=fcn_resnet101", "model.freeze_backbone=1"], "model.freeze_backbone=1 is invalid"),
    (["model=unet", "model.unet_base_channels=0"], "model.unet_base_channels=0 is invalid"),
])
def test_bad_model_values_fail_in_one_line(compose_config, overrides, starts):
    with pytest.raises(ConfigError) as err:
        validate(compose_config(overrides))
    assert str(err.value).startswith(starts) and "\n" not in str(err.value)


def test_dropblock_voc_preset_sweeps_none_and_three_block_sizes(compose_config):
    from conftest import CONF_DIR
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    cfg = compose_config(["experiment=dropblock_voc", "cell=decoder-dropblock", "dropout.block_size=16"])
    validate(cfg)
    assert (cfg.model.arch, cfg.model.pretrained, cfg.data.fraction) == ("fpn", "none", 1.0)
    assert cfg.dropout.p == 0.8 and cfg.schedule.name == "linear" and cfg.trainer.epochs == 500
    assert len(regularizer_sites(cfg)) == sum(FPN_HEAD_CONVS)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        full = compose(config_name="train", overrides=["experiment=dropblock_voc"], return_hydra_config=True)
    assert dict(full.hydra.sweeper.params) == {"cell": "none,decoder-dropblock", "dropout.block_size": "1,4,16"}


@pytest.mark.parametrize("arch,cell", [("unet", "all-dropblock"), ("fcn", "decoder-chandrop"),
                                       ("fpn", "upper-uout")])
def test_one_run_through_the_runner(voc_root, tmp_path, arch, cell, caplog):
    # The runner's side of a model doesn't depend on its depth: ResNet-18 keeps these seconds on a CPU.
    over = [o for o in SMALL_NET[arch] if o != "model.pretrained=none"] + ([] if arch == "unet" else
                                                                           ["model.backbone=resnet18"])
    cfg = tiny_cfg(voc_root, *over, f"cell={cell}", "trainer.epochs=1", "trainer.max_train_steps=2",
                   "trainer.max_val_images=2")
    with caplog.at_level("INFO"):
        train_mod.run(cfg, tmp_path)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["status"] == "completed" and res["cell"] == cell and res["config"]["model"]["arch"] == arch
    assert len(res["history"]) == 1 and len(res["history"][0]["class_iou"]) == 21
    assert (tmp_path / "checkpoints" / "best.pt").is_file()
    assert describe_sites(build_model(cfg)) in caplog.text  # the sites are reported at start-up


def test_regularizers_are_parameter_free_so_checkpoints_cross_cells(compose_config):
    plain = build_meta(compose_config(SMALL_NET["fpn"]))
    placed = build_meta(compose_config(SMALL_NET["fpn"] + ["cell=all-chandrop"]))
    assert isinstance(next(iter(placed.regularizers().values())), Regularizer)
    assert [k for k, _ in plain.named_parameters()] == [k for k, _ in placed.named_parameters()]
