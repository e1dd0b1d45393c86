"""Speed of the runner against this machine's own limits, as ratios measured in one run (never timed tests).

    python scripts/bench.py --quick               # < 1 min on 2 idle CPU cores: ResNet-50 at 129², 3 rounds, no (i)
    python scripts/bench.py                       # ResNet-101 OS16 DeepLabv3+, batch 2 × 321², CPU, 5 rounds
    python scripts/bench.py --device cuda         # batch 8 × 513² (the study's batch and crop), 10 rounds

Sections (each printed row names the config it used):
(a) train-step images/s at fp32 and at the default precision (trainer.precision=auto, as the runner resolves it);
(b) FLOPs per step (FlopCounterMode, forward+backward); achieved FLOP/s ÷ a dense n×n×n GEMM timed in the same
    rounds at the same precision, and ÷ the faster of that GEMM and a dense 3×3 convolution (on CPU oneDNN's
    convolutions can run above the BLAS's GEMM: the step can exceed the GEMM, never the faster of the two);
(c) torchvision's own deeplabv3_<backbone> train step on the same input, ours ÷ theirs in FLOP/s;
(d) the engine's ``evaluate`` with data.val_cache=ram vs off (VOC-sized generated images), the most a cache can
    gain on this device, and evaluation's wall time ÷ the time inside the model;
(e) the demo's `none` cell trained by the runner itself (``train.run``, trainer.profile=true), --repeats runs
    one after another in this process as the demo's sweep runs its cells: where a run's time goes (data,
    steps, evaluation, bookkeeping, and outside the epochs), read from each run's results.json;
(f) projected time of one 50-epoch study run and of the 31-run study from (a), (d), (e) and the FLOP count;
(g) the cost of the regularisers (each `all-*` cell ÷ `none`; our DropBlock ÷ torchvision's drop_block2d);
(h) each architecture's train step (DeepLabv3+, FCN, FPN, U-Net): FLOPs, images/s, time ÷ DeepLabv3+'s;
(i) trainer.tune_malloc: (e)'s run through the CLI (`python -m deeplab_dropout.train`), each in a fresh process,
    false ÷ true in results.json's seconds (not in --quick).
The step timed in (a)-(c), (g) and (h) is the engine's: ``engine.forward``, the loss group's criterion and
``train.make_optimizer``'s SGD. Every section but (i) runs with the runner's default trainer.tune_malloc=true.
Timed calls are interleaved round by round so that drift hits all alike; each ratio is its median (min–max)
over rounds. The machine is shared and noisy: compare ratios within one run, never times across runs.
Prints the table (progress on stderr) and writes a JSON record and a Markdown table named by date and machine
into benchmarks/ (--out DIR, or --json PATH with the Markdown beside it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

from deeplab_dropout.config import CONF_DIR  # the runner's own conf/
from deeplab_dropout.data import get_val_dataset, prepare_root
from deeplab_dropout.data.loaders import make_val_loader
from deeplab_dropout.engine import evaluate, forward
from deeplab_dropout.loss import make_criterion
from deeplab_dropout.model import build_model
from deeplab_dropout.rundir import RunDir
from deeplab_dropout.runtime import Runtime, cpu_has_native, resolve_device, tune_malloc
from deeplab_dropout.train import PROFILE_KEYS, TIMING_KEYS, make_optimizer, run

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"  # the record of each machine, in the repo
SECTIONS = ("step", "eval", "demo", "project", "reg", "models", "malloc")
NOTE = ("Shared, noisy machine: only ratios measured within this one run mean anything; each ratio is the "
        "median (min–max) over interleaved rounds.")


@dataclass(frozen=True)
class Bench:
    """The config of the step sections (a)–(c), (h), the repeats of every section, the demo's epochs."""

    backbone: str
    size: int
    batch: int
    device: str
    repeats: int
    gemm_n: int
    quick: bool
    demo_epochs: int | None = None  # None: the demo preset's (8)

    def describe(self) -> str:
        """One line naming the step config, e.g. ``resnet101 OS16 DeepLabv3+, batch 2 × 321², cpu``."""
        return f"{self.backbone} OS16 DeepLabv3+, batch {self.batch} × {self.size}², {self.device}"


@dataclass
class Table:
    """Rows (section, quantity, value, config) printed at the end, and the JSON record beside them."""

    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    record: dict = field(default_factory=dict)

    def add(self, section: str, quantity: str, value: str, config: str = "") -> None:
        """Append one row."""
        self.rows.append((section, quantity, value, config))

    def shown(self) -> list[tuple[str, ...]]:
        """The rows with a config repeated from the row above left blank, so each one reads once."""
        return [(*r[:3], "" if i and r[3] == self.rows[i - 1][3] else r[3]) for i, r in enumerate(self.rows)]

    def render(self) -> str:
        """The rows as an aligned text table."""
        rows = [("", "quantity", "value", "config"), *self.shown()]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)

    def markdown(self) -> str:
        """The rows as a Markdown table."""
        lines = ["| | quantity | value | config |", "|---|---|---|---|"]
        lines += ["| " + " | ".join(c.strip().replace("|", "\\|") for c in r) + " |" for r in self.shown()]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- pure helpers
def spread(values: list[float]) -> dict:
    """Median, min and max of ``values`` (the repeats of one measured quantity or ratio) and their count."""
    if not values:
        raise ValueError("spread: no values (every measured quantity needs at least one repeat)")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt_spread(s: dict, unit: str = "×", digits: int = 2) -> str:
    """``median{unit} (min–max, n=N)``, e.g. ``0.93× (0.88–1.01, n=5)``."""
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}–{s['max']:.{digits}f}, n={s['n']})"


def scaled(s: dict, factor: float) -> dict:
    """A spread with its median/min/max multiplied by ``factor``."""
    return {**s, **{k: s[k] * factor for k in ("median", "min", "max")}}


