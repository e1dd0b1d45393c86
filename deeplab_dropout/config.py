"""Start-up validation of the composed config: every bad value fails before any work, in one line.

Hydra already rejects unknown keys (struct mode) and unknown group options (listing the available ones);
this checks the values inside the groups, once: the code that uses them trusts them, and the keys a `+`
override added inside them (``+trainer.epoch=3``: no code reads it). The allowed values live here (the
study's vocabulary in deeplab_dropout.study), and this module imports no torch. A misspelt value or key is
answered with the closest allowed one ("did you mean ...?").
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path

import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import deeplab_dropout.resolvers  # noqa: F401  (registers the resolvers conf/ uses)
from deeplab_dropout.study import DROPOUT_NAMES, PLACEMENT_PARTS, SCHEDULES

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # the apps' Hydra configs (train.yaml, eval.yaml)

# Blocks per layer of each torchvision ResNet (and whether it uses Bottleneck blocks).
BACKBONES: dict[str, tuple[list[int], bool]] = {
    "resnet18": ([2, 2, 2, 2], False),
    "resnet34": ([3, 4, 6, 3], False),
    "resnet50": ([3, 4, 6, 3], True),
    "resnet101": ([3, 4, 23, 3], True),
    "resnet152": ([3, 8, 36, 3], True),
}
# The other families (model=fcn_resnet101 | unet | fpn_resnet101 | course_fcn): deeplab_dropout.model.fcn, .unet,
# .fpn and .course.
NET_ARCHS = ("fcn", "unet", "fpn", "encdec")
ARCHS = ("deeplabv3plus", "torchvision_deeplabv3", *NET_ARCHS)
# Architectures with an encoder of their own instead of a ResNet: no model.backbone, random init only, and each
# encoder level is both a block and a stage (one resnet site per level).
OWN_ENCODER_ARCHS = ("unet", "encdec")
# The Table 2 parts (placement words) each architecture has regulariser sites for (README "Models and sites").
ARCH_PARTS = {"deeplabv3plus": ("resnet", "spp", "decoder"), "torchvision_deeplabv3": (),
              "fcn": ("resnet", "decoder"), "unet": ("resnet", "spp", "decoder"), "fpn": ("resnet", "spp", "decoder"),
              "encdec": ("resnet", "spp", "decoder")}
# Named weights per architecture (besides a file; the U-Net takes none: random init only).
PRETRAINED = {"deeplabv3plus": ("imagenet", "none"), "torchvision_deeplabv3": ("coco_with_voc_labels", "none"),
              "fcn": ("imagenet", "coco_with_voc_labels", "none"), "unet": ("none",), "fpn": ("imagenet", "none"),
              "encdec": ("none",)}
OUTPUT_STRIDES = (8, 16)
POOL_NORMS = ("bn", "none")
RESNET_SITES = ("blocks", "blocks_and_skips", "stages", "first_block")
SPP_SITES = ("output", "branches")
RESNET_STAGES = (1, 2, 3, 4)
GRANULARITIES = ("iteration", "epoch")
SPLIT_METHODS = ("per_class", "authors", "min_cover")
YEARS = ("2007", "2012")  # data.year: reads VOCdevkit/VOC<year> (an int in conf/data; checked and used as str)
VAL_CROPS = ("center", "full")
VAL_LISTS = ("unique", "per_class")  # data.val_list (data.get_val_dataset)
LABEL_PADS = (255, 0)  # data.label_pad: the train crop's label fill (data.transforms)
LOSSES = ("ce", "focal")
CLASS_WEIGHTS = ("none", "inverse_frequency", "log_inverse_frequency")  # or a list (deeplab_dropout.class_weights)
OPTIMIZERS = ("sgd_poly", "adamw")  # optim.name: torch.optim.SGD | torch.optim.AdamW
LR_SCHEDULES = ("poly", "cosine", "cosine_restarts")  # optim.schedule (schedules.lr_at)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
EVAL_PRECISIONS = ("fp32", "same")
DATA_CACHES = ("auto", "ram", "off")
VAL_CACHES = ("auto", "ram", "device", "off")
MONITORS = ("miou", "pixel_acc", "per_image_miou_mean", "batch_miou_mean")
RESUME = ("auto", "never")
FIDELITIES = ("paper", "authors_code")  # the `fidelity` group: the paper's text | the authors' code
# The `report` node: Table 3/4 statistics over images | batches; the Loss column's epoch; the paper's tables.
REPORT_OPTIONS = {"statistics": ("image", "batch"), "loss_epoch": ("best", "min"), "reference": ("paper", "none")}
REPORT_COLUMNS = ("paper", "course")  # report.md's column sets (report.tables.COLUMN_SETS), hydra.callbacks.report.columns


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""


def invalid(key: str, value, expected: str) -> ConfigError:
    """The one-line error for ``key=value``, e.g. ``dropout.p=1.0 is invalid: expected a number in [0, 1)``."""
    return ConfigError(f"{key}={value!r} is invalid: expected {expected}")


def did_you_mean(word: str, choices: Iterable, prefix: str = "") -> str:
    """``"; did you mean <prefix><choice>?"`` for the choice closest to a misspelt ``word``, or ``""``."""
    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f"; did you mean {prefix}{match[0]}?" if match else ""


def unknown_key(key: str, siblings: Iterable[str]) -> str:
    """The one line for a dotted ``key`` the config does not have, given the keys of its node: the closest
    of them if one is close; else, at the top level, how to add a key of one's own (``+key=...``), inside a
    node, the keys it has (a key added there would be read by no code)."""
    parent, _, name = key.rpartition(".")
    siblings = list(siblings)
    guess = did_you_mean(name, siblings, f"{parent}." if parent else "")
    if guess:
        return f"{key} is not a config key{guess}"
    if not parent:
        return f"{key} is not a config key (use +{key}=... to add one)"
    if not siblings:
        return f"{key} is not a config key"
    return f"{key} is not a config key ({parent} has {', '.join(siblings)})"


def _one_of(key: str, value, allowed: Iterable) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        guess = did_you_mean(value, allowed) if isinstance(value, str) else ""
        raise ConfigError(f"{invalid(key, value, 'one of ' + ', '.join(map(str, allowed)))}{guess}")


def _number(key: str, value, low: float, high: float | None = None, *, low_open=False, high_open=False,
            integer=False) -> None:
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    ok = ok and not isinstance(value, bool)
    high_open = high_open or high is None
    rng = f"{'(' if low_open else '['}{low}, {'inf' if high is None else high}{')' if high_open else ']'}"
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        raise invalid(key, value, f"{kind} in {rng}")


def _as_list(value):
    """A config list as a plain list (to check and to show in a message); any other value as it is."""
    return list(value) if OmegaConf.is_list(value) else value


def _is_numbers(value, integer: bool = False) -> bool:
    """Whether ``value`` is a plain list of numbers (integers if ``integer``); booleans are neither."""
    kind = int if integer else int | float
    return isinstance(value, list) and all(isinstance(x, kind) and not isinstance(x, bool) for x in value)


def _check_bool(key: str, value) -> None:
    if not isinstance(value, bool):  # `in (True, False)` would let 1 and 0 through
        raise invalid(key, value, "true or false")


def _placement(cfg: DictConfig) -> None:
    """Where dropout goes (model.regularizer_sites turns these values into module names)."""
    pl = cfg.placement
    _one_of("placement.resnet_sites", pl.resnet_sites, RESNET_SITES)
    _one_of("placement.spp_sites", pl.spp_sites, SPP_SITES)
    expected = "a non-empty list of distinct stages from " + ", ".join(map(str, RESNET_STAGES))
    try:
        stages = [int(s) for s in pl.resnet_stages]
    except (TypeError, ValueError):
        raise invalid("placement.resnet_stages", pl.resnet_stages, expected) from None
    if not stages or not set(stages) <= set(RESNET_STAGES) or len(set(stages)) != len(stages):
        raise invalid("placement.resnet_stages", stages, expected)
    if pl.resnet and pl.resnet_sites == "first_block" and 1 not in stages:
        raise ConfigError(f"placement.resnet_sites=first_block is inside layer1 but placement.resnet_stages="
                          f"{stages} excludes stage 1")


def _multi_grid(m: DictConfig) -> None:
    """layer4's Multi-Grid: one positive integer per layer4 block (extra entries are unused)."""
    grid = _as_list(m.multi_grid)
    blocks = BACKBONES[m.backbone][0][3]
    if not (_is_numbers(grid, integer=True) and len(grid) >= blocks and all(g >= 1 for g in grid)):
        raise invalid("model.multi_grid", grid, f"a list of at least {blocks} positive integers (one per layer4 "
                      f"block of {m.backbone}), e.g. [1, 2, 4]")


