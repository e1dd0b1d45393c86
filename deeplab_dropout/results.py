"""The one place that writes what a run leaves: results.json, per_image.npz, the predictions/ PNGs and
checkpoints, all atomically, and that decides whether a checkpoint may be resumed.

torch and PIL are imported only by the functions that need them, so the data tools can write JSON through
here cheaply.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from deeplab_dropout.config import ConfigError, one_line

LAST, BEST = Path("checkpoints/last.pt"), Path("checkpoints/best.pt")  # in the run dir
PER_IMAGE = Path("per_image.npz")  # in the run dir, beside results.json
PREDICTIONS = Path("predictions")  # in the run dir: <image id>/{image,truth,epoch_NNN}.png and index.json
KILL_AT_ENV = "DEEPLAB_DROPOUT_KILL_AT"


def kill_point(point: str, n: int) -> None:
    """Test hook: SIGKILL this process here if $DEEPLAB_DROPOUT_KILL_AT is ``point:n``, so tests can kill a run
    at an exact moment: ``step:N`` before training iteration N (1-based, as results.json's ``iteration``),
    ``eval:E`` as evaluation of epoch E starts, ``ckpt:E`` in the write of epoch E's last.pt, after the temp
    file is written and before it is renamed over last.pt. Unset (always, outside tests) it does nothing."""
    if os.environ.get(KILL_AT_ENV) == f"{point}:{n}":
        os.kill(os.getpid(), signal.SIGKILL)


@cache
def _umask() -> int:
    old = os.umask(0)  # the only way to read it
    os.umask(old)
    return old


def atomic_write(path: Path, write, before_rename: Callable[[], None] | None = None, durable: bool = False) -> None:
    """Call ``write(file_object)`` on a temp file beside ``path``, then rename over it (no torn files: a killed
    process leaves the old file or the new one). ``durable``: fsync before the rename, so that the file also
    survives a power loss (checkpoints, which a resume rebuilds everything else from). The file gets the usual
    permissions under the user's umask (mkstemp alone would leave it 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_safe(value: Any) -> Any:
    # JSON has no NaN/inf: an undefined metric is null, so every reader parses the file.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically, NaN as null."""
    text = json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


class PerImage(NamedTuple):
    """per_image.npz: the val ids in evaluation order, their (N, K, 2) int32 [intersection, union] pixel
    counts per class, and the 1-based epoch they were counted at."""

    ids: list[str]
    counts: np.ndarray
    epoch: int


def write_per_image(path: Path, ids: list[str], counts, epoch: int) -> None:
    """Write ``path`` (per_image.npz) atomically: ``ids``, ``counts`` (N, K, 2) as int32, ``epoch``."""
    counts = np.asarray(counts)
    if counts.ndim != 3 or counts.shape[2] != 2 or counts.shape[0] != len(ids):
        raise ValueError(f"per-image counts for {path} must be ({len(ids)}, K, 2), got {counts.shape}")
    # int32 holds 2**31 pixels an image and class, far beyond any crop; checked rather than wrapped.
    if counts.size and (counts.min() < 0 or counts.max() > np.iinfo(np.int32).max):
        raise ValueError(f"per-image counts for {path} are outside [0, 2**31)")
    arrays = {"ids": np.array([str(i) for i in ids], dtype=np.str_), "counts": counts.astype(np.int32),
              "epoch": np.array(int(epoch))}
    atomic_write(Path(path), lambda f: np.savez(f, **arrays))


def read_per_image(path: Path) -> PerImage:
    """The per_image.npz at ``path``; a file without the expected keys and shapes is a one-line ValueError
    (a missing one FileNotFoundError)."""
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read {path}: {one_line(e)}") from e
    missing = sorted({"ids", "counts", "epoch"} - arrays.keys())
    if missing:
        raise ValueError(f"{path} is not a per-image record: no {', '.join(missing)}")
    ids, counts, epoch = arrays["ids"], arrays["counts"], arrays["epoch"]
    if ids.ndim != 1 or counts.ndim != 3 or counts.shape[0] != ids.shape[0] or counts.shape[2] != 2 \
            or not np.issubdtype(counts.dtype, np.integer) or epoch.shape != () \
            or not np.issubdtype(epoch.dtype, np.integer):
        raise ValueError(f"{path} is not a per-image record: ids {ids.shape}, counts {counts.shape} "
                         f"{counts.dtype}, epoch {epoch.shape} (expected (N,), (N, K, 2) integer, scalar)")
    return PerImage([str(i) for i in ids], counts.astype(np.int32), int(epoch))


def _write_png(path: Path, pil_image) -> None:
    atomic_write(Path(path), lambda f: pil_image.save(f, format="PNG"))


def write_label_png(path: Path, label) -> None:
    """An (H, W) label map (0..K-1, 255 = void) as a palette PNG in the VOC colours, atomically."""
    from PIL import Image

    from deeplab_dropout.data.voc import VOC_PALETTE

    label = np.asarray(label)
    if label.ndim != 2 or label.min(initial=0) < 0 or label.max(initial=0) > 255:
        raise ValueError(f"label map for {path} must be (H, W) in [0, 255], got {label.shape}")
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    img.putpalette(VOC_PALETTE)
    _write_png(path, img)


def write_rgb_png(path: Path, image) -> None:
    """A uint8 (3, H, W) image as an RGB PNG, atomically."""
    from PIL import Image

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image for {path} must be uint8 (3, H, W), got {image.dtype} {image.shape}")
    _write_png(path, Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), mode="RGB"))


