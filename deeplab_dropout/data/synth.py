"""Generated VOC-format dataset: textured shapes of the 20 classes on cluttered backgrounds, seeded."""
from __future__ import annotations

import colorsys
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from deeplab_dropout.data.voc import IGNORE_INDEX, VOC_PALETTE, DatasetError, voc_dir

SYNTH_VERSION = 1
N_OBJ_CLASSES = 20
_PATTERNS = ("stripes", "checks", "dots", "waves")
# Fixed (seed-independent) class popularity, roughly VOC's: person most common, then pets, vehicles...
_POPULARITY = (15, 12, 8, 7, 9, 3, 1, 19, 5, 11, 2, 14, 13, 20, 4, 18, 17, 16, 10, 6)
_RANK = {c: r for r, c in enumerate(_POPULARITY)}
CLASS_WEIGHTS = np.array([1.0 / (_RANK[c] + 1) ** 0.9 for c in range(1, N_OBJ_CLASSES + 1)])
CLASS_WEIGHTS /= CLASS_WEIGHTS.sum()


def _class_style(c: int) -> dict:
    """Cues of class c: pairs of classes share a hue but differ in texture, so both cues are needed."""
    k = c - 1
    hue = (k % 10) / 10.0 + 0.03
    return {
        "hue": hue,
        "sat": 0.55 + 0.35 * ((k * 7) % 5) / 4,
        "val": 0.55 + 0.4 * ((k * 3) % 4) / 3,
        "pattern": _PATTERNS[k % 4],
        "period": 0.025 + 0.05 * ((k * 5) % 7) / 6,  # fraction of the short side
        "angle": np.deg2rad((k * 37) % 180),
    }


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))) * 255.0


def _pattern(kind: str, xx: np.ndarray, yy: np.ndarray, period: float, angle: float) -> np.ndarray:
    """Texture in [0, 1] on a pixel grid."""
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    if kind == "stripes":
        return (np.sin(2 * np.pi * u / period) > 0).astype(np.float32)
    if kind == "checks":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if kind == "dots":
        du, dv = u % period - period / 2, v % period - period / 2
        return (du * du + dv * dv < (0.3 * period) ** 2).astype(np.float32)
    return (0.5 + 0.5 * np.sin(2 * np.pi * u / period + 2.0 * np.sin(np.pi * v / period))).astype(np.float32)


def _shape_mask(rng: np.random.Generator, w: int, h: int, area: float) -> np.ndarray:
    """Boolean mask of one random ellipse, rectangle or star-convex polygon of about `area` pixels."""
    aspect = float(np.exp(rng.uniform(-0.6, 0.6)))
    bw = min(np.sqrt(area * aspect), 0.95 * w)
    bh = min(area / max(bw, 1.0), 0.95 * h)
    cx = rng.uniform(bw / 2, w - bw / 2)
    cy = rng.uniform(bh / 2, h - bh / 2)
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    kind = rng.integers(3)
    if kind == 0:
        draw.ellipse([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], fill=1)
    elif kind == 1:
        draw.rectangle([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], fill=1)
    else:
        n = int(rng.integers(5, 10))
        # Jittered even angles: random sorted angles can bunch up into slivers.
        ang = (np.arange(n) + rng.uniform(-0.35, 0.35, n)) * (2 * np.pi / n) + rng.uniform(0, 2 * np.pi)
        rad = rng.uniform(0.6, 1.0, n)
        pts = [(cx + 0.5 * bw * r * np.cos(a), cy + 0.5 * bh * r * np.sin(a)) for a, r in zip(ang, rad, strict=True)]
        draw.polygon(pts, fill=1)
    return np.asarray(canvas, dtype=bool)


