"""Generated VOC-format dataset: layout, determinism, VOC-like statistics, reuse and refusal to overwrite."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deeplab_dropout.data import DatasetError, VOCSegmentation, generate, read_split_ids, voc_dir
from deeplab_dropout.data import synth as synth_mod

SMALL = {"n_train": 40, "n_val": 8, "min_side": 48, "max_side": 72}


def _hashes(root: Path) -> dict[str, str]:
    vdir = voc_dir(root)
    return {str(p.relative_to(vdir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(vdir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ds40(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synth") / "a", seed=0, **SMALL)


@pytest.fixture(scope="module")
def masks40(ds40) -> dict[str, np.ndarray]:
    mdir = voc_dir(ds40) / "SegmentationClass"
    return {i: np.array(Image.open(mdir / f"{i}.png")) for i in read_split_ids(ds40, "trainval")}


def test_layout_like_voc(ds40):
    vdir = voc_dir(ds40)
    train, val = read_split_ids(ds40, "train"), read_split_ids(ds40, "val")
    assert len(train) == 40 and len(val) == 8 and not set(train) & set(val)
    assert read_split_ids(ds40, "trainval") == train + val
    assert sorted(p.stem for p in (vdir / "JPEGImages").glob("*.jpg")) == sorted(train + val)
    assert sorted(p.stem for p in (vdir / "SegmentationClass").glob("*.png")) == sorted(train + val)
    params = json.loads((vdir / "synth.json").read_text())
    assert params["seed"] == 0 and params["n_train"] == 40 and params["min_side"] == 48
    for i in train[:5] + val[:2]:
        with Image.open(vdir / "JPEGImages" / f"{i}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            size = im.size
        with Image.open(vdir / "SegmentationClass" / f"{i}.png") as m:
            assert m.format == "PNG" and m.mode == "P" and m.size == size
        assert 48 <= min(size) <= 72
    assert len(VOCSegmentation(ds40, "train")) == 40


def test_deterministic_for_a_seed(ds40, tmp_path):
    again = generate(tmp_path / "b", seed=0, **SMALL)
    assert _hashes(again) == _hashes(ds40)


def test_differs_across_seeds(ds40, tmp_path):
    other = generate(tmp_path / "c", seed=1, **SMALL)
    a, b = _hashes(ds40), _hashes(other)
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert sum(a[k] != b[k] for k in jpgs) == len(jpgs)


def test_background_share_and_void_band(masks40):
    counts = sum(np.bincount(m.ravel(), minlength=256) for m in masks40.values())
    bg = counts[0] / counts.sum()
    assert 0.55 <= bg <= 0.85, bg
    assert counts[255] > 0 and counts[1:21].sum() > counts[255]
    for m in masks40.values():
        assert set(np.unique(m)) <= set(range(21)) | {255}
        # The void band separates every pair of different labels: no two 4-neighbours hold
        # different non-void labels.
        for a, b in ((m[:, 1:], m[:, :-1]), (m[1:, :], m[:-1, :])):
            touching = (a != b) & (a != 255) & (b != 255)
            assert not touching.any()


def test_several_classes_and_uneven_frequencies(ds40, masks40):
    train = read_split_ids(ds40, "train")
    present = [set(np.unique(masks40[i])) - {0, 255} for i in train]
    assert all(len(p) >= 1 for p in present)
    assert np.mean([len(p) for p in present]) > 1.0
    per_class = np.array([sum(c in p for p in present) for c in range(1, 21)])
    assert (per_class >= 1).all(), per_class  # every class in at least one train image
    assert per_class.max() >= 3 * per_class.min(), per_class


def test_class_cues_differ(ds40, masks40):
    """Learnable: each class's mean colour is consistent, and differs from the background's."""
    jdir = voc_dir(ds40) / "JPEGImages"
    sums, n = np.zeros((256, 3)), np.zeros(256)
    for i, m in masks40.items():
        img = np.asarray(Image.open(jdir / f"{i}.jpg"), dtype=np.float64)
        for c in np.unique(m):
            sel = m == c
            sums[c] += img[sel].sum(0)
            n[c] += sel.sum()
    present = [c for c in range(1, 21) if n[c] > 0]
    means = sums[present] / n[present, None]
    bg_mean = sums[0] / n[0]
    assert np.linalg.norm(means - bg_mean, axis=1).mean() > 30
    assert np.ptp(means, axis=0).max() > 100  # classes are not all one colour


def test_reuse_without_rewriting(ds40, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in voc_dir(ds40).rglob("*")}

    def boom(*a, **k):
        raise AssertionError("rendered again")

    monkeypatch.setattr(synth_mod, "_render", boom)
    assert generate(ds40, seed=0, **SMALL) == ds40
    assert {p: p.stat().st_mtime_ns for p in voc_dir(ds40).rglob("*")} == before


def test_refuses_to_overwrite_different_data(ds40, tmp_path):
    before = _hashes(ds40)
    with pytest.raises(DatasetError) as e:
        generate(ds40, seed=1, **SMALL)
    assert "\n" not in str(e.value) and "VOCdevkit" in str(e.value)
    assert _hashes(ds40) == before
    foreign = tmp_path / "real"
    (foreign / "VOCdevkit" / "VOC2012").mkdir(parents=True)
    with pytest.raises(DatasetError):
        generate(foreign, seed=0, **SMALL)
    assert not (voc_dir(foreign) / "JPEGImages").exists()


def test_bad_sizes_rejected(tmp_path):
    with pytest.raises(DatasetError):
        generate(tmp_path / "x", n_train=2, n_val=1, min_side=80, max_side=60)
    assert not (tmp_path / "x").exists()