def round_ratios(num: list[float], den: list[float]) -> list[float]:
    """Round-by-round ratios ``num[i] / den[i]`` of two interleaved series."""
    if len(num) != len(den):
        raise ValueError(f"round_ratios: series of {len(num)} and {len(den)} rounds differ in length")
    return [a / b for a, b in zip(num, den, strict=True)]


def fmt_seconds(s: float) -> str:
    """Seconds in the largest fitting unit: ``42.0 s``, ``3.5 min``, ``2.1 h``, ``4.3 d``."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if s >= size:
            return f"{s / size:.1f} {unit}"
    return f"{s:.1f} s"


def project(train_flops: float, val_flops: float, flops_per_s: float, n_train: int, n_val: int = 1449,
            epochs: int = 50, runs: int = 31, eval_overhead: float = 1.0, train_overhead: float = 1.0,
            eval_flops_per_s: float | None = None) -> dict:
    """Projected seconds of one run and of the study: per epoch ``n_train`` images forward+backward at
    ``train_flops`` each, run at ``flops_per_s``, and ``n_val`` forward at ``val_flops``, run at
    ``eval_flops_per_s`` (default: the same); the overheads multiply the model time by the measured
    wall ÷ model ratio of each phase."""
    train_s = n_train * train_flops / flops_per_s * train_overhead
    eval_s = n_val * val_flops / (eval_flops_per_s or flops_per_s) * eval_overhead
    run_s = epochs * (train_s + eval_s)
    return {"train_s_per_epoch": train_s, "eval_s_per_epoch": eval_s, "run_s": run_s, "study_s": runs * run_s,
            "pflop_per_run": epochs * (n_train * train_flops + n_val * val_flops) / 1e15}


def cache_bound(decode_s: float, cached_images_per_s: float) -> float:
    """The most any val cache can gain: (decoding an image + evaluating it from the cache) ÷ the latter, per
    image (decoding, resizing and cropping are all a cache removes)."""
    cached_s = 1 / cached_images_per_s
    return (decode_s + cached_s) / cached_s


def demo_summary(runs: list[dict]) -> dict:
    """Section (e)'s numbers from each run's wall seconds (``wall_s``) and results.json history entries
    (``epochs``, with TIMING_KEYS and PROFILE_KEYS): per run means of each part of the time, and ratios."""
    def total(r: dict, key: str) -> float:
        return sum(e[key] for e in r["epochs"])

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    busy = [total(r, "step_seconds") + total(r, "eval_seconds") for r in runs]  # time in the model's work
    ratios = [r["wall_s"] / b for r, b in zip(runs, busy, strict=True)]
    split = {"data": mean([total(r, "data_seconds") for r in runs]),
             "steps": mean([total(r, "step_seconds") for r in runs]),
             "eval": mean([total(r, "eval_seconds") for r in runs]),
             # the rest of each epoch: recording it (results.json, predictions, TensorBoard, checkpoints)
             "bookkeeping": mean([total(r, "bookkeeping_seconds") for r in runs])}
    split["outside_epochs"] = mean([r["wall_s"] for r in runs]) - sum(split.values())  # set-up, the run's end
    epochs = [e for r in runs for e in r["epochs"]]
    return {"runs": runs, "run_wall_s": [r["wall_s"] for r in runs], "split_s": split,
            "wall_over_steps_and_eval": spread(ratios), "first_run_wall_over_steps_and_eval": ratios[0],
            "per_epoch_wall_over_steps_and_eval": spread([e["seconds"] / (e["step_seconds"] + e["eval_seconds"])
                                                          for e in epochs]),
            "train_wall_over_steps": (split["data"] + split["steps"]) / split["steps"], "eval_wall_s": split["eval"]}


def slug(text: str, words: int = 4) -> str:
    """A file-name form of a CPU or GPU name: ``AMD EPYC 7B13 64-Core Processor`` → ``amd-epyc-7b13``."""
    text = re.sub(r"\((r|tm)\)|\b\d+-core\b|\bcpu\b|\bprocessor\b|(@|\bw/|\bwith\b).*$", " ", text.lower())
    return "-".join([w for w in re.split(r"[^a-z0-9]+", text) if w][:words]) or "unknown"


def record_name(info: dict, device: str, date: str, quick: bool) -> str:
    """The stem of the record's files: date, then the device the sections ran on, e.g.
    ``2026-12-03-cpu-amd-epyc-2c`` (``-quick`` for a --quick run)."""
    if device.startswith("cuda") and info.get("gpu"):
        where = f"cuda-{slug(info['gpu'])}"
    else:
        where = f"cpu-{slug(info['cpu'])}-{info['cores']}c"
    return f"{date}-{where}{'-quick' if quick else ''}"


# ------------------------------------------------------------------------------------------- measuring tools
def now(device: torch.device) -> float:
    """``time.perf_counter()`` once the queued work of ``device`` is done (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one ``fn()`` call (synchronised on CUDA)."""
    t = now(device)
    fn()
    return now(device) - t


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                warm: bool = True) -> dict[str, list[float]]:
    """Seconds of each function over ``repeats`` rounds, one call of each per round, after one warm-up."""
    if warm:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


def count_flops(model: torch.nn.Module, images: torch.Tensor, backward: bool = False) -> int:
    """FLOPs that ``FlopCounterMode`` counts for one forward (and, with ``backward``, the backward of a
    scalar of the output) of ``model`` on ``images``; works on the meta device, where nothing is computed."""
    with FlopCounterMode(display=False) as counter:
        out = model(images)
        out = out["out"] if isinstance(out, dict) else out
        if backward:
            out.float().sum().backward()
    return counter.get_total_flops()


@contextmanager
def model_timer(model: torch.nn.Module, device: torch.device):
    """Seconds spent inside ``model``'s eval-mode forward calls, accumulated in the yielded one-element list
    (forward hooks, removed on exit)."""
    total, start = [0.0], [0.0]

    def pre(module, args) -> None:
        if not module.training:
            start[0] = now(device)

    def post(module, args, output) -> None:
        if not module.training:
            total[0] += now(device) - start[0]

    handles = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
    try:
        yield total
    finally:
        for h in handles:
            h.remove()


def compose_cfg(overrides: list[str]) -> DictConfig:
    """The runner's config: ``conf/train.yaml`` composed with ``overrides``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def precision_name(runtime: Runtime) -> str:
    """The trainer.precision name (fp32, bf16, fp16) of a resolved Runtime."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[runtime.amp_dtype]


def error_line(e: BaseException) -> str:
    """An exception as one short line with its type (for the "unavailable" rows)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}"


