"""A run directory as one object: results.json (``RunResults``), the per-image record, predictions/, the
checkpoints, and the decisions a re-launch makes there (skip a completed run, resume an interrupted one,
move an earlier run aside, record a failure). The only module that writes into a run directory.
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from deeplab_dropout.config import ConfigError, one_line
from deeplab_dropout.results import (
    BEST,
    LAST,
    PER_IMAGE,
    PREDICTIONS,
    load_checkpoint,
    load_run_checkpoint,
    prediction_png,
    save_checkpoint,
    write_json,
    write_label_png,
    write_per_image,
    write_rgb_png,
)
from deeplab_dropout.saved_config import check_resumable
from deeplab_dropout.study import cell_name

RESULTS = Path("results.json")  # in the run dir
RERUN_HINT = "trainer.rerun=true moves this run aside and starts again (nothing is deleted)"
LOCK = Path(".lock")  # held (flock) by the process running in the run dir; it names that process
PROCESS_GONE = "interrupted (process gone)"  # a run whose results.json says running but whose lock no one holds
log = logging.getLogger("deeplab_dropout")
_held: dict[Path, int] = {}  # the run dirs this process holds: resolved path -> the lock file's descriptor


class RunDirBusy(ConfigError):
    """Another live process holds the run dir."""


class RunResults:
    """results.json of one run: status, cell, resolved config, split record, per-epoch history and best."""

    def __init__(self, path: Path, *, cell: str, config: dict, split: dict, monitor: str = "miou") -> None:
        self.path = Path(path)
        self.monitor = monitor
        self.data: dict[str, Any] = {
            "status": "running",
            "cell": cell,
            "config": config,
            "split": split,
            "best_epoch": None,
            "best": None,
            "history": [],
        }

    @staticmethod
    def monitor_value(entry: dict, monitor: str) -> float:
        """The value of ``monitor`` in a history entry (``per_image_miou_mean`` reads the nested dict,
        ``batch_miou_mean`` is the mean of the per-batch means: the authors' rule)."""
        if monitor == "per_image_miou_mean":
            return entry["per_image_miou"]["mean"]
        if monitor == "batch_miou_mean":
            means = [m for m in entry.get("batch_miou", []) if m is not None]
            return sum(means) / len(means) if means else math.nan
        return entry[monitor]

    def best_value(self) -> float:
        """The monitored value at the best epoch (NaN before any evaluation)."""
        best = self.data["best"]
        return math.nan if best is None else self.monitor_value(best, self.monitor)

    @property
    def history(self) -> list[dict]:
        return self.data["history"]

    def restore(self, history: list[dict]) -> None:
        """Take the history of a resumed run (from its checkpoint) and recompute the best epoch."""
        self.data["history"] = []
        self.data["best_epoch"] = self.data["best"] = None
        for entry in history:
            self.add_epoch(entry, write=False)

    def add_epoch(self, entry: dict, write: bool = True) -> bool:
        """Append one epoch's entry; returns True if it is the new best. Rewrites the file."""
        self.history.append(entry)
        value = self.monitor_value(entry, self.monitor) if "miou" in entry else None
        best = self.data["best"]
        is_best = value is not None and not math.isnan(value) and (
            best is None or value > self.monitor_value(best, self.monitor))
        if is_best:
            self.data["best_epoch"] = entry["epoch"]
            self.data["best"] = entry
        if write:
            self.write()
        return is_best

    def finish(self, status: str, error: str | None = None, stopped_epoch: int | None = None) -> None:
        """Mark the run ``completed`` or ``failed`` (with the error message) and write. A completed run records
        whether early stopping ended it and after which epoch (``stopped_epoch``; None: it ran every epoch)."""
        self.data["status"] = status
        if error is not None:
            self.data["error"] = error
        if status == "completed":
            self.data.update(stopped_early=stopped_epoch is not None, stopped_epoch=stopped_epoch)
        self.data["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.write()

    def should_stop(self, patience: int | None) -> bool:
        """Early stopping: True once ``patience`` evaluated epochs follow the best epoch (none beat it: a tie is
        no new best); None never stops. It reads only the history, so a resumed run decides the same way."""
        if patience is None:
            return False
        best = self.data["best_epoch"] or 0  # no best yet (all NaN): every evaluated epoch counts
        return sum("miou" in e and e["epoch"] > best for e in self.history) >= patience

    def write(self) -> None:
        write_json(self.path, self.data)

    @classmethod
    def read(cls, path: Path, monitor: str = "miou") -> RunResults:
        """The results.json at ``path`` as written by ``write`` (an unreadable file is ConfigError)."""
        results = cls(path, cell="", config={}, split={}, monitor=monitor)
        try:
            results.data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {path}: {one_line(e)}") from e
        return results


def _run_record(results: RunResults, epoch: int | None = None) -> dict:
    data = results.data
    return {"epoch": results.history[-1]["epoch"] if epoch is None else epoch, "config": data["config"],
            "cell": data["cell"], "split": data["split"]}


@dataclass
class BestWeights:
    """The best epoch's weights (a CPU copy, taken when it happened) and its BEST record, waiting for the next
    checkpoint: between checkpoints (trainer.checkpoint_every) a new best costs a copy in RAM, not a file."""

    epoch: int
    record: dict  # BEST's keys besides the weights: epoch, config, cell, split, metrics

    @classmethod
    def of(cls, results: RunResults, model_state: dict, superseded: BestWeights | None = None) -> BestWeights:
        """The weights ``model_state`` of the last epoch in ``results`` (its new best), copied to the CPU, into
        the tensors of ``superseded`` (an earlier best still waiting, never to be written) where they fit:
        a copy without new memory to allocate and fault in."""
        record = {**_run_record(results), "metrics": results.data["best"]}
        old = superseded.record["model"] if superseded is not None else {}
        weights = {}
        for key, value in model_state.items():
            value, into = value.detach(), old.get(key)
            fits = into is not None and into.shape == value.shape and into.dtype == value.dtype
            weights[key] = into.copy_(value) if fits else value.to("cpu", copy=True)
        return cls(record["epoch"], {"model": weights, **record})



class RunDir:
    """The folder of one run (its Hydra run dir): every file a run writes goes through here."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.results = self.path / RESULTS
        self.last, self.best = self.path / LAST, self.path / BEST

    def __str__(self) -> str:
        return str(self.path)

    @classmethod
    def of(cls, run_dir: RunDir | Path) -> RunDir:
        """``run_dir`` as a RunDir (a path, or already one)."""
        return run_dir if isinstance(run_dir, RunDir) else cls(run_dir)

    # --- one process per run dir ---------------------------------------------------------------------------

    def lock(self) -> None:
        """Hold this run dir for this process: an advisory flock on its .lock, taken before the run writes
        anything and released by the OS when the process ends, however it ends. Another live process holding
        it is a RunDirBusy naming that process (pid, host, start time). Idempotent within a process."""
        key = self.path.resolve()
        if key in _held:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._busy() from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        _held[key] = fd

    def _busy(self) -> RunDirBusy:
        """The error for a run dir another process holds, naming it from its lock file."""
        try:
            holder = (self.path / LOCK).read_text(errors="replace").strip()
        except OSError:
            holder = ""
        return RunDirBusy(f"{self.path} is in use by {holder or 'another process'}; wait for it to end, or give "
                          "another hydra.run.dir (hydra.sweep.dir for -m)")

    def is_completed(self) -> bool:
        """Whether results.json here says its run completed (read only: safe on read-only storage)."""
        return self.status() == "completed"

    def status(self) -> str | None:
        """results.json's status (None: none readable here), a ``running`` run that no live process holds shown
        as PROCESS_GONE (killed outright; the next launch resumes it)."""
        try:
            status = json.loads(self.results.read_text()).get("status")
        except (OSError, ValueError, AttributeError):
            return None
        return PROCESS_GONE if status == "running" and not self.held_elsewhere() else status

    def held_elsewhere(self) -> bool:
        """Whether another live process holds this run dir (a ``running`` run whose lock is free: gone)."""
        if self.path.resolve() in _held:
            return False
        try:
            fd = os.open(self.path / LOCK, os.O_RDONLY)
        except OSError:  # no lock file (a run from before locks, or none at all): nobody holds it
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also releases the shared lock taken to test it
        return False

    # --- before a run: skip, resume or start --------------------------------------------------------------

    def earlier_run(self, cfg: DictConfig) -> RunResults | None:
        """What an earlier launch left here: its results if it completed with this config (to skip), else None
        (start, or resume from last.pt). trainer.rerun=true first moves it all aside; another config's
        results.json, or any earlier run with trainer.resume=never, is a ConfigError."""
        if cfg.trainer.rerun and (aside := self.move_aside()) is not None:
            log.info("trainer.rerun=true: moved the earlier run in %s to %s", self.path, aside)
        earlier = self._earlier_results(cfg)
        return earlier if earlier is not None and earlier.data.get("status") == "completed" else None

    def launch_state(self, cfg: DictConfig) -> str:
        """What launching ``cfg`` here would do, found without changing anything (a sweep's plan): ``new``,
        ``completed: skipped``, ``resumes after epoch k``, ``starts again (...)`` for an earlier run that ended
        before its first checkpoint, or ``new (trainer.rerun=true moves the earlier run aside)``. Raises the
        ConfigError the launch would raise (another config's run here, trainer.resume=never over a run)."""
        if self.held_elsewhere():
            raise self._busy()
        if cfg.trainer.rerun and self._leftovers():
            return "new (trainer.rerun=true moves the earlier run aside)"
        earlier = self._earlier_results(cfg)
        if earlier is not None and earlier.data.get("status") == "completed":
            return "completed: skipped"
        status = self.status() if earlier is not None else None  # PROCESS_GONE for a killed run
        if self.last.exists():
            try:
                saved = load_run_checkpoint(self.last, ("epoch", "config"), mmap=True)
            except ConfigError as e:
                raise ConfigError(f"{e}; {RERUN_HINT}") from None
            check_resumable(saved["config"], OmegaConf.to_container(cfg, resolve=True), self.last)
            return f"resumes after epoch {saved['epoch']}" + (f" ({status})" if status else "")
        if earlier is not None:
            return f"starts again ({status} before its first checkpoint)"
        return "new"

    def _earlier_results(self, cfg: DictConfig) -> RunResults | None:
        """results.json of an earlier launch of this config here (None: none); ConfigError as earlier_run says."""
        found = [name for name in (RESULTS, LAST) if (self.path / name).exists()]
        if found and cfg.trainer.resume == "never":
            raise ConfigError(f"trainer.resume=never but {self.path} already holds a run ({found[0]}); use "
                              "trainer.resume=auto to continue it, or another hydra.run.dir (hydra.sweep.dir for -m)")
        if RESULTS not in found:
            return None
        try:
            earlier = RunResults.read(self.results, cfg.trainer.monitor)
        except ConfigError as e:
            if LAST in found:  # last.pt holds the history: the resume rewrites results.json from it
                log.warning("%s; resuming from %s, which holds the history", e, self.last)
                return None
            raise ConfigError(f"{e}; {RERUN_HINT}") from None
        check_resumable(earlier.data.get("config", {}), OmegaConf.to_container(cfg, resolve=True), self.results)
        return earlier

    def _leftovers(self) -> list[Path]:
        """What an earlier run left here: everything but Hydra's ``.hydra/`` and log, and the lock."""
        if not self.path.is_dir():
            return []
        return [p for p in self.path.iterdir() if p.name not in (".hydra", LOCK.name) and p.suffix != ".log"]

    def resumable_checkpoint(self, cfg: DictConfig) -> dict | None:
        """last.pt if the run is to continue from it (same config), else None."""
        if not self.last.exists():
            return None
        try:
            saved = load_run_checkpoint(self.last, ("model", "optimizer", "scaler", "history", "epoch", "config"))
        except ConfigError as e:
            raise ConfigError(f"{e}; {RERUN_HINT}") from None
        check_resumable(saved["config"], OmegaConf.to_container(cfg, resolve=True), self.last)
        return saved

    def check_same_data(self, recorded: dict, split: dict) -> None:
        """Refuse to resume on other data than the run started with: the training split's and the validation
        list's sha256 (``split``, as get_datasets records it) against ``recorded`` (last.pt's). The same data
        moved to another data.root resumes."""
        for key, what in (("sha256", "training split"), ("val_sha256", "validation list")):
            if key in recorded and recorded[key] != split[key]:
                raise ConfigError(f"the data changed since {self.path} started: its {what} (sha256 "
                                  f"{split[key][:12]}) is not the one it trained on ({recorded[key][:12]}); give a "
                                  f"new hydra.run.dir, or {RERUN_HINT}")

    def clean_up_after_kill(self, results: RunResults, saved: dict) -> None:
        """On resume from ``saved`` (last.pt, its history already in ``results``): delete the temp files of writes
        a kill cut short, and make best.pt agree with that history (a kill between last.pt's and best.pt's
        writes left best.pt one best behind: rewrite it from last.pt's weights)."""
        folders = [self.path, self.last.parent, self.path / PREDICTIONS, *(self.path / PREDICTIONS).glob("*/")]
        for folder in folders:
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
        best_epoch = results.data["best_epoch"]
        if best_epoch is None or self._best_epoch() == best_epoch:
            return
        if best_epoch != saved["epoch"]:  # its weights were only ever in best.pt
            raise ConfigError(f"{self.best} does not hold the best epoch ({best_epoch}) that {self.last} names, and "
                              f"{self.last} is of epoch {saved['epoch']}: those weights are lost; {RERUN_HINT}")
        if self.best.exists():
            log.warning("%s is damaged or behind %s: rewriting it from %s", self.best, self.last, self.last)
        self.save_best(BestWeights(best_epoch, {"model": saved["model"], **_run_record(results, best_epoch),
                                                "metrics": results.data["best"]}))

    def _best_epoch(self) -> int | None:
        """best.pt's epoch; None when there is none or it cannot be read (a truncated file)."""
        if not self.best.exists():
            return None
        try:
            return load_checkpoint(self.best, mmap=True)["epoch"]
        except (ConfigError, KeyError, TypeError):
            return None

    def move_aside(self) -> Path | None:
        """Move what an earlier run left here into ``<run_dir>.old-<time>/`` beside it (kept, never deleted);
        Hydra's ``.hydra/`` and log, already rewritten for this launch, and the lock stay. Returns the new folder."""
        run_dir, old = self.path, self._leftovers()
        if not old:
            return None
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            aside, n = aside.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
        aside.mkdir(parents=True)
        for p in old:
            shutil.move(str(p), aside / p.name)
        return aside

    # --- what each evaluated epoch leaves -------------------------------------------------------------------

    def write_per_image(self, ids: list[str], counts, epoch: int) -> None:
        """per_image.npz: each val image's per-class intersection and union at ``epoch``."""
        write_per_image(self.path / PER_IMAGE, ids, counts, epoch)

    def write_prediction(self, image_id: str, epoch: int, image, truth, pred) -> None:
        """Save one val image's prediction at ``epoch``; its image.png and truth.png the first time only."""
        folder = self.path / PREDICTIONS / image_id
        if not (folder / "image.png").exists():
            write_rgb_png(folder / "image.png", image)
        if not (folder / "truth.png").exists():
            write_label_png(folder / "truth.png", truth)
        write_label_png(prediction_png(self.path, image_id, epoch), pred)

    def write_prediction_index(self, index: dict) -> None:
        """predictions/index.json: the fixed images, the best epoch, its best and worst image."""
        write_json(self.path / PREDICTIONS / "index.json", index)

    # --- checkpoints ----------------------------------------------------------------------------------------

    def save_checkpoints(self, results: RunResults, training: dict | None, best: BestWeights | None) -> None:
        """At a checkpoint: last.pt from ``training`` (its state dicts with the history and config: all that
        resuming needs; None: no last.pt this time) and best.pt from ``best`` (the weights of the best epoch so
        far, kept since it happened; None: unchanged since the last best.pt).

        A best.pt of an earlier epoch goes first: last.pt's history names that epoch as the best, so a kill
        between the two must not leave last.pt ahead of it. A best.pt of this very epoch goes after last.pt: a
        kill between them leaves a last.pt whose history names the new best, from which
        ``clean_up_after_kill`` rewrites best.pt on resume."""
        epoch = results.history[-1]["epoch"]
        if best is not None and best.epoch < epoch:
            self.save_best(best)
        if training is not None:
            save_checkpoint(self.last, {**training, **_run_record(results), "history": results.history})
        if best is not None and best.epoch == epoch:
            self.save_best(best)

    def save_best(self, best: BestWeights) -> None:
        """best.pt: the best epoch's weights with its config, split and metrics."""
        save_checkpoint(self.best, best.record)

    def remove_last(self) -> None:
        """Delete last.pt (a completed run is never resumed; best.pt holds the weights)."""
        self.last.unlink(missing_ok=True)

    # --- failures -------------------------------------------------------------------------------------------

    def record_failure(self, cfg: DictConfig, message: str) -> None:
        """Mark results.json failed with ``message``, writing a minimal one if set-up failed before there was
        one. A completed run's results.json, another config's, or one another live process holds is never
        touched."""
        if self.held_elsewhere():
            return
        if self.results.exists():
            data = _or_none(lambda: json.loads(self.results.read_text()))
            if not isinstance(data, dict) or data.get("status") == "completed" or not _same_run(data, cfg):
                return
        else:
            config = _or_none(lambda: OmegaConf.to_container(cfg, resolve=True)) or _or_none(
                lambda: OmegaConf.to_container(cfg, resolve=False))
            data = {"cell": _or_none(lambda: cell_name(cfg)), "config": config}
        data.update(status="failed", error=message, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        try:
            write_json(self.results, data)
        except OSError:  # e.g. an unwritable run dir: the error line on stderr is all there is
            pass


def _or_none(compute) -> Any:
    try:
        return compute()
    except Exception:  # a config too broken to say more: the error line still says what went wrong
        return None


def _same_run(data: dict, cfg: DictConfig) -> bool:
    """Whether results.json ``data`` is of this config's run (as resuming decides it)."""
    try:
        check_resumable(data.get("config") or {}, OmegaConf.to_container(cfg, resolve=True), Path())
    except (ValueError, OmegaConfBaseException):  # another config (ConfigError), or one that does not resolve
        return False
    return True