def _torchvision_deeplabv3(cfg: DictConfig) -> None:
    """torchvision's DeepLabv3 (the pretrained-base row) is one fixed model without regulariser sites."""
    m, pl = cfg.model, cfg.placement
    if m.backbone != "resnet101" or m.output_stride != 8:
        raise ConfigError(f"model.arch=torchvision_deeplabv3 is torchvision's resnet101 at output stride 8, got "
                          f"model.backbone={m.backbone}, model.output_stride={m.output_stride}")
    if cfg.dropout.name != "none" and (pl.resnet or pl.spp or pl.decoder):
        raise ConfigError("model.arch=torchvision_deeplabv3 has no regulariser sites: use placement=none or "
                          "dropout=none (cell=none)")


def _placement_exists(cfg: DictConfig) -> None:
    """A placement needs sites in the model (FCN has no context module, so no spp sites)."""
    m, pl = cfg.model, cfg.placement
    have = ARCH_PARTS[m.arch]
    missing = [part for part in ("resnet", "spp", "decoder") if pl[part] and part not in have]
    if cfg.dropout.name != "none" and missing:
        valid = [name for name, parts in PLACEMENT_PARTS.items() if set(parts) <= set(have)]
        raise ConfigError(f"model={m.name} has no {' or '.join(missing)} sites (placement.{missing[0]}=true); "
                          f"valid placements for it: {', '.join(valid)}")


