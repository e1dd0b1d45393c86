"""Shared fixtures: compose the real Hydra config from conf/ and shrink it for CPU tests."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

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
