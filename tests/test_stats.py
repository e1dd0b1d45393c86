"""report/stats.py against independent recomputations: plain-numpy mIoU sums, a slow per-replicate loop, t tables."""
from __future__ import annotations

import math
import statistics
from collections import namedtuple

import numpy as np
import pytest

from deeplab_dropout.report.stats import mean_ci, paired_bootstrap

# The shared per-image record's fields; the real results.PerImage is built elsewhere.
PerImage = namedtuple("PerImage", ["ids", "counts"])
K = 21


def numpy_miou(summed: np.ndarray) -> float:
    """mIoU of (K, 2) [intersection, union] sums: mean IoU over classes with a non-empty union."""
    inter, union = summed[:, 0].astype(float), summed[:, 1].astype(float)
    present = union > 0
    return float(np.mean(inter[present] / union[present])) if present.any() else math.nan


def random_run(rng: np.random.Generator, n: int = 60, k: int = K, ids: list[str] | None = None) -> PerImage:
    """Counts with ~30% of classes absent per image (union 0) and intersection <= union."""
    union = rng.integers(1, 400, size=(n, k)) * (rng.random((n, k)) > 0.3)
    inter = rng.binomial(union, rng.uniform(0.2, 0.9, size=(n, k)))
    ids = ids if ids is not None else [f"img{i:04d}" for i in range(n)]
    return PerImage(ids, np.stack([inter, union], axis=-1).astype(np.int32))


def improved(run: PerImage, rng: np.random.Generator) -> PerImage:
    """The same images with more true-positive pixels in every class that has room, unions unchanged."""
    inter, union = run.counts[..., 0], run.counts[..., 1]
    room = union - inter
    gain = np.minimum(room, rng.integers(1, 30, size=room.shape))
    assert (gain.sum(1) > 0).all()  # every image strictly better
    return PerImage(run.ids, np.stack([inter + gain, union], axis=-1).astype(np.int32))


def shuffled(run: PerImage, rng: np.random.Generator) -> PerImage:
    order = rng.permutation(len(run.ids))
    return PerImage([run.ids[i] for i in order], run.counts[order])


def test_cell_better_on_every_image():
    rng = np.random.default_rng(1)
    base = random_run(rng)
    cell = improved(base, rng)
    out = paired_bootstrap({0: cell}, {0: base}, n_boot=500)
    expected = numpy_miou(cell.counts.sum(0)) - numpy_miou(base.counts.sum(0))
    assert expected > 0
    assert out["delta"] == pytest.approx(expected, abs=1e-12)
    lo, hi = out["ci"]
    assert 0 < lo <= out["delta"] <= hi
    assert out["excludes_zero"] is True
    assert out | {"delta": 0, "ci": 0} == {"delta": 0, "ci": 0, "excludes_zero": True, "seeds": [0], "n_images": 60,
                                          "n_boot": 500, "level": 0.95, "method": "images", "n_nan": 0}
    assert all(type(v) is float for v in [out["delta"], lo, hi, out["level"]])


def test_identical_runs_give_zero():
    run = random_run(np.random.default_rng(2))
    out = paired_bootstrap({3: run, 4: run}, {3: run, 4: run}, n_boot=300)
    assert out["delta"] == 0.0
    assert out["ci"] == [0.0, 0.0]
    assert out["excludes_zero"] is False
    assert out["method"] == "seeds+images"


def test_same_seed_same_result_other_seed_other_ci():
    rng = np.random.default_rng(3)
    cell, base = random_run(rng), random_run(rng)
    first = paired_bootstrap({0: cell}, {0: base}, n_boot=400, seed=7)
    assert paired_bootstrap({0: cell}, {0: base}, n_boot=400, seed=7) == first
    other = paired_bootstrap({0: cell}, {0: base}, n_boot=400, seed=8)
    assert other["delta"] == first["delta"]  # the point estimate uses no randomness
    assert other["ci"] != first["ci"]


def test_base_image_order_does_not_matter():
    rng = np.random.default_rng(4)
    cell = {s: random_run(rng) for s in (0, 1)}
    base = {s: random_run(rng) for s in (0, 1)}
    out = paired_bootstrap(cell, base, n_boot=300)
    # Integer sums in float64 are exact, so reordering the rows changes nothing, not even the last bit.
    assert paired_bootstrap(cell, {s: shuffled(r, rng) for s, r in base.items()}, n_boot=300) == out
    # A second seed's cell run in another order is aligned by id too (one image resample shared by seeds).
    assert paired_bootstrap({0: cell[0], 1: shuffled(cell[1], rng)}, base, n_boot=300) == out