def _background(rng: np.random.Generator, w: int, h: int, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Clutter: a two-colour gradient plus blobs in random colours and random (non-class) textures."""
    c0 = _rgb(rng.uniform(), rng.uniform(0.0, 0.5), rng.uniform(0.3, 0.9))
    c1 = _rgb(rng.uniform(), rng.uniform(0.0, 0.5), rng.uniform(0.3, 0.9))
    ang = rng.uniform(0, 2 * np.pi)
    t = (xx * np.cos(ang) + yy * np.sin(ang)) / max(w, h)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    img = (c0 + (c1 - c0) * t[..., None]).astype(np.float32)
    short = min(w, h)
    for _ in range(int(rng.integers(3, 9))):
        blob = _shape_mask(rng, w, h, rng.uniform(0.01, 0.08) * w * h)
        col = _rgb(rng.uniform(), rng.uniform(0.0, 0.8), rng.uniform(0.2, 1.0))
        if rng.uniform() < 0.35:
            # Textured clutter with periods off the class grid, so texture alone is not a class label.
            pat = _pattern(str(rng.choice(_PATTERNS)), xx[blob], yy[blob], rng.uniform(0.12, 0.2) * short,
                           rng.uniform(0, np.pi))
            tex = col * (1 - 0.5 * pat[:, None])
        else:
            tex = col
        img[blob] = 0.6 * tex + 0.4 * img[blob]
    return img


def _boundary(label: np.ndarray, r: int) -> np.ndarray:
    """Pixels whose (2r+1)² neighbourhood holds more than one label (separable max/min filters)."""
    def filt(a: np.ndarray, op, axis: int) -> np.ndarray:
        out = a.copy()
        n = a.shape[axis]
        for s in range(1, r + 1):
            lo = [slice(None)] * 2
            hi = [slice(None)] * 2
            lo[axis], hi[axis] = slice(0, n - s), slice(s, n)
            out[tuple(lo)] = op(out[tuple(lo)], a[tuple(hi)])
            out[tuple(hi)] = op(out[tuple(hi)], a[tuple(lo)])
        return out

    hi = filt(filt(label, np.maximum, 0), np.maximum, 1)
    lo = filt(filt(label, np.minimum, 0), np.minimum, 1)
    return hi != lo


def _render(rng: np.random.Generator, min_side: int, max_side: int, forced: int | None):
    """One (RGB uint8 image, uint8 label map) pair; `forced` (a class) is guaranteed to be visible."""
    for _ in range(20):
        img, label = _render_once(rng, min_side, max_side, forced)
        # Redraw (same stream, so still deterministic) if the forced class vanished under the void band.
        if forced is None or (label == forced).any():
            break
    return img, label


def _render_once(rng: np.random.Generator, min_side: int, max_side: int, forced: int | None):
    short = int(rng.integers(min_side, max_side + 1))
    long = int(round(short * rng.uniform(1.0, 1.5)))
    w, h = (long, short) if rng.uniform() < 0.7 else (short, long)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = _background(rng, w, h, xx, yy)
    label = np.zeros((h, w), dtype=np.uint8)

    n_obj = int(rng.integers(1, 5))
    classes = [int(c) for c in rng.choice(np.arange(1, N_OBJ_CLASSES + 1), size=n_obj, p=CLASS_WEIGHTS)]
    if forced is not None:
        classes[-1] = forced  # drawn last, so it stays visible on top
    fg_target = rng.uniform(0.3, 0.6) * w * h
    areas = rng.dirichlet(np.ones(n_obj)) * fg_target
    for c, area in zip(classes, areas, strict=True):
        st = _class_style(c)
        obj = _shape_mask(rng, w, h, max(area, 0.02 * w * h))
        hue = st["hue"] + rng.uniform(-0.025, 0.025)
        val = st["val"] * rng.uniform(0.8, 1.1)
        fg = _rgb(hue, st["sat"], val)
        accent = _rgb(hue + 0.5, st["sat"] * 0.5, val * 0.5)
        period = max(3.0, st["period"] * short * rng.uniform(0.85, 1.15))
        pat = _pattern(st["pattern"], xx[obj], yy[obj], period, st["angle"] + rng.uniform(-0.25, 0.25))
        tex = fg + (accent - fg) * pat[:, None]
        shade = 1.0 + 0.25 * (yy[obj] / h - 0.5) * rng.choice([-1.0, 1.0])  # light from above or below
        img[obj] = tex * shade[:, None]
        label[obj] = c

    # VOC-style void band straddling every boundary between different labels.
    label[_boundary(label, max(1, round(short / 200)))] = IGNORE_INDEX

    img += rng.standard_normal(img.shape, dtype=np.float32) * 10.0
    return np.clip(img, 0, 255).astype(np.uint8), label


def _params(n_train: int, n_val: int, seed: int, min_side: int, max_side: int) -> dict:
    return {"generator": "deeplab_dropout.data.synth", "version": SYNTH_VERSION, "n_train": n_train,
            "n_val": n_val, "seed": seed, "min_side": min_side, "max_side": max_side}


def save_mask(mask: np.ndarray, path: str | os.PathLike) -> None:
    """Write a uint8 label map as a VOC palette PNG."""
    im = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))
    im.putpalette(VOC_PALETTE)  # turns the L image into P with the labels as indices
    im.save(path, format="PNG", optimize=False)


def _existing(out: Path, params: dict, year: str) -> bool:
    """True if `out` already holds this exact generated dataset as VOC<year>; raise if that folder holds anything
    else (other years' folders beside it are left alone)."""
    vdir = voc_dir(out, year)
    if not vdir.exists():
        return False
    meta = vdir / "synth.json"
    try:
        found = json.loads(meta.read_text())
    except (OSError, ValueError):
        found = None
    if found != params:
        what = f"a generated dataset with {found}" if isinstance(found, dict) else "other data (no synth.json)"
        raise DatasetError(
            f"refusing to overwrite {vdir}: it holds {what}, not {params}; "
            "use another --out / data.root or delete that folder"
        )
    return True


def _write(vdir: Path, n_train: int, n_val: int, seed: int, min_side: int, max_side: int) -> None:
    """Render the images and masks into `vdir` and list them in ImageSets/Segmentation/{train,val,trainval}.txt."""
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (vdir / sub).mkdir(parents=True)
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for index in range(n_train + n_val):
        split, local = ("train", index) if index < n_train else ("val", index - n_train)
        image_id = f"synth_{index:06d}"
        # Each image has its own stream: independent of generation order.
        rng = np.random.default_rng([seed, index])
        forced = local % N_OBJ_CLASSES + 1 if local < N_OBJ_CLASSES else None
        img, label = _render(rng, min_side, max_side, forced)
        Image.fromarray(img).save(vdir / "JPEGImages" / f"{image_id}.jpg", quality=90)
        save_mask(label, vdir / "SegmentationClass" / f"{image_id}.png")
        splits[split].append(image_id)
    sets = vdir / "ImageSets" / "Segmentation"
    for name, ids in (*splits.items(), ("trainval", splits["train"] + splits["val"])):
        (sets / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))


def remove_abandoned(out: Path) -> None:
    """Delete the temp folders (``.synth-<pid>-*``) that killed generators left in ``out``: those whose process
    is gone (a generator running now keeps its own)."""
    for tmp in out.glob(".synth-*"):
        pid = tmp.name.split("-")[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def generate(out: str | os.PathLike, n_train: int = 200, n_val: int = 50, seed: int = 0,
             min_side: int = 300, max_side: int = 500, year: str | int = "2012") -> Path:
    """Write (or reuse) `out/VOCdevkit/VOC<year>` with JPEGs, palette PNG masks and ImageSets; return `out`.
    The year names the folder only: every year gets the same images for the same parameters."""
    if n_train < 1 or n_val < 1:
        raise DatasetError(f"synthetic dataset needs at least 1 train and 1 val image (got {n_train}, {n_val})")
    if not 16 <= min_side <= max_side:
        raise DatasetError(f"synthetic image sides need 16 <= min_side <= max_side (got {min_side}, {max_side})")
    out, year = Path(out).expanduser(), str(year)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} is not a folder: the generated dataset needs a folder to hold VOCdevkit/")
    params = _params(int(n_train), int(n_val), int(seed), int(min_side), int(max_side))
    if _existing(out, params, year):
        return out
    (out / "VOCdevkit").mkdir(parents=True, exist_ok=True)
    remove_abandoned(out)
    # Build in a sibling temp folder and rename at the end, so a crash or a parallel run never
    # leaves a half-written dataset that later looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".synth-{os.getpid()}-", dir=out))
    try:
        vdir = voc_dir(tmp, year)
        _write(vdir, int(n_train), int(n_val), int(seed), int(min_side), int(max_side))
        (vdir / "synth.json").write_text(json.dumps(params, indent=2) + "\n")
        try:
            os.rename(vdir, voc_dir(out, year))
        except OSError:
            # Someone else finished first: fine if it is the same dataset.
            if not _existing(out, params, year):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