def log(message: str) -> None:
    """Progress on stderr, so stdout holds the table only."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------- (a)–(c) the step
@dataclass
class Step:
    """One train-step closure, its FLOPs, images per call and the precision it ran at."""

    fn: Callable[[], None]
    flops: int
    images: int
    precision: str


def step_cfg(bench: Bench, precision: str, *overrides: str) -> DictConfig:
    """The runner's config of a step: the bench device and backbone at ``precision``, no pretrained weights."""
    return compose_cfg([f"trainer.device={bench.device}", f"trainer.precision={precision}",
                        "model.pretrained=none", f"model.backbone={bench.backbone}", *overrides])


def fixed_batch(batch: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded input every step of a section sees."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 21, (batch, size, size), generator=g)
    return x.to(device), y.to(device)


def make_step(cfg: DictConfig, x: torch.Tensor, y: torch.Tensor, model: torch.nn.Module | None = None) -> Step:
    """The runner's train step on the fixed batch: ``cfg``'s model (or ``model``) on ``cfg``'s Runtime,
    ``engine.forward``, the loss group's criterion, ``make_optimizer``; its FLOPs counted on a first call."""
    runtime = resolve_device(cfg)
    if model is None:
        torch.manual_seed(0)
        model = build_model(cfg)
    model = runtime.prepare(model).train()
    optimizer = make_optimizer(model, cfg)
    criterion = make_criterion(cfg, runtime.device)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)

    def step() -> None:  # train_one_epoch's step, without its data loader and bookkeeping
        logits, targets = forward(model, x, y, runtime)
        logits = logits["out"] if isinstance(logits, dict) else logits  # torchvision's models return a dict
        loss_sum, n_px = criterion(logits, targets)
        loss = criterion.reduce(loss_sum, n_px, targets.shape[0])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    with FlopCounterMode(display=False) as counter:
        step()
    return Step(step, counter.get_total_flops(), x.shape[0], precision_name(runtime))


def torchvision_deeplabv3(backbone: str) -> torch.nn.Module:
    """torchvision's own ``deeplabv3_<backbone>`` (OS8 DeepLabv3, no aux head, no weights)."""
    from torchvision.models import segmentation

    builder = getattr(segmentation, f"deeplabv3_{backbone}", None)
    if builder is None:
        raise ValueError(f"torchvision has no deeplabv3_{backbone} (use resnet50 or resnet101)")
    torch.manual_seed(0)
    return builder(weights=None, weights_backbone=None, aux_loss=False)


def gemm(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Callable[[], torch.Tensor], float]:
    """A dense n×n×n matmul closure and its 2·n³ FLOPs: the BLAS's practical limit at ``dtype``."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    return (lambda: a @ b), 2.0 * n ** 3


def dense_conv(n: int, dtype: torch.dtype, device: torch.device) -> tuple[Callable[[], torch.Tensor], float]:
    """A 3×3 convolution closure, batch 8 × n/8 channels in and out × 64², and its FLOPs: the convolution
    library's practical limit (on CPU oneDNN's direct kernels can beat the BLAS's GEMM, so both count)."""
    g = torch.Generator().manual_seed(0)
    c = n // 8
    x = torch.randn(8, c, 64, 64, generator=g).to(device, dtype)
    w = torch.randn(c, c, 3, 3, generator=g).to(device, dtype)
    return (lambda: F.conv2d(x, w, padding=1)), 2.0 * 8 * c * c * 9 * 64 * 64


def step_section(bench: Bench, table: Table) -> dict:
    """(a)–(c): our step at fp32 and auto, torchvision's at fp32 and the GEMMs, interleaved; ratios per round."""
    device = torch.device(bench.device)
    x, y = fixed_batch(bench.batch, bench.size, device)
    log(f"(a)-(c) building and counting the steps: {bench.describe()}")
    fp32, auto_cfg = step_cfg(bench, "fp32"), step_cfg(bench, "auto")
    auto_rt = resolve_device(auto_cfg)
    auto = precision_name(auto_rt)
    steps = {"ours_fp32": make_step(fp32, x, y)}
    # Where auto is fp32 it is the same step: time it once.
    steps["ours_auto"] = steps["ours_fp32"] if auto == "fp32" else make_step(auto_cfg, x, y)
    tv_error = None
    try:
        steps["torchvision_fp32"] = make_step(fp32, x, y, model=torchvision_deeplabv3(bench.backbone))
    except ValueError as e:  # a backbone torchvision has no DeepLabv3 for: the section says so
        tv_error = error_line(e)
    fns = {name: s.fn for name, s in steps.items() if not (name == "ours_auto" and auto == "fp32")}
    dtypes = {"fp32": torch.float32} | ({"auto": auto_rt.amp_dtype} if auto != "fp32" else {})
    kernels = {f"{kind}_{p}": make(bench.gemm_n, dtype, device) for p, dtype in dtypes.items()
               for kind, make in (("gemm", gemm), ("conv", dense_conv))}
    fns.update({name: fn for name, (fn, _) in kernels.items()})
    log(f"(a)-(c) timing {len(fns)} calls × {bench.repeats} interleaved rounds")
    # A plain warm-up too: a step's first call outside the counter can still be slow (kernel selection).
    times = interleaved(fns, device, bench.repeats)
    rate = {name: [flops / t for t in times[name]] for name, (_, flops) in kernels.items()}
    rate.update({name: [s.flops / t for t in times[name if name in times else "ours_fp32"]]
                 for name, s in steps.items()})
    for kind in ("gemm", "conv"):  # where auto is fp32, its kernels are the fp32 ones
        rate.setdefault(f"{kind}_auto", rate[f"{kind}_fp32"])
    out = {"config": bench.describe(), "auto_precision": auto, "gemm_n": bench.gemm_n, "repeats": bench.repeats,
           "flops_per_step": {n: s.flops for n, s in steps.items()},
           "images_per_s": {n: spread([s.images / t for t in times[n if n in times else "ours_fp32"]])
                            for n, s in steps.items()},
           "flop_per_s": {n: spread(r) for n, r in rate.items()},
           "ratios": step_ratios(rate, "torchvision_fp32" in steps)}
    if tv_error:
        out["torchvision_unavailable"] = tv_error
    add_step_rows(out, table, bench)
    return out


