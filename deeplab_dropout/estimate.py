"""A run's time, estimated before it starts (the sweep plan): its FLOPs -- torch's FlopCounterMode over one
training step and one evaluation forward of its model, built on the meta device (no memory, no weights) --
times the images it will see, at the rate this device reaches now on a convolution at the run's precision,
times the share of that rate a whole training step reaches here (scripts/bench.py's ``ours ÷ conv`` ratio in the
newest benchmarks/ record of this kind of device, else DEFAULT_EFFICIENCY).

Rough by design: data loading and the per-epoch bookkeeping are not FLOPs. The sweep's ETA after each job, from
the jobs finished so far, replaces it.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.flop_counter import FlopCounterMode

from deeplab_dropout.model import build_model
from deeplab_dropout.runtime import Runtime, resolve_device

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"  # scripts/bench.py's records
DEFAULT_EFFICIENCY = 0.5  # a training step's FLOP/s ÷ a convolution's, without a record for this device
VOC_SIZES = {"train": 1464, "val": 1449, "trainval": 2913}  # VOC 2012's segmentation lists, when the data is absent


def flops_per_image(cfg: DictConfig) -> tuple[float, float]:
    """(training FLOPs per image: forward and backward, evaluation FLOPs per image: forward) of ``cfg``'s model
    at its crop size (the validation image at data.base_size's square when data.val_crop=full)."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.model.pretrained = "none"  # the shapes only: no weights to read
    with torch.device("meta"):
        model = build_model(cfg, validate=False)
        crop, val_side = int(cfg.data.crop_size), int(cfg.data.crop_size)
        if cfg.data.val_crop == "full":
            val_side = int(cfg.data.base_size)
        images = torch.empty(2, 3, crop, crop)  # 2: batch norm needs more than one value per channel
        with FlopCounterMode(display=False) as train:
            model(images).float().sum().backward()
        model.eval()
        with FlopCounterMode(display=False) as val, torch.no_grad():
            model(torch.empty(1, 3, val_side, val_side))
    return train.get_total_flops() / 2, float(val.get_total_flops())


def list_size(cfg: DictConfig, split: str) -> int | None:
    """The number of ids in the dataset's ImageSets/Segmentation/<split>.txt, if it is there."""
    year = str(cfg.data.get("year", 2012))
    path = Path(str(cfg.data.root)) / "VOCdevkit" / f"VOC{year}" / "ImageSets" / "Segmentation" / f"{split}.txt"
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return None


def images_per_epoch(cfg: DictConfig) -> tuple[int, int]:
    """(training images per epoch, validation images): the lists' sizes (the generated dataset's, or VOC 2012's
    when the data is not there yet), the training list times data.fraction (the split keeps about that share),
    with the trainer's caps and the last partial batch dropped as training does."""
    d, t = cfg.data, cfg.trainer
    synth = d.get("synth") or {}
    n_train = list_size(cfg, str(d.train_split)) or synth.get("train") or VOC_SIZES.get(str(d.train_split), 1464)
    n_val = list_size(cfg, str(d.val_split)) or synth.get("val") or VOC_SIZES.get(str(d.val_split), 1449)
    n_train = max(1, round(n_train * float(d.fraction))) * int(d.augment.repeats)
    steps = n_train // t.batch_size if t.drop_last else math.ceil(n_train / t.batch_size)
    if t.max_train_steps is not None:
        steps = min(steps, int(t.max_train_steps))
    if t.max_val_images is not None:
        n_val = min(n_val, int(t.max_val_images))
    return steps * int(t.batch_size), int(n_val)


@cache
def conv_flops_per_s(device: str, dtype: torch.dtype | None) -> float:
    """FLOP/s of a 3×3, 128-channel convolution's forward on ``device`` under autocast ``dtype``, best of 5."""
    x = torch.randn(8, 128, 32, 32, device=device)
    w = torch.randn(128, 128, 3, 3, device=device)
    flops = 2 * 8 * 128 * 128 * 9 * 32 * 32
    best = math.inf
    with torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for _ in range(6):
            start = time.perf_counter()
            torch.nn.functional.conv2d(x, w, padding=1)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return flops / best


def efficiency(device_type: str, precision: str, records: Path = BENCHMARKS) -> float:
    """A training step's FLOP/s ÷ a convolution's in the newest bench record of ``device_type`` (cpu | cuda) at
    ``precision`` (fp32 | auto), else DEFAULT_EFFICIENCY."""
    for path in sorted(records.glob("*.json"), reverse=True):  # named <date>-<device>-...: newest first
        try:
            record = json.loads(path.read_text())
            if record["bench"]["device"] != device_type:
                continue
            rates = record["step"]["flop_per_s"]
            return float(rates[f"ours_{precision}"]["median"]) / float(rates[f"conv_{precision}"]["median"])
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
            continue
    return DEFAULT_EFFICIENCY


def estimate_seconds(cfg: DictConfig, runtime: Runtime) -> float:
    """The estimated time of ``cfg``'s whole run on ``runtime``'s device."""
    train_flops, val_flops = flops_per_image(cfg)
    n_train, n_val = images_per_epoch(cfg)
    precision = "fp32" if runtime.amp_dtype is None else "auto"
    rate = conv_flops_per_s(str(runtime.device), runtime.amp_dtype) * efficiency(runtime.device.type, precision)
    evaluations = sum(1 for e in range(1, cfg.trainer.epochs + 1)
                      if e % cfg.trainer.eval_every == 0 or e == cfg.trainer.epochs)
    return (cfg.trainer.epochs * n_train * train_flops + evaluations * n_val * val_flops) / rate


def estimate_times(jobs: Iterable) -> str:
    """Set ``seconds`` on each job that runs (plan.PlannedJob) to its estimate; jobs alike in everything but
    the regulariser share one count. Returns the device they were estimated on."""
    runtime, seen = None, {}
    for job in jobs:
        if not job.runs:
            continue
        runtime = runtime or resolve_device(job.cfg)
        shape = OmegaConf.to_container(job.cfg, resolve=True)
        for key in ("dropout", "placement", "cell", "schedule", "seed", "report"):
            shape.pop(key, None)
        signature = json.dumps(shape, sort_keys=True, default=str)
        if signature not in seen:
            seen[signature] = estimate_seconds(job.cfg, runtime)
        job.seconds = seen[signature]
    return str(runtime) if runtime is not None else "this device"