def _net(cfg: DictConfig) -> None:
    """FCN, U-Net, FPN and the course model (NET_ARCHS): their own keys and the sites they have."""
    m, pl = cfg.model, cfg.placement
    if m.arch == "fcn":
        _check_bool("model.freeze_backbone", m.freeze_backbone)
        if m.pretrained == "coco_with_voc_labels" and (m.backbone != "resnet101" or m.num_classes != 21):
            raise ConfigError(f"model.pretrained=coco_with_voc_labels is torchvision's fcn_resnet101 with 21 "
                              f"classes, got model.backbone={m.backbone}, model.num_classes={m.num_classes}")
    elif m.arch == "unet":
        _number("model.unet_base_channels", m.unet_base_channels, 1, integer=True)
    elif m.arch == "encdec":
        _course_channels(m.channels)
    else:
        _number("model.fpn_channels", m.fpn_channels, 1, integer=True)
        _number("model.head_channels", m.head_channels, 1, integer=True)
    _placement_exists(cfg)
    if cfg.dropout.name == "none":
        return
    if m.arch != "fcn" and pl.spp and pl.spp_sites != "output":
        raise ConfigError(f"placement.spp_sites={pl.spp_sites} is invalid for model={m.name}: expected output "
                          f"(it has no ASPP branches)")
    if m.arch in OWN_ENCODER_ARCHS and pl.resnet and pl.resnet_sites not in ("blocks", "stages"):
        raise ConfigError(f"placement.resnet_sites={pl.resnet_sites} is invalid for model={m.name}: expected "
                          f"blocks or stages (both: after each encoder level)")


def _course_channels(channels) -> None:
    """The course encoder-decoder's widths: one per encoder block, 5 blocks (the placement stages 1..4 name
    blocks 1..4; the 5th block's output is the spp site)."""
    widths = _as_list(channels)
    if not (_is_numbers(widths, integer=True) and len(widths) == 5 and all(c >= 1 for c in widths)):
        raise invalid("model.channels", widths, "a list of 5 positive integers (encoder widths), e.g. [32, 64, 128, "
                      "256, 512]")


def _model(cfg: DictConfig) -> None:
    m = cfg.model
    _one_of("model.arch", m.arch, ARCHS)
    if m.arch not in OWN_ENCODER_ARCHS:  # no ResNet in these (model.backbone: none)
        _one_of("model.backbone", m.backbone, BACKBONES)
    _one_of("model.output_stride", m.output_stride, OUTPUT_STRIDES)
    named = PRETRAINED[m.arch]
    if m.arch in OWN_ENCODER_ARCHS and m.pretrained not in named:
        raise invalid("model.pretrained", m.pretrained, f"none (model.arch={m.arch} is trained from random init)")
    if m.pretrained not in named and not Path(str(m.pretrained)).expanduser().is_file():
        raise invalid("model.pretrained", m.pretrained, f"{', '.join(named)} or an existing file")
    _number("model.num_classes", m.num_classes, 2, integer=True)
    _one_of("model.pool_norm", m.pool_norm, POOL_NORMS)
    _check_bool("model.align_corners", m.align_corners)
    if m.arch == "deeplabv3plus":
        _multi_grid(m)
    elif m.arch == "torchvision_deeplabv3":
        _torchvision_deeplabv3(cfg)
    else:
        _net(cfg)