def step_ratios(rate: dict[str, list[float]], torchvision: bool) -> dict:
    """The round-by-round ratios of section (a)–(c), each as a spread."""
    # The limit of a round: the faster of its GEMM and its dense convolution at that precision.
    limit = {p: [max(g, c) for g, c in zip(rate[f"gemm_{p}"], rate[f"conv_{p}"], strict=True)]
             for p in ("fp32", "auto")}
    ratios = {"ours_fp32_vs_gemm_fp32": round_ratios(rate["ours_fp32"], rate["gemm_fp32"]),
              "ours_auto_vs_gemm_auto": round_ratios(rate["ours_auto"], rate["gemm_auto"]),
              "ours_fp32_vs_limit_fp32": round_ratios(rate["ours_fp32"], limit["fp32"]),
              "ours_auto_vs_limit_auto": round_ratios(rate["ours_auto"], limit["auto"]),
              # Same FLOPs in both, so the FLOP/s ratio is the speed-up of auto over fp32.
              "ours_auto_vs_ours_fp32": round_ratios(rate["ours_auto"], rate["ours_fp32"])}
    if torchvision:
        ratios["ours_fp32_vs_torchvision_fp32"] = round_ratios(rate["ours_fp32"], rate["torchvision_fp32"])
    return {name: spread(r) for name, r in ratios.items()}


def add_step_rows(out: dict, table: Table, bench: Bench) -> None:
    """The rows of sections (a)–(c)."""
    cfg, auto, ips, fps, r = bench.describe(), out["auto_precision"], out["images_per_s"], out["flop_per_s"], \
        out["ratios"]
    table.add("(a)", "train step fp32, images/s", fmt_spread(ips["ours_fp32"], ""), cfg)
    table.add("(a)", f"train step auto (= {auto}), images/s", fmt_spread(ips["ours_auto"], ""), cfg)
    table.add("(a)", "auto ÷ fp32 speed", fmt_spread(r["ours_auto_vs_ours_fp32"]), cfg)
    table.add("(b)", "FLOPs per step (fwd+bwd)", f"{out['flops_per_step']['ours_fp32'] / 1e9:.1f} GFLOP", cfg)
    conv = f"conv 3×3, 8 × {bench.gemm_n // 8}² ch × 64²"
    for p, name in (("fp32", "fp32"), *((("auto", auto),) if auto != "fp32" else ())):
        table.add("(b)", f"GEMM {bench.gemm_n}³ {name}, GFLOP/s", fmt_spread(scaled(fps[f"gemm_{p}"], 1e-9), "", 1),
                  "")
        table.add("(b)", f"{conv} {name}, GFLOP/s", fmt_spread(scaled(fps[f"conv_{p}"], 1e-9), "", 1), "")
        table.add("(b)", f"ours {name} ÷ GEMM {name} (FLOP/s)", fmt_spread(r[f"ours_{p}_vs_gemm_{p}"]), cfg)
        table.add("(b)", f"ours {name} ÷ max(GEMM, conv) {name}", fmt_spread(r[f"ours_{p}_vs_limit_{p}"]), cfg)
    if "torchvision_unavailable" in out:
        table.add("(c)", "torchvision step", f"unavailable ({out['torchvision_unavailable']})", "")
    if "ours_fp32_vs_torchvision_fp32" in r:
        tv = f"torchvision deeplabv3_{bench.backbone} (OS8), same input"
        table.add("(c)", "torchvision FLOPs per step", f"{out['flops_per_step']['torchvision_fp32'] / 1e9:.1f} GFLOP",
                  tv)
        table.add("(c)", "ours ÷ torchvision fp32 (FLOP/s)", fmt_spread(r["ours_fp32_vs_torchvision_fp32"]), tv)


# ------------------------------------------------------------------------------------------ (d) evaluation
def demo_overrides(root: Path, device: str) -> list[str]:
    """The demo preset's `none` cell on ``device`` on the generated data at ``root`` (generated if absent)."""
    return ["experiment=demo", "cell=none", f"data.root={root}", "trainer.progress=false", f"trainer.device={device}"]


