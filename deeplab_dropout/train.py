"""`deeplab-dropout-train`: train DeepLabv3+ with the configured dropout, evaluate every epoch, record mIoU.

Read top to bottom: ``set_up`` (config validation, device and precision, data, model, optimiser, resume)
returns one ``RunState``; then ``run`` calls, per epoch, ``train_one_epoch``, ``evaluate`` and
``record_epoch`` (results.json, per_image.npz, predictions/, TensorBoard, checkpoints). A re-launch skips a
completed run and resumes an interrupted or failed one from checkpoints/last.pt. ``main`` is the Hydra entry
point.
"""
from __future__ import annotations

import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, RandomSampler
from tqdm import tqdm

from deeplab_dropout.class_weights import class_weights
from deeplab_dropout.config import CONF_DIR, ConfigError, one_line, validate
from deeplab_dropout.data import VOCSegmentation, get_datasets
from deeplab_dropout.data.cache import (
    CachedValLoader,
    cache_train,
    normalize_batch,
    val_bytes,
    val_cache_target,
)
from deeplab_dropout.data.transforms import denormalize
from deeplab_dropout.data.voc import DatasetError
from deeplab_dropout.loss import Criterion, make_criterion, reduce_loss
from deeplab_dropout.metrics import SegmentationMetrics
from deeplab_dropout.model import build_model, describe_sites
from deeplab_dropout.results import (
    LAST,
    PER_IMAGE,
    PREDICTIONS,
    BestWeights,
    RunResults,
    kill_point,
    load_run_checkpoint,
    move_aside,
    remove_temp_files,
    repair_best,
    save_checkpoints,
    write_json,
    write_per_image,
    write_prediction,
)
from deeplab_dropout.runtime import Runtime, resolve_device, resolve_workers, tune_malloc
from deeplab_dropout.saved_config import check_resumable
from deeplab_dropout.schedules import lr_at, scheduled_drop_p
from deeplab_dropout.study import cell_name
from deeplab_dropout.tb import TBLogger, best_and_worst, pick_tb_images, run_hparams, strip

log = logging.getLogger("deeplab_dropout")
# What is wrong with the input rather than the code: the config (weights included), the data, a file.
INPUT_ERRORS = (ConfigError, DatasetError, OSError)
RESULTS = Path("results.json")  # in the run dir
VAL_KEYS = ("val_loss", "miou", "pixel_acc", "class_iou", "per_image_miou")  # evaluate's, in results.json
KEEP_ALL_BYTES = 64 * 2**20  # uint8 label maps kept from an evaluation, at most
TIMING_KEYS = ("seconds", "data_seconds", "eval_seconds")  # per epoch in results.json; vary run to run


class InputError(Exception):
    """Something wrong with the config, data, weights or run dir, found during set-up (one-line message)."""


@dataclass
class RunState:
    """Everything the epoch loop reads and updates; built by ``set_up``."""

    cfg: DictConfig
    run_dir: Path
    runtime: Runtime
    progress: bool  # tqdm bars
    train_ds: VOCSegmentation
    val_ds: VOCSegmentation
    train_loader: DataLoader
    val_loader: DataLoader | CachedValLoader
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    results: RunResults
    tb_indices: list[int]  # the fixed val images shown in TensorBoard
    criterion: Criterion  # the loss group's per-pixel loss, class weights on the device
    start_epoch: int = 0
    saved_epoch: int = 0  # the epoch of checkpoints/last.pt (0: none yet)
    best: BestWeights | None = None  # a new best epoch's weights, until the next checkpoint writes best.pt
    tb: TBLogger | None = None


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


def make_optimizer(model: torch.nn.Module, cfg: DictConfig) -> torch.optim.Optimizer:
    """SGD or AdamW (optim.name) with two groups: backbone at optim.lr, the rest at optim.lr * optim.head_lr_mult."""
    o = cfg.optim
    head = [p for name, p in model.named_parameters() if not name.startswith("backbone.")]
    groups = [
        {"params": list(model.backbone.parameters()), "lr": o.lr, "base_lr": o.lr, "name": "backbone"},
        {"params": head, "lr": o.lr * o.head_lr_mult, "base_lr": o.lr * o.head_lr_mult, "name": "head"},
    ]
    # foreach: one kernel per group instead of one per tensor; the same numbers, bit for bit.
    if o.name == "adamw":
        return torch.optim.AdamW(groups, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, foreach=True)
    return torch.optim.SGD(groups, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov,
                           foreach=True)


