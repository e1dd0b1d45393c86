"""The training and evaluation engine, as torchvision's ``references/segmentation``: ``train_one_epoch`` and
``evaluate`` take what they need as explicit arguments (model, loader, optimiser, criterion, runtime) and
return small typed results. No files, no config: the apps (train.py, eval.py) decide what to record.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from deeplab_dropout.loss import Criterion
from deeplab_dropout.metrics import SegmentationMetrics
from deeplab_dropout.progress import RunProgress
from deeplab_dropout.runtime import Runtime


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of everything random in epoch ``epoch`` (0-based) of a run seeded ``seed``."""
    return seed * 1_000_003 + epoch


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or inf; raised before the step that would spread it into the weights."""


@dataclass(frozen=True)
class EpochStats:
    """What one training epoch leaves: the mean loss (on the criterion's scale), the LRs, drop p and the
    iteration count after its last step, and seconds spent waiting for data and in the steps."""

    train_loss: float
    lr: float
    lr_head: float
    drop_p: float
    iteration: int
    data_seconds: float
    step_seconds: float


@dataclass(frozen=True)
class Evaluation:
    """One pass over the validation set: the metrics results.json records (``metrics``: miou, pixel_acc,
    class_iou, per_image_miou and val_loss), each image's (K, 2) intersection/union counts, mIoU, loss sum
    and pixel weight in loader order (the losses empty without a criterion), the kept predictions (uint8
    CPU label maps by image index) and the seconds it took."""

    metrics: dict
    image_counts: torch.Tensor
    image_miou: list[float]
    image_loss: list[float]
    image_pixels: list[float]
    preds: dict[int, torch.Tensor]
    seconds: float


def batch_statistics(ev: Evaluation, batch_size: int, criterion: Criterion | None) -> dict[str, list]:
    """The validation set as the authors' loader batched it: consecutive groups of ``batch_size`` images in
    loader order (the last one partial); each group's mean per-image mIoU (``batch_miou``, images without
    valid pixels left out; None for a group of only those) and loss (``batch_loss``, on the criterion's
    scale over the group's size; empty without a criterion)."""
    groups = [range(i, min(i + batch_size, len(ev.image_miou))) for i in range(0, len(ev.image_miou), batch_size)]
    mious = []
    for group in groups:
        valid = [ev.image_miou[i] for i in group if not math.isnan(ev.image_miou[i])]
        mious.append(sum(valid) / len(valid) if valid else None)
    losses = []
    if criterion is not None and ev.image_loss:
        losses = [float(criterion.reduce(sum(ev.image_loss[i] for i in g), sum(ev.image_pixels[i] for i in g),
                                         len(g))) for g in groups]
    return {"batch_miou": mious, "batch_loss": losses}


def labels(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel class (N, H, W) of (N, K, H, W) logits: max's indices, which equal argmax's (the first maximum
    on ties) and take a fifth of its time on CPU, where argmax over the strided class dim is slow."""
    return logits.max(1).indices


def forward(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, runtime: Runtime,
            amp: torch.dtype | None | str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to the device and run the model under autocast ``amp`` (the training precision by
    default); returns (logits, targets as int64 on the device)."""
    images = images.to(runtime.device, non_blocking=True)
    if runtime.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = targets.to(runtime.device, non_blocking=True).long()
    with runtime.autocast(amp):
        logits = model(images)
    return logits, targets


def train_one_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, criterion: Criterion, schedules: Callable[[int], float],
                    runtime: Runtime, *, epoch: int, seed: int, max_steps: int | None = None,
                    progress: bool = False, sync: bool = False, log: RunProgress | None = None) -> EpochStats:
    """Train epoch ``epoch`` (0-based). ``schedules(it)`` sets the LRs and the dropout ramp for iteration
    ``it`` and returns drop p. Everything random derives from (``seed``, epoch), so a resumed run repeats the
    epoch exactly. ``sync``: wait for the device after each step, so that step_seconds is the steps' time.
    ``progress``: a tqdm bar; ``log``: its log lines every trainer.log_every steps instead.
    A NaN/inf loss raises NonFiniteLoss before its step."""
    # The loader's shuffle and worker seeds, and each sample's augmentation (from (seed, epoch, index),
    # whichever worker loads it), follow the epoch seed.
    s = epoch_seed(seed, epoch)
    seed_everything(s)
    loader.generator.manual_seed(s)
    loader.sampler.generator.manual_seed(s)
    # The draw a fresh loader iterator used to take from a shared generator first: the same order as before.
    torch.empty((), dtype=torch.int64).random_(generator=loader.sampler.generator)
    loader.dataset.epoch = epoch  # before the loader's workers start (each epoch, with copies of it)
    model.train()
    steps = len(loader) if max_steps is None else min(len(loader), max_steps)
    total_loss, total_px, seen, waited, stepping = 0.0, 0, 0, 0.0, 0.0
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}", disable=not progress, leave=False)
    it, drop_p, batches = epoch * len(loader), 0.0, iter(loader)
    for step in range(steps):
        t0 = time.perf_counter()
        images, targets = next(batches)
        t1 = time.perf_counter()
        waited += t1 - t0  # the loop waiting for input: decode/augment not hidden by workers
        it = epoch * len(loader) + step
        drop_p = schedules(it)
        logits, targets = forward(model, images, targets, runtime)
        loss_sum, n_px = criterion(logits, targets)
        loss = criterion.reduce(loss_sum, n_px, targets.shape[0])
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(f"training loss is {loss_value} at epoch {epoch + 1}, iteration {it + 1}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if sync and runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)
        stepping += time.perf_counter() - t1
        total_loss += loss_value
        total_px += n_px
        seen += targets.shape[0]
        if log is not None:
            log.step(epoch, step, loss.detach(), optimizer.param_groups[0]["lr"], drop_p)
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        p=f"{drop_p:.3f}", ips=f"{seen / (time.perf_counter() - start):.1f}")
    bar.close()
    # On the configured scale (loss.batch_average divides by trainer.batch_size, every step's batch size).
    return EpochStats(train_loss=criterion.reduce(total_loss, total_px), lr=optimizer.param_groups[0]["lr"],
                      lr_head=optimizer.param_groups[1]["lr"], drop_p=drop_p, iteration=it + 1,
                      data_seconds=waited, step_seconds=stepping)