def prediction_png(run_dir: Path, image_id: str, epoch: int) -> Path:
    """predictions/<image id>/epoch_<NNN>.png in ``run_dir`` (1-based epoch, 3 digits)."""
    return Path(run_dir) / PREDICTIONS / image_id / f"epoch_{epoch:03d}.png"


def write_prediction(run_dir: Path, image_id: str, epoch: int, image, truth, pred) -> None:
    """Save one val image's prediction at ``epoch``; its image.png and truth.png the first time only."""
    folder = Path(run_dir) / PREDICTIONS / image_id
    if not (folder / "image.png").exists():
        write_rgb_png(folder / "image.png", image)
    if not (folder / "truth.png").exists():
        write_label_png(folder / "truth.png", truth)
    write_label_png(prediction_png(run_dir, image_id, epoch), pred)


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
        """The value of ``monitor`` in a history entry (``per_image_miou_mean`` reads the nested dict)."""
        if monitor == "per_image_miou_mean":
            return entry["per_image_miou"]["mean"]
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


def save_checkpoint(path: Path, state: dict, before_rename: Callable[[], None] | None = None) -> None:
    """torch.save ``state`` atomically (temp file + rename): a crash never leaves a half-written .pt."""
    import torch

    atomic_write(Path(path), lambda f: torch.save(state, f), before_rename, durable=True)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint written by ``save_checkpoint`` (tensors and plain containers only); a missing file is
    FileNotFoundError, an unreadable one ConfigError."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which file, in one line
        raise ConfigError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def load_run_checkpoint(path: Path, keys: tuple[str, ...] = ("model", "config", "cell", "epoch")) -> dict:
    """A checkpoint written by deeplab-dropout-train holding ``keys``; anything else is one ConfigError line."""
    saved = load_checkpoint(path)
    missing = [k for k in keys if k not in (saved.keys() if isinstance(saved, dict) else ())]
    if missing:
        raise ConfigError(f"{path} is not a deeplab-dropout-train checkpoint (no {', '.join(missing)}); "
                          "move it away or use another run dir")
    return saved


def save_checkpoints(run_dir: Path, results: RunResults, training: dict | None, best: BestWeights | None) -> None:
    """At a checkpoint: LAST from ``training`` (its state dicts with the history and config: all that resuming
    needs; None: no LAST this time) and BEST from ``best`` (the weights of the best epoch so far, kept since it
    happened; None: unchanged since the last BEST).

    A BEST of an earlier epoch goes first: LAST's history names that epoch as the best, so a kill between the
    two must not leave LAST ahead of it. A BEST of this very epoch goes after LAST: a kill between them leaves
    a LAST whose history names the new best, from which ``repair_best`` rewrites BEST on resume."""
    epoch = results.history[-1]["epoch"]
    if best is not None and best.epoch < epoch:
        save_best(run_dir, best)
    if training is not None:
        save_checkpoint(run_dir / LAST, {**training, **_run_record(results), "history": results.history},
                        before_rename=lambda: kill_point("ckpt", epoch))
    if best is not None and best.epoch == epoch:
        save_best(run_dir, best)


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


def save_best(run_dir: Path, best: BestWeights) -> None:
    """BEST: the best epoch's weights with its config, split and metrics."""
    save_checkpoint(run_dir / BEST, best.record)


def repair_best(run_dir: Path, results: RunResults, saved: dict) -> None:
    """On resume from ``saved`` (LAST, its history already in ``results``): make BEST agree with that history.
    A kill between LAST's and BEST's writes left BEST one best behind; rewrite it from LAST's weights."""
    best_epoch = results.data["best_epoch"]
    if best_epoch is None or best_epoch != saved["epoch"]:
        return
    best = run_dir / BEST
    if not best.exists() or load_checkpoint(best)["epoch"] != best_epoch:
        save_best(run_dir, BestWeights(best_epoch, {"model": saved["model"], **_run_record(results, best_epoch),
                                                    "metrics": results.data["best"]}))


def remove_temp_files(run_dir: Path) -> None:
    """Delete the temp files killed writes left in the run dir, its checkpoints/ and predictions/ (never a
    finished file)."""
    folders = [run_dir, run_dir / LAST.parent, run_dir / PREDICTIONS, *(run_dir / PREDICTIONS).glob("*/")]
    for folder in folders:
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def move_aside(run_dir: Path) -> Path | None:
    """Move what an earlier run left in ``run_dir`` into ``<run_dir>.old-<time>/`` beside it (kept, never
    deleted); Hydra's ``.hydra/`` and log, already rewritten for this launch, stay. Returns the new folder."""
    old = [p for p in run_dir.iterdir() if p.name != ".hydra" and p.suffix != ".log"] if run_dir.is_dir() else []
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
