"""`deeplab-dropout-eval`: evaluate a checkpoint (with its run's config) or torchvision's COCO-trained
DeepLabv3 (the paper's `pretrained-base` row) on the val set, with the training runs' metrics code.

Writes a one-epoch results.json in its own Hydra run directory.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from deeplab_dropout.config import ConfigError, one_line, validate
from deeplab_dropout.data import get_val_dataset
from deeplab_dropout.model import build_model, cell_name
from deeplab_dropout.results import CONF_DIR, RunResults, load_checkpoint
from deeplab_dropout.train import (
    INPUT_ERRORS,
    VAL_KEYS,
    InputError,
    Runtime,
    evaluate,
    exit_on_input_error,
    make_val_loader,
    resolve_device,
)

log = logging.getLogger("deeplab_dropout")
GROUPS = ("model", "data", "dropout", "placement", "schedule", "loss", "optim", "trainer")


def checkpoint_config(cfg: DictConfig, saved: dict, overrides: list[str]) -> DictConfig:
    """The checkpoint's run config with this call's command-line overrides applied on top of it (keys the
    checkpoint predates take today's defaults)."""
    merged = OmegaConf.merge(OmegaConf.to_container(cfg), saved)
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key == "checkpoint" or key.startswith("hydra"):
            continue
        if key == "experiment":
            raise ConfigError(f"{override} is invalid with checkpoint=...: a checkpoint brings its own config")
        if key == "cell":  # a preset of two groups
            merged.dropout, merged.placement = cfg.dropout, cfg.placement
        elif key in GROUPS:
            merged[key] = cfg[key]
        else:
            OmegaConf.update(merged, key, OmegaConf.select(cfg, key), force_add=True)
    return merged


def load_run_checkpoint(path: Path) -> dict:
    """A checkpoint written by deeplab-dropout-train (last.pt or best.pt)."""
    saved = load_checkpoint(path)
    keys = saved.keys() if isinstance(saved, dict) else ()
    missing = [k for k in ("model", "config", "cell", "epoch") if k not in keys]
    if missing:
        raise ConfigError(f"checkpoint={path} is invalid: not a deeplab-dropout-train checkpoint "
                          f"(no {', '.join(missing)})")
    return saved


def eval_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, dict | None]:
    """The config to evaluate with and the checkpoint whose weights to use (None: the config's model)."""
    checkpoint = cfg.checkpoint
    if checkpoint is None:
        return cfg, None
    saved = load_run_checkpoint(Path(str(checkpoint)).expanduser())
    cfg = checkpoint_config(cfg, saved["config"], overrides)
    cfg.checkpoint = checkpoint
    # The checkpoint holds every weight: don't fetch the backbone's initial weights.
    cfg.model.pretrained = "none"
    return cfg, saved


def load_eval_model(cfg: DictConfig, saved: dict | None, runtime: Runtime) -> torch.nn.Module:
    """The configured model, with the checkpoint's weights if there is one, on the device."""
    model = build_model(cfg)
    if saved is not None:
        try:
            model.load_state_dict(saved["model"])
        except RuntimeError as e:  # e.g. a model.* override that the checkpoint's weights don't fit
            raise ConfigError(f"checkpoint={cfg.checkpoint} does not fit the configured model: "
                              f"{one_line(e).strip()}") from e
    return runtime.prepare(model)


def run_eval(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict:
    """Evaluate as configured; returns the history entry written to ``run_dir/results.json``."""
    try:
        cfg, saved = eval_config(cfg, list(overrides or []))
        validate(cfg)
        runtime = resolve_device(cfg)
        loader = make_val_loader(cfg, get_val_dataset(cfg.data), runtime)
        model = load_eval_model(cfg, saved, runtime)
    except INPUT_ERRORS as e:
        raise InputError(one_line(e)) from e

    cell = saved["cell"] if saved is not None else cell_name(cfg)
    log.info("evaluating %s (%s) on %d val images (%s crop)", cfg.checkpoint or cfg.model.name, cell,
             len(loader.dataset), cfg.data.val_crop)
    results = RunResults(run_dir / "results.json", cell=cell, config=OmegaConf.to_container(cfg, resolve=True),
                         split=saved.get("split") if saved is not None else None, monitor=cfg.trainer.monitor)
    if saved is not None:
        results.data["checkpoint"] = {"path": str(cfg.checkpoint), "epoch": saved["epoch"]}
    results.write()
    t0 = time.perf_counter()
    try:
        ev = evaluate(model, loader, cfg, runtime, progress=sys.stderr.isatty())
        entry = {"epoch": 1, "train_loss": None, **{k: ev[k] for k in VAL_KEYS}, "lr": None, "drop_p": None,
                 "seconds": time.perf_counter() - t0}
        results.add_epoch(entry)
    except BaseException as e:
        results.finish("failed", error=f"{type(e).__name__}: {e}")
        raise
    results.finish("completed")
    log.info("mIoU %.4f  pixel acc %.4f  per-image mIoU mean %.4f  ->  %s", entry["miou"], entry["pixel_acc"],
             entry["per_image_miou"]["mean"], results.path)
    return entry


@hydra.main(config_path=str(CONF_DIR), config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    overrides = list(HydraConfig.get().overrides.task)
    exit_on_input_error(lambda c, d: run_eval(c, d, overrides), cfg)


if __name__ == "__main__":
    main()
