"""The one place that writes what a run leaves: results.json and checkpoints, both atomically.

torch is imported only by the checkpoint functions, so the data tools can write JSON through here cheaply.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

# Config keys that may change when a run is resumed (and that the report ignores when it groups runs into
# experiments): they don't change what is computed.
RESUME_FREE_KEYS = ("trainer.resume", "trainer.progress", "trainer.num_workers", "trainer.device", "data.root")


def atomic_write(path: Path, write) -> None:
    """Call ``write(file_object)`` on a temp file beside ``path``, then rename over it (no torn files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
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

    def finish(self, status: str, error: str | None = None) -> None:
        """Mark the run ``completed`` or ``failed`` (with the error message) and write."""
        self.data["status"] = status
        if error is not None:
            self.data["error"] = error
        self.data["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.write()

    def write(self) -> None:
        write_json(self.path, self.data)


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save ``state`` atomically (temp file + rename): a crash never leaves a half-written .pt."""
    import torch

    atomic_write(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint written by ``save_checkpoint`` (tensors and plain containers only)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which file, in one line
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
