"""VOC reader: opens the generated dataset, round-trips palette masks, one-line errors per data problem."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deeplab_dropout.data import (
    IGNORE_INDEX,
    VOC_CLASSES,
    VOC_PALETTE,
    DatasetError,
    VOCSegmentation,
    generate,
    get_datasets,
    read_image,
    read_mask,
    read_split_ids,
    voc_dir,
)
from deeplab_dropout.data.synth import save_mask


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A tiny generated dataset shared by the read-only tests."""
    return generate(tmp_path_factory.mktemp("voc") / "root", n_train=12, n_val=6, seed=0, min_side=48, max_side=80)


@pytest.fixture
def root_copy(synth_root, tmp_path) -> Path:
    """A private copy for tests that break the data."""
    shutil.copytree(synth_root / "VOCdevkit", tmp_path / "VOCdevkit")
    return tmp_path


def _one_line_error(excinfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, DatasetError) and isinstance(excinfo.value, ValueError)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def test_classes_and_palette_constants():
    assert len(VOC_CLASSES) == 21
    assert (VOC_CLASSES[0], VOC_CLASSES[10], VOC_CLASSES[15], VOC_CLASSES[20]) == (
        "background", "cow", "person", "tvmonitor")
    assert len(VOC_PALETTE) == 768 and IGNORE_INDEX == 255
    rgb = [tuple(VOC_PALETTE[3 * i:3 * i + 3]) for i in range(256)]
    # Published VOC colours: aeroplane, cow, person, tvmonitor and the void colour.
    assert rgb[0] == (0, 0, 0) and rgb[1] == (128, 0, 0) and rgb[10] == (64, 128, 0)
    assert rgb[15] == (192, 128, 128) and rgb[20] == (0, 64, 128) and rgb[255] == (224, 224, 192)
    assert len(set(rgb)) == 256


def test_generated_dataset_opens(synth_root):
    train = VOCSegmentation(synth_root, "train")
    val = VOCSegmentation(synth_root, "val")
    assert len(train) == 12 and len(val) == 6 and not set(train.ids) & set(val.ids)
    assert train.ids == read_split_ids(synth_root, "train")
    for i in range(len(train)):
        image, mask = train[i]
        assert image.mode == "RGB" and mask.dtype == np.uint8
        assert mask.shape == (image.height, image.width)
        assert set(np.unique(mask)) <= set(range(21)) | {255}


def test_ids_restrict_and_order(synth_root):
    all_ids = read_split_ids(synth_root, "train")
    chosen = [all_ids[5], all_ids[2]]
    ds = VOCSegmentation(synth_root, "train", ids=chosen)
    assert ds.ids == chosen and len(ds) == 2
    _, m = ds.load(0)
    assert np.array_equal(m, read_mask(voc_dir(synth_root) / "SegmentationClass" / f"{chosen[0]}.png"))
    with pytest.raises(DatasetError) as e:
        VOCSegmentation(synth_root, "train", ids=["not_an_id"])
    _one_line_error(e, "train.txt", "not_an_id")


def test_transforms_are_applied(synth_root):
    calls = []

    def t(image, mask):
        calls.append((image.size, mask.shape))
        return torch.zeros(1), torch.ones(1)

    ds = VOCSegmentation(synth_root, "val", transforms=t)
    out = ds[0]
    assert torch.equal(out[1], torch.ones(1))
    (w, h), shape = calls[0]
    assert shape == (h, w)


def test_palette_and_labels_round_trip(synth_root, tmp_path):
    png = next((voc_dir(synth_root) / "SegmentationClass").glob("*.png"))
    with Image.open(png) as im:
        assert im.mode == "P"
        assert im.getpalette()[:63] == VOC_PALETTE[:63]
    rng = np.random.default_rng(1)
    labels = rng.choice(np.r_[0:21, 255], size=(37, 53)).astype(np.uint8)
    path = tmp_path / "m.png"
    save_mask(labels, path)
    with Image.open(path) as im:
        assert im.mode == "P" and im.getpalette()[:63] == VOC_PALETTE[:63]
    assert np.array_equal(read_mask(path), labels)


def test_image_is_rgb_and_matches_file(synth_root):
    jpg = next((voc_dir(synth_root) / "JPEGImages").glob("*.jpg"))
    img = read_image(jpg)
    with Image.open(jpg) as ref:
        assert np.array_equal(np.asarray(img), np.asarray(ref.convert("RGB")))


# ---- one test per error case -------------------------------------------------------------------


def test_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as e:
        VOCSegmentation(missing, "train")
    msg = _one_line_error(e, "nowhere", "VOCdevkit", "deeplab-dropout-data synth --out", "data.download=true")
    assert "data.root" in msg


