"""10%-per-class split: quotas, near-minimal size, seeded determinism, manifest and presence caching."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from deeplab_dropout.data import DatasetError, class_presence, generate, make_split
from deeplab_dropout.data import split as split_mod
from deeplab_dropout.data.synth import save_mask


def _write_presence_dataset(root: Path, presence: dict[str, list[int]], split: str = "train") -> None:
    """Masks-only VOC layout (the split never opens images) with exactly the given classes per image."""
    vdir = root / "VOCdevkit" / "VOC2012"
    (vdir / "SegmentationClass").mkdir(parents=True)
    (vdir / "ImageSets" / "Segmentation").mkdir(parents=True)
    for i, classes in presence.items():
        m = np.zeros((6, 6), dtype=np.uint8)
        m[0, :] = 255  # void is not a class
        for k, c in enumerate(classes):
            m[1 + k // 6, k % 6] = c  # one pixel is enough to count
        save_mask(m, vdir / "SegmentationClass" / f"{i}.png")
    (vdir / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(presence) + "\n")


def _random_presence(n: int, seed: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, 21) ** 1.1  # Zipf-like, like VOC's class imbalance
    out = {}
    for i in range(n):
        k = int(rng.integers(0, 4))  # some images hold only background
        out[f"img_{i:04d}"] = sorted(int(c) for c in rng.choice(np.arange(1, 21), size=k, replace=False, p=w / w.sum()))
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict[str, list[int]]]:
    root = tmp_path_factory.mktemp("split") / "root"
    presence = _random_presence(400, seed=3)
    _write_presence_dataset(root, presence)
    return root, presence


def _need(fraction: float, n: int) -> int:
    return math.ceil(fraction * n - 1e-9)


def _plain_greedy(presence: dict[str, list[int]], fraction: float) -> int:
    """Independent reference: classic greedy set multicover (most still-needed classes per pick)."""
    need = {c: _need(fraction, sum(c in v for v in presence.values())) for c in range(1, 21)}
    left, picked = dict(presence), 0
    while any(v > 0 for v in need.values()):
        best = max(left, key=lambda i: sum(need[c] > 0 for c in left[i]))
        for c in left.pop(best):
            need[c] -= 1
        picked += 1
    return picked


def test_quota_no_duplicates_near_minimal(dataset, tmp_path):
    root, presence = dataset
    path, man = make_split(root, 0.1, 0, cache_dir=tmp_path)
    ids = man["ids"]
    assert ids == sorted(ids) and len(ids) == len(set(ids)) and set(ids) <= set(presence)
    for c in range(1, 21):
        n_c = sum(c in v for v in presence.values())
        k_c = sum(c in presence[i] for i in ids)
        assert k_c >= _need(0.1, n_c), c
        assert man["per_class"][str(c)] == {"n": n_c, "selected": k_c}
    assert len(ids) <= _plain_greedy(presence, 0.1) + 2
    assert len(ids) >= max(_need(0.1, sum(c in v for v in presence.values())) for c in range(1, 21))
    assert man["sha256"] == hashlib.sha256("\n".join(ids).encode()).hexdigest()
    assert man["fraction"] == 0.1 and man["seed"] == 0 and man["split"] == "train"
    assert json.loads(path.read_text()) == man
    assert path.name == "train_frac0.1_seed0.json"


def test_float_ceil_is_exact(tmp_path):
    # 30 images of class 1: ceil(0.1·30) is 3, not 4 (0.1*30 == 3.0000000000000004 in floats).
    presence = {f"a{i:02d}": [1] for i in range(30)}
    presence |= {f"b{c:02d}": [c] for c in range(2, 21)}
    _write_presence_dataset(tmp_path / "r", presence)
    _, man = make_split(tmp_path / "r", 0.1, 0)
    assert man["per_class"]["1"] == {"n": 30, "selected": 3}
    assert len(man["ids"]) == 3 + 19


def test_deterministic_and_seed_dependent(dataset, tmp_path):
    root, _ = dataset
    _, a = make_split(root, 0.1, 0, cache_dir=tmp_path / "a")
    _, b = make_split(root, 0.1, 0, cache_dir=tmp_path / "b")
    _, c = make_split(root, 0.1, 1, cache_dir=tmp_path / "c")
    assert a["ids"] == b["ids"] and a["sha256"] == b["sha256"]
    assert a["ids"] != c["ids"]


def test_manifest_reused_without_reading_masks(dataset, tmp_path, monkeypatch):
    root, _ = dataset
    path, first = make_split(root, 0.1, 0, cache_dir=tmp_path)
    mtime = path.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("masks read again")

    monkeypatch.setattr(split_mod, "read_mask", boom)
    path2, second = make_split(root, 0.1, 0, cache_dir=tmp_path)
    assert path2 == path and second == first and path.stat().st_mtime_ns == mtime
    # The presence index is cached too: a new seed needs no mask reads either.
    _, other = make_split(root, 0.1, 5, cache_dir=tmp_path)
    assert other["seed"] == 5


def test_presence_from_masks(dataset, tmp_path):
    root, presence = dataset
    assert class_presence(root, "train", cache_dir=tmp_path) == presence
    assert list(tmp_path.glob("presence_train_*.json"))


def test_default_cache_dir_is_under_root(tmp_path):
    presence = _random_presence(60, seed=1)
    _write_presence_dataset(tmp_path, presence)
    path, _ = make_split(tmp_path, 0.2, 0)
    assert path.parent == tmp_path / "splits"


def test_fraction_one_keeps_every_image(dataset, tmp_path):
    root, presence = dataset
    path, man = make_split(root, 1.0, 0, cache_dir=tmp_path)
    assert man["ids"] == sorted(presence)  # background-only images included
    assert all(v["n"] == v["selected"] for v in man["per_class"].values())
    assert path.is_file()


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_bad_fraction(dataset, tmp_path, fraction):
    with pytest.raises(DatasetError):
        make_split(dataset[0], fraction, 0, cache_dir=tmp_path)


def test_stale_manifest_rejected(dataset, tmp_path):
    root, _ = dataset
    path, man = make_split(root, 0.1, 0, cache_dir=tmp_path)
    man["ids"] = man["ids"][:-1]  # sha256 no longer matches
    path.write_text(json.dumps(man))
    with pytest.raises(DatasetError) as e:
        make_split(root, 0.1, 0, cache_dir=tmp_path)
    assert path.name in str(e.value) and "\n" not in str(e.value)


def test_split_on_generated_dataset(tmp_path):
    root = generate(tmp_path / "g", n_train=40, n_val=4, seed=0, min_side=40, max_side=56)
    _, man = make_split(root, 0.1, 0)
    assert all(v["selected"] >= _need(0.1, v["n"]) for v in man["per_class"].values())
    assert all(v["n"] >= 1 for v in man["per_class"].values())
    assert len(man["ids"]) < 40
