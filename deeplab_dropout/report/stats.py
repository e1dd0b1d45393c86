"""Statistics for the report: a mean's t-interval over seeds, and ΔmIoU against `none` by paired bootstrap.

``paired_bootstrap`` resamples the validation images with replacement (and, with several training seeds,
the seeds too: two-level, one image resample per replicate shared by every seed, as there is one val set).
It is paired: the cell and the base run are scored on the same resample, so the image-to-image difficulty
that both runs share cancels and the interval reflects only how they differ. The statistic is the dataset
mIoU (per-class IoU from intersection/union counts summed over the drawn images), the standard VOC
measure; the mean of per-image mIoUs weights a few pixels of a class like a whole image of it and is a
different quantity. The interval is the percentile one: it assumes no normality or symmetry for a
difference of two bounded ratios, stays within their range, and is exactly [0, 0] for identical runs.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import torch

from deeplab_dropout.metrics import miou_from_counts

# Two-sided 95% Student t quantiles for 1..30 degrees of freedom (beyond: the normal 1.96).
T95 = [12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
       2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
       2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272]


class PerImageLike(Protocol):
    """What the bootstrap reads from a run's per-image record (``results.PerImage`` fits)."""

    @property
    def ids(self) -> Sequence[str]: ...

    @property
    def counts(self) -> np.ndarray: ...


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% t-interval (None for a single value)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, None
    t = T95[len(values) - 2] if len(values) - 1 <= len(T95) else 1.96
    return m, t * statistics.stdev(values) / math.sqrt(len(values))


def _counts(run: PerImageLike, where: str) -> np.ndarray:
    """The run's counts as int64 (N, K, 2), checked against its ids."""
    counts = np.asarray(run.counts)
    ids = list(run.ids)
    if counts.ndim != 3 or counts.shape[2] != 2 or counts.shape[0] != len(ids):
        raise ValueError(f"{where}: counts shape {counts.shape} is not (N={len(ids)}, K, 2)")
    if not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
        raise ValueError(f"{where}: counts must be non-negative integers (got dtype {counts.dtype})")
    return counts.astype(np.int64)


def _aligned(cell: Mapping[int, PerImageLike], base: Mapping[int, PerImageLike],
             seeds: list[int]) -> tuple[list[str], np.ndarray]:
    """The common image ids (the first seed's cell order) and counts (N, S, 2 = cell/base, K, 2) in it. Runs
    whose lists repeat an image (data.val_list=per_class) pair by position and must list the same ids in the
    same order."""
    ref = list(cell[seeds[0]].ids)
    position = {image: i for i, image in enumerate(ref)}
    repeats = len(position) != len(ref)
    stacked, k = [], None
    for seed in seeds:
        for name, run in (("cell", cell[seed]), ("base", base[seed])):
            counts = _counts(run, f"{name} seed {seed}")
            if k is not None and counts.shape[1] != k:
                raise ValueError(f"{name} seed {seed}: K = {counts.shape[1]} classes, expected {k}")
            k = counts.shape[1]
            if repeats or len(set(run.ids)) != len(run.ids):
                if list(run.ids) != ref:
                    raise ValueError(f"{name} seed {seed}: its image ids repeat or those of cell seed {seeds[0]} "
                                     "do, and the two lists differ (runs of data.val_list=per_class pair by "
                                     "position: every run must list the same images in the same order)")
                stacked.append(counts)
                continue
            unmatched = len(set(run.ids) ^ position.keys())
            if unmatched:
                raise ValueError(f"{name} seed {seed}: {unmatched} image ids unmatched with cell seed "
                                 f"{seeds[0]} (every run must cover the same validation images)")
            order = np.empty(len(ref), dtype=np.int64)
            order[[position[i] for i in run.ids]] = np.arange(len(ref))
            stacked.append(counts[order])
    return ref, np.stack(stacked, axis=1).reshape(len(ref), len(seeds), 2, k, 2)


def _draw_weights(rng: np.random.Generator, n_boot: int, n: int) -> np.ndarray:
    """(B, N) float64: how many times each image is drawn in each of B resamples of N with replacement."""
    drawn = rng.integers(0, n, size=(n_boot, n))
    flat = (np.arange(n_boot)[:, None] * n + drawn).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def _miou(summed: np.ndarray) -> np.ndarray:
    """mIoU over K of (..., K, 2) summed intersection/union counts."""
    t = torch.from_numpy(summed)
    return miou_from_counts(t[..., 0], t[..., 1]).numpy()


def _resampled_delta(counts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B, S) mIoU_cell − mIoU_base of each seed on each weighted resample."""
    n = counts.shape[0]
    # Integer counts below 2**53 in float64: the matmul's products and sums are exact (and BLAS-fast).
    summed = (weights @ counts.reshape(n, -1).astype(np.float64)).reshape(len(weights), *counts.shape[1:])
    miou = _miou(summed)
    return miou[..., 0] - miou[..., 1]


def _check_args(n_boot: int, level: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise ValueError(f"paired_bootstrap: n_boot must be an integer >= 1, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"paired_bootstrap: level must be in (0, 1), got {level!r}")


def paired_bootstrap(cell: Mapping[int, PerImageLike], base: Mapping[int, PerImageLike], n_boot: int = 2000,
                     seed: int = 0, level: float = 0.95) -> dict:
    """ΔmIoU = dataset mIoU(cell) − mIoU(base), paired by training seed and image id, with a percentile CI.

    Random draws, from one ``np.random.default_rng(seed)``: first the images (B, N) indices, then, with
    several seeds, the seeds (B, S) indices. Replicates whose Δ* is NaN (no class present in a resample)
    are left out of the percentiles; ``n_nan`` counts them.
    """
    _check_args(n_boot, level)
    seeds = sorted(set(cell) & set(base))
    if not seeds:
        raise ValueError(f"paired_bootstrap: no training seed in common: cell {sorted(cell)}, base {sorted(base)}")
    ids, counts = _aligned(cell, base, seeds)
    full = _miou(counts.sum(0).astype(np.float64))  # (S, 2)
    delta = float(np.mean(full[:, 0] - full[:, 1]))
    rng = np.random.default_rng(seed)
    per_seed = _resampled_delta(counts, _draw_weights(rng, n_boot, len(ids)))  # (B, S)
    if len(seeds) == 1:
        star = per_seed[:, 0]
    else:
        drawn = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
        star = np.take_along_axis(per_seed, drawn, axis=1).mean(1)
    valid = star[~np.isnan(star)]
    if valid.size:
        lo, hi = (float(v) for v in np.percentile(valid, [50 * (1 - level), 50 * (1 + level)]))
    else:
        lo = hi = math.nan
    return {"delta": delta, "ci": [lo, hi], "excludes_zero": bool(lo > 0 or hi < 0),
            "seeds": [int(s) for s in seeds], "n_images": len(ids), "n_boot": int(n_boot), "level": float(level),
            "method": "images" if len(seeds) == 1 else "seeds+images", "n_nan": int(star.size - valid.size)}