def make_loaders(cfg: DictConfig, train_ds, val_ds, runtime: Runtime) -> tuple[DataLoader, DataLoader]:
    """The shuffled training loader (its generator is reseeded every epoch) and the val loader; the training
    images decoded into RAM first if data.cache says so (before any worker forks, so they share them)."""
    t = cfg.trainer
    if cache_train(train_ds, cfg.data.cache):
        log.info("data.cache: %d decoded training images in RAM", len(train_ds))
    workers = resolve_workers(t.num_workers)
    # Persistent workers read the epoch from the dataset's shared-memory counter (see VOCSegmentation.epoch).
    # The shuffle has its own generator, reseeded every epoch: a persistent loader draws no new worker seed
    # from its generator per epoch, so sharing one would make the order depend on the worker count.
    sampler = RandomSampler(train_ds, generator=torch.Generator())
    train_loader = DataLoader(train_ds, batch_size=t.batch_size, sampler=sampler, drop_last=True,
                              generator=torch.Generator(), num_workers=workers, persistent_workers=workers > 0,
                              pin_memory=runtime.device.type == "cuda", worker_init_fn=seed_worker)
    if len(train_loader) == 0:
        raise ConfigError(f"trainer.batch_size={t.batch_size} is invalid: larger than the "
                          f"{len(train_ds)} training images (drop_last would leave no step)")
    return train_loader, make_val_loader(cfg, val_ds, runtime)


def make_val_loader(cfg: DictConfig, val_ds, runtime: Runtime) -> DataLoader | CachedValLoader:
    """The val set in order, cached as uint8 tensors where data.val_cache allows (else a DataLoader); one
    image per batch for data.val_crop=full."""
    # `full` keeps every image's own size, so those can't be stacked into a batch.
    val_bs = 1 if cfg.data.val_crop == "full" else cfg.trainer.val_batch_size
    target = val_cache_target(cfg.data.val_cache, val_bytes(val_ds, cfg.data), runtime.device)
    if target is not None:
        loader = CachedValLoader(val_ds, cfg.data, val_bs, target)
        log.info("data.val_cache: %d val images on %s", len(val_ds), target)
        return loader
    workers = resolve_workers(cfg.trainer.num_workers)
    return DataLoader(val_ds, batch_size=val_bs, shuffle=False, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=runtime.device.type == "cuda",
                      worker_init_fn=seed_worker)


def earlier_run(cfg: DictConfig, run_dir: Path) -> RunResults | None:
    """What an earlier launch left in ``run_dir``: its results if it completed with this config (to skip),
    else None (start, or resume from last.pt). trainer.rerun=true first moves it all aside; another config's
    results.json, or any earlier run with trainer.resume=never, is a ConfigError."""
    if cfg.trainer.rerun and (aside := move_aside(run_dir)) is not None:
        log.info("trainer.rerun=true: moved the earlier run in %s to %s", run_dir, aside)
    found = [name for name in (RESULTS, LAST) if (run_dir / name).exists()]
    if found and cfg.trainer.resume == "never":
        raise ConfigError(f"trainer.resume=never but {run_dir} already holds a run ({found[0]}); use "
                          "trainer.resume=auto to continue it, or another hydra.run.dir (hydra.sweep.dir for -m)")
    if RESULTS not in found:
        return None
    earlier = RunResults.read(run_dir / RESULTS, cfg.trainer.monitor)
    check_resumable(earlier.data.get("config", {}), OmegaConf.to_container(cfg, resolve=True), run_dir / RESULTS)
    return earlier if earlier.data.get("status") == "completed" else None


def resumable_checkpoint(cfg: DictConfig, run_dir: Path) -> dict | None:
    """``run_dir``'s last checkpoint if the run is to continue from it (same config), else None."""
    last = run_dir / LAST
    if not last.exists():
        return None
    saved = load_run_checkpoint(last, ("model", "optimizer", "scaler", "history", "epoch", "config"))
    check_resumable(saved["config"], OmegaConf.to_container(cfg, resolve=True), last)
    return saved


