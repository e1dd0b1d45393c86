"""`loss.class_weights`: per-class weights of the loss from the training split's pixel counts.

The counts (pixels of each class over the split's masks, 255 ignored) are read once and cached as JSON beside
the split manifest (``<manifest>.class_counts.json``), recomputed when the manifest's sha256 changes. The
formulas are pure functions of the counts. Every formula is scale-free (counts times a constant give the same
weights), and the weighted mean loss is too (a common factor of the weights cancels), so the number of
repeats or the image size does not change the loss.

A class with no pixel in the split would get an infinite weight: it gets the largest weight of the classes
that do occur instead (it is at least as rare as the rarest seen class), so the weights stay finite and its
pixels still count in the validation loss.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from deeplab_dropout.data.voc import DatasetError, VOCSegmentation, read_mask
from deeplab_dropout.results import write_json

log = logging.getLogger("deeplab_dropout")


def _fill_absent(weights: np.ndarray, counts: np.ndarray) -> np.ndarray:
    # Classes with zero pixels take the largest weight of the present ones (see the module docstring).
    present = counts > 0
    out = np.where(present, weights, 0.0)
    out[~present] = out[present].max()
    return out


def _frequencies(counts) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or (c < 0).any() or c.sum() <= 0:
        raise ValueError(f"class pixel counts must be non-negative with a positive total, got {c.tolist()}")
    return c, c / c.sum()


def inverse_frequency(counts) -> np.ndarray:
    """w_i = Σ_j c_j / (K · c_i) for K classes: 1 for every class when all are equally frequent
    (scikit-learn's "balanced" weights)."""
    c, f = _frequencies(counts)
    with np.errstate(divide="ignore"):
        return _fill_absent(1.0 / (len(c) * f), c)


def log_inverse_frequency(counts) -> np.ndarray:
    """The VOC 2007 course report's eq. (3), w_i = log(1 / (max_j f_j · f_i)) with f_i = c_i / Σ_j c_j.

    The report writes log(Σ_j c_j / (max_j c_j · c_i)) over pixel counts; with counts in pixels that is this
    value minus log Σ_j c_j, negative for any real dataset (a negative weight rewards errors). Its text
    normalises "from 0 to 1" first, i.e. uses frequencies: then w_i >= 0, larger for rarer classes, and 0
    only for a class holding every pixel.
    """
    c, f = _frequencies(counts)
    with np.errstate(divide="ignore"):
        return _fill_absent(-np.log(f.max()) - np.log(f), c)


def weights_from_counts(counts, formula: str) -> np.ndarray:
    """The weights of ``formula`` (one of FORMULAS) from per-class pixel counts."""
    weights = {"inverse_frequency": inverse_frequency, "log_inverse_frequency": log_inverse_frequency}[formula](
        counts)
    if not weights.any():  # every pixel in one class: the log formula gives 0 everywhere, a 0/0 loss
        raise ValueError(f"{formula} weights are all 0: the counts {list(counts)} hold a single class")
    return weights


def count_pixels(mask_paths, num_classes: int) -> np.ndarray:
    """Pixels of each class 0..num_classes-1 over the masks (each path as often as listed; 255 not counted)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for path, times in Counter(map(str, mask_paths)).items():  # decode a repeated mask once
        counts += times * np.bincount(read_mask(path).ravel(), minlength=256)[:num_classes]
    return counts


def counts_path(manifest: str | Path) -> Path:
    """Where the pixel counts of a split manifest are cached: beside it, ``<name>.class_counts.json``."""
    manifest = Path(manifest)
    return manifest.with_name(f"{manifest.stem}.class_counts.json")


def cached_counts(manifest: str | Path, train_ds: VOCSegmentation, num_classes: int) -> np.ndarray:
    """Per-class pixel counts over the masks of the ids a split manifest lists (as often as it lists them),
    read from ``counts_path(manifest)`` while it matches the manifest's sha256, else counted and cached."""
    try:
        listed = json.loads(Path(manifest).read_text())
        sha, ids = listed["sha256"], listed["ids"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"unreadable split manifest: {manifest} ({e})") from None
    cache = counts_path(manifest)
    try:
        saved = json.loads(cache.read_text())
        if saved["manifest_sha256"] == sha and len(saved["counts"]) == num_classes:
            return np.asarray(saved["counts"], dtype=np.int64)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or unreadable: count below
    counts = count_pixels([train_ds.mask_path(i) for i in ids], num_classes)
    write_json(cache, {"manifest": Path(manifest).name, "manifest_sha256": sha, "n_images": len(ids),
                       "counts": counts.tolist()})
    return counts


def class_weights(cfg, train_ds: VOCSegmentation | None = None, manifest: str | Path | None = None
                  ) -> list[float] | None:
    """The weights ``loss.class_weights`` asks for (None: unweighted), one per class of model.num_classes.
    Without ``train_ds``/``manifest`` the training split is looked up from ``cfg.data`` (e.g. in the eval app)."""
    spec = cfg.loss.get("class_weights")
    if spec is None or spec == "none":
        return None
    if not isinstance(spec, str):  # a list, checked by config.validate
        return [float(w) for w in spec]
    if train_ds is None or manifest is None:
        from deeplab_dropout.data import get_datasets

        train_ds, _, split = get_datasets(cfg.data)
        manifest = split["manifest"]
    counts = cached_counts(manifest, train_ds, int(cfg.model.num_classes))
    try:
        weights = weights_from_counts(counts, spec).tolist()
    except ValueError as e:
        raise DatasetError(f"loss.class_weights={spec} cannot weight the split {manifest}: {e}") from None
    log.info("loss.class_weights=%s (pixel counts in %s): %s", spec, counts_path(manifest),
             " ".join(f"{w:.3g}" for w in weights))
    return weights
