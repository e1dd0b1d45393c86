"""Every preset composes and validates; invalid values fail with a one-line message naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONF_DIR, compose_cfg

from deeplab_dropout.config import ARCHS, ConfigError, validate
from deeplab_dropout.study import cell_name

PRESETS = sorted(f"{p.parent.name}={p.stem}" for p in Path(CONF_DIR).glob("*/*.yaml"))


@pytest.mark.parametrize("config_name", ["train", "eval"])
@pytest.mark.parametrize("override", PRESETS)
def test_every_preset_composes_and_validates(override, config_name):
    # Every option of every group, under both primary configs; no weights are ever fetched in tests.
    cfg = compose_cfg([override, "model.pretrained=none"], config_name=config_name)
    validate(cfg)
    if override.startswith("cell="):
        # The cell name recorded in results.json is recomputed from the values the preset sets.
        assert cell_name(cfg) == override.split("=", 1)[1]


def test_paper_defaults():
    cfg = compose_cfg([])
    assert cfg.model.backbone == "resnet101" and cfg.model.output_stride == 16
    assert cfg.model.pretrained == "imagenet"
    assert cfg.optim.lr == 0.007 and cfg.optim.lr * cfg.optim.head_lr_mult == pytest.approx(0.07)
    assert (cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.poly_power) == (0.9, 0.0005, 0.9)
    assert (cfg.trainer.epochs, cfg.trainer.batch_size) == (50, 8)
    assert (cfg.data.crop_size, list(cfg.data.scale_range), cfg.data.fraction) == (513, [0.5, 2.0], 0.1)
    assert cell_name(cfg) == "none" and cfg.dropout.name == "none"
    linear = compose_cfg(["schedule=linear", "cell=all-chandrop"])
    assert linear.schedule.ramp_epochs == 30 and linear.dropout.p == 0.2


def test_paper_experiment_sweeps_both_tables():
    cfg = compose_cfg(["experiment=paper"])
    # The sweep lives in the config, so `-m experiment=paper` runs Tables 3 and 4.
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        full = compose(config_name="train", overrides=["experiment=paper"], return_hydra_config=True)
    assert dict(full.hydra.sweeper.params) == {"cell": "glob(*)", "schedule": "constant,linear"}
    # Each of its runs is the paper's setup (test_paper_defaults) plus the swept cell and schedule.
    assert cfg == compose_cfg([])


def test_command_line_beats_cell_preset():
    cfg = compose_cfg(["cell=upper-dropblock", "dropout=uout", "placement.resnet=true"])
    assert cfg.dropout.name == "uout" and cell_name(cfg) == "all-uout"


STAGES = "expected a non-empty list of distinct stages from 1, 2, 3, 4"
RESNETS = "resnet18, resnet34, resnet50, resnet101, resnet152"
GRID = "expected a list of at least 3 positive integers (one per layer4 block of resnet101), e.g. [1, 2, 4]"
TV = ["model=torchvision_deeplabv3_resnet101", "model.pretrained=none"]

# The one table of invalid values: each fails config.validate (and so build_model and the runners) with
# exactly this one-line message; the code that uses a value trusts it.
INVALID = [
    (["model.backbone=vgg16"], f"model.backbone='vgg16' is invalid: expected one of {RESNETS}"),
    (["dropout.name=gauss"], "dropout.name='gauss' is invalid: expected one of none, channel, dropblock, uout"),
    (["placement.resnet_sites=everywhere"],
     "placement.resnet_sites='everywhere' is invalid: expected one of blocks, blocks_and_skips, stages, "
     "first_block"),
    (["placement.spp_sites=all"], "placement.spp_sites='all' is invalid: expected one of output, branches"),
    (["placement.resnet_stages=[0,5]"], f"placement.resnet_stages=[0, 5] is invalid: {STAGES}"),
    (["placement.resnet_stages=[]"], f"placement.resnet_stages=[] is invalid: {STAGES}"),
    (["placement.resnet_stages=[2,2]"], f"placement.resnet_stages=[2, 2] is invalid: {STAGES}"),
    (["placement.resnet_stages=[a]"], f"placement.resnet_stages=['a'] is invalid: {STAGES}"),
    (["cell=all-uout", "placement.resnet_sites=first_block", "placement.resnet_stages=[3,4]"],
     "placement.resnet_sites=first_block is inside layer1 but placement.resnet_stages=[3, 4] excludes stage 1"),
    (["model.output_stride=32"], "model.output_stride=32 is invalid: expected one of 8, 16"),
    (["model.arch=deeplabv4"],
     "model.arch='deeplabv4' is invalid: expected one of " + ", ".join(ARCHS) + "; did you mean deeplabv3plus?"),
    (["model.pretrained=/no/such/file.pth"],
     "model.pretrained='/no/such/file.pth' is invalid: expected imagenet, none or an existing file"),
    (["model.num_classes=1"], "model.num_classes=1 is invalid: expected an integer in [2, inf)"),
    (["model.pool_norm=gn"], "model.pool_norm='gn' is invalid: expected one of bn, none"),
    (["model.multi_grid=[1,2]"], f"model.multi_grid=[1, 2] is invalid: {GRID}"),  # ResNet-101's layer4: 3 blocks
    (["model.multi_grid=[1,0,4]"], f"model.multi_grid=[1, 0, 4] is invalid: {GRID}"),
    (["model.multi_grid=[1,2.5,4]"], f"model.multi_grid=[1, 2.5, 4] is invalid: {GRID}"),
    (["model.multi_grid=2"], f"model.multi_grid=2 is invalid: {GRID}"),
    ([*TV, "model.output_stride=16"], "model.arch=torchvision_deeplabv3 is torchvision's resnet101 at output "
     "stride 8, got model.backbone=resnet101, model.output_stride=16"),
    ([*TV, "cell=spp-uout"], "model.arch=torchvision_deeplabv3 has no regulariser sites: use placement=none or "
     "dropout=none (cell=none)"),
    (["model=torchvision_deeplabv3_resnet101", "model.pretrained=imagenet"],
     "model.pretrained='imagenet' is invalid: expected coco_with_voc_labels, none or an existing file"),
    (["data.fraction=0"], "data.fraction=0 is invalid: expected a number in (0, 1]"),
    (["data.fraction=1.5"], "data.fraction=1.5 is invalid: expected a number in (0, 1]"),
    (["data.split_seed=-1"], "data.split_seed=-1 is invalid: expected an integer in [0, inf)"),
    (["data.crop_size=0"], "data.crop_size=0 is invalid: expected an integer in [1, inf)"),
    (["data.val_crop=random"], "data.val_crop='random' is invalid: expected one of center, full"),
    (["data.split_method=greedy"],
     "data.split_method='greedy' is invalid: expected one of per_class, authors, min_cover"),
    (["data.scale_range=[0,1]"], "data.scale_range=[0, 1] is invalid: expected [min, max] with 0 < min <= max"),
    (["data.scale_range=[2,1]"], "data.scale_range=[2, 1] is invalid: expected [min, max] with 0 < min <= max"),
    (["data.blur_radius=[1,0]"], "data.blur_radius=[1, 0] is invalid: expected [min, max] with 0 <= min <= max"),
    (["data.flip_p=2"], "data.flip_p=2 is invalid: expected a number in [0, 1]"),
    (["dropout.p=1.0"], "dropout.p=1.0 is invalid: expected a number in [0, 1)"),
    (["dropout.p=-0.1"], "dropout.p=-0.1 is invalid: expected a number in [0, 1)"),
    (["dropout.p=true"], "dropout.p=True is invalid: expected a number in [0, 1)"),
    (["dropout.block_size=0"], "dropout.block_size=0 is invalid: expected an integer in [1, inf)"),
    (["schedule.name=cosine"], "schedule.name='cosine' is invalid: expected one of constant, linear"),
    (["schedule.granularity=batch"], "schedule.granularity='batch' is invalid: expected one of iteration, epoch"),
    (["schedule.ramp_epochs=-1"], "schedule.ramp_epochs=-1 is invalid: expected a number in [0, inf)"),
    (["schedule=linear", "schedule.ramp_epochs=0"],
     "schedule.ramp_epochs=0 is invalid: expected a number in (0, inf)"),
    (["schedule=constant", "schedule.ramp_epochs=5"],
     "schedule.ramp_epochs=5 is invalid: expected 0 with schedule.name=constant (a ramp is schedule=linear)"),
    (["loss.name=focal"], "loss.name='focal' is invalid: expected one of ce"),
    (["optim.lr=0"], "optim.lr=0 is invalid: expected a number in (0, inf)"),
    (["optim.momentum=2"], "optim.momentum=2 is invalid: expected a number in [0, 1]"),
    (["trainer.epochs=0"], "trainer.epochs=0 is invalid: expected an integer in [1, inf)"),
    (["trainer.epochs=true"], "trainer.epochs=True is invalid: expected an integer in [1, inf)"),
    (["trainer.device=tpu"], "trainer.device='tpu' is invalid: expected auto, cpu, cuda or cuda:N"),
    (["trainer.precision=fp8"], "trainer.precision='fp8' is invalid: expected one of auto, fp32, bf16, fp16"),
    (["trainer.max_val_images=0"], "trainer.max_val_images=0 is invalid: expected an integer in [1, inf)"),
    (["trainer.num_workers=-1"], "trainer.num_workers=-1 is invalid: expected auto or an integer in [0, inf)"),
    (["trainer.num_workers=many"], "trainer.num_workers='many' is invalid: expected auto or an integer in [0, inf)"),
    (["trainer.eval_precision=bf16"], "trainer.eval_precision='bf16' is invalid: expected one of fp32, same"),
    (["trainer.checkpoint_every=0"], "trainer.checkpoint_every=0 is invalid: expected an integer in [1, inf)"),
    (["trainer.compile=1"], "trainer.compile=1 is invalid: expected true or false"),
    (["trainer.tune_malloc=yes"], "trainer.tune_malloc='yes' is invalid: expected true or false"),
    (["trainer.compile_backend=''"], "trainer.compile_backend='' is invalid: expected a torch.compile backend "
     "name, e.g. inductor"),
    (["data.cache=disk"], "data.cache='disk' is invalid: expected one of auto, ram, off"),
    (["data.val_cache=gpu"], "data.val_cache='gpu' is invalid: expected one of auto, ram, device, off"),
    (["seed=1.5"], "seed=1.5 is invalid: expected an integer in [0, inf)"),
    # The authors'-code options (docs/paper-vs-code.md).
    (["data.label_pad=1"], "data.label_pad=1 is invalid: expected one of 255, 0"),
    (["data.label_pad=false"], "data.label_pad=False is invalid: expected one of 255, 0"),
    (["data.label_pad=255.0"], "data.label_pad=255.0 is invalid: expected one of 255, 0"),
    (["data.val_list=all"], "data.val_list='all' is invalid: expected one of unique, per_class"),
    (["model.align_corners=1"], "model.align_corners=1 is invalid: expected true or false"),
    (["model.align_corners=yes"], "model.align_corners='yes' is invalid: expected true or false"),
    (["trainer.drop_last=0"], "trainer.drop_last=0 is invalid: expected true or false"),
    (["trainer.drop_last=keep"], "trainer.drop_last='keep' is invalid: expected true or false"),
]


@pytest.mark.parametrize(("overrides", "message"), INVALID, ids=[" ".join(o) for o, _ in INVALID])
def test_invalid_values_fail_in_one_line(overrides, message):
    cfg = compose_cfg(overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert str(info.value) == message


def test_batch_of_one_needs_pool_norm_none():
    # The image-pooling BN sees one value per channel with batch 1; PyTorch raises mid-training otherwise.
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(["trainer.batch_size=1"]))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("trainer.batch_size=1") and "model.pool_norm" in msg
    validate(compose_cfg(["trainer.batch_size=1", "model.pool_norm=none"]))


def test_multi_grid_needs_one_entry_per_layer4_block():
    validate(compose_cfg(["model=deeplabv3plus_resnet18", "model.multi_grid=[1,2]"]))  # 2 blocks in layer4
    validate(compose_cfg(["model.multi_grid=[1,1,1]"]))
    with pytest.raises(ConfigError, match=r"^model\.multi_grid=\[1\]"):
        validate(compose_cfg(["model=deeplabv3plus_resnet18", "model.multi_grid=[1]"]))


# --- dropout / placement keys of issue 12 --------------------------------------------------------------------

@pytest.mark.parametrize("value", [0, 0.0, -0.25, 1.5, "a", True])
def test_group3_gamma_scale_is_validated(value):
    cfg = compose_cfg(["cell=resnet-dropblock"])
    cfg.dropout.group3_gamma_scale = value
    with pytest.raises(ConfigError, match=r"^dropout\.group3_gamma_scale=.* is invalid: expected a number in "
                                          r"\(0, 1\]$"):
        validate(cfg)


def test_dropblock_paper_options_compose_cfg():
    cfg = compose_cfg(["cell=resnet-dropblock", "dropout.block_size=4", "dropout.group3_gamma_scale=0.25",
                   "placement.resnet_sites=blocks_and_skips", "placement.resnet_stages=[3,4]"])
    validate(cfg)
    assert (cfg.dropout.block_size, cfg.dropout.group3_gamma_scale) == (4, 0.25)
    assert cfg.placement.resnet_sites == "blocks_and_skips"
    assert compose_cfg([]).dropout.group3_gamma_scale == 1.0  # off unless asked for

