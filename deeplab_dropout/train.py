"""`deeplab-dropout-train`: train DeepLabv3+ with the configured dropout, evaluate every epoch, record mIoU.

Read top to bottom: set-up (config, data, model, optimiser, resume), then ``train_one_epoch`` and
``evaluate`` per epoch, writing results.json, TensorBoard and checkpoints after each.
"""
from __future__ import annotations

import logging
import math
import random
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from deeplab_dropout.config import ConfigError, one_line, validate
from deeplab_dropout.data import get_datasets
from deeplab_dropout.data.split import class_presence
from deeplab_dropout.data.transforms import denormalize
from deeplab_dropout.loss import pixel_loss_sum, reduce_loss
from deeplab_dropout.metrics import SegmentationMetrics
from deeplab_dropout.model import build_model, cell_name, describe_sites, placement_name
from deeplab_dropout.results import RESUME_FREE_KEYS, RunResults, load_checkpoint, save_checkpoint
from deeplab_dropout.schedules import poly_lr, scheduled_drop_p
from deeplab_dropout.tb import HPARAM_METRICS, TBLogger, strip

log = logging.getLogger("deeplab_dropout")
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
class InputError(Exception):
    """Something wrong with the config, data, weights or run dir, found during set-up (one-line message)."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random must follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def resolve_device(cfg: DictConfig) -> tuple[torch.device, torch.dtype | None, bool]:
    """(device, autocast dtype or None for fp32, channels_last) from trainer.device/precision/channels_last."""
    name = cfg.trainer.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={cfg.trainer.device!r} is invalid: CUDA is not available here")
    precision = cfg.trainer.precision
    if precision == "auto":
        if device.type != "cuda":
            precision = "fp32"
        else:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    channels_last = cfg.trainer.channels_last
    if channels_last == "auto":
        channels_last = device.type == "cuda"
    return device, amp_dtype, bool(channels_last)


def make_optimizer(model: torch.nn.Module, cfg: DictConfig) -> torch.optim.SGD:
    """SGD with two groups: backbone at optim.lr, ASPP + decoder at optim.lr * optim.head_lr_mult."""
    o = cfg.optim
    head = [p for name, p in model.named_parameters() if not name.startswith("backbone.")]
    groups = [
        {"params": list(model.backbone.parameters()), "lr": o.lr, "base_lr": o.lr, "name": "backbone"},
        {"params": head, "lr": o.lr * o.head_lr_mult, "base_lr": o.lr * o.head_lr_mult, "name": "head"},
    ]
    return torch.optim.SGD(groups, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)


def make_loaders(cfg: DictConfig, train_ds, val_ds, device: torch.device) -> tuple[DataLoader, DataLoader]:
    t = cfg.trainer
    train_loader = DataLoader(train_ds, batch_size=t.batch_size, shuffle=True, drop_last=True,
                              generator=torch.Generator(), num_workers=t.num_workers,
                              pin_memory=device.type == "cuda", worker_init_fn=seed_worker)
    if len(train_loader) == 0:
        raise ConfigError(f"trainer.batch_size={t.batch_size} is invalid: larger than the "
                          f"{len(train_ds)} training images (drop_last would leave no step)")
    return train_loader, make_val_loader(cfg, val_ds, device)


def make_val_loader(cfg: DictConfig, val_ds, device: torch.device) -> DataLoader:
    # `full` keeps every image's own size, so those can't be stacked into a batch.
    val_bs = 1 if cfg.data.val_crop == "full" else cfg.trainer.val_batch_size
    return DataLoader(val_ds, batch_size=val_bs, shuffle=False, num_workers=cfg.trainer.num_workers,
                      pin_memory=device.type == "cuda", worker_init_fn=seed_worker)


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """Mixed precision in ``amp_dtype`` on ``device``, or a no-op for fp32."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def forward(model, images, targets, device, amp_dtype, channels_last: bool, ignore_index: int):
    """Move a batch to the device and run the model; returns (logits, targets on the device, loss summed
    over valid pixels, their count)."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = targets.to(device, non_blocking=True)
    with autocast(device, amp_dtype):
        logits = model(images)
    loss_sum, n_px = pixel_loss_sum(logits, targets, ignore_index)
    return logits, targets, loss_sum, n_px


def train_one_epoch(model, optimizer, scaler, loader, cfg, device, amp_dtype, channels_last,
                    epoch: int, max_it: int, progress: bool) -> dict:
    """One pass over the training set with per-iteration poly LR and dropout ramp; returns epoch stats."""
    model.train()
    steps = len(loader) if cfg.trainer.max_train_steps is None else min(len(loader), cfg.trainer.max_train_steps)
    total_loss, total_px, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.trainer.epochs}", disable=not progress, leave=False)
    it = epoch * len(loader)
    for step, (images, targets) in enumerate(loader):
        if step == steps:
            break
        it = epoch * len(loader) + step
        for group in optimizer.param_groups:
            group["lr"] = poly_lr(group["base_lr"], it, max_it, cfg.optim.poly_power)
        drop_p = scheduled_drop_p(cfg, it, len(loader))
        model.set_drop_p(drop_p)

        _, _, loss_sum, n_px = forward(model, images, targets, device, amp_dtype, channels_last,
                                       cfg.data.ignore_index)
        loss = reduce_loss(loss_sum, n_px, targets.shape[0], cfg.loss)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        total_loss += loss_sum.item()
        total_px += n_px
        seen += targets.shape[0]
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        p=f"{drop_p:.3f}", ips=f"{seen / (time.perf_counter() - start):.1f}")
    bar.close()
    if not math.isfinite(total_loss):
        raise FloatingPointError(f"training loss is {total_loss} in epoch {epoch + 1}")
    # On the configured scale (loss.batch_average divides by trainer.batch_size, every step's batch size).
    return {"train_loss": reduce_loss(total_loss, total_px, cfg.trainer.batch_size, cfg.loss),
            "lr": optimizer.param_groups[0]["lr"], "lr_head": optimizer.param_groups[1]["lr"], "drop_p": drop_p, "iteration": it + 1}


@torch.no_grad()
def evaluate(model, loader, cfg, device, amp_dtype, channels_last, progress: bool = False) -> dict:
    """Whole-val evaluation: dataset mIoU, pixel accuracy, class IoU, per-image mIoU stats, val loss."""
    model.eval()
    metrics = SegmentationMetrics(cfg.model.num_classes, cfg.data.ignore_index)
    limit = cfg.trainer.max_val_images
    total_loss, total_px, seen = 0.0, 0, 0
    for images, targets in tqdm(loader, desc="val", disable=not progress, leave=False):
        if limit is not None and seen >= limit:
            break
        logits, targets, loss_sum, n_px = forward(model, images, targets, device, amp_dtype, channels_last,
                                                  cfg.data.ignore_index)
        total_loss += loss_sum.item()
        total_px += n_px
        metrics.update(logits.argmax(1), targets)
        seen += targets.shape[0]
    out = metrics.compute()
    # The training loss's scale (whatever the val batch size), so val_loss compares with train_loss.
    out["val_loss"] = reduce_loss(total_loss, total_px, cfg.trainer.batch_size, cfg.loss)
    out["image_miou"] = metrics.image_miou.tolist()
    return out


@torch.no_grad()
def predict(model, dataset, index: int, device, amp_dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normalised image, target, prediction) of one dataset item, for visualisation."""
    model.eval()
    image, target = dataset[index]
    with autocast(device, amp_dtype):
        pred = model(image[None].to(device)).argmax(1)[0].cpu()
    return image, target, pred