def test_two_seeds_point_estimate_and_pairing_by_seed():
    rng = np.random.default_rng(5)
    cell = {0: random_run(rng), 1: random_run(rng)}
    base = {0: random_run(rng), 1: random_run(rng)}
    full = {name: {s: numpy_miou(r.counts.sum(0)) for s, r in runs.items()}
            for name, runs in (("cell", cell), ("base", base))}
    out = paired_bootstrap(cell, base, n_boot=200)
    assert out["delta"] == pytest.approx(statistics.fmean(full["cell"][s] - full["base"][s] for s in (0, 1)),
                                         abs=1e-12)
    assert out["seeds"] == [0, 1] and out["method"] == "seeds+images"
    # Only seed 1 is in both; which base run carries seed 1 decides Δ.
    partial = paired_bootstrap(cell, {1: base[1], 2: base[0]}, n_boot=200)
    swapped = paired_bootstrap(cell, {1: base[0], 2: base[1]}, n_boot=200)
    assert partial["seeds"] == [1] and partial["method"] == "images"
    assert partial["delta"] == pytest.approx(full["cell"][1] - full["base"][1], abs=1e-12)
    assert swapped["delta"] == pytest.approx(full["cell"][1] - full["base"][0], abs=1e-12)
    # With both seeds paired, the mean of differences is the same either way, but the resampled pairs
    # (and so the CI) are not.
    crossed = paired_bootstrap(cell, {0: base[1], 1: base[0]}, n_boot=200)
    assert crossed["delta"] == pytest.approx(out["delta"], abs=1e-12)
    assert crossed["ci"] != out["ci"]


def test_two_level_matches_a_slow_loop_with_the_same_draws():
    rng = np.random.default_rng(6)
    seeds, n, n_boot, level = [2, 5, 9], 40, 25, 0.9
    cell = {s: random_run(rng, n) for s in seeds}
    base = {s: shuffled(random_run(rng, n), rng) for s in seeds}
    out = paired_bootstrap(cell, base, n_boot=n_boot, seed=11, level=level)
    # The documented draw order: images (B, N), then seeds (B, S), from one Generator.
    draws = np.random.default_rng(11)
    images = draws.integers(0, n, size=(n_boot, n))
    picked = draws.integers(0, len(seeds), size=(n_boot, len(seeds)))
    ref = cell[seeds[0]].ids
    by_id = {s: {name: dict(zip(run.ids, run.counts, strict=True)) for name, run in (("cell", cell[s]),
                                                                                      ("base", base[s]))}
             for s in seeds}
    star = []
    for b in range(n_boot):
        diffs = []
        for j in picked[b]:
            rows = by_id[seeds[j]]
            sums = {name: sum(rows[name][ref[i]].astype(np.int64) for i in images[b]) for name in rows}
            diffs.append(numpy_miou(sums["cell"]) - numpy_miou(sums["base"]))
        star.append(statistics.fmean(diffs))
    lo, hi = np.percentile(star, [5, 95])
    assert out["ci"] == pytest.approx([lo, hi], abs=1e-12)
    assert out["n_images"] == n and out["seeds"] == seeds and out["n_boot"] == n_boot


def test_noisy_zero_difference_ci_contains_zero():
    rng = np.random.default_rng(7)
    a, b = random_run(rng, 100), random_run(rng, 100)
    ids = [f"img{i:04d}" for i in range(200)]
    # Image 2i is a_i in the cell and b_i in the base, image 2i+1 the other way round: equal totals, and
    # relabelling 2i <-> 2i+1 maps every resample to one with -Δ*, so Δ* is symmetric about 0.
    cell = np.empty((200, K, 2), np.int32)
    cell[0::2], cell[1::2] = a.counts, b.counts
    base = np.empty_like(cell)
    base[0::2], base[1::2] = b.counts, a.counts
    out = paired_bootstrap({0: PerImage(ids, cell)}, {0: PerImage(ids, base)}, n_boot=1000, seed=3)
    assert out["delta"] == 0.0
    lo, hi = out["ci"]
    assert lo < 0 < hi and not out["excludes_zero"]


def test_coverage_of_a_known_difference():
    rng = np.random.default_rng(8)
    # A population of images; a dataset is 150 of them. Cell and base share each image's difficulty
    # (so pairing matters), the cell a little better; the true Δ is the population's mIoU difference.
    pool, k, n, reps = 4000, 3, 150, 200
    union = rng.integers(20, 300, size=(pool, k))
    difficulty = rng.beta(4, 3, size=(pool, k))
    make = {name: np.stack([rng.binomial(union, np.clip(difficulty + lift, 0, 1)), union], -1)
            for name, lift in (("cell", 0.03), ("base", 0.0))}
    truth = numpy_miou(make["cell"].sum(0)) - numpy_miou(make["base"].sum(0))
    ids = [str(i) for i in range(n)]
    deltas, covered, widths = [], 0, []
    for r in range(reps):
        pick = rng.integers(0, pool, size=n)
        out = paired_bootstrap({0: PerImage(ids, make["cell"][pick])}, {0: PerImage(ids, make["base"][pick])},
                               n_boot=300, seed=r)
        deltas.append(out["delta"])
        covered += out["ci"][0] <= truth <= out["ci"][1]
        widths.append(out["ci"][1] - out["ci"][0])
    # Binomial noise of the coverage (4 sd) plus 3 points for the percentile interval's small-sample bias.
    assert covered / reps >= 0.95 - 4 * math.sqrt(0.95 * 0.05 / reps) - 0.03
    # The CI's width matches the spread of Δ over datasets (sd estimated to ~5% from 200 values).
    ratio = statistics.fmean(widths) / (2 * 1.959964 * statistics.stdev(deltas))
    assert 0.8 < ratio < 1.25