def _data(d: DictConfig) -> None:
    _number("data.fraction", d.fraction, 0, 1, low_open=True)
    _number("data.split_seed", d.split_seed, 0, integer=True)
    _number("data.crop_size", d.crop_size, 1, integer=True)
    _number("data.base_size", d.base_size, 1, integer=True)
    _one_of("data.val_crop", d.val_crop, VAL_CROPS)
    _one_of("data.split_method", d.split_method, SPLIT_METHODS)
    _one_of("data.val_list", d.val_list, VAL_LISTS)
    pad = d.label_pad  # `in` alone would let false (== 0) and 255.0 through
    if not (isinstance(pad, int) and not isinstance(pad, bool) and pad in LABEL_PADS):
        raise invalid("data.label_pad", d.label_pad, "one of " + ", ".join(map(str, LABEL_PADS)))
    year = d.get("year", "2012")  # Hydra parses data.year=2007 as an int: the code uses str(year)
    if str(year) not in YEARS:
        raise invalid("data.year", year, "one of " + ", ".join(YEARS))
    lo, hi = d.scale_range
    if not 0 < lo <= hi:
        raise invalid("data.scale_range", list(d.scale_range), "[min, max] with 0 < min <= max")
    lo, hi = d.blur_radius
    if not 0 <= lo <= hi:
        raise invalid("data.blur_radius", list(d.blur_radius), "[min, max] with 0 <= min <= max")
    _number("data.flip_p", d.flip_p, 0, 1)
    _number("data.blur_p", d.blur_p, 0, 1)
    _one_of("data.cache", d.cache, DATA_CACHES)
    _one_of("data.val_cache", d.val_cache, VAL_CACHES)
    _augment(d.augment)


def _augment(a: DictConfig) -> None:
    """The training augmentation beyond Table 1 (data.transforms, data.get_datasets)."""
    _number("data.augment.rotation_degrees", a.rotation_degrees, 0, 180)
    _number("data.augment.repeats", a.repeats, 1, integer=True)


def _dropout_and_schedule(cfg: DictConfig) -> None:
    _number("dropout.p", cfg.dropout.p, 0, 1, high_open=True)
    _number("dropout.block_size", cfg.dropout.block_size, 1, integer=True)
    # 0 < scale <= 1: the DropBlock paper divides gamma by 4 in group 3 (0.25); 0 would silence the stage.
    _number("dropout.group3_gamma_scale", cfg.dropout.get("group3_gamma_scale", 1.0), 0, 1, low_open=True)
    s = cfg.schedule
    _one_of("schedule.name", s.name, SCHEDULES)
    _one_of("schedule.granularity", s.granularity, GRANULARITIES)
    _number("schedule.ramp_epochs", s.ramp_epochs, 0)
    # The ramp length alone decides the schedule (schedules.drop_p); the name must agree with it.
    if s.name == "linear":
        _number("schedule.ramp_epochs", s.ramp_epochs, 0, low_open=True)
    elif s.ramp_epochs != 0:
        raise invalid("schedule.ramp_epochs", s.ramp_epochs, "0 with schedule.name=constant (a ramp is "
                      "schedule=linear)")


def _loss(cfg: DictConfig) -> None:
    """The loss group (loss.make_criterion): name, reduction, class weights, focal γ and α."""
    lo = cfg.loss
    # The name follows the option file: loss.name=focal over loss=ce's keys would lack gamma and alpha.
    _one_of("loss.name", lo.name, LOSSES if "gamma" in lo else ("ce",))
    _one_of("loss.batch_average", lo.batch_average, (True, False))
    w, k = lo.class_weights, cfg.model.num_classes
    if OmegaConf.is_list(w) or isinstance(w, list):
        w = list(w)
        if not (_is_numbers(w) and len(w) == k and all(0 <= x < float("inf") for x in w) and any(x > 0 for x in w)):
            raise invalid("loss.class_weights", w, f"{', '.join(CLASS_WEIGHTS)} or a list of model.num_classes={k} "
                          "finite numbers >= 0, at least one > 0")
    else:
        _one_of("loss.class_weights", w, CLASS_WEIGHTS)
    if lo.name == "focal":
        _number("loss.gamma", lo.gamma, 0)
        if lo.alpha is not None:
            _number("loss.alpha", lo.alpha, 0, 1, low_open=True, high_open=True)


