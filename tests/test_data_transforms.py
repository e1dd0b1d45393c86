"""Table 1 transforms: joint geometry, 255 label padding, crop size, blur radius, val center/full."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageFilter
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from deeplab_dropout.data import denormalize, get_transform
from deeplab_dropout.data.transforms import RandomGaussianBlur

VOC_YAML = Path(__file__).resolve().parents[1] / "conf" / "data" / "voc2012.yaml"


def data_cfg(**over):
    """The real data config (conf/data/voc2012.yaml) shrunk for CPU tests."""
    cfg = OmegaConf.load(VOC_YAML)
    cfg.base_size, cfg.crop_size = 64, 48
    for k, v in over.items():
        cfg[k] = v
    return cfg


# Label k is painted as a distinct colour, so the label can be recomputed from the transformed image.
CODES = np.array([[(37 * k) % 256, (91 * k + 40) % 256, (151 * k + 80) % 256] for k in range(21)], np.uint8)


def coded_pair(h: int = 64, w: int = 88, block: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 21, size=(h // block + 1, w // block + 1))
    label = np.kron(blocks, np.ones((block, block), dtype=np.int64))[:h, :w].astype(np.uint8)
    return Image.fromarray(CODES[label]), label


def train_samples(cfg, seeds=range(12)):
    """(source label map, transformed image, transformed mask) of coded_pair(seed) through the train transform
    of ``cfg``, with torch seeded by ``seed``, for each seed."""
    t = get_transform(True, cfg)
    for seed in seeds:
        image, label = coded_pair(seed=seed)
        torch.manual_seed(seed)
        yield (label, *t(image, label))


def decode(img: torch.Tensor, cfg) -> torch.Tensor:
    rgb = denormalize(img, cfg).permute(1, 2, 0).reshape(-1, 1, 3).int()
    dist = (rgb - torch.from_numpy(CODES).int()[None]).abs().sum(-1)
    return dist.argmin(1).reshape(img.shape[1:])


def uniform_interior(mask: torch.Tensor, r: int = 3) -> torch.Tensor:
    """Pixels whose (2r+1)² neighbourhood holds one non-void label (away from edges and padding)."""
    m = mask.float()[None, None]
    hi = torch.nn.functional.max_pool2d(m, 2 * r + 1, 1, r)
    lo = -torch.nn.functional.max_pool2d(-m, 2 * r + 1, 1, r)
    return ((hi == lo) & (mask[None, None] != 255))[0, 0]


def test_train_keeps_image_and_mask_aligned():
    cfg = data_cfg(blur_p=0.0)
    flipped_seen = checked = 0
    for seed, (_, img, mask) in enumerate(train_samples(cfg)):
        assert img.shape == (3, 48, 48) and img.dtype == torch.float32
        assert mask.shape == (48, 48) and mask.dtype == torch.int64
        inner = uniform_interior(mask)
        decoded = decode(img, cfg)
        assert inner.sum() > 100
        assert torch.equal(decoded[inner], mask[inner]), seed
        checked += int(inner.sum())
        # Sanity of the check itself: a mask flipped relative to the image would fail it.
        flipped_seen += int(not torch.equal(decoded.flip(-1)[inner], mask[inner]))
    assert flipped_seen == 12 and checked > 5000


def test_label_padding_is_255_and_image_padding_is_zero():
    cfg = data_cfg(scale_range=[0.5, 0.5], blur_p=0.0)  # short side 32 < crop 48
    image = Image.fromarray(np.full((20, 20, 3), 200, np.uint8))
    label = np.ones((20, 20), np.uint8)
    torch.manual_seed(0)
    img, mask = get_transform(True, cfg)(image, label)
    assert mask.shape == (48, 48)
    assert int((mask == 1).sum()) == 32 * 32 and int((mask == 255).sum()) == 48 * 48 - 32 * 32
    raw = denormalize(img, cfg)
    assert (raw[:, mask == 255] == 0).all() and (raw[:, mask == 1] >= 199).all()


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_train_scale_and_crop_size(scale):
    """Short side = base_size × scale: 8-px blocks of a 64-px-high image become 8·scale px wide."""
    cfg = data_cfg(blur_p=0.0, crop_size=40, scale_range=[scale, scale])
    jj = np.arange(88 // 8)
    blocks = (jj[None, :] * 3 + np.arange(64 // 8)[:, None] * 7) % 21  # neighbours always differ
    label = np.kron(blocks, np.ones((8, 8), dtype=np.int64)).astype(np.uint8)
    torch.manual_seed(3)
    img, mask = get_transform(True, cfg)(Image.fromarray(CODES[label]), label)
    assert img.shape == (3, 40, 40) and mask.shape == (40, 40)
    values, runs = torch.unique_consecutive(mask[0], return_counts=True)
    inner = runs[1:-1][values[1:-1] != 255]
    assert len(inner) >= 1 and (inner == int(8 * scale)).all(), runs


def test_train_is_reproducible_from_torch_seed():
    cfg = data_cfg()
    t = get_transform(True, cfg)
    image, label = coded_pair(seed=1)
    outs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        outs.append(t(image, label))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not torch.equal(outs[0][0], outs[2][0])


def test_zero_blur_radius_equals_no_blur():
    image, label = coded_pair(seed=2)
    for seed in range(4):
        torch.manual_seed(seed)
        a = get_transform(True, data_cfg(blur_p=1.0, blur_radius=[0.0, 0.0]))(image, label)
        torch.manual_seed(seed)
        b = get_transform(True, data_cfg(blur_p=0.0))(image, label)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_blur_radius_sampled_in_range_with_probability():
    blur = RandomGaussianBlur(p=0.5, lo=0.3, hi=0.8)
    torch.manual_seed(0)
    radii = np.array([blur.draw() for _ in range(2000)])
    applied = radii[radii > 0]
    assert 0.45 < len(applied) / len(radii) < 0.55
    assert applied.min() >= 0.3 and applied.max() <= 0.8
    assert applied.min() < 0.32 and applied.max() > 0.78  # the whole range is used


def test_blur_has_pil_radius_semantics_and_spares_the_mask():
    rng = np.random.default_rng(0)
    arr = np.kron(rng.integers(0, 256, (6, 7, 3)).astype(np.uint8), np.ones((10, 10, 1), np.uint8))
    inner = (slice(8, -8), slice(8, -8))
    for r in (0.5, 1.0):
        blur = RandomGaussianBlur(p=1.0, lo=r, hi=r)
        mask = torch.from_numpy(arr[..., 0].copy())[None]
        out_img, out_mask = blur(torch.from_numpy(arr).permute(2, 0, 1), mask)
        assert torch.equal(out_mask, mask)
        ours = out_img.permute(1, 2, 0).numpy().astype(float)[inner]
        pil = np.asarray(Image.fromarray(arr).filter(ImageFilter.GaussianBlur(r))).astype(float)[inner]
        other = np.asarray(Image.fromarray(arr).filter(ImageFilter.GaussianBlur(2 * r))).astype(float)[inner]
        assert np.abs(ours - pil).mean() < 1.0
        assert np.abs(ours - other).mean() > 3.0


def test_val_center_is_deterministic_and_crop_sized():
    cfg = data_cfg(val_crop="center")
    t = get_transform(False, cfg)
    image, label = coded_pair(h=70, w=100, block=10, seed=4)
    torch.manual_seed(0)
    a = t(image, label)
    torch.manual_seed(1)
    b = t(image, label)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (3, 48, 48) and a[1].shape == (48, 48)
    inner = uniform_interior(a[1])
    assert torch.equal(decode(a[0], cfg)[inner], a[1][inner])
    # Centred: the resized (64×91) image's middle column lands in the crop's middle.
    ref = F.resize(torch.from_numpy(label)[None], [64], interpolation=F.InterpolationMode.NEAREST)[0]
    top, spare = (64 - 48) // 2, ref.shape[1] - 48
    assert any(torch.equal(a[1], ref[top:top + 48, left:left + 48].long()) for left in {spare // 2, -(-spare // 2)})


def test_val_center_pads_labels_with_255():
    cfg = data_cfg(val_crop="center", base_size=32, crop_size=48)
    image, label = coded_pair(h=32, w=40, block=8)
    img, mask = get_transform(False, cfg)(image, label)
    assert mask.shape == (48, 48)
    assert (mask[:8] == 255).all() and (mask[-8:] == 255).all() and (mask[8:-8, 4:44] != 255).all()
    assert (denormalize(img, cfg)[:, :8] == 0).all()


def test_val_full_keeps_size_and_values():
    cfg = data_cfg(val_crop="full")
    image, label = coded_pair(h=37, w=53, block=5)
    img, mask = get_transform(False, cfg)(image, label)
    assert img.shape == (3, 37, 53) and torch.equal(mask, torch.from_numpy(label).long())
    assert torch.equal(denormalize(img, cfg), torch.from_numpy(np.array(image)).permute(2, 0, 1))


def test_normalisation_uses_config_mean_std():
    cfg = data_cfg(val_crop="full", mean=[0.5, 0.5, 0.5], std=[0.25, 0.5, 1.0])
    image = Image.fromarray(np.full((4, 4, 3), 255, np.uint8))
    img, _ = get_transform(False, cfg)(image, np.zeros((4, 4), np.uint8))
    assert torch.allclose(img[:, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


# --- the same pixels and draws as the v2.Compose pipeline the steps replaced (torchvision's own dispatch) ---
class V2PadTo(v2.Transform):
    def __init__(self, size: int, center: bool = False) -> None:
        super().__init__()
        self.size, self.center = size, center

    def make_params(self, flat_inputs):
        h, w = v2.query_size(flat_inputs)
        dh, dw = max(self.size - h, 0), max(self.size - w, 0)
        return {"padding": [dw // 2, dh // 2, dw - dw // 2, dh - dh // 2] if self.center else [0, 0, dw, dh]}

    def transform(self, inpt, params):
        fill = 255 if isinstance(inpt, tv_tensors.Mask) else 0
        return self._call_kernel(F.pad, inpt, params["padding"], fill=fill) if any(params["padding"]) else inpt


class V2Blur(v2.Transform):
    _transformed_types = (tv_tensors.Image,)

    def __init__(self, p: float, lo: float, hi: float) -> None:
        super().__init__()
        self.p, self.lo, self.hi = p, lo, hi

    def make_params(self, flat_inputs):
        apply = bool(torch.rand(()) < self.p)
        return {"r": float(torch.empty(()).uniform_(self.lo, self.hi)) if apply else 0.0}

    def transform(self, inpt, params):
        r = params["r"]
        k = 2 * math.ceil(3 * r) + 1
        return inpt if r <= 1e-3 else self._call_kernel(F.gaussian_blur, inpt, [k, k], [r, r])


def v2_reference(train: bool, cfg) -> v2.Compose:
    """The Table 1 / val pipeline as v2 transforms: RandomResize, RandomRotation, RandomCrop, ... themselves."""
    crop, base = cfg.crop_size, cfg.base_size
    finish = [v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
              v2.Normalize(list(cfg.mean), list(cfg.std))]
    if not train:
        center = [v2.Resize(base), V2PadTo(crop, center=True), v2.CenterCrop(crop)]
        return v2.Compose((center if cfg.val_crop == "center" else []) + finish)
    lo, hi = cfg.scale_range
    d = cfg.augment.rotation_degrees
    rotate = [v2.RandomRotation(d, v2.InterpolationMode.BILINEAR, fill={tv_tensors.Image: 0, tv_tensors.Mask: 255})]
    return v2.Compose([v2.RandomResize(max(1, round(base * lo)), max(1, round(base * hi)) + 1),
                       *(rotate if d > 0 else []), V2PadTo(crop), v2.RandomCrop(crop),
                       v2.RandomHorizontalFlip(cfg.flip_p), V2Blur(cfg.blur_p, *cfg.blur_radius), *finish])


@pytest.mark.parametrize(("train", "over"), [
    (True, {}), (True, {"rotation": 30.0}), (True, {"blur_p": 1.0, "flip_p": 1.0, "scale_range": [0.3, 0.9]}),
    (False, {"val_crop": "center"}), (False, {"val_crop": "center", "base_size": 32}), (False, {"val_crop": "full"})])
def test_steps_give_the_v2_pipelines_pixels_and_draws(train, over):
    cfg = data_cfg(**{k: v for k, v in over.items() if k != "rotation"})
    cfg.augment.rotation_degrees = over.get("rotation", 0.0)
    ours, ref = get_transform(train, cfg), v2_reference(train, cfg)
    for seed, (h, w) in enumerate([(64, 88), (30, 41), (97, 50), (48, 48), (20, 130)] * 4):
        image, label = coded_pair(h=h, w=w, block=5, seed=seed)
        torch.manual_seed(seed)
        img, mask = ours(image, label)
        after = torch.get_rng_state()
        torch.manual_seed(seed)
        ref_img, ref_mask = ref(tv_tensors.Image(F.pil_to_tensor(image)), tv_tensors.Mask(torch.from_numpy(label)[None]))
        assert torch.equal(img, ref_img) and torch.equal(mask, ref_mask[0]), (seed, h, w)
        assert img.dtype == torch.float32 and mask.dtype == torch.int64
        assert torch.equal(after, torch.get_rng_state()), "a different number of random draws"


@pytest.mark.parametrize("train", [True, False])
def test_transforms_pickle_for_spawned_loader_workers(train):
    # Loader workers started with `spawn` (macOS, or CUDA users) receive the dataset, transforms included, pickled.
    import pickle

    cfg = data_cfg(val_crop="center")
    cfg.augment.rotation_degrees = 20.0
    t = get_transform(train, cfg)
    copy = pickle.loads(pickle.dumps(t))
    assert repr(copy) == repr(t)
    image, label = coded_pair(seed=3)
    torch.manual_seed(5)
    a = t(image, label)
    torch.manual_seed(5)
    b = copy(image, label)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
