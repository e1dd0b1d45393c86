"""Shared fixtures: compose the real Hydra config from conf/ and shrink it for CPU tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from deeplab_dropout.config import CONF_DIR as _CONF

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs 2 workers on 2 cores: one thread each,
    os.environ["OMP_NUM_THREADS"] = "1"  # in the processes the tests start too (the same sums as in-process)
    torch.set_num_threads(1)

CONF_DIR = str(_CONF)

# Small enough for seconds on 2 CPU cores, still the real code paths.
TINY = [
    "model=deeplabv3plus_resnet18",
    "model.pretrained=none",
    "trainer=smoke",
]


def compose_cfg(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose `conf/<config_name>.yaml` with overrides, as the app would (without running it)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=False)


@pytest.fixture
def compose_config():
    """`compose_config(overrides)` -> the composed train config."""
    return compose_cfg

# Tiny crops for the runner tests.
SMALL = ["data.base_size=40", "data.crop_size=33", "trainer.batch_size=2", "trainer.val_batch_size=4"]


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory) -> Path:
    """A small generated VOC-format dataset shared by the runner tests (24 train, 6 val images)."""
    from deeplab_dropout.data.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, n_train=24, n_val=6, seed=0, min_side=40, max_side=56)
    return root


def tiny_cfg(voc_root: Path, *overrides: str) -> DictConfig:
    """The train config shrunk to seconds on CPU, on the dataset at ``voc_root``."""
    return compose_cfg([*TINY, "data=synthetic", f"data.root={voc_root}", "data.synth=null", *SMALL, *overrides])


def tiny_preset(tmp_path: Path, voc_root: Path) -> list[str]:
    """A 1-step experiment preset (as a user would write one), so run dirs are named by the swept keys."""
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "tiny.yaml").write_text(f"""# @package _global_
defaults:
  - override /model: deeplabv3plus_resnet18
  - override /data: synthetic
  - override /trainer: smoke
model: {{pretrained: none}}
data: {{root: {voc_root}, synth: null, base_size: 40, crop_size: 33}}
trainer: {{epochs: 1, batch_size: 2, max_train_steps: 1, max_val_images: 2}}
""")
    return ["experiment=tiny", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]


def counting_backend(graphs: list):
    """A torch.compile backend that appends each graph it is asked to compile to ``graphs`` and runs it as is,
    so a test counts (re)compilations without paying for a real compiler."""
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend
