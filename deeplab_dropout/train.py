"""`deeplab-dropout-train`: train DeepLabv3+ with the configured dropout, evaluate every epoch, record mIoU.

Read top to bottom: ``set_up`` builds everything a run needs from the config (resumed from the run
directory's last.pt if there is one); ``run`` is the epoch loop: ``train_one_epoch`` and ``evaluate`` from
the engine, then the run directory records the epoch (results.json, per_image.npz, predictions/,
TensorBoard, checkpoints). A re-launch skips a completed run and resumes an interrupted one. ``app`` is the
Hydra app.
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from deeplab_dropout.class_weights import class_weights
from deeplab_dropout.cli import input_errors, run_app, run_job
from deeplab_dropout.config import CONF_DIR, one_line, validate
from deeplab_dropout.data import VOCSegmentation, get_datasets
from deeplab_dropout.data.loaders import make_loaders
from deeplab_dropout.data.split import ids_sha256
from deeplab_dropout.engine import (
    EpochStats,
    Evaluation,
    NonFiniteLoss,
    batch_statistics,
    evaluate,
    seed_everything,
    train_one_epoch,
)
from deeplab_dropout.interrupts import Interrupted, interruptible, shielded
from deeplab_dropout.loss import Criterion, make_criterion
from deeplab_dropout.model import build_model
from deeplab_dropout.progress import RunProgress
from deeplab_dropout.regularizers import describe_sites
from deeplab_dropout.results import LAST, free_space, no_space
from deeplab_dropout.rundir import BestWeights, RunDir, RunResults
from deeplab_dropout.runtime import Runtime, resolve_device, tune_malloc
from deeplab_dropout.schedules import lr_at, scheduled_drop_p
from deeplab_dropout.study import cell_name
from deeplab_dropout.tb import ImageViews, TBLogger, pick_tb_images, run_hparams

log = logging.getLogger("deeplab_dropout")
TIMING_KEYS = ("seconds", "data_seconds", "eval_seconds")  # per epoch in results.json; vary run to run
PROFILE_KEYS = ("step_seconds", "bookkeeping_seconds")  # with trainer.profile=true, per epoch too


@dataclass
class Run:
    """Everything the epoch loop reads and updates; built by ``set_up``."""

    cfg: DictConfig
    run_dir: RunDir
    runtime: Runtime
    progress: bool  # tqdm bars
    train_ds: VOCSegmentation
    val_ds: VOCSegmentation
    train_loader: DataLoader
    val_loader: DataLoader
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: Criterion  # the loss group's per-pixel loss, class weights on the device
    results: RunResults
    tb_indices: list[int]  # the fixed val images shown in TensorBoard
    start_epoch: int = 0
    saved_epoch: int = 0  # the epoch of checkpoints/last.pt (0: none yet)
    best: BestWeights | None = None  # a new best epoch's weights, until the next checkpoint writes best.pt
    clock: RunProgress | None = None  # the epoch loop's progress (where a signal found the run)

    def resume_point(self) -> str:
        """Where a relaunch continues: ``from epoch k`` after last.pt's epoch, or from the start."""
        return f"from epoch {self.saved_epoch + 1}" if self.saved_epoch > 0 else "from its start (no checkpoint yet)"

    def position(self) -> tuple[int, int]:
        """(epoch, iteration within it), both 1-based, of the last training step taken (iteration 0: none yet)."""
        if self.clock is None or self.clock.it is None:
            return self.start_epoch + 1, 0
        return self.clock.it // self.clock.steps + 1, self.clock.it % self.clock.steps + 1


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


def make_schedules(cfg: DictConfig, optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                   steps_per_epoch: int) -> Callable[[int], float]:
    """``schedules(it)``: set the LR schedule (optim.schedule) on both parameter groups and the dropout ramp
    for iteration ``it``; returns drop p. Pure functions of the iteration, so a resumed run repeats them."""
    def schedules(it: int) -> float:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg.optim, group["base_lr"], it, steps_per_epoch, cfg.trainer.epochs)
        drop_p = scheduled_drop_p(cfg, it, steps_per_epoch)
        model.set_drop_p(drop_p)
        return drop_p
    return schedules


