"""The paper's split of the train list: keep a fraction (10%) of the images of every object class.

Three ways to do it (`data.split_method`), all seeded and read from the masks' class presence:

* `per_class` (default): for each class c with n_c images, a seeded uniform sample of ceil(fraction·n_c) of
  them; the split is the union (each image once). Images holding several classes are more likely to be
  drawn, so the split's mean classes per image is a bit above the pool's.
* `authors`: the authors' code: floor(fraction·n_c) per class from the same draw, and an image chosen for
  k classes is listed k times (seen k times per epoch). Classes with n_c < 1/fraction get no image. Their
  code also took class membership from the detection lists (ImageSets/Main) and left the order of the
  picks to Python's set iteration (unseeded); neither is reproduced here (masks, seeded draw).
* `min_cover`: the smallest set found by a seeded greedy multicover that still holds ceil(fraction·n_c)
  images of every class; it prefers images with many classes, so it is smaller and less typical.

`fraction == 1.0` keeps the whole train list (background-only images included) for every method.

Manifests and presence caches carry the VOC year (``data.year``) in their file name and record, so a VOC 2012
manifest is never taken for VOC 2007 data under the same root.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from fractions import Fraction
from pathlib import Path

import numpy as np

from deeplab_dropout.config import SPLIT_METHODS
from deeplab_dropout.data.voc import NUM_CLASSES, DatasetError, read_mask, read_split_ids, voc_dir
from deeplab_dropout.results import nearest_existing, write_json

OBJECT_CLASSES = range(1, NUM_CLASSES)
log = logging.getLogger("deeplab_dropout")
_announced: set[Path] = set()  # the per-user cache folders already logged once


def ids_sha256(ids: list[str]) -> str:
    """Hex sha256 of the newline-joined ids (the manifest's fingerprint)."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def cache_file(root: str | os.PathLike, cache_dir: str | os.PathLike | None, name: str) -> Path:
    """Where the cache file ``name`` (a split manifest, a class-presence index) of the dataset at ``root`` lives:
    in ``cache_dir`` (data.cache_dir) when given; else in ``<root>/splits`` when it is there already or can be
    written, else (a read-only dataset, as on clusters) in a per-user folder, ``user_cache_dir(root)``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser() / name
    beside = Path(root).expanduser() / "splits"
    if (beside / name).is_file() or os.access(nearest_existing(beside), os.W_OK):
        return beside / name
    fallback = user_cache_dir(root)
    if fallback not in _announced:
        _announced.add(fallback)
        log.info("%s cannot be written: split manifests and caches go to %s (data.cache_dir sets another place)",
                 beside, fallback)
    return fallback / name


def user_cache_dir(root: str | os.PathLike) -> Path:
    """The per-user cache folder of the dataset at ``root``: $XDG_CACHE_HOME (or ~/.cache)/deeplab-dropout/splits/
    <the root's absolute path, its separators as underscores>."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "deeplab-dropout" / "splits" / str(Path(root).expanduser().resolve()).strip("/").replace("/", "_")


def class_presence(root: str | os.PathLike, split: str = "train",
                   cache_dir: str | os.PathLike | None = None, year: str | int = "2012") -> dict[str, list[int]]:
    """Object classes (1..20) present in each mask of `split` of VOC<year>, read once and cached as JSON."""
    ids = read_split_ids(root, split, year)
    key = ids_sha256(ids)
    cache = cache_file(root, cache_dir, f"presence_VOC{year}_{split}_{key[:16]}.json")
    if cache.is_file():
        try:
            data = json.loads(cache.read_text())
            if data.get("sha256") == key and set(data["presence"]) == set(ids):
                return {i: [int(c) for c in data["presence"][i]] for i in ids}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable cache: rebuild it below
    mask_dir = voc_dir(root, year) / "SegmentationClass"
    presence: dict[str, list[int]] = {}
    for i in ids:
        counts = np.bincount(read_mask(mask_dir / f"{i}.png").ravel(), minlength=256)
        presence[i] = [c for c in OBJECT_CLASSES if counts[c] > 0]
    write_json(cache, {"split": split, "sha256": key, "presence": presence})
    return presence


def quota(fraction: float, n: int, rounding: str = "ceil") -> int:
    """ceil or floor of fraction·n in exact arithmetic (0.1·30 is 3.0000000000000004 in floats)."""
    exact = Fraction(str(fraction)) * n
    if rounding == "ceil":
        return math.ceil(exact)
    if rounding == "floor":
        return math.floor(exact)
    raise ValueError(f"rounding must be 'ceil' or 'floor', got {rounding!r}")


def required(fraction: float, n: int) -> int:
    """ceil(fraction·n) without float surprises: the per-class quota of `per_class` and `min_cover`."""
    return quota(fraction, n, "ceil")


def images_by_class(presence: dict[str, list[int]]) -> dict[int, list[str]]:
    """Sorted ids of the images holding each object class 1..20."""
    by_class: dict[int, list[str]] = {c: [] for c in OBJECT_CLASSES}
    for i in sorted(presence):
        for c in presence[i]:
            by_class[c].append(i)
    return by_class


def class_picks(presence: dict[str, list[int]], fraction: float, seed: int,
                rounding: str = "ceil") -> dict[int, list[str]]:
    """Per class c, m_c = ceil/floor(fraction·n_c) images drawn by default_rng([seed, c]).permutation over
    the sorted images of c; one independent stream per class so a class's draw ignores the others."""
    if int(seed) < 0:
        raise DatasetError(f"split seed must be >= 0 for per_class/authors, got {seed}")
    picks: dict[int, list[str]] = {}
    for c, imgs in images_by_class(presence).items():
        order = np.random.default_rng([int(seed), c]).permutation(len(imgs))
        picks[c] = [imgs[k] for k in order[:quota(fraction, len(imgs), rounding)]]
    return picks


def _greedy(presence: dict[str, list[int]], by_class: dict[int, list[str]], quota: dict[int, int],
            rng: random.Random, rarest_first: bool) -> list[str]:
    """One greedy multicover pass with seeded tie-breaks, then redundant picks dropped."""
    need = dict(quota)
    # A random key per image / class, drawn in a fixed (sorted) order, breaks ties.
    img_key = {i: rng.random() for i in sorted(presence)}
    cls_key = {c: rng.random() for c in OBJECT_CLASSES}
    chosen: set[str] = set()
    while True:
        open_classes = [c for c in OBJECT_CLASSES if need[c] > 0]
        if not open_classes:
            break
        if rarest_first:
            c = min(open_classes, key=lambda k: (len(by_class[k]), cls_key[k]))
            candidates = [i for i in by_class[c] if i not in chosen]
        else:
            candidates = sorted({i for k in open_classes for i in by_class[k]} - chosen)
        best = max(candidates, key=lambda i: (sum(need[k] > 0 for k in presence[i]), img_key[i]))
        chosen.add(best)
        for k in presence[best]:
            need[k] -= 1
    count = {c: sum(1 for i in chosen if c in presence[i]) for c in OBJECT_CLASSES}
    for i in sorted(chosen, key=lambda i: img_key[i]):
        if all(count[c] > quota[c] for c in presence[i]):
            chosen.remove(i)
            for c in presence[i]:
                count[c] -= 1
    return sorted(chosen)


def select_images(presence: dict[str, list[int]], fraction: float, seed: int, tries: int = 8) -> list[str]:
    """Smallest of a few seeded greedy multicovers (rarest class first, and most-needed-classes first)."""
    by_class: dict[int, list[str]] = {c: [] for c in OBJECT_CLASSES}
    for i, classes in presence.items():
        for c in classes:
            by_class[c].append(i)
    quota = {c: required(fraction, len(imgs)) for c, imgs in by_class.items()}
    rng = random.Random(seed)
    best: list[str] | None = None
    for t in range(tries):
        ids = _greedy(presence, by_class, quota, rng, rarest_first=t % 2 == 0)
        if best is None or len(ids) < len(best):
            best = ids
    return best if best is not None else []


def _check_method(method: str) -> None:
    if method not in SPLIT_METHODS:
        raise DatasetError(f"unknown split method {method!r}: expected one of {', '.join(SPLIT_METHODS)}")


def select_split(presence: dict[str, list[int]], fraction: float, seed: int,
                 method: str = "per_class") -> list[str]:
    """The sorted training list of `method` (see the module docstring); `authors` lists an image once per
    class that picked it. The authors' class lists (ImageSets/Main) and set-iteration order aren't reproduced."""
    _check_method(method)
    if float(fraction) == 1.0:
        return sorted(presence)  # the whole list, background-only images included
    if method == "min_cover":
        return select_images(presence, fraction, seed)
    if method == "per_class":
        return sorted({i for imgs in class_picks(presence, fraction, seed, "ceil").values() for i in imgs})
    # authors: one entry per (class, pick); sorting keeps the repeats adjacent.
    return sorted(i for imgs in class_picks(presence, fraction, seed, "floor").values() for i in imgs)


def per_class_list(presence: dict[str, list[int]]) -> list[str]:
    """The authors' validation list (data.val_list=per_class): their code passed it through the training list's
    per-class function at fraction 1.0, i.e. ``sorted(chain(*class lists))``: each image once per object class
    1..20 it holds, the repeats adjacent, ids sorted; an image with no object class drops out (background is not
    one of their class lists). They read the classes from ImageSets/Main (detection lists, which generated
    data lacks); here they come from the masks (``class_presence``)."""
    return sorted(i for i, classes in presence.items() for _ in classes)


def mean_classes(presence: dict[str, list[int]], ids: list[str] | None = None) -> float:
    """Mean object classes per entry of `ids` (repeats count); without ids, over the pool images that
    hold at least one object class. 0.0 when there is nothing to average."""
    if ids is None:
        counts = [len(v) for v in presence.values() if v]
    else:
        counts = [len(presence[i]) for i in ids]
    return sum(counts) / len(counts) if counts else 0.0


def compare_methods(presence: dict[str, list[int]], fraction: float, seed: int) -> list[dict]:
    """One row per method plus `pool`: entries, unique images, mean classes per entry (nothing written)."""
    rows = []
    for method in SPLIT_METHODS:
        ids = select_split(presence, fraction, seed, method)
        rows.append({"method": method, "images": len(ids), "unique": len(set(ids)),
                     "mean_classes": mean_classes(presence, ids)})
    rows.append({"method": "pool", "images": len(presence), "unique": len(presence),
                 "mean_classes": mean_classes(presence)})
    return rows


def manifest_path(root: str | os.PathLike, fraction: float, seed: int, split: str = "train",
                  cache_dir: str | os.PathLike | None = None, method: str = "per_class",
                  year: str | int = "2012") -> Path:
    """Where the manifest of (year, split, method, fraction, seed) lives."""
    return cache_file(root, cache_dir, f"VOC{year}_{split}_{method}_frac{fraction:g}_seed{seed}.json")


def _load_manifest(path: Path, root: str | os.PathLike, fraction: float, seed: int, split: str,
                   method: str, year: str) -> dict:
    try:
        manifest = json.loads(path.read_text())
        ids = manifest["ids"]
        ok = (manifest["sha256"] == ids_sha256(ids) and float(manifest["fraction"]) == float(fraction)
              and int(manifest["seed"]) == int(seed) and manifest.get("split", split) == split
              and int(manifest["n_unique"]) == len(set(ids)) and "mean_classes" in manifest)
        made_by, made_for = manifest["method"], str(manifest.get("year", "2012"))  # no year: VOC 2012
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"unreadable split manifest: {path} ({e}); delete it to recompute") from None
    if not ok:
        raise DatasetError(f"split manifest does not match its fields or sha256: {path}; delete it to recompute")
    if made_by != method:
        raise DatasetError(f"split manifest {path} was made by method {made_by!r}, not {method!r}; "
                           "delete it to recompute")
    if made_for != year:
        raise DatasetError(f"split manifest {path} was made for VOC{made_for}, not VOC{year} (data.year); "
                           "delete it to recompute")
    # Cheap (no masks): the manifest must still describe this dataset's split list.
    listed = set(read_split_ids(root, split, year))
    stale = [i for i in ids if i not in listed]
    if stale:
        raise DatasetError(f"split manifest {path} lists ids not in {split}.txt (first: {stale[0]}); "
                           "it was made for other data, delete it to recompute")
    return manifest


