"""`deeplab-dropout-train [overrides]`: one run, or a multirun with ``-m`` (deeplab_dropout.train). The config
is validated before the training code, and torch with it, is imported."""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from deeplab_dropout.cli import input_errors, run_app, run_job
from deeplab_dropout.config import CONF_DIR, validate


def train(cfg: DictConfig, run_dir: Path) -> float:
    """Validate ``cfg``, then train and evaluate it in ``run_dir``; returns the best monitored value."""
    with input_errors():
        validate(cfg)
    from deeplab_dropout.train import run  # torch, torchvision, TensorBoard: only for a valid config

    return run(cfg, run_dir)


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def app(cfg: DictConfig) -> float:
    """The Hydra app: one run (or one job of a multirun)."""
    return run_job(train, cfg)


def main() -> None:
    """`deeplab-dropout-train`: the Hydra app, with a mistyped override as one line (exit 2)."""
    run_app(app)