def eval_section(bench: Bench, root: Path, table: Table) -> dict:
    """(d): images/s of ``engine.evaluate`` over ``make_val_loader``'s loader, data.val_cache=ram vs off,
    interleaved (building the loaders, which fills the cache, timed apart); also wall ÷ model time of the
    cached evaluation (for the projection)."""
    n_val = 16 if bench.quick else 48
    # VOC's image size (short side 300–500), so that decoding and resizing cost what they cost on VOC.
    overrides = demo_overrides(root, bench.device) + ["data.synth.train=20", f"data.synth.val={n_val}",
                                                      "data.synth.min_side=300", "data.synth.max_side=500"]
    cfgs = {mode: compose_cfg([*overrides, f"data.val_cache={mode}"]) for mode in ("off", "ram")}
    cfg = cfgs["ram"]
    log(f"(d) generating {n_val} VOC-sized val images, building the model and both val loaders")
    runtime = resolve_device(cfg)
    device = runtime.device
    val_ds = get_val_dataset(cfg.data)
    torch.manual_seed(0)
    model = runtime.prepare(build_model(cfg))
    criterion = make_criterion(cfg, device)
    loaders, build = {}, {}
    for mode, c in cfgs.items():  # with a cache, building the loader is where it is filled
        t = now(device)
        loaders[mode] = make_val_loader(c, val_ds, runtime)
        build[mode] = now(device) - t

    def evaluation(loader) -> Callable[[], object]:
        return lambda: evaluate(model, loader, runtime, criterion, num_classes=cfg.model.num_classes,
                                ignore_index=cfg.data.ignore_index)

    fns = {mode: evaluation(loader) for mode, loader in loaders.items()}
    first = {mode: timed(fn, device) for mode, fn in fns.items()}
    log(f"(d) timing evaluation (off, ram) × {bench.repeats} rounds")
    times = interleaved(fns, device, bench.repeats, warm=False)
    with model_timer(model, device) as inside:
        wall = timed(fns["ram"], device)
    ips = {mode: spread([len(val_ds) / t for t in ts]) for mode, ts in times.items()}
    out = {"config": f"demo none cell ({cfg.model.backbone}, aspp {cfg.model.aspp_channels}, val short side "
                     f"{cfg.data.base_size}, crop {cfg.data.crop_size}), generated val images 300–500 px",
           "n_val": len(val_ds), "loader_build_s": build, "first_call_s": first, "images_per_s": ips,
           "ram_vs_off": spread(round_ratios(times["off"], times["ram"])),  # speed ratio: time off ÷ time ram
           "wall_over_model": wall / inside[0],
           # decode + resize + crop of each image, timed as the cache's fill
           "cache_bound": cache_bound(build["ram"] / len(val_ds), ips["ram"]["median"])}
    add_eval_rows(out, table)
    return out


def add_eval_rows(out: dict, table: Table) -> None:
    """The rows of section (d)."""
    cfg, ips = f"{out['config']}, {out['n_val']} images", out["images_per_s"]
    for mode, s in ips.items():
        table.add("(d)", f"eval val_cache={mode}, images/s", fmt_spread(s, "", 1), cfg)
    table.add("(d)", "cached ÷ uncached eval speed", fmt_spread(out["ram_vs_off"]), cfg)
    decode_ms = out["loader_build_s"]["ram"] / out["n_val"] * 1e3
    table.add("(d)", "  the most a cache can gain here", f"{out['cache_bound']:.2f}× (decode {decode_ms:.1f} ms "
              f"+ cached eval {1e3 / ips['ram']['median']:.1f} ms an image)", "")
    table.add("(d)", "val loader build (cache fill), s", ", ".join(f"{m} {t:.2f}" for m, t in
                                                                 out["loader_build_s"].items()), cfg)
    table.add("(d)", "eval wall ÷ model forward time", f"{out['wall_over_model']:.2f}×", cfg)


# ------------------------------------------------------------------------------------- (e) the demo's run
def demo_cfg(bench: Bench, root: Path, *overrides: str) -> list[str]:
    """The overrides of (e)'s and (i)'s run: the demo's `none` cell, --demo-epochs if set."""
    epochs = [] if bench.demo_epochs is None else [f"trainer.epochs={bench.demo_epochs}"]
    return [*demo_overrides(root, bench.device), *epochs, *overrides]


def demo_section(bench: Bench, root: Path, work: Path, table: Table) -> dict:
    """(e): the demo's `none` cell trained by ``train.run`` with trainer.profile=true, ``bench.repeats`` times
    one after another in this process (as the demo's sweep runs its 16 cells; the first run also pays the
    process's first-use costs); the split of each run's time read from its results.json."""
    cfg = compose_cfg(demo_cfg(bench, root, "trainer.profile=true"))
    prepare_root(cfg.data)  # generate the data once, outside the timed runs
    device = torch.device(bench.device)
    log(f"(e) the demo's none cell through train.run, {bench.repeats} runs one after another")
    runs = []
    for r in range(bench.repeats):
        run_dir = RunDir(work / f"demo-{r}")
        t = now(device)
        run(cfg, run_dir)
        wall = now(device) - t
        results = json.loads(run_dir.results.read_text())
        runs.append({"wall_s": wall, "epochs": [{k: e[k] for k in (*TIMING_KEYS, *PROFILE_KEYS)}
                                                for e in results["history"]]})
    split = results["split"]
    out = {"config": f"experiment=demo cell=none ({cfg.model.backbone}, crop {cfg.data.crop_size}, batch "
                     f"{cfg.trainer.batch_size}, {precision_name(resolve_device(cfg))}), {split['n_images']} "
                     f"train / {cfg.data.synth.val} val images, {len(runs[0]['epochs'])} epochs, {len(runs)} runs "
                     "in one process", **demo_summary(runs)}
    add_demo_rows(out, table)
    return out