def test_errors_name_the_problem():
    rng = np.random.default_rng(9)
    run = random_run(rng, 10)
    with pytest.raises(ValueError, match=r"no training seed in common: cell \[0, 1\], base \[2\]"):
        paired_bootstrap({0: run, 1: run}, {2: run})
    other = PerImage(run.ids[:8] + ["x", "y"], run.counts)
    with pytest.raises(ValueError, match="base seed 0: 4 image ids unmatched"):
        paired_bootstrap({0: run}, {0: other})
    with pytest.raises(ValueError, match="cell seed 1: 4 image ids unmatched"):
        paired_bootstrap({0: run, 1: other}, {0: run, 1: other})
    with pytest.raises(ValueError, match=r"base seed 0: counts shape \(10, 21\) is not \(N=10, K, 2\)"):
        paired_bootstrap({0: run}, {0: PerImage(run.ids, run.counts[..., 0])})
    with pytest.raises(ValueError, match=r"counts shape \(9, 21, 2\) is not \(N=10"):
        paired_bootstrap({0: PerImage(run.ids, run.counts[:9])}, {0: run})
    with pytest.raises(ValueError, match="base seed 0: K = 20 classes, expected 21"):
        paired_bootstrap({0: run}, {0: PerImage(run.ids, run.counts[:, :20])})
    with pytest.raises(ValueError, match="non-negative integers"):
        paired_bootstrap({0: run}, {0: PerImage(run.ids, run.counts * -1)})
    with pytest.raises(ValueError, match="base seed 0: its image ids repeat .* the two lists differ"):
        paired_bootstrap({0: PerImage(["a"] * 10, run.counts)}, {0: run})
    with pytest.raises(ValueError, match="n_boot must be an integer >= 1, got 0"):
        paired_bootstrap({0: run}, {0: run}, n_boot=0)
    for level in (0, 1, 1.5):
        with pytest.raises(ValueError, match=f"level must be in \\(0, 1\\), got {level}"):
            paired_bootstrap({0: run}, {0: run}, level=level)


def test_nan_replicates_are_left_out():
    # Image "e" has no pixels of any class: a resample of only "e" has no mIoU.
    ids = ["e", "f"]
    empty, full = np.zeros((K, 2), np.int32), np.zeros((K, 2), np.int32)
    full[0] = [5, 10]
    base = PerImage(ids, np.stack([empty, full]))
    cell = PerImage(ids, np.stack([empty, full + np.eye(K, 2, dtype=np.int32)[0] * 3]))
    out = paired_bootstrap({0: cell}, {0: base}, n_boot=400)
    assert 50 < out["n_nan"] < 150  # each replicate is all-"e" with probability 1/4
    assert out["ci"] == [pytest.approx(0.3), pytest.approx(0.3)] and out["delta"] == pytest.approx(0.3)


def test_mean_ci_t_interval():
    values = [1.0, 2.0, 3.0, 4.0]
    m, half = mean_ci(values)
    # t(0.975, df=3) = 3.182446; sample sd = sqrt(5/3).
    assert m == 2.5 and half == pytest.approx(3.182446 * math.sqrt(5 / 3) / 2, rel=1e-12)
    assert mean_ci([0.7]) == (0.7, None)
    two = mean_ci([1.0, 3.0])  # df=1: 12.706205 * sqrt(2) / sqrt(2)
    assert two == (2.0, pytest.approx(12.706205, rel=1e-12))
    many = [float(i % 5) for i in range(40)]  # df=39, past the table: the normal 1.96
    assert mean_ci(many)[1] == pytest.approx(1.96 * statistics.stdev(many) / math.sqrt(40), rel=1e-12)


def test_runs_listing_images_once_per_class_pair_by_position():
    # data.val_list=per_class repeats an image once per class it holds: identical lists pair position by
    # position, so the result equals that of the same counts under distinct ids.
    rng = np.random.default_rng(5)
    counts = [rng.integers(0, 50, size=(6, K, 2)).astype(np.int32) for _ in range(2)]
    for c in counts:
        c[..., 1] = np.maximum(c[..., 0], c[..., 1])
    repeated, distinct = ["a", "a", "b", "c", "c", "c"], [f"i{n}" for n in range(6)]
    out = paired_bootstrap({0: PerImage(repeated, counts[0])}, {0: PerImage(repeated, counts[1])}, n_boot=200)
    ref = paired_bootstrap({0: PerImage(distinct, counts[0])}, {0: PerImage(distinct, counts[1])}, n_boot=200)
    assert out == ref
    with pytest.raises(ValueError, match="the two lists differ"):
        paired_bootstrap({0: PerImage(repeated, counts[0])}, {0: PerImage(repeated[::-1], counts[1])})