def set_up(cfg: DictConfig, run_dir: Path) -> RunState:
    """Everything a run needs, resumed from ``run_dir``'s last checkpoint if it holds one. Input errors
    (config, data, weights, run dir) all fail here, before any work, as a one-line InputError."""
    try:
        validate(cfg)
        runtime = resolve_device(cfg)
        if cfg.trainer.tune_malloc:
            tune_malloc()
        saved = resumable_checkpoint(cfg, run_dir)
        seed_everything(cfg.seed)
        train_ds, val_ds, split = get_datasets(cfg.data, seed=cfg.seed)
        train_loader, val_loader = make_loaders(cfg, train_ds, val_ds, runtime)
        criterion = make_criterion(cfg, runtime.device, class_weights(cfg, train_ds, split["manifest"]))
        model = runtime.prepare(build_model(cfg))
        if cfg.trainer.compile:  # in place: state_dict keys and set_drop_p stay those of the model
            model.compile(backend=cfg.trainer.compile_backend)
        optimizer = make_optimizer(model, cfg)
        scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
        tb_indices = pick_tb_images(cfg, val_ds)
    except INPUT_ERRORS as e:
        raise InputError(one_line(e)) from e
    progress = sys.stderr.isatty() if cfg.trainer.progress == "auto" else bool(cfg.trainer.progress)
    config = OmegaConf.to_container(cfg, resolve=True)
    results = RunResults(run_dir / RESULTS, cell=cell_name(cfg), config=config, split=split,
                         monitor=cfg.trainer.monitor)
    state = RunState(cfg, run_dir, runtime, progress, train_ds, val_ds, train_loader, val_loader, model,
                     optimizer, scaler, results, tb_indices, criterion)
    log.info("run dir: %s", run_dir)
    log.info("cell %s | schedule %s | %s on %s", results.data["cell"], cfg.schedule.name, cfg.model.backbone,
             runtime)
    log.info("data: %d train images (split %s), %d val images, %d steps/epoch",
             len(train_ds), split["manifest"], len(val_ds), len(train_loader))
    log.info("regularisers: %s", describe_sites(model))
    if saved is not None:
        resume(state, saved)
    return state


def resume(state: RunState, saved: dict) -> None:
    """Continue after the checkpoint's epoch: model, optimiser and scaler state, history so far."""
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scaler.load_state_dict(saved["scaler"])
    state.results.restore(saved["history"])
    state.start_epoch = state.saved_epoch = saved["epoch"]
    remove_temp_files(state.run_dir)  # of a write that a kill cut short
    repair_best(state.run_dir, state.results, saved)
    log.info("resuming from %s after epoch %d", state.run_dir / LAST, state.start_epoch)


