"""Issue 13 item 4: data.augment.rotation_degrees (aligned, label 255 outside the frame) and data.augment.repeats."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from test_data_transforms import data_cfg, decode, train_samples, uniform_interior

from deeplab_dropout.config import ConfigError, validate
from deeplab_dropout.data import get_datasets, get_transform
from deeplab_dropout.data.cache import cache_train
from deeplab_dropout.data.transforms import PadTo, RandomCrop, RandomResize, RandomRotation


def rotated_cfg(degrees: float, **over):
    cfg = data_cfg(**over)
    cfg.augment.rotation_degrees = degrees
    return cfg


def test_rotation_sits_after_the_resize_and_before_pad_and_crop():
    steps = get_transform(True, rotated_cfg(30)).steps
    kinds = [type(s) for s in steps[:4]]
    assert kinds == [RandomResize, RandomRotation, PadTo, RandomCrop]
    assert steps[1].degrees == 30.0
    # 0: no step at all, so Table 1 runs draw the same random numbers as without the option.
    assert RandomRotation not in [type(s) for s in get_transform(True, data_cfg()).steps]


def test_rotation_keeps_image_and_mask_aligned():
    cfg = rotated_cfg(45, blur_p=0.0)
    checked = void = 0
    for label, img, mask in train_samples(cfg):
        # NEAREST for the mask: only labels of the source (and the 255 fill), never a blend of two.
        assert set(mask.unique().tolist()) <= set(np.unique(label).tolist()) | {255}
        inner = uniform_interior(mask)
        # Not the crop's 3-pixel rim either: the frame's edge (image blended with the fill) may lie just outside.
        rim = torch.ones_like(inner)
        rim[3:-3, 3:-3] = False
        inner &= ~rim
        assert torch.equal(decode(img, cfg)[inner], mask[inner])
        checked += int(inner.sum())
        void += int((mask == 255).sum())
    assert checked > 5000 and void > 0  # the checks saw pixels, and rotated corners


def frame_distance(h: int, w: int, angle: float) -> np.ndarray:
    """For each output pixel of a rotation by ``angle`` degrees (counter-clockwise, about the image centre),
    how far inside the source frame its source point lies (negative: outside), in pixels."""
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    ox, oy = xs - w / 2, ys - h / 2
    a = math.radians(angle)
    sx = ox * math.cos(a) - oy * math.sin(a) + w / 2
    sy = ox * math.sin(a) + oy * math.cos(a) + h / 2
    return np.minimum.reduce([sx, w - sx, sy, h - sy])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rotation_fills_the_label_with_255_and_the_image_with_0_outside_the_frame(seed):
    h, w = 40, 64
    rotate = get_transform(True, rotated_cfg(60)).steps[1]
    image = torch.full((3, h, w), 200, dtype=torch.uint8)
    mask = torch.full((1, h, w), 7, dtype=torch.uint8)  # no void pixel in the source
    torch.manual_seed(seed)
    img, m = rotate(image, mask)
    torch.manual_seed(seed)
    angle = torch.empty(1).uniform_(-60, 60).item()  # the draw the call above made
    assert abs(angle) > 5  # a real rotation: corners leave the frame
    d = frame_distance(h, w, angle)
    outside, inside = torch.from_numpy(d < -1), torch.from_numpy(d > 1)  # a pixel's slack for the rounding
    assert outside.any() and inside.any()
    assert (m[0][outside] == 255).all() and (m[0][inside] == 7).all()
    assert (img[:, outside] == 0).all() and (img[:, inside] == 200).all()


def repeated(voc_root, k: int):
    return get_datasets(tiny_cfg(voc_root, f"data.augment.repeats={k}").data, seed=0)[0]


def test_repeats_list_each_image_k_times_with_its_own_augmentation(voc_root):
    once, thrice = repeated(voc_root, 1), repeated(voc_root, 3)
    n = len(once)
    assert len(thrice) == 3 * n and thrice.ids == once.ids * 3
    for i in range(n):
        first = thrice[i]
        # Index i draws from (seed, epoch, i) with or without repeats: the first copy is the unrepeated sample.
        assert all(torch.equal(a, b) for a, b in zip(first, once[i], strict=True))
        for j in (i + n, i + 2 * n):  # the same image, another index: another crop/flip/blur
            assert thrice.ids[j] == thrice.ids[i] and not torch.equal(thrice[j][0], first[0])
    # data.cache decodes a repeated image once, and the cached samples are the same numbers.
    before = [thrice[i] for i in range(0, 3 * n, n)]
    assert cache_train(thrice, "ram")
    assert thrice._decoded[0] is thrice._decoded[n] is thrice._decoded[2 * n]
    after = [thrice[i] for i in range(0, 3 * n, n)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(before, after, strict=True))


BAD = [
    ("data.augment.rotation_degrees=181", "data.augment.rotation_degrees=181 is invalid: expected a number in "
     "[0, 180]"),
    ("data.augment.rotation_degrees=-5", "data.augment.rotation_degrees=-5 is invalid: expected a number in [0, 180]"),
    ("data.augment.rotation_degrees=true", "data.augment.rotation_degrees=True is invalid: expected a number in "
     "[0, 180]"),
    ("data.augment.repeats=0", "data.augment.repeats=0 is invalid: expected an integer in [1, inf)"),
    ("data.augment.repeats=1.5", "data.augment.repeats=1.5 is invalid: expected an integer in [1, inf)"),
]


@pytest.mark.parametrize(("override", "message"), BAD, ids=[o for o, _ in BAD])
def test_bad_augment_values_fail_in_one_line(compose_config, override, message):
    with pytest.raises(ConfigError) as info:
        validate(compose_config([override]))
    assert str(info.value) == message


def test_the_course_report_values_pass(compose_config):
    validate(compose_config(["data.augment.rotation_degrees=180", "data.augment.repeats=4", "data.crop_size=224"]))
