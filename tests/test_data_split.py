"""10%-per-class split: the three methods (per_class, authors, min_cover), their quotas and sampling
statistics, seeded determinism, manifest and presence caching."""
from __future__ import annotations

import hashlib
import json
import math
from fractions import Fraction
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
    path, man = make_split(root, 0.1, 0, cache_dir=tmp_path, method="min_cover")
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
    assert path.name == "VOC2012_train_min_cover_frac0.1_seed0.json" and man["method"] == "min_cover"


@pytest.mark.parametrize("method", ["per_class", "min_cover"])
def test_float_ceil_is_exact(tmp_path, method):
    # 30 images of class 1: ceil(0.1·30) is 3, not 4 (0.1*30 == 3.0000000000000004 in floats).
    presence = {f"a{i:02d}": [1] for i in range(30)}
    presence |= {f"b{c:02d}": [c] for c in range(2, 21)}
    _write_presence_dataset(tmp_path / "r", presence)
    _, man = make_split(tmp_path / "r", 0.1, 0, method=method)
    assert man["per_class"]["1"] == {"n": 30, "selected": 3}
    assert len(man["ids"]) == 3 + 19


@pytest.mark.parametrize("method", ["per_class", "authors", "min_cover"])
def test_deterministic_and_seed_dependent(dataset, tmp_path, method):
    root, _ = dataset
    _, a = make_split(root, 0.1, 0, cache_dir=tmp_path / "a", method=method)
    _, b = make_split(root, 0.1, 0, cache_dir=tmp_path / "b", method=method)
    _, c = make_split(root, 0.1, 1, cache_dir=tmp_path / "c", method=method)
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
    assert list(tmp_path.glob("presence_VOC2012_train_*.json"))


def test_default_cache_dir_is_under_root(tmp_path):
    presence = _random_presence(60, seed=1)
    _write_presence_dataset(tmp_path, presence)
    path, _ = make_split(tmp_path, 0.2, 0)
    assert path.parent == tmp_path / "splits"


@pytest.mark.parametrize("method", ["per_class", "authors", "min_cover"])
def test_fraction_one_keeps_every_image(dataset, tmp_path, method):
    root, presence = dataset
    path, man = make_split(root, 1.0, 0, cache_dir=tmp_path, method=method)
    assert man["ids"] == sorted(presence)  # background-only images included
    assert man["method"] == method and man["n_unique"] == len(presence)
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


# ---- per_class and authors: one seeded draw per class ------------------------------------------------


def _reference_picks(presence: dict[str, list[int]], fraction: float, seed: int, floor: bool) -> dict:
    """Independent recomputation of the documented draw: per class, a seeded permutation of its sorted ids."""
    picks = {}
    for c in range(1, 21):
        imgs = sorted(i for i, v in presence.items() if c in v)
        exact = Fraction(str(fraction)) * len(imgs)
        m = math.floor(exact) if floor else math.ceil(exact)
        order = np.random.default_rng([seed, c]).permutation(len(imgs))
        picks[c] = [imgs[k] for k in order[:m]]
    return picks


def _classes_per_entry(presence: dict[str, list[int]], ids: list[str]) -> float:
    return sum(len(presence[i]) for i in ids) / len(ids)


def test_per_class_quota_fields_and_reference(dataset, tmp_path):
    root, presence = dataset
    path, man = make_split(root, 0.1, 0, cache_dir=tmp_path)
    ids = man["ids"]
    assert path.name == "VOC2012_train_per_class_frac0.1_seed0.json" and man["method"] == "per_class"
    assert ids == sorted(ids) and len(ids) == len(set(ids)) == man["n_unique"]
    for c in range(1, 21):
        n_c = sum(c in v for v in presence.values())
        k_c = sum(c in presence[i] for i in ids)
        assert k_c >= math.ceil(Fraction("0.1") * n_c), c
        assert man["per_class"][str(c)] == {"n": n_c, "selected": k_c}
    ref = _reference_picks(presence, 0.1, 0, floor=False)
    assert ids == sorted({i for picks in ref.values() for i in picks})
    assert man["mean_classes"] == pytest.approx(_classes_per_entry(presence, ids))
    with_objects = [v for v in presence.values() if v]
    assert man["pool_mean_classes"] == pytest.approx(sum(map(len, with_objects)) / len(with_objects))
    # A union of independent per-class samples is larger than the minimal multicover.
    _, cover = make_split(root, 0.1, 0, cache_dir=tmp_path, method="min_cover")
    assert len(cover["ids"]) < len(ids)


def test_authors_matches_independent_recomputation(dataset, tmp_path):
    root, presence = dataset
    path, man = make_split(root, 0.1, 4, cache_dir=tmp_path, method="authors")
    ref = _reference_picks(presence, 0.1, 4, floor=True)
    expected = sorted(i for picks in ref.values() for i in picks)  # repeats kept
    assert man["ids"] == expected and man["method"] == "authors"
    assert len(expected) == sum(math.floor(Fraction("0.1") * v["n"]) for v in man["per_class"].values())
    assert man["n_unique"] == len(set(expected)) < len(expected)  # some image was picked for two classes
    assert man["sha256"] == hashlib.sha256("\n".join(expected).encode()).hexdigest()
    assert man["mean_classes"] == pytest.approx(_classes_per_entry(presence, expected))
    for c in range(1, 21):
        distinct = {i for i in expected if c in presence[i]}
        assert man["per_class"][str(c)]["selected"] == len(distinct)
    assert json.loads(path.read_text()) == man