def add_demo_rows(out: dict, table: Table) -> None:
    """The rows of section (e)."""
    split, wall = out["split_s"], statistics.mean(out["run_wall_s"])
    table.add("(e)", "demo run wall ÷ (steps + eval)", f"{fmt_spread(out['wall_over_steps_and_eval'])} "
              f"({wall:.1f} s a run)", out["config"])
    table.add("(e)", "  the process's first run", f"{out['first_run_wall_over_steps_and_eval']:.2f}×", "")
    table.add("(e)", "  per epoch (its seconds)", fmt_spread(out["per_epoch_wall_over_steps_and_eval"]), "")
    table.add("(e)", "  training ÷ steps (data + steps ÷ steps)", f"{out['train_wall_over_steps']:.2f}×", "")
    parts = {"data": "waiting for data", "steps": "train steps", "eval": "evaluation",
             "bookkeeping": "bookkeeping (results.json's)", "outside_epochs": "outside the epochs' seconds"}
    for key, name in parts.items():
        table.add("(e)", f"  {name}, s a run", f"{split[key]:.2f} ({split[key] / wall:.0%})", "")


# ------------------------------------------------------------------------------------------ (f) projection
def study_flops(backbone: str = "resnet101", size: int = 513) -> tuple[float, float]:
    """FLOPs per image of one train step (forward+backward) and of one val forward, counted on the meta device
    (nothing computed) at the study's crop."""
    cfg = compose_cfg(["model.pretrained=none", f"model.backbone={backbone}"])
    with torch.device("meta"):
        model = build_model(cfg)
    # Batch 2 in training: image pooling's BatchNorm needs more than one value per channel.
    train_flops = count_flops(model.train(), torch.empty(2, 3, size, size, device="meta"), backward=True) / 2
    val_flops = count_flops(model.eval(), torch.empty(1, 3, size, size, device="meta"))
    return train_flops, val_flops


def projection_section(step: dict, ev: dict | None, demo: dict | None, table: Table) -> dict:
    """(f): one 50-epoch run and the 31-run study at the measured FLOP/s of our step at the default precision."""
    train_flops, val_flops = study_flops()
    rate = step["flop_per_s"]["ours_auto"]["median"]
    # Metrics come from logits at trainer.eval_precision (fp32 by default): evaluation runs at that rate.
    eval_precision = str(compose_cfg([]).trainer.eval_precision)
    eval_rate = step["flop_per_s"]["ours_fp32" if eval_precision == "fp32" else "ours_auto"]["median"]
    eval_overhead = ev["wall_over_model"] if ev else 1.0
    train_overhead = demo["train_wall_over_steps"] if demo else 1.0
    assumptions = (f"ResNet-101 OS16 at 513²: {train_flops / 1e9:.0f} GFLOP per train image (fwd+bwd), "
                   f"{val_flops / 1e9:.0f} per val image (fwd); 150–250 train images (1464 × 0.1 per class), "
                   f"1449 val; 50 epochs, 31 runs; train at {rate / 1e9:.0f} GFLOP/s (our {step['auto_precision']}"
                   f" step in (a), {step['config']}), eval at {eval_rate / 1e9:.0f} (trainer.eval_precision="
                   f"{eval_precision}); eval × {eval_overhead:.2f} (wall ÷ model, (d)), train × "
                   f"{train_overhead:.2f} (data + steps ÷ steps, (e)); one device, runs one after another")
    out = {"assumptions": assumptions, "train_flops_per_image": train_flops, "val_flops_per_image": val_flops,
           "flop_per_s": rate, "eval_flop_per_s": eval_rate, "eval_overhead": eval_overhead,
           "train_overhead": train_overhead,
           "n_train": {str(n): project(train_flops, val_flops, rate, n, eval_overhead=eval_overhead,
                                       train_overhead=train_overhead, eval_flops_per_s=eval_rate)
                       for n in (150, 250)}}
    lo, hi = out["n_train"]["150"], out["n_train"]["250"]
    table.add("(f)", "FLOPs of one 50-epoch run", f"{lo['pflop_per_run']:.1f}–{hi['pflop_per_run']:.1f} PFLOP",
              "150–250 train images")
    table.add("(f)", "projected one run", f"{fmt_seconds(lo['run_s'])} – {fmt_seconds(hi['run_s'])}", "")
    table.add("(f)", "projected 31-run study", f"{fmt_seconds(lo['study_s'])} – {fmt_seconds(hi['study_s'])}", "")
    return out


# ------------------------------------------------------------------------------------- (g) the regularisers
def regularizer_section(bench: Bench, table: Table) -> dict:
    """(g): the step of each `all-*` cell ÷ the `none` cell's, and our DropBlock ÷ torchvision's drop_block2d."""
    from torchvision.ops import drop_block2d

    from deeplab_dropout.regularizers import DropBlock

    device = torch.device(bench.device)
    # Small on CPU (the cost of a regulariser is per activation, visible at any size); the bench's on CUDA.
    backbone, size, batch = ("resnet18", 65, 8) if device.type == "cpu" else (bench.backbone, bench.size, bench.batch)
    config = f"{backbone}, batch {batch} × {size}², fp32, {device}"
    small = Bench(backbone, size, batch, bench.device, bench.repeats, bench.gemm_n, bench.quick)
    x, y = fixed_batch(batch, size, device)
    cells = ("none", "all-chandrop", "all-dropblock", "all-uout")
    fns = {cell: make_step(step_cfg(small, "fp32", f"cell={cell}"), x, y).fn for cell in cells}
    log(f"(g) timing {len(cells)} cells × {bench.repeats} rounds")
    times = interleaved(fns, device, bench.repeats, warm=False)  # make_step's counted call was the warm-up
    out = {"config": config, "cell_vs_none": {c: spread(round_ratios(times[c], times["none"])) for c in cells[1:]}}
    for cell, s in out["cell_vs_none"].items():
        table.add("(g)", f"{cell} step ÷ none step (time)", fmt_spread(s), config)
    act = torch.randn(batch, 256, 33, 33, device=device)
    ours = DropBlock(0.2, 7).train()
    t = interleaved({"ours": lambda: ours(act), "tv": lambda: drop_block2d(act, 0.2, 7)}, device,
                    max(bench.repeats, 10))
    out["dropblock_vs_torchvision"] = spread(round_ratios(t["ours"], t["tv"]))
    table.add("(g)", "our DropBlock ÷ torchvision drop_block2d", fmt_spread(out["dropblock_vs_torchvision"]),
              f"p=0.2, block 7, {tuple(act.shape)}")
    return out


