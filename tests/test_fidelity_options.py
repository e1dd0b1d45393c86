"""The options where the authors' code differs from the paper's text (docs/paper-vs-code.md): data.label_pad,
data.val_list and trainer.drop_last here (model.align_corners in test_model.py); each default is today's."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from PIL import Image

from deeplab_dropout import train as train_mod
from deeplab_dropout.config import ConfigError
from deeplab_dropout.data import denormalize, get_datasets, get_val_dataset, read_split_ids, voc_dir
from deeplab_dropout.data.loaders import make_loaders
from deeplab_dropout.results import read_per_image
from deeplab_dropout.runtime import resolve_device


def write_voc(root: Path, masks: dict[str, np.ndarray]) -> Path:
    """A hand-made VOC 2012 folder: each id's grey JPEG and its L-mode mask, listed as train and val."""
    vdir = voc_dir(root, "2012")
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (vdir / folder).mkdir(parents=True, exist_ok=True)
    for image_id, mask in masks.items():
        Image.fromarray(np.full((*mask.shape, 3), 128, np.uint8)).save(vdir / "JPEGImages" / f"{image_id}.jpg")
        Image.fromarray(mask, mode="L").save(vdir / "SegmentationClass" / f"{image_id}.png")
    for split in ("train", "val"):
        (vdir / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(masks) + "\n")
    return root


# ---- data.label_pad ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("label_pad", [255, 0])
def test_label_pad_fills_only_the_padding(tmp_path, label_pad):
    # 40x40 masks of class 1 with a void (255) square at rows/cols 10..29; the short side goes to 20 (scale
    # 0.5 of base 40), nearest halves the square to rows/cols 5..14, and the 33 crop pads 13 px bottom/right.
    mask = np.ones((40, 40), np.uint8)
    mask[10:30, 10:30] = 255
    root = write_voc(tmp_path / "voc", {"a": mask, "b": mask})
    cfg = tiny_cfg(root, "data.fraction=1.0", "data.scale_range=[0.5,0.5]", "data.flip_p=0", "data.blur_p=0",
                   f"data.label_pad={label_pad}")
    train_ds, val_ds, _ = get_datasets(cfg.data, seed=0)
    train_loader, _ = make_loaders(cfg, train_ds, val_ds, resolve_device(cfg))
    images, masks = next(iter(train_loader))
    assert masks.shape == (2, 33, 33)
    inside = np.zeros((33, 33), bool)
    inside[:20, :20] = True
    void = np.zeros((33, 33), bool)
    void[5:15, 5:15] = True
    for m in masks.numpy():
        assert (m[~inside] == label_pad).all()  # the padding
        assert (m[inside & void] == 255).all() and (m[inside & ~void] == 1).all()  # the image's own labels
        assert ((m == 255) == (void | (~inside if label_pad == 255 else False))).all()
    raw, inner = denormalize(images, cfg.data), torch.from_numpy(inside)
    assert (raw[:, :, ~inner] == 0).all() and (raw[:, :, inner] > 100).all()  # the image is padded with 0


# ---- data.val_list ----------------------------------------------------------------------------------------

def object_classes(root: Path, image_id: str) -> list[int]:
    """The object classes (1..20) in an id's mask, read here with PIL/numpy (independently of the package)."""
    mask = np.array(Image.open(voc_dir(root, "2012") / "SegmentationClass" / f"{image_id}.png"))
    return [int(c) for c in np.unique(mask) if 1 <= c <= 20]


def test_val_list_unique_is_the_list(voc_root):
    assert get_val_dataset(tiny_cfg(voc_root).data).ids == read_split_ids(voc_root, "val")


def test_val_list_per_class_is_the_authors_list(voc_root):
    listed = read_split_ids(voc_root, "val")
    counts = {i: len(object_classes(voc_root, i)) for i in listed}
    ids = get_val_dataset(tiny_cfg(voc_root, "data.val_list=per_class").data).ids
    # One entry per (image, object class in its mask); the authors' code sorted the chained class lists, so an
    # image's entries are adjacent and the ids sorted.
    assert len(ids) == sum(counts.values()) > len(listed)
    assert ids == [i for i in sorted(listed) for _ in range(counts[i])]