def final_drop_p(cfg: DictConfig, loader_steps: int) -> float:
    """The drop p at the run's last training iteration (below dropout.p when the ramp is longer than the run)."""
    steps = loader_steps if cfg.trainer.max_train_steps is None else min(loader_steps, cfg.trainer.max_train_steps)
    return scheduled_drop_p(cfg, (cfg.trainer.epochs - 1) * loader_steps + steps - 1, loader_steps)


def set_up(cfg: DictConfig, run_dir: RunDir) -> Run:
    """Everything a run needs, resumed from the run dir's last checkpoint if it holds one. Input errors
    (config, data, weights, run dir) all fail here, before any work, as a one-line InputError."""
    with input_errors():
        runtime = resolve_device(cfg)
        if cfg.trainer.tune_malloc:
            tune_malloc()
        saved = run_dir.resumable_checkpoint(cfg)
        seed_everything(cfg.seed)
        train_ds, val_ds, split = get_datasets(cfg.data, seed=cfg.seed)
        split["val_sha256"] = ids_sha256(val_ds.ids)
        if saved is not None:
            run_dir.check_same_data(saved.get("split") or {}, split)
        train_loader, val_loader = make_loaders(cfg, train_ds, val_ds, runtime)
        criterion = make_criterion(cfg, runtime.device, class_weights(cfg, train_ds, split["manifest"]))
        model = runtime.prepare(build_model(cfg, validate=False))
        if cfg.trainer.compile:  # in place: state_dict keys and set_drop_p stay those of the model
            model.compile(backend=cfg.trainer.compile_backend)
        optimizer = make_optimizer(model, cfg)
        scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
        tb_indices = pick_tb_images(cfg, val_ds)
    progress = sys.stderr.isatty() if cfg.trainer.progress == "auto" else bool(cfg.trainer.progress)
    results = RunResults(run_dir.results, cell=cell_name(cfg), config=OmegaConf.to_container(cfg, resolve=True),
                         split=split, monitor=cfg.trainer.monitor)
    run = Run(cfg, run_dir, runtime, progress, train_ds, val_ds, train_loader, val_loader, model, optimizer,
              scaler, criterion, results, tb_indices)
    log.info("run dir: %s", run_dir)
    log.info("cell %s | schedule %s | %s on %s", results.data["cell"], cfg.schedule.name, cfg.model.backbone,
             runtime)
    log.info("data: %d train images (split %s), %d val images, %d steps/epoch",
             len(train_ds), split["manifest"], len(val_ds), len(train_loader))
    log.info("regularisers: %s", describe_sites(model))
    results.data["final_drop_p"] = final_drop_p(cfg, len(train_loader))
    if results.data["final_drop_p"] < float(cfg.dropout.p) - 1e-9:
        log.warning("schedule.ramp_epochs=%s is longer than the run (trainer.epochs=%d): p reaches %.3g of "
                    "dropout.p=%s by its last iteration", cfg.schedule.ramp_epochs, cfg.trainer.epochs,
                    results.data["final_drop_p"], cfg.dropout.p)
    if saved is not None:  # continue after the checkpoint's epoch: model, optimiser and scaler state, history
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        results.restore(saved["history"])
        run.start_epoch = run.saved_epoch = saved["epoch"]
        with input_errors():
            run_dir.clean_up_after_kill(results, saved)
        log.info("resuming from %s after epoch %d", run_dir.last, run.start_epoch)
    return run


def history_entry(run: Run, epoch: int, stats: EpochStats, ev: Evaluation | None, seconds: float) -> dict:
    """Epoch ``epoch``'s (0-based) results.json entry; the val metrics only if it was evaluated, with the
    per-batch means of the authors' validation batching (trainer.batch_size images, in list order)."""
    entry = {"epoch": epoch + 1, "train_loss": stats.train_loss}
    if ev is not None:
        entry.update(ev.metrics)
        entry.update(batch_statistics(ev, run.cfg.trainer.batch_size, run.criterion))
    entry.update(lr=stats.lr, lr_head=stats.lr_head, drop_p=stats.drop_p, iteration=stats.iteration,
                 seconds=seconds, data_seconds=stats.data_seconds, eval_seconds=ev.seconds if ev is not None else 0.0)
    return entry


def checkpoint(run: Run, write_last: bool) -> None:
    """Write last.pt (``write_last``) and best.pt if a new best epoch happened since the last checkpoint."""
    training = None
    if write_last:
        training = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                    "scaler": run.scaler.state_dict()}
    run.run_dir.save_checkpoints(run.results, training, run.best)
    run.best = None
    if write_last:
        run.saved_epoch = run.results.history[-1]["epoch"]


