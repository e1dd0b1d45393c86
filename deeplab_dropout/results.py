"""The file formats a run leaves, each written atomically: JSON (NaN as null), the per-image record
(per_image.npz), label-map and RGB PNGs, and checkpoints (loaded with ``weights_only=True``).

torch and PIL are imported only by the functions that need them, so the data tools can write JSON through
here cheaply.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from deeplab_dropout.config import ConfigError, one_line

LAST, BEST = Path("checkpoints/last.pt"), Path("checkpoints/best.pt")  # in the run dir
PER_IMAGE = Path("per_image.npz")  # in the run dir, beside results.json
PREDICTIONS = Path("predictions")  # in the run dir: <image id>/{image,truth,epoch_NNN}.png and index.json


@cache
def _umask() -> int:
    old = os.umask(0)  # the only way to read it
    os.umask(old)
    return old


def atomic_write(path: Path, write, durable: bool = False) -> None:
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
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if no_space(e) is not None:  # however the writer reported it (torch.save: a RuntimeError)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise


def no_space(error: BaseException) -> OSError | None:
    """The "no space left on device" OSError in ``error`` or the errors it was raised from, else None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        if "No space left on device" in str(error):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        error = error.__cause__ or error.__context__
    return None


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` if it exists, else its nearest existing parent (what a write there would create below)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_space(path: str | os.PathLike) -> str:
    """The space left on the file system holding ``path`` (its nearest existing folder), e.g. ``12.3 MiB``."""
    try:
        free = float(shutil.disk_usage(nearest_existing(path)).free)
    except OSError:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if free < 1024 or unit == "GiB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return f"{free:.1f} TiB"


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


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save ``state`` atomically (temp file + rename): a crash never leaves a half-written .pt."""
    import torch

    atomic_write(Path(path), lambda f: torch.save(state, f), durable=True)


def load_checkpoint(path: Path, map_location="cpu", mmap: bool = False) -> dict:
    """Load a checkpoint written by ``save_checkpoint`` (tensors and plain containers only; ``mmap``: tensors
    mapped from the file, read only when used); a missing file is FileNotFoundError, an unreadable one
    ConfigError."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # a truncated or foreign file: say which file, in one line
        reason = (str(e).strip().splitlines() or [""])[0]
        reason = reason if len(reason) <= 100 else ""  # torch's own explanations run to a paragraph
        raise ConfigError(f"{path} is not a readable checkpoint ({type(e).__name__}"
                          f"{': ' + reason if reason else ''}); give a checkpoints/best.pt or last.pt file") from e


def load_run_checkpoint(path: Path, keys: tuple[str, ...] = ("model", "config", "cell", "epoch"),
                        mmap: bool = False) -> dict:
    """A checkpoint written by deeplab-dropout-train holding ``keys``; anything else is one ConfigError line."""
    saved = load_checkpoint(path, mmap=mmap)
    missing = [k for k in keys if k not in (saved.keys() if isinstance(saved, dict) else ())]
    if missing:
        raise ConfigError(f"{path} is not a deeplab-dropout-train checkpoint (no {', '.join(missing)}); "
                          "move it away or use another run dir")
    return saved


