"""`deeplab-dropout-eval [RUN_DIR_OR_CHECKPOINT] [overrides]` (deeplab_dropout.eval). The path (a run dir, not
a sweep's folder; a checkpoint file) and the config are checked before the evaluation code, and torch with
it, is imported."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from deeplab_dropout.cli import (
    checkpoint_file,
    input_errors,
    run_app,
    run_job,
    set_checkpoint,
    take_path_argument,
)
from deeplab_dropout.config import CONF_DIR, check_keys, validate
from deeplab_dropout.results import BEST

_path_argument: list[str | None] = [None]  # RUN_DIR_OR_CHECKPOINT, taken out of sys.argv by ``main``


def evaluate(cfg: DictConfig, run_dir: Path) -> dict:
    """Check the checkpoint's path (or, without one, the config), then evaluate in ``run_dir``."""
    overrides = list(HydraConfig.get().overrides.task)
    set_checkpoint(cfg, _path_argument[0])
    with input_errors():
        if cfg.checkpoint is None:
            validate(cfg)
        else:  # its run's config, checked once merged with the overrides (deeplab_dropout.eval.eval_config)
            check_keys(cfg)
            checkpoint_file(cfg.checkpoint, BEST)
    from deeplab_dropout.eval import run_eval  # torch: only once the input is known good

    return run_eval(cfg, run_dir, overrides)


@hydra.main(config_path=str(CONF_DIR), config_name="eval", version_base="1.3")
def app(cfg: DictConfig) -> dict:
    """The Hydra app; the positional RUN_DIR_OR_CHECKPOINT, if given, is the checkpoint."""
    return run_job(evaluate, cfg)


def main() -> None:
    """`deeplab-dropout-eval`: take RUN_DIR_OR_CHECKPOINT out of sys.argv, then run the Hydra app (a
    mistyped override prints one line and exits 2)."""
    _path_argument[0] = take_path_argument(sys.argv)
    run_app(app)