def test_float_floor_is_exact(tmp_path):
    # 0.29·100 is 28.999999999999996 in floats; the authors' floor must still keep 29.
    presence = {f"a{i:03d}": [1] for i in range(100)}
    _write_presence_dataset(tmp_path / "r", presence)
    _, man = make_split(tmp_path / "r", 0.29, 0, method="authors")
    assert man["per_class"]["1"] == {"n": 100, "selected": 29} and len(man["ids"]) == 29


SEEDS = range(200)


@pytest.fixture(scope="module")
def pool() -> dict[str, list[int]]:
    return _random_presence(120, seed=5)


@pytest.mark.parametrize("fraction, rounding", [(0.15, "ceil"), (0.2, "floor"), (0.1, "ceil")])
def test_each_image_of_a_class_is_equally_likely(pool, fraction, rounding):
    by_class = {c: sorted(i for i, v in pool.items() if c in v) for c in range(1, 21)}
    hits = {(c, i): 0 for c, imgs in by_class.items() for i in imgs}
    for seed in SEEDS:
        for c, picks in split_mod.class_picks(pool, fraction, seed, rounding).items():
            assert len(picks) == len(set(picks)) == split_mod.quota(fraction, len(by_class[c]), rounding)
            for i in picks:
                hits[c, i] += 1
    for (c, i), k in hits.items():
        n_c = len(by_class[c])
        q = split_mod.quota(fraction, n_c, rounding) / n_c
        sigma = math.sqrt(q * (1 - q) / len(SEEDS))
        assert abs(k / len(SEEDS) - q) <= 4 * sigma + 1e-12, (c, i, k, q)


def test_mean_classes_per_image_matches_inclusion_probabilities(pool):
    fraction = 0.15
    n = {c: sum(c in v for v in pool.values()) for c in range(1, 21)}
    q = {c: math.ceil(Fraction(str(fraction)) * n[c]) / n[c] for c in n if n[c]}
    # Image i joins the union unless every one of its classes passes it over (independent draws per class).
    pi = {i: 1 - math.prod(1 - q[c] for c in v) for i, v in pool.items() if v}
    expected = sum(p * len(pool[i]) for i, p in pi.items()) / sum(pi.values())
    means = np.array([split_mod.mean_classes(pool, split_mod.select_split(pool, fraction, s, "per_class"))
                      for s in SEEDS])
    se = means.std(ddof=1) / math.sqrt(len(means))
    assert abs(means.mean() - expected) <= 4 * se, (means.mean(), expected, se)
    pool_mean = split_mod.mean_classes(pool)
    assert abs(pool_mean - expected) > 4 * se  # the plain pool mean is the wrong reference
    cover = split_mod.mean_classes(pool, split_mod.select_split(pool, fraction, 0, "min_cover"))
    assert cover > expected + 10 * se


# ---- manifests per method ------------------------------------------------------------------------------


def test_manifest_is_per_method(dataset, tmp_path):
    root, _ = dataset
    made = {m: make_split(root, 0.1, 2, cache_dir=tmp_path, method=m) for m in ("per_class", "authors", "min_cover")}
    paths = {m: p for m, (p, _) in made.items()}
    assert len(set(paths.values())) == 3 and all(f"_{m}_" in paths[m].name for m in paths)
    for m, (_, man) in made.items():
        assert man["method"] == m
    assert made["per_class"][1]["ids"] != made["min_cover"][1]["ids"] != made["authors"][1]["ids"]
    # Asking again for each method gets its own manifest back.
    for m, (p, man) in made.items():
        assert make_split(root, 0.1, 2, cache_dir=tmp_path, method=m) == (p, man)


def test_manifest_with_edited_method_refused(dataset, tmp_path):
    root, _ = dataset
    path, man = make_split(root, 0.1, 0, cache_dir=tmp_path, method="per_class")
    man["method"] = "min_cover"
    path.write_text(json.dumps(man))
    with pytest.raises(DatasetError) as e:
        make_split(root, 0.1, 0, cache_dir=tmp_path, method="per_class")
    msg = str(e.value)
    assert path.name in msg and "min_cover" in msg and "\n" not in msg


def test_unknown_method_names_the_allowed_ones(dataset, tmp_path):
    with pytest.raises(DatasetError) as e:
        make_split(dataset[0], 0.1, 0, cache_dir=tmp_path, method="greedy")
    msg = str(e.value)
    assert "greedy" in msg and all(m in msg for m in ("per_class", "authors", "min_cover")) and "\n" not in msg
    assert not list(tmp_path.glob("*greedy*"))


def test_empty_authors_split_is_an_error(tmp_path):
    # Every class has 3 images: floor(0.1·3) = 0, so the authors' rule keeps nothing.
    presence = {f"x{c:02d}_{k}": [c] for c in range(1, 21) for k in range(3)}
    _write_presence_dataset(tmp_path / "r", presence)
    with pytest.raises(DatasetError) as e:
        make_split(tmp_path / "r", 0.1, 0, method="authors")
    assert "empty" in str(e.value) and "\n" not in str(e.value)
    _, man = make_split(tmp_path / "r", 0.1, 0, method="per_class")  # ceil keeps one image per class
    assert len(man["ids"]) == 20