def test_root_without_vocdevkit(tmp_path):
    with pytest.raises(DatasetError) as e:
        VOCSegmentation(tmp_path, "train")
    _one_line_error(e, str(tmp_path), "VOCdevkit", "data.root")


def test_missing_split_file(root_copy):
    with pytest.raises(DatasetError) as e:
        VOCSegmentation(root_copy, "trainaug")
    _one_line_error(e, "trainaug.txt")


def test_missing_image(root_copy):
    first = read_split_ids(root_copy, "train")[3]
    (voc_dir(root_copy) / "JPEGImages" / f"{first}.jpg").unlink()
    with pytest.raises(DatasetError) as e:
        VOCSegmentation(root_copy, "train")
    _one_line_error(e, f"{first}.jpg", "not found")


def test_missing_mask(root_copy):
    first = read_split_ids(root_copy, "val")[0]
    (voc_dir(root_copy) / "SegmentationClass" / f"{first}.png").unlink()
    with pytest.raises(DatasetError) as e:
        VOCSegmentation(root_copy, "val")
    _one_line_error(e, f"{first}.png", "not found")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_image(root_copy, damage):
    ds = VOCSegmentation(root_copy, "train")
    path = ds.image_path(ds.ids[1])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a jpeg at all" * 50)
    ds.load(0)  # other images still load
    with pytest.raises(DatasetError) as e:
        ds.load(1)
    _one_line_error(e, path.name, "corrupt")


def test_mask_size_mismatch(root_copy):
    ds = VOCSegmentation(root_copy, "train")
    path = ds.mask_path(ds.ids[2])
    mask = read_mask(path)
    save_mask(mask[:-3, :], path)
    with pytest.raises(DatasetError) as e:
        ds.load(2)
    _one_line_error(e, path.name, "size")


def test_mask_values_outside_labels(root_copy):
    ds = VOCSegmentation(root_copy, "train")
    path = ds.mask_path(ds.ids[0])
    mask = read_mask(path)
    mask[0, 0], mask[1, 1] = 21, 40
    save_mask(mask, path)
    with pytest.raises(DatasetError) as e:
        ds.load(0)
    msg = _one_line_error(e, path.name, "{0..20, 255}")
    assert "21" in msg and "40" in msg


def test_rgb_mask_rejected(root_copy):
    ds = VOCSegmentation(root_copy, "train")
    path = ds.mask_path(ds.ids[0])
    Image.open(path).convert("RGB").save(path)
    with pytest.raises(DatasetError) as e:
        ds.load(0)
    _one_line_error(e, path.name, "RGB")


# ---- get_datasets from the composed config -------------------------------------------------------


def _tiny_data_cfg(compose_config, root: Path, *extra: str):
    cfg = compose_config(["data=synthetic", f"data.root={root}", "data.synth.train=12", "data.synth.val=6",
                          "data.synth.min_side=48", "data.synth.max_side=64", "data.base_size=48",
                          "data.crop_size=40", *extra])
    return cfg.data


def test_get_datasets_generates_splits_and_transforms(compose_config, tmp_path):
    data_cfg = _tiny_data_cfg(compose_config, tmp_path / "synth")
    train, val, record = get_datasets(data_cfg)
    assert (voc_dir(tmp_path / "synth") / "synth.json").is_file()
    assert len(val) == 6 and 1 <= len(train) <= 12
    assert set(record) >= {"manifest", "sha256", "fraction", "seed", "n_images", "per_class"}
    assert Path(record["manifest"]).is_file() and record["n_images"] == len(train)
    assert record["fraction"] == data_cfg.fraction and record["seed"] == data_cfg.split_seed
    img, mask = train[0]
    assert img.shape == (3, 40, 40) and img.dtype == torch.float32 and mask.dtype == torch.int64
    img, mask = val[0]
    assert img.shape == (3, 40, 40) and mask.shape == (40, 40)
    # Same config again: dataset and manifest reused.
    _, _, again = get_datasets(data_cfg)
    assert again == record


def test_get_datasets_full_fraction_records_manifest(compose_config, tmp_path):
    data_cfg = _tiny_data_cfg(compose_config, tmp_path / "synth", "data.fraction=1.0")
    train, _, record = get_datasets(data_cfg)
    assert train.ids == sorted(read_split_ids(tmp_path / "synth", "train"))
    assert record["n_images"] == 12 and Path(record["manifest"]).is_file()


def test_get_datasets_missing_real_root(compose_config, tmp_path):
    cfg = compose_config([f"data.root={tmp_path / 'voc'}"]).data
    assert cfg.synth is None and not cfg.download
    with pytest.raises(DatasetError) as e:
        get_datasets(cfg)
    _one_line_error(e, "voc", "data.root")