def forward(model: torch.nn.Module, images, targets, runtime: Runtime, criterion: Criterion, data_cfg=None,
            amp: torch.dtype | None | str = "train"):
    """Move a batch to the device and run the model (autocast ``amp``: the training precision by default);
    returns (logits, targets on the device, ``criterion``'s loss sum over valid pixels and its weight sum: their
    count when unweighted). uint8 images (the val cache) are normalised on the device with ``data_cfg``'s
    mean/std."""
    images = images.to(runtime.device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = normalize_batch(images, data_cfg)
    if runtime.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = targets.to(runtime.device, non_blocking=True).long()
    with runtime.autocast(amp):
        logits = model(images)
    loss_sum, n_px = criterion(logits, targets)
    return logits, targets, loss_sum, n_px


def set_schedules(state: RunState, it: int) -> float:
    """The LR schedule (optim.schedule) on both parameter groups and the dropout ramp at iteration ``it``;
    returns drop p."""
    cfg, steps_per_epoch = state.cfg, len(state.train_loader)
    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(cfg.optim, group["base_lr"], it, steps_per_epoch, cfg.trainer.epochs)
    drop_p = scheduled_drop_p(cfg, it, steps_per_epoch)
    state.model.set_drop_p(drop_p)
    return drop_p


def train_step(state: RunState, images, targets, epoch: int, it: int) -> tuple[float, float, torch.Tensor, float]:
    """One SGD step at iteration ``it`` with its poly LR and dropout ramp; returns (loss summed over valid
    pixels, their count or weight sum, the loss, drop p). A NaN/inf loss stops the run here, before the step."""
    kill_point("step", it + 1)
    cfg = state.cfg
    drop_p = set_schedules(state, it)
    _, _, loss_sum, n_px = forward(state.model, images, targets, state.runtime, state.criterion)
    loss = reduce_loss(loss_sum, n_px, targets.shape[0], cfg.loss)
    loss_value = loss_sum.item()
    if not math.isfinite(loss_value):
        saved = state.saved_epoch
        last = f"is {LAST}, epoch {saved}" if saved > 0 else "does not exist yet"
        raise FloatingPointError(f"training loss is {loss_value} at epoch {epoch + 1}, iteration {it + 1} "
                                 f"(the last good checkpoint {last})")
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    return loss_value, n_px, loss, drop_p


def train_one_epoch(state: RunState, epoch: int) -> dict:
    """One pass over the training set with per-iteration poly LR and dropout ramp; returns epoch stats."""
    cfg, optimizer, loader = state.cfg, state.optimizer, state.train_loader
    # Everything random in an epoch derives from (seed, epoch): a resumed run repeats it exactly. The
    # augmentation of each sample derives from (seed, epoch, index), whichever worker loads it.
    epoch_seed = cfg.seed * 1_000_003 + epoch
    seed_everything(epoch_seed)
    loader.generator.manual_seed(epoch_seed)
    loader.sampler.generator.manual_seed(epoch_seed)
    # The draw a fresh loader iterator used to take from a shared generator first: the same order as before.
    torch.empty((), dtype=torch.int64).random_(generator=loader.sampler.generator)
    state.train_ds.epoch = epoch  # before the loader's workers start (each epoch, with copies of it)
    state.model.train()
    steps = len(loader) if cfg.trainer.max_train_steps is None else min(len(loader), cfg.trainer.max_train_steps)
    total_loss, total_px, seen, waited = 0.0, 0, 0, 0.0
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.trainer.epochs}", disable=not state.progress,
               leave=False)
    it = epoch * len(loader)
    batches = iter(loader)
    for step in range(steps):
        t0 = time.perf_counter()
        images, targets = next(batches)
        waited += time.perf_counter() - t0  # the loop waiting for input: decode/augment not hidden by workers
        it = epoch * len(loader) + step
        loss_sum, n_px, loss, drop_p = train_step(state, images, targets, epoch, it)
        total_loss += loss_sum
        total_px += n_px
        seen += targets.shape[0]
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                        p=f"{drop_p:.3f}", ips=f"{seen / (time.perf_counter() - start):.1f}")
    bar.close()
    # On the configured scale (loss.batch_average divides by trainer.batch_size, every step's batch size).
    return {"train_loss": reduce_loss(total_loss, total_px, cfg.trainer.batch_size, cfg.loss),
            "lr": optimizer.param_groups[0]["lr"], "lr_head": optimizer.param_groups[1]["lr"],
            "drop_p": drop_p, "iteration": it + 1, "data_seconds": waited}