def test_val_list_per_class_drops_images_without_an_object_class(tmp_path):
    masks = {"a": np.zeros((8, 8), np.uint8), "b": np.full((8, 8), 3, np.uint8)}  # background only | class 3
    masks["b"][0, 0], masks["b"][1, 1] = 15, 255
    root = write_voc(tmp_path / "voc", masks)
    cfg = tiny_cfg(root, "data.val_list=per_class")
    assert get_val_dataset(cfg.data).ids == ["b", "b"]


@pytest.mark.parametrize("val_cache", ["ram", "off"])
def test_val_list_per_class_run_completes(voc_root, tmp_path, val_cache):
    cfg = tiny_cfg(voc_root, "data.val_list=per_class", "trainer.epochs=1", "trainer.max_train_steps=1",
                   f"data.val_cache={val_cache}")
    train_mod.run(cfg, tmp_path)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["status"] == "completed"
    expected = get_val_dataset(cfg.data).ids
    record = read_per_image(tmp_path / "per_image.npz")
    assert list(record.ids) == expected and len(set(expected)) < len(expected)  # repeats recorded as listed
    # A repeated image is evaluated identically each time it is listed.
    first = {}
    for k, image_id in enumerate(expected):
        j = first.setdefault(image_id, k)
        assert (record.counts[k] == record.counts[j]).all()
    assert (tmp_path / "predictions" / "index.json").is_file()


# ---- trainer.drop_last ------------------------------------------------------------------------------------

def batch_with_remainder(n: int) -> int:
    """A batch size that leaves a last partial batch of at least 2 images (the image-pooling BN needs 2)."""
    return next(b for b in range(2, n) if n % b >= 2)


def test_drop_last_false_trains_the_remainder(voc_root):
    n = len(get_datasets(tiny_cfg(voc_root).data, seed=0)[0])
    b = batch_with_remainder(n)
    lengths = {}
    for drop_last in (True, False):
        cfg = tiny_cfg(voc_root, f"trainer.batch_size={b}", f"trainer.drop_last={str(drop_last).lower()}")
        train_ds, val_ds, _ = get_datasets(cfg.data, seed=0)
        loader, _ = make_loaders(cfg, train_ds, val_ds, resolve_device(cfg))
        sizes = [len(targets) for _, targets in loader]
        lengths[drop_last] = len(loader)
        assert len(sizes) == len(loader) and sum(sizes) == (n - n % b if drop_last else n)
        assert sizes[-1] == (b if drop_last else n % b)
    assert lengths == {True: n // b, False: math.ceil(n / b)}


def test_drop_last_false_run_steps_ceil_and_ends_the_poly_schedule(voc_root, tmp_path):
    n = len(get_datasets(tiny_cfg(voc_root).data, seed=0)[0])
    b = batch_with_remainder(n)
    cfg = tiny_cfg(voc_root, f"trainer.batch_size={b}", "trainer.drop_last=false", "trainer.epochs=2",
                   "trainer.max_val_images=2")
    train_mod.run(cfg, tmp_path)
    history = json.loads((tmp_path / "results.json").read_text())["history"]
    steps = math.ceil(n / b)  # the LR schedule's steps per epoch: len(loader)
    assert [e["iteration"] for e in history] == [steps, 2 * steps]
    for entry in history:
        it = entry["iteration"] - 1
        assert entry["lr"] == pytest.approx(0.007 * (1 - it / (2 * steps)) ** 0.9, rel=1e-12)


def test_drop_last_false_refuses_a_last_batch_of_one_with_pooling_bn(voc_root):
    n = len(get_datasets(tiny_cfg(voc_root).data, seed=0)[0])
    b = next(b for b in range(2, n) if n % b == 1)
    for pool_norm, fails in (("bn", True), ("none", False)):
        cfg = tiny_cfg(voc_root, f"trainer.batch_size={b}", "trainer.drop_last=false",
                       f"model.pool_norm={pool_norm}")
        train_ds, val_ds, _ = get_datasets(cfg.data, seed=0)
        if not fails:
            assert len(make_loaders(cfg, train_ds, val_ds, resolve_device(cfg))[0]) == math.ceil(n / b)
            continue
        with pytest.raises(ConfigError) as err:
            make_loaders(cfg, train_ds, val_ds, resolve_device(cfg))
        assert "\n" not in str(err.value) and str(err.value).startswith("trainer.drop_last=false")
