"""Start-up validation of the composed config: every bad value fails before any work, in one line.

Hydra already rejects unknown keys (struct mode) and unknown group options (listing the available ones);
this checks the values inside the groups.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from deeplab_dropout.model import ARCHS, BACKBONES, regularizer_sites
from deeplab_dropout.schedules import GRANULARITIES, SCHEDULE_NAMES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
VAL_CROPS = ("center", "full")
MONITORS = ("miou", "pixel_acc", "per_image_miou_mean")
RESUME = ("auto", "never")
SPLIT_METHODS = ("per_class", "authors", "min_cover")
LOSSES = ("ce",)
POOL_NORMS = ("bn", "none")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""


def _check(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: expected {allowed}")


def _one_of(key: str, value, allowed: Iterable) -> None:
    allowed = tuple(allowed)
    _check(value in allowed, key, value, "one of " + ", ".join(map(str, allowed)))


def _number(key: str, value, low: float, high: float | None = None, *, low_open=False, integer=False) -> None:
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    ok = ok and not isinstance(value, bool)
    rng = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}{')' if high is None else ']'}"
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    _check(ok, key, value, f"{kind} in {rng}")


def _multi_grid(m: DictConfig) -> None:
    """layer4's Multi-Grid: one positive integer per layer4 block (extra entries are unused)."""
    grid = list(m.multi_grid) if OmegaConf.is_list(m.multi_grid) else m.multi_grid
    blocks = BACKBONES[m.backbone][0][3]
    ok = isinstance(grid, list) and len(grid) >= blocks and all(
        isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)
    _check(ok, "model.multi_grid", grid, f"a list of at least {blocks} positive integers (one per layer4 "
           f"block of {m.backbone}), e.g. [1, 2, 4]")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first invalid value in a composed train/eval config."""
    m = cfg.model
    try:  # model.backbone, dropout.name and the placement keys, checked where they are used
        regularizer_sites(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    _one_of("model.output_stride", m.output_stride, (8, 16))
    _one_of("model.arch", m.arch, ARCHS)
    named = ("coco_with_voc_labels", "none") if m.arch == "torchvision_deeplabv3" else ("imagenet", "none")
    pre = m.pretrained
    if pre not in named and not Path(str(pre)).expanduser().is_file():
        raise ConfigError(f"model.pretrained={pre!r} is invalid: expected {', '.join(named)} or an existing file")
    _number("model.num_classes", m.num_classes, 2, integer=True)
    _one_of("model.pool_norm", m.pool_norm, POOL_NORMS)
    if m.arch == "deeplabv3plus":
        _multi_grid(m)

    d = cfg.data
    _number("data.fraction", d.fraction, 0, 1, low_open=True)
    _number("data.split_seed", d.split_seed, 0, integer=True)
    _number("data.crop_size", d.crop_size, 1, integer=True)
    _number("data.base_size", d.base_size, 1, integer=True)
    _one_of("data.val_crop", d.val_crop, VAL_CROPS)
    _one_of("data.split_method", d.split_method, SPLIT_METHODS)
    lo, hi = d.scale_range
    _check(0 < lo <= hi, "data.scale_range", list(d.scale_range), "[min, max] with 0 < min <= max")
    lo, hi = d.blur_radius
    _check(0 <= lo <= hi, "data.blur_radius", list(d.blur_radius), "[min, max] with 0 <= min <= max")
    _number("data.flip_p", d.flip_p, 0, 1)
    _number("data.blur_p", d.blur_p, 0, 1)

    _number("dropout.p", cfg.dropout.p, 0, 1)
    _check(cfg.dropout.p < 1, "dropout.p", cfg.dropout.p, "a number in [0, 1)")
    _number("dropout.block_size", cfg.dropout.block_size, 1, integer=True)

    _one_of("schedule.name", cfg.schedule.name, SCHEDULE_NAMES)
    _one_of("schedule.granularity", cfg.schedule.granularity, GRANULARITIES)
    _number("schedule.ramp_epochs", cfg.schedule.ramp_epochs, 0)
    if cfg.schedule.name == "linear":
        _number("schedule.ramp_epochs", cfg.schedule.ramp_epochs, 0, low_open=True)

    _one_of("loss.name", cfg.loss.name, LOSSES)
    _one_of("loss.batch_average", cfg.loss.batch_average, (True, False))

    o = cfg.optim
    _number("optim.lr", o.lr, 0, low_open=True)
    _number("optim.head_lr_mult", o.head_lr_mult, 0, low_open=True)
    _number("optim.momentum", o.momentum, 0, 1)
    _number("optim.weight_decay", o.weight_decay, 0)
    _number("optim.poly_power", o.poly_power, 0)

    t = cfg.trainer
    _number("trainer.epochs", t.epochs, 1, integer=True)
    _number("trainer.batch_size", t.batch_size, 1, integer=True)
    if t.batch_size == 1 and m.pool_norm == "bn":
        raise ConfigError("trainer.batch_size=1 is invalid with model.pool_norm=bn: the image-pooling BatchNorm "
                          "sees one value per channel in training; use a batch of 2 or more, or model.pool_norm=none")
    _number("trainer.val_batch_size", t.val_batch_size, 1, integer=True)
    _number("trainer.num_workers", t.num_workers, 0, integer=True)
    _number("trainer.eval_every", t.eval_every, 1, integer=True)
    _check(bool(re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(t.device))), "trainer.device", t.device,
           "auto, cpu, cuda or cuda:N")
    _one_of("trainer.precision", t.precision, PRECISIONS)
    _one_of("trainer.channels_last", t.channels_last, ("auto", True, False))
    _one_of("trainer.monitor", t.monitor, MONITORS)
    _one_of("trainer.resume", t.resume, RESUME)
    _one_of("trainer.progress", t.progress, ("auto", True, False))
    for key in ("max_train_steps", "max_val_images"):
        if t[key] is not None:
            _number(f"trainer.{key}", t[key], 1, integer=True)
    _number("seed", cfg.seed, 0, integer=True)


def one_line(e: BaseException) -> str:
    """The last line of an exception's message (DataLoader workers prepend their traceback to it)."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
    return re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1]) if len(lines) > 1 else lines[-1]
