"""The paper's split: keep ceil(fraction·n_c) of the train images of every class, as few images as possible."""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
from fractions import Fraction
from pathlib import Path

import numpy as np

from deeplab_dropout.data.voc import NUM_CLASSES, DatasetError, read_mask, read_split_ids, voc_dir
from deeplab_dropout.results import write_json

OBJECT_CLASSES = range(1, NUM_CLASSES)


def ids_sha256(ids: list[str]) -> str:
    """Hex sha256 of the newline-joined ids (the manifest's fingerprint)."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def _cache_dir(root: str | os.PathLike, cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else Path(root).expanduser() / "splits"


def class_presence(root: str | os.PathLike, split: str = "train",
                   cache_dir: str | os.PathLike | None = None) -> dict[str, list[int]]:
    """Object classes (1..20) present in each mask of `split`, read once and cached as JSON."""
    ids = read_split_ids(root, split)
    key = ids_sha256(ids)
    cache = _cache_dir(root, cache_dir) / f"presence_{split}_{key[:16]}.json"
    if cache.is_file():
        try:
            data = json.loads(cache.read_text())
            if data.get("sha256") == key and set(data["presence"]) == set(ids):
                return {i: [int(c) for c in data["presence"][i]] for i in ids}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable cache: rebuild it below
    mask_dir = voc_dir(root) / "SegmentationClass"
    presence: dict[str, list[int]] = {}
    for i in ids:
        counts = np.bincount(read_mask(mask_dir / f"{i}.png").ravel(), minlength=256)
        presence[i] = [c for c in OBJECT_CLASSES if counts[c] > 0]
    write_json(cache, {"split": split, "sha256": key, "presence": presence})
    return presence


def required(fraction: float, n: int) -> int:
    """ceil(fraction·n) without float surprises (0.1·30 is 3.0000000000000004 in floats)."""
    return math.ceil(Fraction(str(fraction)) * n)


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


def manifest_path(root: str | os.PathLike, fraction: float, seed: int, split: str = "train",
                  cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the manifest of (split, fraction, seed) lives."""
    return _cache_dir(root, cache_dir) / f"{split}_frac{fraction:g}_seed{seed}.json"


def _load_manifest(path: Path, root: str | os.PathLike, fraction: float, seed: int, split: str) -> dict:
    try:
        manifest = json.loads(path.read_text())
        ids = manifest["ids"]
        ok = (manifest["sha256"] == ids_sha256(ids) and float(manifest["fraction"]) == float(fraction)
              and int(manifest["seed"]) == int(seed) and manifest.get("split", split) == split)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"unreadable split manifest: {path} ({e}); delete it to recompute") from None
    if not ok:
        raise DatasetError(f"split manifest does not match its fields or sha256: {path}; delete it to recompute")
    # Cheap (no masks): the manifest must still describe this dataset's split list.
    listed = set(read_split_ids(root, split))
    stale = [i for i in ids if i not in listed]
    if stale:
        raise DatasetError(f"split manifest {path} lists ids not in {split}.txt (first: {stale[0]}); "
                           "it was made for other data, delete it to recompute")
    return manifest


def make_split(root: str | os.PathLike, fraction: float = 0.1, seed: int = 0, split: str = "train",
               cache_dir: str | os.PathLike | None = None) -> tuple[Path, dict]:
    """Compute (or reuse) the per-class split of `split`; return (manifest path, manifest dict)."""
    if not 0.0 < float(fraction) <= 1.0:
        raise DatasetError(f"data.fraction must be in (0, 1], got {fraction}")
    path = manifest_path(root, fraction, seed, split, cache_dir)
    if path.is_file():
        return path, _load_manifest(path, root, fraction, seed, split)
    presence = class_presence(root, split, cache_dir)
    if float(fraction) == 1.0:
        ids = sorted(presence)  # the whole list, background-only images included
    else:
        ids = select_images(presence, fraction, seed)
    chosen = set(ids)
    per_class = {}
    for c in OBJECT_CLASSES:
        with_c = [i for i, cls in presence.items() if c in cls]
        per_class[str(c)] = {"n": len(with_c), "selected": sum(1 for i in with_c if i in chosen)}
    manifest = {"ids": ids, "fraction": fraction, "seed": seed, "split": split,
                "per_class": per_class, "sha256": ids_sha256(ids)}
    write_json(path, manifest)
    return path, manifest
