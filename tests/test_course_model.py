"""The VOC 2007 course report's baseline encoder-decoder (model=course_fcn, deeplab_dropout.model.course): output
size for any input, parameters recomputed from the report's layer list, sites per placement read off the module
tree, gradients, the regulariser active in training only, and its config errors in one line."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deeplab_dropout.config import ConfigError, validate
from deeplab_dropout.model import build_model
from deeplab_dropout.model.course import CourseFCN
from deeplab_dropout.regularizers import ChannelDropout, describe_sites
from deeplab_dropout.train import make_optimizer

TINY = ["model=course_fcn", "model.channels=[4,8,8,16,16]"]
REPORT_ENCODER = [32, 64, 128, 256, 512]  # section 3.1: conv1..conv5
REPORT_DECODER = [512, 256, 128, 64, 32]  # section 3.1: deconv1..deconv5


@pytest.mark.parametrize("size", [(37, 45), (1, 5), (64, 32), (33, 97)])
def test_output_size_equals_input_size(compose_config, size):
    net = build_model(compose_config(TINY)).eval()
    assert net(torch.randn(2, 3, *size)).shape == (2, 21, *size)


def test_input_is_zero_padded_bottom_right_to_a_multiple_of_32(compose_config):
    torch.manual_seed(0)
    net = build_model(compose_config(TINY)).eval()
    x = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        padded = net(F.pad(x, (0, 64 - 45, 0, 64 - 37)))  # 37 x 45 -> 64 x 64 by hand
        assert torch.equal(net(x), padded[..., :37, :45])


def test_layers_and_parameter_count_are_the_reports(compose_config):
    net = build_model(compose_config(["model=course_fcn"]))
    enc = [lv.conv for lv in net.backbone.levels]
    dec = [lv.conv for lv in net.decoder.levels]
    assert [c.out_channels for c in enc] == REPORT_ENCODER and [c.out_channels for c in dec] == REPORT_DECODER
    assert all(type(c) is nn.Conv2d and c.stride == (2, 2) and c.kernel_size == (3, 3) for c in enc)
    assert all(isinstance(c, nn.ConvTranspose2d) and c.stride == (2, 2) and c.kernel_size == (3, 3) for c in dec)
    # Each layer: 3x3 weights (no bias: BN follows) + BN scale and shift; then the 1x1 classifier with bias.
    ins = [3, *REPORT_ENCODER[:-1]] + [REPORT_ENCODER[-1], *REPORT_DECODER[:-1]]
    outs = REPORT_ENCODER + REPORT_DECODER
    expected = sum(9 * i * o + 2 * o for i, o in zip(ins, outs, strict=True)) + 32 * 21 + 21
    assert sum(p.numel() for p in net.parameters()) == expected
    assert not any(isinstance(m, nn.Dropout | nn.MaxPool2d) for m in net.modules())  # the plain baseline
    # Xavier (Glorot) uniform: every weight within +-sqrt(6 / (fan_in + fan_out)), the bound nearly reached
    conv = enc[2]
    bound = (6 / (conv.in_channels * 9 + conv.out_channels * 9)) ** 0.5
    assert 0.9 * bound < conv.weight.abs().max() <= bound


def expected_sites(net: nn.Module) -> dict[str, int]:
    """Sites per placement word, read off the unplaced module tree: the encoder blocks but the last (whose output
    is the encoder -> decoder bridge), the bridge, every transposed-conv block."""
    encoder = sum(isinstance(m, nn.Conv2d) for m in net.backbone.modules())
    return {"resnet": encoder - 1, "spp": 1, "decoder": sum(isinstance(m, nn.ConvTranspose2d) for m in net.modules())}


@pytest.mark.parametrize("where,parts", [("resnet", ("resnet",)), ("spp", ("spp",)), ("decoder", ("decoder",)),
                                         ("upper", ("spp", "decoder")), ("all", ("resnet", "spp", "decoder"))])
def test_sites_per_placement(compose_config, where, parts):
    plain = build_model(compose_config(TINY))
    assert plain.regularizers() == {}
    counts = expected_sites(plain)
    assert counts == {"resnet": 4, "spp": 1, "decoder": 5}
    net = build_model(compose_config([*TINY, f"cell={where}-chandrop"]))
    regs = net.regularizers()
    assert len(regs) == sum(counts[p] for p in parts)
    assert all(isinstance(r, ChannelDropout) for r in regs.values())
    assert ("aspp.drop" in regs) == ("spp" in parts)  # the report's dropout site: between encoder and decoder
    assert "backbone.levels.4.drop" not in regs  # the 5th block's output is that same tensor: one site only
    assert describe_sites(net).startswith("backbone: 4" if "resnet" in parts else "aspp: 1" if "spp" in parts
                                          else "decoder: 5")


def test_resnet_stages_pick_encoder_blocks(compose_config):
    net = build_model(compose_config([*TINY, "cell=resnet-chandrop", "placement.resnet_stages=[3,4]"]))
    assert list(net.regularizers()) == ["backbone.levels.2.drop", "backbone.levels.3.drop"]


def test_gradients_reach_every_parameter_and_the_encoder_trains_at_optim_lr(compose_config):
    torch.manual_seed(0)
    cfg = compose_config([*TINY, "cell=all-chandrop", "optim=adamw", "optim.head_lr_mult=10"])
    net = build_model(cfg).train()
    x, y = torch.randn(2, 3, 37, 45), torch.randint(0, 21, (2, 37, 45))
    F.cross_entropy(net(x), y).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    backbone, head = make_optimizer(net, cfg).param_groups
    assert {id(p) for p in backbone["params"]} == {id(p) for p in net.backbone.parameters()}
    assert backbone["lr"] == cfg.optim.lr and head["lr"] == pytest.approx(10 * cfg.optim.lr)
    assert len(backbone["params"]) + len(head["params"]) == len(list(net.parameters()))


def test_bridge_dropout_acts_in_training_only(compose_config):
    torch.manual_seed(0)
    net = build_model(compose_config([*TINY, "cell=spp-chandrop", "dropout.p=0.5"]))
    seen = []
    net.aspp.register_forward_hook(lambda m, inp, out: seen.append((inp[0].detach(), out.detach())))
    x = torch.randn(4, 3, 64, 64)
    net.train()(x)
    (inp, out), = seen
    maps_in, maps_out = inp.flatten(2), out.flatten(2)  # (N, C, H*W)
    dropped = (maps_out == 0).all(-1)
    assert dropped.any() and (~dropped).any()  # whole maps dropped, others kept ...
    torch.testing.assert_close(maps_out[~dropped], 2 * maps_in[~dropped])  # ... and scaled by 1 / (1 - p)
    net.eval()(x)
    assert torch.equal(seen[1][1], seen[1][0])  # identity in eval


@pytest.mark.parametrize("overrides,message", [
    (["model.channels=[32,64,128,256]"], "model.channels=[32, 64, 128, 256] is invalid: expected a list of 5"),
    (["model.channels=[32,64,0,256,512]"], "model.channels=[32, 64, 0, 256, 512] is invalid"),
    (["model.pretrained=imagenet"], "model.pretrained='imagenet' is invalid: expected none (model.arch=encdec"),
    (["cell=resnet-chandrop", "placement.resnet_sites=first_block"],
     "placement.resnet_sites=first_block is invalid for model=course_fcn: expected blocks or stages"),
])
def test_bad_values_fail_in_one_line(compose_config, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_config(["model=course_fcn", *overrides]))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_build_model_builds_the_course_model(compose_config):
    net = build_model(compose_config(TINY))
    assert isinstance(net, CourseFCN) and {n for n, _ in net.named_children()} == {"backbone", "aspp", "decoder"}