def make_split(root: str | os.PathLike, fraction: float = 0.1, seed: int = 0, split: str = "train",
               cache_dir: str | os.PathLike | None = None, method: str = "per_class",
               year: str | int = "2012") -> tuple[Path, dict]:
    """Compute (or reuse) the `method` split of `split` of VOC<year>; return (manifest path, manifest dict)."""
    _check_method(method)
    year = str(year)
    # config.validate checks data.fraction, but `deeplab-dropout-data split --fraction` arrives here unchecked.
    if not 0.0 < float(fraction) <= 1.0:
        raise DatasetError(f"data.fraction must be in (0, 1], got {fraction}")
    path = manifest_path(root, fraction, seed, split, cache_dir, method, year)
    if path.is_file():
        return path, _load_manifest(path, root, fraction, seed, split, method, year)
    presence = class_presence(root, split, cache_dir, year)
    ids = select_split(presence, fraction, seed, method)
    if not ids:  # e.g. `authors` on a small list: floor(fraction·n_c) is 0 for every class
        raise DatasetError(f"the {method} split of {split}.txt at fraction {fraction} is empty "
                           "(no class has enough images); raise data.fraction or use another data.split_method")
    chosen = set(ids)
    per_class = {str(c): {"n": len(imgs), "selected": sum(1 for i in imgs if i in chosen)}
                 for c, imgs in images_by_class(presence).items()}
    manifest = {"ids": ids, "year": year, "fraction": fraction, "seed": seed, "split": split, "method": method,
                "n_unique": len(chosen), "mean_classes": mean_classes(presence, ids),
                "pool_mean_classes": mean_classes(presence), "per_class": per_class, "sha256": ids_sha256(ids)}
    write_json(path, manifest)
    return path, manifest