def labels(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel class (N, H, W) of (N, K, H, W) logits: max's indices, which equal argmax's (the first maximum
    on ties) and take a fifth of its time on CPU, where argmax over the strided class dim is slow."""
    return logits.max(1).indices


def evaluate(model: torch.nn.Module, loader, cfg: DictConfig, runtime: Runtime, progress: bool = False,
             keep: tuple[int, ...] | None = (), criterion: Criterion | None = None) -> dict:
    """Whole-val evaluation: dataset mIoU, pixel accuracy, class IoU, per-image mIoU stats, val loss; also
    (not for results.json) ``image_counts``, int64 (N, K, 2) per-image counts of the first N val images
    (trainer.max_val_images may cut the list), ``image_miou``, ``preds`` (the uint8 CPU label maps of the
    val images ``keep``, None: all) and ``eval_seconds``. The val loss uses ``criterion``, the training one
    (by default built from ``cfg``, class weights from the training split, as set_up does)."""
    t0 = time.perf_counter()
    if criterion is None:  # e.g. the eval app: the same loss as the run trained with
        criterion = make_criterion(cfg, runtime.device, class_weights(cfg))
    model.eval()
    metrics = SegmentationMetrics(cfg.model.num_classes, cfg.data.ignore_index)
    limit = cfg.trainer.max_val_images
    total_loss, total_px, seen, preds = 0.0, 0, 0, {}
    with torch.inference_mode():
        for images, targets in tqdm(loader, desc="val", disable=not progress, leave=False):
            if limit is not None and seen >= limit:
                break
            logits, targets, loss_sum, n_px = forward(model, images, targets, runtime, criterion,
                                                      cfg.data, runtime.eval_amp_dtype)
            total_loss += loss_sum.item()
            total_px += n_px
            pred = labels(logits)
            metrics.update(pred, targets)
            wanted = range(seen, seen + len(pred)) if keep is None else [i for i in keep if i - seen in
                                                                              range(len(pred))]
            preds.update({i: pred[i - seen].to("cpu", torch.uint8) for i in wanted})
            seen += targets.shape[0]
    out = metrics.compute()
    # The training loss's scale (whatever the val batch size), so val_loss compares with train_loss.
    out["val_loss"] = reduce_loss(total_loss, total_px, cfg.trainer.batch_size, cfg.loss)
    out["image_miou"] = metrics.image_miou.tolist()
    out["image_counts"] = metrics.image_counts
    out["preds"] = preds
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def kept_predictions(state: RunState) -> tuple[int, ...] | None:
    """The val images whose predictions evaluate keeps for predictions/: all of them (no second forward for
    the best and worst image) when they take at most KEEP_ALL_BYTES, else only the fixed ones."""
    d = state.cfg.data
    if d.val_crop == "center" and len(state.val_ds) * d.crop_size ** 2 <= KEEP_ALL_BYTES:
        return None
    return tuple(state.tb_indices)


def is_eval_epoch(cfg: DictConfig, epoch: int) -> bool:
    """Every trainer.eval_every epochs, and after the last."""
    return (epoch + 1) % cfg.trainer.eval_every == 0 or epoch + 1 == cfg.trainer.epochs


# A dataclass, not a NamedTuple: under `python -m` this module is __main__, and launchers that cloudpickle the
# task (submitit) pickle its classes by value, which fails for NamedTuples on Python 3.11.
@dataclass(frozen=True)
class View:
    """One val image as saved and shown: id, uint8 (3, H, W) image, label map and the model's prediction."""

    id: str
    image: torch.Tensor
    target: torch.Tensor
    pred: torch.Tensor


@torch.inference_mode()
def predict(state: RunState, index: int, pred: torch.Tensor | None = None) -> View:
    """Val image ``index`` with its prediction ``pred`` (kept by evaluate), else through the model once (eval
    mode, evaluation's precision); the View that both its PNG and strip use."""
    cfg, runtime = state.cfg, state.runtime
    if isinstance(state.val_loader, CachedValLoader):
        image, target = state.val_loader.item(index)  # already uint8: no decode, no de-normalising
        batch = normalize_batch(image[None].to(runtime.device), cfg.data)
        target = target.long()
    else:
        normalised, target = state.val_ds[index]
        image, batch = denormalize(normalised, cfg.data), normalised[None].to(runtime.device)
    if pred is None:
        state.model.eval()
        with runtime.eval_autocast():
            pred = labels(state.model(batch))[0]
    return View(state.val_ds.ids[index], image, target, pred.to("cpu", torch.int64))


def show(state: RunState, tag: str, view: View, epoch: int, miou: float) -> None:
    """Save ``view``'s prediction at ``epoch`` under predictions/ and log its captioned strip as ``tag``."""
    write_prediction(state.run_dir, view.id, epoch, view.image, view.target, view.pred)
    titles = (view.id, "ground truth", f"prediction · mIoU {miou:.3f} · epoch {epoch}")
    state.tb.image(tag, strip(view.image, view.target, view.pred, titles=titles), epoch)


def view_miou(view: View, index: int, ev: dict, cfg: DictConfig) -> float:
    """The per-image mIoU of the prediction in ``view`` of val image ``index`` (NaN if the image has no valid
    pixel): evaluate's own number when it kept that prediction, else scored here."""
    if index in ev["preds"]:
        return ev["image_miou"][index]
    metrics = SegmentationMetrics(cfg.model.num_classes, cfg.data.ignore_index)
    metrics.update(view.pred, view.target)
    return metrics.image_miou[0].item()


def record_views(state: RunState, epoch: int, ev: dict, is_best: bool) -> None:
    """The fixed val images' predictions at evaluated epoch ``epoch`` (1-based); at a new best epoch also the
    best and worst image's, per_image.npz and predictions/index.json."""
    fixed = {i: predict(state, i, ev["preds"].get(i)) for i in state.tb_indices}
    for i, view in fixed.items():
        show(state, f"val_images/{view.id}", view, epoch, view_miou(view, i, ev, state.cfg))
    if not is_best:
        return
    counts = ev["image_counts"]
    ids = state.val_ds.ids[:counts.shape[0]]  # the images evaluate saw, in its order
    write_per_image(state.run_dir / PER_IMAGE, ids, counts.numpy(), epoch)
    image_miou = ev["image_miou"]  # miou_from_counts of these counts
    index = {"fixed": [v.id for v in fixed.values()], "best_epoch": epoch}
    for name, i in zip(("best", "worst"), best_and_worst(image_miou), strict=True):
        view = fixed[i] if i in fixed else predict(state, i, ev["preds"].get(i))  # at most one forward
        show(state, f"val/{name}_image", view, epoch, image_miou[i])
        state.tb.text(f"val/{name}_image_id", f"{view.id} (mIoU {image_miou[i]:.3f})", epoch)
        index[name] = {"id": view.id, "miou": image_miou[i]}
    write_json(state.run_dir / PREDICTIONS / "index.json", index)


def record_epoch(state: RunState, epoch: int, stats: dict, ev: dict | None, seconds: float) -> None:
    """Write what epoch ``epoch`` left: its results.json entry, per-image record, predictions, TensorBoard
    scalars and images, a log line; keep a new best's weights for best.pt, and write the checkpoints every
    trainer.checkpoint_every epochs (the last epoch's are final_checkpoint's). ``ev`` is None for an epoch
    without evaluation."""
    entry = {"epoch": epoch + 1, "train_loss": stats["train_loss"]}
    if ev is not None:
        entry.update({k: ev[k] for k in VAL_KEYS})
    entry.update({k: stats[k] for k in ("lr", "lr_head", "drop_p", "iteration")}, seconds=seconds,
                 data_seconds=stats["data_seconds"], eval_seconds=ev["eval_seconds"] if ev is not None else 0.0)
    # per_image.npz and predictions/ first, results.json after: a kill between them leaves results.json
    # on the previous best, and the resumed run redoes this epoch and rewrites both.
    is_best = state.results.add_epoch(entry, write=False)
    state.tb.log_scalars(entry, state.results.data["best"])
    if ev is not None:
        record_views(state, entry["epoch"], ev, is_best)
    state.results.write()
    log.info("epoch %d/%d  train_loss %.4f  val_loss %s  mIoU %s  lr %.2e  p %.3f  %.1fs", entry["epoch"],
             state.cfg.trainer.epochs, entry["train_loss"], _fmt(entry.get("val_loss")),
             _fmt(entry.get("miou")), entry["lr"], entry["drop_p"], entry["seconds"])
    if is_best:
        state.best = BestWeights.of(state.results, state.model.state_dict(), superseded=state.best)
    # A resume from an older last.pt re-trains the epochs after it, to the same numbers (runs are seeded).
    # The last epoch's checkpoint is final_checkpoint's: last.pt then only if it is kept.
    t = state.cfg.trainer
    if (epoch + 1) % t.checkpoint_every == 0 and epoch + 1 < t.epochs:
        checkpoint(state, write_last=True)


def checkpoint(state: RunState, write_last: bool) -> None:
    """Write last.pt (``write_last``) and best.pt if a new best epoch happened since the last checkpoint."""
    training = None
    if write_last:
        training = {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                    "scaler": state.scaler.state_dict()}
    save_checkpoints(state.run_dir, state.results, training, state.best)
    state.best = None
    if write_last:
        state.saved_epoch = state.results.history[-1]["epoch"]


def final_checkpoint(state: RunState) -> None:
    """After the last epoch: best.pt if still waiting, and last.pt only if trainer.keep_last (it exists for
    resuming; a completed run is never resumed)."""
    if state.results.history:
        keep = bool(state.cfg.trainer.keep_last) and state.saved_epoch != state.results.history[-1]["epoch"]
        checkpoint(state, write_last=keep)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def run_epoch(state: RunState, epoch: int) -> None:
    """Train epoch ``epoch`` (0-based), evaluate it if due, record it."""
    t0 = time.perf_counter()
    stats = train_one_epoch(state, epoch)
    ev = None
    if is_eval_epoch(state.cfg, epoch):
        kill_point("eval", epoch + 1)
        ev = evaluate(state.model, state.val_loader, state.cfg, state.runtime, state.progress,
                      keep=kept_predictions(state), criterion=state.criterion)
    record_epoch(state, epoch, stats, ev, time.perf_counter() - t0)


def skip_completed(cfg: DictConfig, run_dir: Path) -> RunResults | None:
    """The results of a completed run of ``cfg`` in ``run_dir`` (nothing to do), else None; input errors
    (config, another config's run dir) as a one-line InputError."""
    try:
        validate(cfg)
        return earlier_run(cfg, run_dir)
    except INPUT_ERRORS as e:
        raise InputError(one_line(e)) from e


def early_stop(state: RunState) -> int | None:
    """The epoch after which trainer.early_stop_patience ends the run (logged), or None to go on."""
    patience, results = state.cfg.trainer.early_stop_patience, state.results
    if not results.should_stop(patience):
        return None
    epoch = results.history[-1]["epoch"]
    log.info("early stop after epoch %d: %d evaluated epochs since the best %s (epoch %s)", epoch, patience,
             state.cfg.trainer.monitor, results.data["best_epoch"])
    return epoch


def run(cfg: DictConfig, run_dir: Path) -> float:
    """Train and evaluate one configuration in ``run_dir``; returns the best monitored value. A completed run
    is left as it is, an interrupted or failed one resumes from last.pt (or starts afresh without one)."""
    done = skip_completed(cfg, run_dir)
    if done is not None:  # e.g. a sweep re-run with the same hydra.sweep.dir
        log.info("skipping %s: already completed", run_dir)
        return done.best_value()
    state = set_up(cfg, run_dir)
    results = state.results
    results.write()
    state.tb = TBLogger(run_dir, run_hparams(cfg))  # in the run dir: TensorBoard names runs by their folder
    try:
        stopped = None
        for epoch in range(state.start_epoch, cfg.trainer.epochs):
            if (stopped := early_stop(state)) is not None:  # before each epoch: a resumed run decides too
                break
            run_epoch(state, epoch)
        final_checkpoint(state)
    except BaseException as e:
        if state.best is not None:  # the weights results.json already names as the best
            checkpoint(state, write_last=False)
        results.finish("failed", error=f"{type(e).__name__}: {e}")
        raise
    else:
        results.finish("completed", stopped_epoch=stopped)
        if not cfg.trainer.keep_last:  # only resuming needs it (optimiser state): best.pt holds the weights
            (run_dir / LAST).unlink(missing_ok=True)
    finally:
        state.tb.close()
    best = results.data["best"]
    if best is not None:
        log.info("best epoch %d: mIoU %.4f (per-image mean %.4f); results: %s; tensorboard --logdir %s",
                 results.data["best_epoch"], best["miou"], best["per_image_miou"]["mean"], results.path,
                 run_dir)
    return results.best_value()


def exit_on_input_error(job, cfg: DictConfig):
    """Run ``job(cfg, run_dir)`` in the Hydra run dir; bad input prints one line, ``error: ...``. A single run
    then exits 2 (results.json, if any, already says "failed"); a multirun job records the error in its
    results.json and re-raises, so Hydra marks that job FAILED and the sweep goes on. Anything else keeps its
    traceback."""
    from hydra.types import RunMode

    from deeplab_dropout.entry import EXIT_INPUT, record_failure

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        return job(cfg, run_dir)
    except (InputError, DatasetError) as e:
        message = one_line(e)
        print(f"error: {message}", file=sys.stderr)
        if hydra_cfg.mode != RunMode.MULTIRUN:
            sys.exit(EXIT_INPUT)
        record_failure(run_dir / RESULTS, cfg, message)
        raise


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def app(cfg: DictConfig) -> float:
    """The Hydra app: one run (or one job of a multirun)."""
    return exit_on_input_error(run, cfg)


def main() -> None:
    """`deeplab-dropout-train`: the Hydra app, with a mistyped override as one line (exit 2)."""
    from deeplab_dropout.entry import run_app

    run_app(app)


if __name__ == "__main__":
    main()