def _optim_and_loss(cfg: DictConfig) -> None:
    _loss(cfg)
    _optim(cfg.optim)


def _optim(o: DictConfig) -> None:
    """The optimiser (train.make_optimizer) and its LR schedule (schedules.lr_at)."""
    _one_of("optim.name", o.name, OPTIMIZERS)
    _number("optim.lr", o.lr, 0, low_open=True)
    _number("optim.head_lr_mult", o.head_lr_mult, 0, low_open=True)
    _number("optim.weight_decay", o.weight_decay, 0)
    _one_of("optim.schedule", o.schedule, LR_SCHEDULES)
    _number("optim.poly_power", o.poly_power, 0)
    _number("optim.eta_min", o.eta_min, 0)
    if o.schedule != "poly":  # only the cosines read these (t_max_epochs is trainer.epochs by default)
        if o.eta_min >= o.lr:
            raise invalid("optim.eta_min", o.eta_min, f"a number in [0, optim.lr={o.lr}) with optim.schedule="
                          f"{o.schedule}")
        _number("optim.t_max_epochs", o.t_max_epochs, 1)
    if o.name == "sgd_poly":
        _number("optim.momentum", o.momentum, 0, 1)
        _check_bool("optim.nesterov", o.nesterov)
        if o.nesterov and o.momentum == 0:
            raise invalid("optim.nesterov", o.nesterov, "false with optim.momentum=0 (Nesterov needs momentum)")
        return
    if "betas" not in o:  # optim.name=adamw typed over optim=sgd_poly's keys
        raise invalid("optim.name", o.name, "the optimiser's own option file: optim=adamw (optim.name follows it)")
    for key in ("momentum", "nesterov"):  # SGD's: with AdamW a value would be silently ignored
        if o[key] is not None:
            raise invalid(f"optim.{key}", o[key], f"null with optim.name={o.name} (AdamW's momentum is betas[0])")
    betas = _as_list(o.betas)
    if not (_is_numbers(betas) and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
        raise invalid("optim.betas", betas, "two numbers in [0, 1), e.g. [0.9, 0.999]")
    _number("optim.eps", o.eps, 0, low_open=True)


def _trainer(cfg: DictConfig) -> None:
    t = cfg.trainer
    _number("trainer.epochs", t.epochs, 1, integer=True)
    _number("trainer.batch_size", t.batch_size, 1, integer=True)
    if t.batch_size == 1 and cfg.model.pool_norm == "bn":
        raise ConfigError("trainer.batch_size=1 is invalid with model.pool_norm=bn: the image-pooling BatchNorm "
                          "sees one value per channel in training; use a batch of 2 or more, or model.pool_norm=none")
    _number("trainer.val_batch_size", t.val_batch_size, 1, integer=True)
    w = t.num_workers
    if w != "auto" and (not isinstance(w, int) or isinstance(w, bool) or w < 0):
        raise invalid("trainer.num_workers", w, "auto or an integer in [0, inf)")
    _number("trainer.eval_every", t.eval_every, 1, integer=True)
    _number("trainer.checkpoint_every", t.checkpoint_every, 1, integer=True)
    _number("trainer.log_every", t.log_every, 0, integer=True)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(t.device)):
        raise invalid("trainer.device", t.device, "auto, cpu, cuda or cuda:N")
    _one_of("trainer.precision", t.precision, PRECISIONS)
    _one_of("trainer.eval_precision", t.eval_precision, EVAL_PRECISIONS)
    _one_of("trainer.channels_last", t.channels_last, ("auto", True, False))
    _one_of("trainer.monitor", t.monitor, MONITORS)
    _one_of("trainer.resume", t.resume, RESUME)
    _one_of("trainer.progress", t.progress, ("auto", True, False))
    if not isinstance(t.compile_backend, str) or not t.compile_backend:
        raise invalid("trainer.compile_backend", t.compile_backend, "a torch.compile backend name, e.g. inductor")
    for key in ("drop_last", "rerun", "keep_last", "compile", "tune_malloc", "profile"):
        _check_bool(f"trainer.{key}", t[key])
    for key in ("max_train_steps", "max_val_images", "early_stop_patience"):
        if t[key] is not None:
            _number(f"trainer.{key}", t[key], 1, integer=True)