# ------------------------------------------------------------------------------------ (h) the architectures
MODELS = {"deeplabv3plus": [], "fcn": ["model=fcn_resnet101"], "fpn": ["model=fpn_resnet101"], "unet": ["model=unet"]}


def models_section(bench: Bench, table: Table) -> dict:
    """(h): each architecture's fp32 train step on the same input — FLOPs, images/s and time ÷ DeepLabv3+'s;
    the ResNet ones on the bench backbone (U-Net at its own width, model.unet_base_channels)."""
    device = torch.device(bench.device)
    x, y = fixed_batch(bench.batch, bench.size, device)
    steps = {}
    for name, overrides in MODELS.items():
        cfg = step_cfg(bench, "fp32", *overrides)
        steps[name] = make_step(cfg, x, y)
    log(f"(h) timing {len(steps)} models × {bench.repeats} rounds")
    times = interleaved({k: st.fn for k, st in steps.items()}, device, bench.repeats, warm=False)
    config = f"{bench.backbone} (U-Net: its own encoder), batch {bench.batch} × {bench.size}², fp32, {device}"
    out = {"config": config, "models": {}}
    for name, st in steps.items():
        ips = spread([st.images / t for t in times[name]])
        ratio = spread(round_ratios(times[name], times["deeplabv3plus"]))
        out["models"][name] = {"flops_per_step": st.flops, "images_per_s": ips, "time_vs_deeplabv3plus": ratio}
        table.add("(h)", f"{name} step: {st.flops / 1e9:.1f} GFLOP, images/s", fmt_spread(ips, unit=""), config)
        if name != "deeplabv3plus":
            table.add("(h)", f"  {name} step ÷ deeplabv3plus step (time)", fmt_spread(ratio), "")
    return out


# ------------------------------------------------------------------------------------------- (i) allocator
def cli_run_seconds(overrides: list[str], run_dir: Path) -> float:
    """One run through the CLI in a fresh process (``python -m deeplab_dropout.train``; the allocator's state
    is per process and only grows): the sum of its epochs' seconds from results.json."""
    cmd = [sys.executable, "-m", "deeplab_dropout.train", *overrides, "hydra.mode=RUN", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = " ".join((done.stderr or done.stdout or "no output").split()[-40:])
        raise RuntimeError(f"{' '.join(cmd[2:4])} ... exited {done.returncode}: {tail}")
    return sum(e["seconds"] for e in json.loads(RunDir(run_dir).results.read_text())["history"])


def malloc_section(bench: Bench, root: Path, work: Path, table: Table) -> dict:
    """(i): trainer.tune_malloc's speed-up, (e)'s run with glibc's malloc as a process starts ÷ tuned, each
    run in a fresh process, the two orders alternating round by round."""
    if bench.device != "cpu":
        table.add("(i)", "trainer.tune_malloc", "measured on CPU only (--device cpu)", "")
        return {"unavailable": "CPU only"}
    log(f"(i) (e)'s run through the CLI in fresh processes, trainer.tune_malloc false vs true × {bench.repeats}")
    times: dict[str, list[float]] = {"default": [], "tuned": []}
    for r in range(bench.repeats):
        for tuned in ((False, True) if r % 2 == 0 else (True, False)):
            mode = "tuned" if tuned else "default"
            overrides = demo_cfg(bench, root, f"trainer.tune_malloc={str(tuned).lower()}")
            times[mode].append(cli_run_seconds(overrides, work / f"malloc-{mode}-{r}"))
    epochs = bench.demo_epochs or compose_cfg(demo_overrides(root, "cpu")).trainer.epochs
    config = f"experiment=demo cell=none, {epochs} epochs through the CLI, one fresh process a run"
    out = {"config": config, "run_seconds": times,
           "default_vs_tuned": spread(round_ratios(times["default"], times["tuned"]))}
    table.add("(i)", "demo run, glibc malloc default ÷ tuned (time)", fmt_spread(out["default_vs_tuned"]), config)
    return out


# -------------------------------------------------------------------------------------------------- main
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the numbers were measured on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"cpu": cpu_model(), "cores": cores, "torch_threads": torch.get_num_threads(),
            "native_bf16_cpu": cpu_has_native("bf16"), "gpu": None, "gpu_bf16": None,
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), gpu_bf16=torch.cuda.is_bf16_supported())
    return info


def describe_machine(info: dict) -> str:
    """One line naming the machine."""
    gpu = f"{info['gpu']} (bf16: {'yes' if info['gpu_bf16'] else 'no'})" if info["gpu"] else "none"
    return (f"{info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), native bf16: "
            f"{'yes' if info['native_bf16_cpu'] else 'no'}; GPU: {gpu}; torch {info['torch']}, "
            f"Python {info['python']}")


