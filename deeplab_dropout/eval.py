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
from deeplab_dropout.results import RunResults, load_checkpoint
from deeplab_dropout.train import (
    CONF_DIR,
    InputError,
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


def run_eval(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict:
    """Evaluate as configured; returns the history entry written to ``run_dir/results.json``."""
    state, checkpoint = None, cfg.checkpoint
    try:
        if checkpoint is not None:
            state = load_checkpoint(Path(str(checkpoint)).expanduser())
            cfg = checkpoint_config(cfg, state["config"], list(overrides or []))
            cfg.checkpoint = checkpoint
            # The checkpoint holds every weight: don't fetch the backbone's initial weights.
            cfg.model.pretrained = "none"
        validate(cfg)
        device, amp_dtype, channels_last = resolve_device(cfg)
        val_ds = get_val_dataset(cfg.data)
        loader = make_val_loader(cfg, val_ds, device)
        model = build_model(cfg)
        if state is not None:
            model.load_state_dict(state["model"])
        model = model.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        raise InputError(one_line(e)) from e

    cell = state["cell"] if state is not None else cell_name(cfg)
    log.info("evaluating %s (%s) on %d val images (%s crop)", checkpoint or cfg.model.name, cell,
             len(val_ds), cfg.data.val_crop)
    results = RunResults(run_dir / "results.json", cell=cell, config=OmegaConf.to_container(cfg, resolve=True),
                         split=state.get("split") if state is not None else None, monitor=cfg.trainer.monitor)
    if state is not None:
        results.data["checkpoint"] = {"path": str(checkpoint), "epoch": state["epoch"]}
    results.write()
    t0 = time.perf_counter()
    try:
        ev = evaluate(model, loader, cfg, device, amp_dtype, channels_last, progress=sys.stderr.isatty())
        entry = {"epoch": 1, "train_loss": None,
                 **{k: ev[k] for k in ("val_loss", "miou", "pixel_acc", "class_iou", "per_image_miou")},
                 "lr": None, "drop_p": None, "seconds": time.perf_counter() - t0}
        results.add_epoch(entry)
    except BaseException as e:
        results.finish("failed", error=f"{type(e).__name__}: {e}")
        raise
    results.finish("completed")
    log.info("mIoU %.4f  pixel acc %.4f  per-image mIoU mean %.4f  ->  %s", entry["miou"], entry["pixel_acc"],
             entry["per_image_miou"]["mean"], results.path)
    return entry


@hydra.main(config_path=CONF_DIR, config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    overrides = list(HydraConfig.get().overrides.task)
    exit_on_input_error(lambda c, d: run_eval(c, d, overrides), cfg)


if __name__ == "__main__":
    main()