def evaluate(model: torch.nn.Module, loader, runtime: Runtime, criterion: Criterion | None = None, *,
             num_classes: int, ignore_index: int, max_images: int | None = None,
             keep: Collection[int] | None = (), progress: bool = False) -> Evaluation:
    """Evaluate on the whole validation loader (its first ``max_images`` images if set), in evaluation's
    precision: dataset mIoU, pixel accuracy, class IoU, per-image mIoU statistics and, with ``criterion``,
    the validation loss on the training loss's scale (else None). Keeps the predictions of the images
    ``keep`` (None: all)."""
    t0 = time.perf_counter()
    model.eval()
    metrics = SegmentationMetrics(num_classes, ignore_index)
    total_loss, total_px, seen, preds, image_loss, image_pixels = 0.0, 0, 0, {}, [], []
    with torch.inference_mode():
        for images, targets in tqdm(loader, desc="val", disable=not progress, leave=False):
            if max_images is not None and seen >= max_images:
                break
            logits, targets = forward(model, images, targets, runtime, runtime.eval_amp_dtype)
            if criterion is not None:
                loss_sum, n_px = criterion(logits, targets)
                total_loss += loss_sum.item()
                total_px += n_px
                for i in range(len(targets)):  # each image's own, for statistics over other batchings
                    one_sum, one_px = criterion(logits[i:i + 1], targets[i:i + 1])
                    image_loss.append(one_sum.item())
                    image_pixels.append(float(one_px))
            pred = labels(logits)
            metrics.update(pred, targets)
            batch = range(seen, seen + len(pred))
            wanted = batch if keep is None else [i for i in keep if i in batch]
            preds.update({i: pred[i - seen].to("cpu", torch.uint8) for i in wanted})
            seen += targets.shape[0]
    out = metrics.compute()
    # The training loss's scale (whatever the val batch size), so val_loss compares with train_loss.
    out = {"val_loss": criterion.reduce(total_loss, total_px) if criterion is not None else None, **out}
    return Evaluation(out, metrics.image_counts, metrics.image_miou.tolist(), image_loss, image_pixels, preds,
                      time.perf_counter() - t0)