def pick_tb_images(cfg: DictConfig, val_ds) -> list[int]:
    """Indices of the fixed val images: trainer.tb_images by id, else the first containing each class of
    trainer.tb_image_classes (the paper's tvmonitor and cow images)."""
    if cfg.trainer.tb_images is not None:
        missing = [i for i in cfg.trainer.tb_images if i not in val_ds.ids]
        if missing:
            raise ConfigError(f"trainer.tb_images={list(cfg.trainer.tb_images)} is invalid: "
                              f"{missing} not in the val list")
        return [val_ds.ids.index(i) for i in cfg.trainer.tb_images]
    presence = class_presence(cfg.data.root, cfg.data.val_split)
    picked = []
    for cls in cfg.trainer.tb_image_classes:
        first = next((i for i, id_ in enumerate(val_ds.ids) if cls in presence.get(id_, ())), None)
        if first is not None and first not in picked:
            picked.append(first)
    return picked


def log_strip(tb: TBLogger, tag: str, model, val_ds, index: int, cfg, device, amp_dtype, step: int) -> None:
    image, target, pred = predict(model, val_ds, index, device, amp_dtype)
    tb.image(tag, strip(denormalize(image, cfg.data), target, pred), step)


def check_resumable(saved: dict, cfg: DictConfig, run_dir: Path) -> None:
    """Refuse to continue a checkpoint made with a different config (it would not be the same run)."""
    now = OmegaConf.to_container(cfg, resolve=True)
    old, new = OmegaConf.create(saved), OmegaConf.create(now)
    for key in RESUME_FREE_KEYS:
        OmegaConf.update(old, key, None, force_add=True)
        OmegaConf.update(new, key, None, force_add=True)
    if old != new:
        a, b = _flatten(OmegaConf.to_container(old)), _flatten(OmegaConf.to_container(new))
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        first = diff[0]
        raise ConfigError(f"{run_dir / 'checkpoints/last.pt'} was trained with a different config "
                          f"({first}: {a.get(first)!r} -> {b.get(first)!r}{' and more' if len(diff) > 1 else ''}); "
                          "use another hydra.run.dir (hydra.sweep.dir for -m) or delete that folder")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run(cfg: DictConfig, run_dir: Path) -> float:
    """Train and evaluate one configuration in ``run_dir``; returns the best monitored value."""
    # --- set-up: everything that can be wrong with the input fails here, before any work -------------
    try:
        validate(cfg)
        device, amp_dtype, channels_last = resolve_device(cfg)
        ckpt_dir = run_dir / "checkpoints"
        last_path = ckpt_dir / "last.pt"
        resume_state = None
        if last_path.exists():
            if cfg.trainer.resume == "never":
                raise ConfigError(f"trainer.resume=never but {run_dir} already holds a run (checkpoints/last.pt); "
                                  "use trainer.resume=auto to continue it, or another hydra.run.dir (hydra.sweep.dir for -m)")
            resume_state = load_checkpoint(last_path)
            check_resumable(resume_state["config"], cfg, run_dir)
        seed_everything(cfg.seed)
        train_ds, val_ds, split = get_datasets(cfg.data)
        train_loader, val_loader = make_loaders(cfg, train_ds, val_ds, device)
        model = build_model(cfg).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = make_optimizer(model, cfg)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        tb_indices = pick_tb_images(cfg, val_ds)
    except (ValueError, OSError, RuntimeError) as e:
        raise InputError(one_line(e)) from e
    progress = sys.stderr.isatty() if cfg.trainer.progress == "auto" else bool(cfg.trainer.progress)

    cell = cell_name(cfg)
    steps_per_epoch = len(train_loader)
    max_it = cfg.trainer.epochs * steps_per_epoch
    log.info("run dir: %s", run_dir)
    log.info("cell %s | schedule %s | %s on %s (%s, channels_last=%s)", cell, cfg.schedule.name,
             cfg.model.backbone, device, "fp32" if amp_dtype is None else str(amp_dtype).split(".")[-1],
             channels_last)
    log.info("data: %d train images (split %s), %d val images, %d steps/epoch",
             len(train_ds), split["manifest"], len(val_ds), steps_per_epoch)
    log.info("regularisers: %s", describe_sites(model))

    config = OmegaConf.to_container(cfg, resolve=True)
    results = RunResults(run_dir / "results.json", cell=cell, config=config, split=split,
                         monitor=cfg.trainer.monitor)
    start_epoch = 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scaler.load_state_dict(resume_state["scaler"])
        results.restore(resume_state["history"])
        start_epoch = resume_state["epoch"]
        log.info("resuming from %s after epoch %d", last_path, start_epoch)
    if start_epoch >= cfg.trainer.epochs:  # e.g. a sweep re-run with the same hydra.sweep.dir
        log.info("%s is already complete", run_dir)
        results.finish("completed")
        return results.best_value()
    results.write()

    hp = {"cell": cell, "dropout": cfg.dropout.name, "placement": placement_name(cfg),
          "schedule": cfg.schedule.name, "p": float(cfg.dropout.p), "seed": int(cfg.seed),
          "backbone": cfg.model.backbone}
    tb = TBLogger(run_dir / "tb", hp)

    # --- training --------------------------------------------------------------------------------------
    try:
        for epoch in range(start_epoch, cfg.trainer.epochs):
            # Everything random in an epoch derives from (seed, epoch): a resumed run repeats it exactly.
            epoch_seed = cfg.seed * 1_000_003 + epoch
            seed_everything(epoch_seed)
            train_loader.generator.manual_seed(epoch_seed)
            t0 = time.perf_counter()
            stats = train_one_epoch(model, optimizer, scaler, train_loader, cfg, device, amp_dtype,
                                    channels_last, epoch, max_it, progress)
            entry = {"epoch": epoch + 1, "train_loss": stats["train_loss"]}
            evaluated = (epoch + 1) % cfg.trainer.eval_every == 0 or epoch + 1 == cfg.trainer.epochs
            if evaluated:
                ev = evaluate(model, val_loader, cfg, device, amp_dtype, channels_last, progress)
                entry.update({k: ev[k] for k in ("val_loss", "miou", "pixel_acc", "class_iou", "per_image_miou")})
            entry.update({"lr": stats["lr"], "lr_head": stats["lr_head"], "drop_p": stats["drop_p"],
                          "iteration": stats["iteration"], "seconds": time.perf_counter() - t0})
            is_best = results.add_epoch(entry)

            step = epoch + 1
            tb.scalars({"train/loss": entry["train_loss"], "lr": entry["lr"], "lr_head": entry["lr_head"],
                        "drop_p": entry["drop_p"]}, step)
            if evaluated:
                best = results.data["best"]
                tb.scalars({"val/loss": entry["val_loss"], "val/miou": entry["miou"],
                            "val/pixel_acc": entry["pixel_acc"],
                            "val/per_image_miou_mean": entry["per_image_miou"]["mean"],
                            HPARAM_METRICS[0]: best["miou"] if best else None,
                            HPARAM_METRICS[1]: best["per_image_miou"]["mean"] if best else None}, step)
                for index in tb_indices:
                    log_strip(tb, f"val_images/{val_ds.ids[index]}", model, val_ds, index, cfg, device,
                              amp_dtype, step)
                if is_best:
                    scores = torch.tensor(ev["image_miou"], dtype=torch.float64).nan_to_num(nan=math.inf)
                    best_i = int(scores.masked_fill(scores.isinf(), -math.inf).argmax())
                    worst_i = int(scores.argmin())
                    for tag, index in (("best_image", best_i), ("worst_image", worst_i)):
                        log_strip(tb, f"val/{tag}", model, val_ds, index, cfg, device, amp_dtype, step)
                        tb.text(f"val/{tag}_id", f"{val_ds.ids[index]} (mIoU {ev['image_miou'][index]:.3f})", step)
            log.info("epoch %d/%d  train_loss %.4f  val_loss %s  mIoU %s  lr %.2e  p %.3f  %.1fs", step,
                     cfg.trainer.epochs, entry["train_loss"], _fmt(entry.get("val_loss")),
                     _fmt(entry.get("miou")), entry["lr"], entry["drop_p"], entry["seconds"])

            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": step, "iteration": stats["iteration"],
                     "history": results.history, "config": config, "cell": cell, "split": split}
            save_checkpoint(last_path, state)
            if is_best:
                save_checkpoint(ckpt_dir / "best.pt", {"model": state["model"], "epoch": step, "config": config,
                                                       "cell": cell, "split": split, "metrics": entry})
    except BaseException as e:
        results.finish("failed", error=f"{type(e).__name__}: {e}")
        tb.close()
        raise
    results.finish("completed")
    tb.close()
    best = results.data["best"]
    if best is not None:
        log.info("best epoch %d: mIoU %.4f (per-image mean %.4f); results: %s; tensorboard --logdir %s",
                 results.data["best_epoch"], best["miou"], best["per_image_miou"]["mean"], results.path,
                 run_dir / "tb")
    return results.best_value()


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def exit_on_input_error(job, cfg: DictConfig):
    """Run ``job(cfg, run_dir)`` in the Hydra run dir; bad input ends the process with one line and exit 2
    (results.json, if any, already says "failed"); anything else keeps its traceback."""
    from deeplab_dropout.data.voc import DatasetError

    try:
        return job(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (InputError, DatasetError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Hydra entry point: one run (or one job of a multirun)."""
    return exit_on_input_error(run, cfg)


if __name__ == "__main__":
    main()
