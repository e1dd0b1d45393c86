"""`deeplab-dropout-eval [RUN_DIR_OR_CHECKPOINT] [overrides]`: evaluate a checkpoint (with its run's config)
or torchvision's COCO-trained DeepLabv3 (the paper's `pretrained-base` row) on the val set, with the
training runs' metrics code.

A run directory means its checkpoints/best.pt (a sweep's folder is refused, naming its runs). The path comes
first and is taken out of the command line before Hydra parses it, so sweep folders
(``cell=none,schedule=constant``) need no escaping. Writes a one-epoch results.json and its per_image.npz in
its own Hydra run directory. The console script is deeplab_dropout.commands.eval's app (it checks the input
before importing this module); ``app`` here is ``python -m deeplab_dropout.eval``'s.
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

from deeplab_dropout.class_weights import class_weights
from deeplab_dropout.cli import (
    checkpoint_file,
    input_errors,
    run_app,
    run_job,
    set_checkpoint,
    take_path_argument,
)
from deeplab_dropout.config import CONF_DIR, ConfigError, one_line, validate
from deeplab_dropout.data import get_val_dataset
from deeplab_dropout.data.loaders import make_val_loader
from deeplab_dropout.engine import batch_statistics, evaluate
from deeplab_dropout.loss import make_criterion
from deeplab_dropout.model import build_model
from deeplab_dropout.results import BEST, load_run_checkpoint
from deeplab_dropout.rundir import RunDir, RunResults
from deeplab_dropout.runtime import Runtime, resolve_device
from deeplab_dropout.study import PRETRAINED_BASE, PRETRAINED_BASE_EVAL_ONLY, cell_name

log = logging.getLogger("deeplab_dropout")
GROUPS = ("model", "data", "dropout", "placement", "schedule", "loss", "optim", "trainer")
_path_argument: list[str | None] = [None]  # RUN_DIR_OR_CHECKPOINT, taken out of sys.argv by ``main``


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


def eval_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, dict | None]:
    """The config to evaluate with and the checkpoint whose weights to use (None: the config's model)."""
    if cfg.checkpoint is None:
        return cfg, None
    checkpoint = checkpoint_file(str(cfg.checkpoint), BEST)  # a run directory: the checkpoint of its best epoch
    saved = load_run_checkpoint(checkpoint)
    checkpoint = str(checkpoint)
    cfg = checkpoint_config(cfg, saved["config"], overrides)
    cfg.checkpoint = checkpoint
    # The checkpoint holds every weight: don't fetch the backbone's initial weights.
    cfg.model.pretrained = "none"
    return cfg, saved


def load_eval_model(cfg: DictConfig, saved: dict | None, runtime: Runtime) -> torch.nn.Module:
    """The configured model, with the checkpoint's weights if there is one, on the device."""
    model = build_model(cfg, validate=False)
    if saved is not None:
        try:
            model.load_state_dict(saved["model"])
        except RuntimeError as e:  # e.g. a model.* override that the checkpoint's weights don't fit
            raise ConfigError(f"checkpoint={cfg.checkpoint} does not fit the configured model: "
                              f"{one_line(e).strip()}") from e
    return runtime.prepare(model)


def run_eval(cfg: DictConfig, run_dir: RunDir | Path, overrides: list[str] | None = None) -> dict:
    """Evaluate as configured; returns the history entry written to the run dir's results.json (and writes
    the per-image counts to its per_image.npz)."""
    run_dir = RunDir.of(run_dir)
    with input_errors():
        cfg, saved = eval_config(cfg, list(overrides or []))
        validate(cfg, keys=saved is None)  # a checkpoint's saved config may hold keys conf/ has since dropped
        runtime = resolve_device(cfg)
        loader = make_val_loader(cfg, get_val_dataset(cfg.data), runtime)
        model = load_eval_model(cfg, saved, runtime)
        # The loss the run trained with: its class weights come from the training split.
        criterion = make_criterion(cfg, runtime.device, class_weights(cfg))

    cell = saved["cell"] if saved is not None else cell_name(cfg)
    if cell == PRETRAINED_BASE:  # torchvision's weights as they come: not the paper's fine-tuned row
        cell = PRETRAINED_BASE_EVAL_ONLY
    log.info("evaluating %s (%s) on %d val images (%s crop)", cfg.checkpoint or cfg.model.name, cell,
             len(loader.dataset), cfg.data.val_crop)
    status = RunDir(Path(str(cfg.checkpoint)).resolve().parent.parent).status() if saved is not None else None
    if status not in (None, "completed"):  # the checkpoint of a run that has not finished
        log.warning("its run is %s: these are the weights of its best epoch so far (epoch %s)", status,
                    saved["epoch"])
    results = RunResults(run_dir.results, cell=cell, config=OmegaConf.to_container(cfg, resolve=True),
                         split=saved.get("split") if saved is not None else None, monitor=cfg.trainer.monitor)
    if saved is not None:
        results.data["checkpoint"] = {"path": str(cfg.checkpoint), "epoch": saved["epoch"]}
    results.write()
    t0 = time.perf_counter()
    try:
        ev = evaluate(model, loader, runtime, criterion, num_classes=cfg.model.num_classes,
                      ignore_index=cfg.data.ignore_index, max_images=cfg.trainer.max_val_images,
                      progress=sys.stderr.isatty())
        entry = {"epoch": 1, "train_loss": None, **ev.metrics,
                 **batch_statistics(ev, cfg.trainer.batch_size, criterion), "lr": None, "drop_p": None,
                 "seconds": time.perf_counter() - t0}
        run_dir.write_per_image(loader.dataset.ids[:ev.image_counts.shape[0]], ev.image_counts.numpy(), 1)
        results.add_epoch(entry)
    except BaseException as e:
        results.finish("failed", error=f"{type(e).__name__}: {e}")
        raise
    results.finish("completed")
    log.info("mIoU %.4f  pixel acc %.4f  per-image mIoU mean %.4f  ->  %s", entry["miou"], entry["pixel_acc"],
             entry["per_image_miou"]["mean"], results.path)
    return entry


@hydra.main(config_path=str(CONF_DIR), config_name="eval", version_base="1.3")
def app(cfg: DictConfig) -> None:
    """The Hydra app; the positional RUN_DIR_OR_CHECKPOINT, if given, is the checkpoint."""
    overrides = list(HydraConfig.get().overrides.task)

    def job(cfg: DictConfig, run_dir: Path) -> dict:
        set_checkpoint(cfg, _path_argument[0])
        return run_eval(cfg, run_dir, overrides)

    run_job(job, cfg)


def main() -> None:
    """`python -m deeplab_dropout.eval`: take RUN_DIR_OR_CHECKPOINT out of sys.argv, then run the Hydra app
    (a mistyped override prints one line and exits 2)."""
    _path_argument[0] = take_path_argument(sys.argv)
    run_app(app)


if __name__ == "__main__":
    main()
