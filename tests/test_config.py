"""Every preset composes and validates; invalid values fail with a one-line message naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONF_DIR, compose_cfg

from deeplab_dropout.config import ConfigError, validate
from deeplab_dropout.model import cell_name

PRESETS = sorted(f"{p.parent.name}={p.stem}" for p in Path(CONF_DIR).glob("*/*.yaml"))


@pytest.mark.parametrize("override", PRESETS)
def test_every_preset_composes_and_validates(override):
    cfg = compose_cfg([override])
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
    assert cfg.model.backbone == "resnet101"


def test_command_line_beats_cell_preset():
    cfg = compose_cfg(["cell=upper-dropblock", "dropout=uout", "placement.resnet=true"])
    assert cfg.dropout.name == "uout" and cell_name(cfg) == "all-uout"


@pytest.mark.parametrize(("override", "key"), [
    ("dropout.p=1.0", "dropout.p"),
    ("dropout.p=-0.1", "dropout.p"),
    ("dropout.block_size=0", "dropout.block_size"),
    ("placement.resnet_sites=everywhere", "placement.resnet_sites"),
    ("placement.resnet_stages=[0,5]", "placement.resnet_stages"),
    ("schedule.granularity=batch", "schedule.granularity"),
    ("trainer.device=tpu", "trainer.device"),
    ("trainer.epochs=0", "trainer.epochs"),
    ("data.fraction=0", "data.fraction"),
    ("data.val_crop=random", "data.val_crop"),
    ("model.backbone=vgg16", "model.backbone"),
    ("model.pretrained=/no/such/file.pth", "model.pretrained"),
    ("model.pool_norm=gn", "model.pool_norm"),
    ("model.multi_grid=[1,2]", "model.multi_grid"),  # ResNet-101's layer4 has 3 blocks
    ("model.multi_grid=[1,0,4]", "model.multi_grid"),
    ("model.multi_grid=[1,2.5,4]", "model.multi_grid"),
    ("model.multi_grid=2", "model.multi_grid"),
    ("optim.lr=0", "optim.lr"),
])
def test_invalid_values_fail_in_one_line(override, key):
    cfg = compose_cfg([override])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{key}=")


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
