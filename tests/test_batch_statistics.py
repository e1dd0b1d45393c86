"""The authors' validation batching recorded at every evaluated epoch: per-batch mean mIoU and loss over
consecutive groups of trainer.batch_size validation images (the last one partial), whatever the evaluation's
own batch size, and the best epoch by their mean (trainer.monitor=batch_miou_mean)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_cfg

from deeplab_dropout import train as train_mod
from deeplab_dropout.engine import Evaluation, batch_statistics
from deeplab_dropout.loss import Criterion
from deeplab_dropout.report.tables import best_values
from deeplab_dropout.results import read_per_image
from deeplab_dropout.rundir import RunResults


def evaluation(image_miou, image_loss, image_pixels) -> Evaluation:
    return Evaluation({}, torch.zeros(len(image_miou), 21, 2), image_miou, image_loss, image_pixels, {}, 0.0)


def test_groups_of_the_batch_size_in_order_with_a_partial_last_one():
    ev = evaluation([0.5, math.nan, 0.25, 1.0, 0.75], [2.0, 4.0, 6.0, 8.0, 10.0], [10.0, 20.0, 30.0, 40.0, 50.0])
    averaged = Criterion(batch_average=True, batch_size=2)
    out = batch_statistics(ev, 2, averaged)
    # Groups [0, 1], [2, 3], [4]; an image without valid pixels (NaN) is left out of its group's mean.
    assert out["batch_miou"] == [0.5, 0.625, 0.75]
    # Each group's pixel mean, divided by the group's own size (the last batch has 1 image).
    assert out["batch_loss"] == pytest.approx([6.0 / 30 / 2, 14.0 / 70 / 2, 10.0 / 50 / 1])
    plain = batch_statistics(ev, 2, Criterion(batch_average=False, batch_size=2))["batch_loss"]
    assert plain == pytest.approx([6.0 / 30, 14.0 / 70, 10.0 / 50])
    assert batch_statistics(ev, 2, None)["batch_loss"] == []
    only_void = batch_statistics(evaluation([math.nan, math.nan, 0.5], [], []), 2, averaged)
    assert only_void == {"batch_miou": [None, 0.5], "batch_loss": []}


def test_batch_of_one_is_the_per_image_mious():
    values = [0.1, 0.7, 0.4]
    assert batch_statistics(evaluation(values, [], []), 1, None)["batch_miou"] == values


def test_monitor_batch_miou_mean_picks_the_best_mean_of_batch_means():
    results = RunResults("unused.json", cell="none", config={}, split={}, monitor="batch_miou_mean")
    for epoch, batches in ((1, [0.2, 0.4]), (2, [0.5, None, 0.3]), (3, [0.35, 0.35])):
        results.add_epoch({"epoch": epoch, "miou": 0.0, "batch_miou": batches}, write=False)
    assert results.data["best_epoch"] == 2 and results.best_value() == pytest.approx(0.4)


def per_image_miou(counts: np.ndarray) -> list[float]:
    """Each image's mIoU from its (K, 2) counts: classes with an empty union left out (recomputed here)."""
    out = []
    for image in counts.astype(float):
        present = image[:, 1] > 0
        out.append(float(np.mean(image[present, 0] / image[present, 1])) if present.any() else math.nan)
    return out


def test_recorded_batches_follow_the_training_batch_size_not_the_evaluations(voc_root, tmp_path):
    runs = {}
    for val_bs in (1, 4):
        cfg = tiny_cfg(voc_root, "trainer.epochs=1", "trainer.max_train_steps=2", "trainer.batch_size=4",
                       f"trainer.val_batch_size={val_bs}")
        train_mod.run(cfg, tmp_path / str(val_bs))
        runs[val_bs] = json.loads((tmp_path / str(val_bs) / "results.json").read_text())["history"][0]
    assert runs[1]["batch_miou"] == pytest.approx(runs[4]["batch_miou"], abs=1e-12)
    assert runs[1]["batch_loss"] == pytest.approx(runs[4]["batch_loss"], rel=1e-6)
    # The same groups recounted from the per-image record: 6 val images in batches of 4 (the last has 2).
    mious = per_image_miou(read_per_image(tmp_path / "4" / "per_image.npz").counts)
    expected = [float(np.nanmean(mious[i:i + 4])) for i in range(0, len(mious), 4)]
    assert len(mious) == 6 and runs[4]["batch_miou"] == pytest.approx(expected, abs=1e-12)
    assert len(runs[4]["batch_loss"]) == 2 and all(v > 0 for v in runs[4]["batch_loss"])


def test_batches_of_one_image_report_the_image_statistics_but_the_stds_ddof(voc_root, tmp_path):
    # With trainer.batch_size=1 each batch is one image: the report's batch columns are its image columns,
    # except that describe()'s std has ddof 1 where the per-image std is the population's.
    cfg = tiny_cfg(voc_root, "trainer.epochs=1", "trainer.max_train_steps=2", "trainer.batch_size=1",
                   "model.pool_norm=none")
    train_mod.run(cfg, tmp_path)
    run = json.loads((tmp_path / "results.json").read_text())
    image, batch = best_values(run, "image"), best_values(run, "batch")
    for key in ("mean", "min", "median", "max"):
        assert batch[key] == pytest.approx(image[key], abs=1e-12), key
    n = sum(m is not None for m in run["best"]["batch_miou"])
    assert n > 1 and batch["std"] == pytest.approx(image["std"] * math.sqrt(n / (n - 1)), rel=1e-9)
