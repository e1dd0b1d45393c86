"""SegmentationMetrics against an independent brute-force computation (plain numpy, per-class TP/FP/FN)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deeplab_dropout.metrics import SegmentationMetrics, iou_from_counts, miou_from_counts

K, IGNORE = 21, 255


def brute_force_iou(pred: np.ndarray, target: np.ndarray) -> list[float]:
    """IoU per class from explicit TP/FP/FN counts; NaN for a class absent from truth and prediction."""
    valid = target != IGNORE
    p, t = pred[valid], target[valid]
    out = []
    for c in range(K):
        tp = np.sum((p == c) & (t == c))
        fp = np.sum((p == c) & (t != c))
        fn = np.sum((p != c) & (t == c))
        out.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
    return out


def random_batch(rng: np.random.Generator, n: int, h: int, w: int, classes: list[int]):
    """Random label maps over a subset of classes, ~10% ignore, predictions right ~60% of the time."""
    target = rng.choice(classes, size=(n, h, w))
    target[rng.random((n, h, w)) < 0.1] = IGNORE
    pred = np.where(rng.random((n, h, w)) < 0.6, np.where(target == IGNORE, 0, target),
                    rng.choice(classes + [classes[0] + 1], size=(n, h, w)))
    return pred, target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    # A subset of classes so that some are absent from truth, and one that appears only in predictions.
    classes = sorted(rng.choice(np.arange(K - 1), size=7, replace=False).tolist())
    metrics = SegmentationMetrics(K, IGNORE)
    preds, targets = [], []
    for _ in range(3):
        pred, target = random_batch(rng, 4, 17, 23, classes)
        metrics.update(torch.from_numpy(pred), torch.from_numpy(target))
        preds.append(pred)
        targets.append(target)
    pred, target = np.concatenate(preds), np.concatenate(targets)
    out = metrics.compute()

    expected_iou = brute_force_iou(pred, target)
    for got, want in zip(out["class_iou"], expected_iou, strict=True):
        if math.isnan(want):
            assert got is None
        else:
            assert got == pytest.approx(want, abs=1e-12)
    assert out["miou"] == pytest.approx(np.nanmean(expected_iou), abs=1e-12)
    valid = target != IGNORE
    assert out["pixel_acc"] == pytest.approx(np.mean(pred[valid] == target[valid]), abs=1e-12)

    per_image = np.array([np.nanmean(brute_force_iou(p, t)) for p, t in zip(pred, target, strict=True)])
    stats = out["per_image_miou"]
    assert stats["mean"] == pytest.approx(per_image.mean(), abs=1e-12)
    assert stats["std"] == pytest.approx(per_image.std(), abs=1e-12)
    assert stats["min"] == pytest.approx(per_image.min(), abs=1e-12)
    assert stats["median"] == pytest.approx(np.median(per_image), abs=1e-12)
    assert stats["max"] == pytest.approx(per_image.max(), abs=1e-12)
    np.testing.assert_allclose(metrics.image_miou.numpy(), per_image, atol=1e-12)


def test_perfect_and_all_ignored_images():
    target = torch.tensor([[[0, 1], [1, 2]], [[IGNORE, IGNORE], [IGNORE, IGNORE]]])
    metrics = SegmentationMetrics(K, IGNORE)
    metrics.update(target.clamp(max=K - 1), target)
    out = metrics.compute()
    assert out["miou"] == 1.0 and out["pixel_acc"] == 1.0
    assert sum(v is not None for v in out["class_iou"]) == 3
    # The all-ignored image has no mIoU and does not enter the statistics.
    assert math.isnan(metrics.image_miou[1].item())
    assert out["per_image_miou"]["min"] == 1.0 and out["per_image_miou"]["std"] == 0.0


def test_accumulation_equals_one_big_update():
    rng = np.random.default_rng(5)
    pred, target = random_batch(rng, 6, 9, 11, [0, 3, 7, 15])
    once, split = SegmentationMetrics(), SegmentationMetrics()
    once.update(torch.from_numpy(pred), torch.from_numpy(target))
    for i in range(6):
        split.update(torch.from_numpy(pred[i]), torch.from_numpy(target[i]))
    assert torch.equal(once.confusion, split.confusion)
    assert once.compute() == split.compute()


def test_bad_inputs_rejected():
    metrics = SegmentationMetrics()
    with pytest.raises(ValueError, match="shape"):
        metrics.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="target labels"):
        metrics.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 30))


def test_image_counts_match_brute_force_and_give_compute_exactly():
    rng = np.random.default_rng(7)
    pred, target = random_batch(rng, 5, 13, 17, [0, 2, 9, 14])
    metrics = SegmentationMetrics(K, IGNORE)
    metrics.update(torch.from_numpy(pred[:2]), torch.from_numpy(target[:2]))
    metrics.update(torch.from_numpy(pred[2:]), torch.from_numpy(target[2:]))
    counts = metrics.image_counts
    assert counts.dtype == torch.int64 and counts.shape == (5, K, 2)
    for i in range(5):
        valid = target[i] != IGNORE
        p, t = pred[i][valid], target[i][valid]
        for c in range(K):
            tp = np.sum((p == c) & (t == c))
            assert counts[i, c].tolist() == [tp, np.sum(p == c) + np.sum(t == c) - tp]
    out = metrics.compute()
    # What a reader of per_image.npz computes (int32 counts, summed over images) equals compute() bit for bit.
    saved = counts.numpy().astype(np.int32)
    inter, union = saved[..., 0].sum(0), saved[..., 1].sum(0)
    assert miou_from_counts(inter, union).item() == out["miou"]
    assert [None if math.isnan(v) else v for v in iou_from_counts(inter, union).tolist()] == out["class_iou"]
    per_image = miou_from_counts(saved[..., 0], saved[..., 1])
    assert per_image.mean().item() == out["per_image_miou"]["mean"]
    assert SegmentationMetrics().image_counts.shape == (0, K, 2)