def make_bench(args: argparse.Namespace) -> Bench:
    """The step config and repeats of ``args``: the defaults of the device and mode, then explicit options."""
    cuda = args.device.startswith("cuda")
    defaults = {(False, False): ("resnet101", 321, 2, 5, 2048), (False, True): ("resnet50", 129, 2, 3, 2048),
                (True, False): ("resnet101", 513, 8, 10, 8192), (True, True): ("resnet101", 321, 8, 5, 8192)}
    backbone, size, batch, repeats, n = defaults[(cuda, args.quick)]
    return Bench(args.backbone or backbone, args.size or size, args.batch or batch, args.device,
                 args.repeats or repeats, args.gemm or n, args.quick, args.demo_epochs or (4 if args.quick else None))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="< 1 min on 2 CPU cores: smaller step config, "
                        "fewer repeats, no (i)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--backbone", help="resnet18 | resnet50 | resnet101 (default: by device and mode)")
    parser.add_argument("--size", type=int, help="square input side of the step sections")
    parser.add_argument("--batch", type=int, help="batch of the step sections")
    parser.add_argument("--repeats", type=int, help="interleaved timed rounds, and runs in (e) and (i) "
                        "(default 5; 3 with --quick; 10 on CUDA)")
    parser.add_argument("--gemm", type=int, help="side n of the n×n×n reference matmul")
    parser.add_argument("--demo-epochs", type=int, help="epochs of the demo run in (e) and (i) (default: the "
                        "demo preset's 8; 4 with --quick)")
    parser.add_argument("--skip", default="", help=f"comma-separated sections to skip: {','.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=BENCHMARKS, help="folder of the record: "
                        "<date>-<machine>[-quick].json and .md (default: the repo's benchmarks/)")
    parser.add_argument("--json", type=Path, help="write the JSON record here instead (the Markdown beside it)")
    args = parser.parse_args(argv)
    unknown = {s.strip() for s in args.skip.split(",") if s.strip()} - set(SECTIONS)
    if unknown:
        parser.error(f"--skip: unknown sections {', '.join(sorted(unknown))} (sections: {', '.join(SECTIONS)})")
    return args


def guarded(section: str, table: Table, fn: Callable[[], dict]) -> dict:
    """``fn()``, or, where it fails, a row and a record saying why, so that one broken section never hides the
    others (main then exits 1)."""
    try:
        return fn()
    except Exception as e:
        log(f"{section} failed: {error_line(e)}")
        table.add(section, "section", f"failed ({error_line(e)})", "")
        return {"failed": error_line(e)}


def run_sections(bench: Bench, skip: set[str], table: Table) -> None:
    """Every section not in ``skip``, in order, into ``table`` (its rows and its JSON record)."""
    rec = table.record
    if "step" not in skip:
        rec["step"] = guarded("(a)-(c)", table, lambda: step_section(bench, table))
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        root, work = Path(tmp) / "synth-voc-demo", Path(tmp) / "runs"
        if "eval" not in skip:
            rec["eval_cache"] = guarded("(d)", table, lambda: eval_section(bench, Path(tmp) / "synth-voc-sized",
                                                                           table))
        if "demo" not in skip:
            rec["demo_epoch"] = guarded("(e)", table, lambda: demo_section(bench, root, work, table))
        if "malloc" not in skip and not bench.quick:
            rec["malloc"] = guarded("(i)", table, lambda: malloc_section(bench, root, work, table))
    if "project" not in skip and "flop_per_s" in rec.get("step", {}):
        measured = {k: v for k in ("eval_cache", "demo_epoch") if "failed" not in (v := rec.get(k, {})) and v}
        rec["projection"] = guarded("(f)", table, lambda: projection_section(
            rec["step"], measured.get("eval_cache"), measured.get("demo_epoch"), table))
    if "reg" not in skip:
        rec["regularizers"] = guarded("(g)", table, lambda: regularizer_section(bench, table))
    if "models" not in skip:
        rec["models"] = guarded("(h)", table, lambda: models_section(bench, table))


def markdown_record(table: Table) -> str:
    """The Markdown file of a record: what ran where and when, the table, the notes."""
    rec = table.record
    m, device = rec["machine"], rec["bench"]["device"]
    where = m["gpu"] if device.startswith("cuda") and m["gpu"] else f"{m['cpu']} ({m['cores']} cores)"
    lines = [f"# Benchmark {rec['date']}: {device}, {where}", "",
             f"- command: `{rec['command']}`", f"- machine: {describe_machine(rec['machine'])}",
             f"- took {rec['seconds']:.0f} s", "", table.markdown(), ""]
    if "assumptions" in rec.get("projection", {}):
        lines += [f"(f) assumptions: {rec['projection']['assumptions']}", ""]
    return "\n".join([*lines, NOTE, ""])


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    """Run the sections, print the table and the notes, write the JSON record and the Markdown table; 1 if a
    section failed."""
    args = parse_args(argv)
    bench = make_bench(args)
    start = time.perf_counter()
    tune_malloc()  # what the runner does by default (trainer.tune_malloc=true): every section measures that
    date, info = time.strftime("%Y-%m-%d"), machine()
    command = " ".join(["python scripts/bench.py", *(sys.argv[1:] if argv is None else argv)])
    table = Table(record={"date": date, "command": command, "machine": info, "bench": asdict(bench), "note": NOTE})
    run_sections(bench, {s.strip() for s in args.skip.split(",") if s.strip()}, table)
    table.record["seconds"] = time.perf_counter() - start
    print(f"bench{' --quick' if bench.quick else ''} {date} on {describe_machine(info)}; "
          f"{table.record['seconds']:.0f} s")
    print(table.render())
    if "assumptions" in table.record.get("projection", {}):
        print(f"(f) assumptions: {table.record['projection']['assumptions']}")
    print(NOTE)
    json_path = args.json or args.out / f"{record_name(info, bench.device, date, bench.quick)}.json"
    md_path = json_path.with_suffix(".md")
    write_atomic(json_path, json.dumps(table.record, indent=2, allow_nan=False) + "\n")
    write_atomic(md_path, markdown_record(table))
    print(f"wrote {json_path} and {md_path}")
    failed = [k for k, v in table.record.items() if isinstance(v, dict) and "failed" in v]
    if failed:
        log(f"failed sections: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