def early_stop(run: Run) -> int | None:
    """The epoch after which trainer.early_stop_patience ends the run (logged), or None to go on."""
    patience, results = run.cfg.trainer.early_stop_patience, run.results
    if not results.should_stop(patience):
        return None
    epoch = results.history[-1]["epoch"]
    log.info("early stop after epoch %d: %d evaluated epochs since the best %s (epoch %s)", epoch, patience,
             run.cfg.trainer.monitor, results.data["best_epoch"])
    return epoch


def train_epochs(run: Run, tb: TBLogger) -> int | None:
    """The epoch loop, from the run's start epoch; returns the epoch after which early stopping ended it."""
    cfg, t, results = run.cfg, run.cfg.trainer, run.results
    schedules = make_schedules(cfg, run.optimizer, run.model, len(run.train_loader))
    views = ImageViews(tb, run.run_dir, run.val_ds, run.val_loader, cfg.data, cfg.model.num_classes,
                       run.tb_indices)
    steps = len(run.train_loader) if t.max_train_steps is None else min(len(run.train_loader), t.max_train_steps)
    clock = run.clock = RunProgress(run.start_epoch, t.epochs, steps, t.batch_size, run.runtime.device,
                                    0 if run.progress else t.log_every)
    for epoch in range(run.start_epoch, t.epochs):
        if (stopped := early_stop(run)) is not None:  # before each epoch: a resumed run decides too
            return stopped
        t0 = time.perf_counter()
        try:
            stats = train_one_epoch(run.model, run.train_loader, run.optimizer, run.scaler, run.criterion,
                                    schedules, run.runtime, epoch=epoch, seed=cfg.seed,
                                    max_steps=t.max_train_steps, progress=run.progress, sync=t.profile, log=clock)
        except NonFiniteLoss as e:
            last = f"is {LAST}, epoch {run.saved_epoch}" if run.saved_epoch > 0 else "does not exist yet"
            raise FloatingPointError(f"{e} (the last good checkpoint {last})") from None
        ev = None
        if (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs:
            ev = evaluate(run.model, run.val_loader, run.runtime, run.criterion,
                          num_classes=cfg.model.num_classes, ignore_index=cfg.data.ignore_index,
                          max_images=t.max_val_images, keep=views.kept(), progress=run.progress)
        entry = history_entry(run, epoch, stats, ev, time.perf_counter() - t0)
        # per_image.npz and predictions/ first, results.json after: a kill between them leaves results.json
        # on the previous best, and the resumed run redoes this epoch and rewrites both.
        is_best = results.add_epoch(entry, write=False)
        tb.log_scalars(entry, results.data["best"])
        if ev is not None:
            views.record(run.model, run.runtime, entry["epoch"], ev, is_best)
        if is_best:
            ids = run.val_ds.ids[:ev.image_counts.shape[0]]  # the images evaluate saw, in its order
            run.run_dir.write_per_image(ids, ev.image_counts.numpy(), entry["epoch"])
        results.write()
        log.info("epoch %d/%d  train_loss %.4f  val_loss %s  mIoU %s  lr %.2e  p %.3f  %.1fs  %s", entry["epoch"],
                 t.epochs, entry["train_loss"], _fmt(entry.get("val_loss")), _fmt(entry.get("miou")),
                 entry["lr"], entry["drop_p"], entry["seconds"],
                 clock.epoch_summary(epoch, steps * t.batch_size, entry["seconds"]))
        if is_best:
            run.best = BestWeights.of(results, run.model.state_dict(), superseded=run.best)
        # The last epoch's checkpoint is written after the loop (last.pt then only if it is kept).
        if (epoch + 1) % t.checkpoint_every == 0 and epoch + 1 < t.epochs:
            checkpoint(run, write_last=True)
        if t.profile:  # where the whole epoch's time went: data + steps + evaluation + recording it
            bookkeeping = time.perf_counter() - t0 - stats.data_seconds - stats.step_seconds - entry["eval_seconds"]
            entry.update(step_seconds=stats.step_seconds, bookkeeping_seconds=bookkeeping)
            results.write()
    return None


def log_to_files(message: str, error: BaseException) -> None:
    """``message`` with ``error``'s traceback into the run's log file (train.log) only: the console gets the
    traceback once, from the error itself."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None,
                            (type(error), error, error.__traceback__))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def run(cfg: DictConfig, run_dir: RunDir | Path) -> float:
    """Train and evaluate one configuration in ``run_dir``; returns the best monitored value. A completed run
    is left as it is, an interrupted or failed one resumes from last.pt (or starts afresh without one).
    SIGINT/SIGTERM end it as ``interrupted`` (exit 130/143), a full disk as ``failed`` (exit 1), each in one line."""
    run_dir = RunDir.of(run_dir)
    with input_errors():
        validate(cfg)
        if cfg.trainer.rerun or not run_dir.is_completed():  # a completed run is only read: nothing to hold
            run_dir.lock()
        done = run_dir.earlier_run(cfg)
    if done is not None:  # e.g. a sweep re-run with the same hydra.sweep.dir
        log.info("skipping %s: already completed", run_dir)
        return done.best_value()
    with interruptible():
        try:
            state = set_up(cfg, run_dir)
        except Interrupted as e:
            print("interrupted while setting up; run the same command to start again", file=sys.stderr)
            raise SystemExit(e.exit_code) from None
        results = state.results
        results.write()
        tb = TBLogger(run_dir.path, run_hparams(cfg))  # in the run dir: TensorBoard names runs by their folder
        try:
            stopped = train_epochs(state, tb)
            if results.history:  # best.pt if still waiting; last.pt only if kept (a completed run is never resumed)
                keep = bool(cfg.trainer.keep_last) and state.saved_epoch != results.history[-1]["epoch"]
                checkpoint(state, write_last=keep)
        except BaseException as e:
            with shielded():  # a second Ctrl-C is ignored until the state a resume reads is consistent
                end_early(state, e)
            raise
        else:
            results.finish("completed", stopped_epoch=stopped)
            if not cfg.trainer.keep_last:  # only resuming needs it (optimiser state): best.pt holds the weights
                run_dir.remove_last()
        finally:
            tb.close()
    best = results.data["best"]
    if best is not None:
        log.info("best epoch %d: mIoU %.4f (per-image mean %.4f); results: %s; tensorboard --logdir %s",
                 results.data["best_epoch"], best["miou"], best["per_image_miou"]["mean"], results.path,
                 run_dir)
    return results.best_value()


def end_early(run: Run, error: BaseException) -> None:
    """Leave a run that ``error`` stopped resumable and say so: best.pt if a best epoch still waits for it,
    results.json ``interrupted`` (a signal) or ``failed``; the traceback goes to the log file only. A signal
    or a full disk ends the process here, in one line (exit 128 + signal, 1); anything else is re-raised by
    the caller. Writing that state never raises over ``error``."""
    results, resume, disk_full = run.results, run.resume_point(), no_space(error)
    try:
        if run.best is not None:  # the weights results.json already names as the best
            checkpoint(run, write_last=False)
    except (OSError, RuntimeError) as e:  # e.g. the disk that is full: results.json still says what happened
        log.warning("could not write %s: %s", run.run_dir.best, one_line(e))
    if isinstance(error, Interrupted):
        epoch, iteration = run.position()
        message = f"interrupted at epoch {epoch}, iteration {iteration}; run the same command to resume {resume}"
        status, code = "interrupted", error.exit_code
    elif disk_full is not None:
        where = disk_full.filename or run.run_dir.path
        message = (f"no space left on device writing {where} ({free_space(where)} free); the run is resumable "
                   f"{resume}")
        status, code = "failed", 1
    else:
        message, status, code = f"{type(error).__name__}: {one_line(error)}", "failed", None
        log_to_files(f"run failed: {message}", error)
    try:
        results.finish(status, error=message)
    except (OSError, RuntimeError) as e:
        log.warning("could not write %s: %s", results.path, one_line(e))
    if code is not None:
        print(f"{'error: ' if status == 'failed' else ''}{message}", file=sys.stderr)
        raise SystemExit(code) from None


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def app(cfg: DictConfig) -> float:
    """The Hydra app: one run (or one job of a multirun)."""
    return run_job(run, cfg)


def main() -> None:
    """`deeplab-dropout-train`: the Hydra app, with a mistyped override as one line (exit 2)."""
    run_app(app)


if __name__ == "__main__":
    main()