def _fidelity_and_report(cfg: DictConfig) -> None:
    """The `fidelity` preset's name and how the report shows the runs (`report`)."""
    _one_of("fidelity", cfg.get("fidelity", "paper"), FIDELITIES)
    report = cfg.get("report") or {}
    for key, allowed in REPORT_OPTIONS.items():
        _one_of(f"report.{key}", report.get(key, allowed[0]), allowed)


def config_dirs() -> tuple[Path, ...]:
    """conf/ and, in a Hydra app, the other config folders on its search path (``hydra.searchpath``: a user's
    own presets, which may give our nodes keys of their own)."""
    dirs = [CONF_DIR]
    if HydraConfig.initialized():
        dirs += [Path(source.path) for source in HydraConfig.get().runtime.config_sources
                 if source.schema == "file" and Path(source.path) != CONF_DIR]
    return tuple(dirs)


@cache
def defined_keys(dirs: tuple[Path, ...] = (CONF_DIR,)) -> dict[str, tuple[str, ...]]:
    """Every node the config files under ``dirs`` define (``""`` the top level, ``"data"``,
    ``"data.augment"``, ...) -> the keys any of those files gives it (a group's files at its package,
    ``# @package _global_`` files and the primary configs at the top; Hydra's own config left out). Options
    and presets differ in their keys (data.synth, model.unet_base_channels): a node's keys are their union."""
    keys: dict[str, set[str]] = {"": set()}
    for folder, path in sorted((d, p) for d in dirs for p in d.rglob("*.yaml")):
        group = path.parent.relative_to(folder).as_posix()
        if group.split("/")[0] == "hydra":
            continue
        if group != ".":
            keys[""].add(group.split("/")[0])  # a group's name, as in cell=..., is a top-level word too
        text = path.read_text()
        node = "" if group == "." or "# @package _global_" in text else group.replace("/", ".")
        content = yaml.safe_load(text) or {}
        content.pop("defaults", None)
        content.pop("hydra", None)
        for parent, key in _dict_keys(content, node):
            keys.setdefault(parent, set()).add(key)
    return {node: tuple(sorted(names)) for node, names in keys.items()}


def _dict_keys(content: dict, node: str) -> Iterator[tuple[str, str]]:
    """(node, key) for every key of a nested dict placed at ``node``, the nested nodes' keys included."""
    for key, value in content.items():
        yield node, str(key)
        if isinstance(value, dict):
            yield from _dict_keys(value, f"{node}.{key}" if node else str(key))


def check_keys(cfg: DictConfig) -> None:
    """Refuse a key that a `+` override added inside one of conf/'s nodes (``+trainer.epoch=3``,
    ``+dropout.pp=0.1``): no code reads it, and it is most likely a misspelt key. A top-level key of one's own
    (``+note=baseline``) is left alone unless it is close to a group or key of ours (``+dropuot=channel``)."""
    defined = defined_keys(config_dirs())
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)
    nodes = [("", container)]
    while nodes:
        node, content = nodes.pop()
        for key, value in content.items():
            path = f"{node}.{key}" if node else str(key)
            if key not in defined.get(node, ()):
                if node or did_you_mean(key, defined[""]):
                    raise ConfigError(unknown_key(path, defined.get(node, ())))
            elif isinstance(value, dict) and path in defined:
                nodes.append((path, value))


def validate(cfg: DictConfig, keys: bool = True) -> None:
    """Raise ConfigError for the first invalid value in a composed train/eval config, or (``keys``) a key
    added inside one of its nodes (check_keys; not for a saved run's config, which may hold keys conf/ has
    since dropped)."""
    if keys:
        check_keys(cfg)
    _one_of("dropout.name", cfg.dropout.name, DROPOUT_NAMES)
    _placement(cfg)
    _model(cfg)
    _data(cfg.data)
    _dropout_and_schedule(cfg)
    _optim_and_loss(cfg)
    _trainer(cfg)
    _fidelity_and_report(cfg)
    _number("seed", cfg.seed, 0, integer=True)


def one_line(e: BaseException) -> str:
    """The last line of an exception's message (DataLoader workers prepend their traceback to it)."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
    return re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1]) if len(lines) > 1 else lines[-1]
