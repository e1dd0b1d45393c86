"""Speed of the runner against this machine's own limit, as ratios measured in one run (never timed tests).

    python scripts/bench.py --quick               # < 1 min on 2 idle CPU cores: ResNet-50 at 129², 3 rounds
    python scripts/bench.py                       # ResNet-101 OS16 DeepLabv3+, batch 2 × 321², CPU, 5 rounds
    python scripts/bench.py --device cuda         # batch 8 × 513² (the study's batch and crop), 10 rounds

Sections (each printed row names the config it used):
(a) train-step images/s at fp32 and at the default precision (trainer.precision=auto, as the runner resolves it);
(b) FLOPs per step (FlopCounterMode, forward+backward) and achieved FLOP/s ÷ a dense n×n×n GEMM timed in the same
    rounds at the same precision, and ÷ the faster of that GEMM and a dense 3×3 convolution (on CPU oneDNN's
    convolutions can run above the BLAS's GEMM: the step can exceed the GEMM, never the faster of the two); (c) torchvision's own deeplabv3_<backbone> train step on the same input, ours ÷
    theirs in FLOP/s; (d) the runner's ``evaluate`` with data.val_cache=ram vs off (demo model, VOC-sized generated
    images), and the most a cache can gain on this device; (e) the demo's `none` cell, all its epochs through
    ``run_epoch``, wall ÷ time inside the model, over --repeats runs one after another in this process (as the
    demo's sweep runs its 16 cells);
(f) projected time of one 50-epoch study run and of the 31-run study from (a), (d), (e) and the FLOP count;
(g) the cost of the regularisers (each `all-*` cell ÷ `none`; our DropBlock ÷ torchvision's drop_block2d);
(h) each architecture's train step (DeepLabv3+, FCN, FPN, U-Net): FLOPs, images/s, time ÷ DeepLabv3+'s;
(i) trainer.tune_malloc: (e)'s demo run with glibc's malloc as a process starts ÷ tuned, in fresh processes (not
    in --quick: two 10-second runs a round).
Every section but (i) runs with the runner's default allocator setting (trainer.tune_malloc=true).
Timed calls are interleaved round by round so that drift hits all alike; each ratio is its median (min–max)
over rounds. The machine is shared and noisy: compare ratios within one run, never times across runs.
Prints the table to stdout (progress to stderr) and writes the JSON record (--json, outputs/bench.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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
from torch.utils.flop_counter import FlopCounterMode

from deeplab_dropout.config import CONF_DIR  # the runner's own conf/
from deeplab_dropout.runtime import tune_malloc

NOTE = ("Shared, noisy machine: only ratios measured within this one run mean anything; each ratio is the "
        "median (min–max) over interleaved rounds.")


@dataclass(frozen=True)
class Bench:
    """The config of the step sections (a)–(c) and the repeat counts of every section."""

    backbone: str
    size: int
    batch: int
    device: str
    repeats: int
    gemm_n: int
    quick: bool

    def describe(self) -> str:
        """One line naming the step config, e.g. ``resnet101 OS16 DeepLabv3+, batch 2 × 321², cpu``."""
        return f"{self.backbone} OS16 DeepLabv3+, batch {self.batch} × {self.size}², {self.device}"


@dataclass
class Table:
    """Rows (section, quantity, value, config) printed at the end, and the JSON record beside them."""

    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    record: dict = field(default_factory=dict)

    def add(self, section: str, quantity: str, value: str, config: str = "") -> None:
        """Append one printed row."""
        self.rows.append((section, quantity, value, config))

    def render(self) -> str:
        """The rows as an aligned text table."""
        head = ("", "quantity", "value", "config")
        # A config repeated from the row above is left blank, so each one reads once per run of rows.
        rows = [(*r[:3], "" if i and r[3] == self.rows[i - 1][3] else r[3]) for i, r in enumerate(self.rows)]
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(4)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                         for r in (head, *rows))


# ---------------------------------------------------------------------------------------------- pure helpers
def spread(values: list[float]) -> dict:
    """Median, min and max of ``values`` (the repeats of one measured quantity or ratio) and their count."""
    if not values:
        raise ValueError("spread: no values (every measured quantity needs at least one repeat)")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt_spread(s: dict, unit: str = "×", digits: int = 2) -> str:
    """``median{unit} (min–max, n=N)``, e.g. ``0.93× (0.88–1.01, n=5)``."""
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}–{s['max']:.{digits}f}, n={s['n']})"


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


# ------------------------------------------------------------------------------------------- measuring tools
def now(device: torch.device) -> float:
    """``time.perf_counter()`` once the queued work of ``device`` is done (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
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


def compose_cfg(overrides: list[str]):
    """The runner's config: ``conf/train.yaml`` composed with ``overrides``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


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


def fixed_batch(bench: Bench, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded input every step of sections (a)–(c) sees."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(bench.batch, 3, bench.size, bench.size, generator=g)
    y = torch.randint(0, 21, (bench.batch, bench.size, bench.size), generator=g)
    return x.to(device), y.to(device)


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, runtime, precision: str) -> Step:
    """An SGD step closure of ``model`` under ``runtime`` (the runner's autocast and memory format), its FLOPs
    counted on a first call."""
    model = runtime.prepare(model).train()
    if runtime.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)

    def step() -> None:
        with runtime.autocast():
            out = model(x)
        out = out["out"] if isinstance(out, dict) else out
        loss = F.cross_entropy(out.float(), y, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    with FlopCounterMode(display=False) as counter:
        step()
    return Step(step, counter.get_total_flops(), x.shape[0], precision)


def runtime_for(bench: Bench, precision: str):
    """The runner's Runtime (``train.resolve_device``) for the bench device at ``precision``, and its name."""
    from deeplab_dropout.train import resolve_device

    rt = resolve_device(compose_cfg([f"trainer.device={bench.device}", f"trainer.precision={precision}"]))
    return rt, "fp32" if rt.amp_dtype is None else str(rt.amp_dtype).split(".")[-1]


def our_step(bench: Bench, precision: str, x: torch.Tensor, y: torch.Tensor) -> Step:
    """Our DeepLabv3+ (cell none, no pretrained weights) train step at ``precision`` (fp32 | auto)."""
    from deeplab_dropout.model import build_model

    runtime, name = runtime_for(bench, precision)
    torch.manual_seed(0)
    cfg = compose_cfg(["model.pretrained=none", f"model.backbone={bench.backbone}"])
    return make_step(build_model(cfg), x, y, runtime, name)


def torchvision_step(bench: Bench, x: torch.Tensor, y: torch.Tensor) -> Step:
    """torchvision's own ``deeplabv3_<backbone>`` (OS8 DeepLabv3, no aux head) train step in fp32."""
    from torchvision.models import segmentation

    builder = getattr(segmentation, f"deeplabv3_{bench.backbone}", None)
    if builder is None:
        raise ValueError(f"torchvision has no deeplabv3_{bench.backbone} (use resnet50 or resnet101)")
    torch.manual_seed(0)
    model = builder(weights=None, weights_backbone=None, aux_loss=False)
    runtime, name = runtime_for(bench, "fp32")
    return make_step(model, x, y, runtime, name)


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


def reference_kernels(n: int, precisions: dict[str, torch.dtype], device: torch.device) -> dict:
    """``{gemm_<p>, conv_<p>: (closure, FLOPs)}`` for each precision name ``p`` (fp32, auto)."""
    return {f"{kind}_{name}": make(n, dtype, device) for name, dtype in precisions.items()
            for kind, make in (("gemm", gemm), ("conv", dense_conv))}


def step_section(bench: Bench, table: Table) -> dict:
    """(a)–(c): our step at fp32 and auto, torchvision's at fp32 and the GEMMs, interleaved; ratios per round."""
    device = torch.device(bench.device)
    x, y = fixed_batch(bench, device)
    log(f"(a)-(c) building and counting the steps: {bench.describe()}")
    steps = {"ours_fp32": our_step(bench, "fp32", x, y)}
    auto = runtime_for(bench, "auto")[1]
    # Where auto is fp32 it is the same step: time it once.
    steps["ours_auto"] = steps["ours_fp32"] if auto == "fp32" else our_step(bench, "auto", x, y)
    tv_error = None
    try:
        steps["torchvision_fp32"] = torchvision_step(bench, x, y)
    except Exception as e:  # a backbone torchvision has no DeepLabv3 for: the section says so, others run
        tv_error = error_line(e)
    dtypes = {"fp32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    fns = {name: s.fn for name, s in steps.items() if not (name == "ours_auto" and auto == "fp32")}
    precisions = {"fp32": torch.float32} | ({"auto": dtypes[auto]} if auto != "fp32" else {})
    kernels = reference_kernels(bench.gemm_n, precisions, device)
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
           "images_per_s": {n: spread([s.images / t for t in times[n]]) for n, s in steps.items()},
           "flop_per_s": {n: spread(r) for n, r in rate.items()}, "ratios": step_ratios(rate, steps)}
    if tv_error:
        out["torchvision_unavailable"] = tv_error
    add_step_rows(out, table, bench)
    return out


def step_ratios(rate: dict[str, list[float]], steps: dict[str, Step]) -> dict:
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
    if "torchvision_fp32" in steps:
        ratios["ours_fp32_vs_torchvision_fp32"] = round_ratios(rate["ours_fp32"], rate["torchvision_fp32"])
    return {name: spread(r) for name, r in ratios.items()}


def add_step_rows(out: dict, table: Table, bench: Bench) -> None:
    """The printed rows of sections (a)–(c)."""
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


def scaled(s: dict, factor: float) -> dict:
    """A spread with its median/min/max multiplied by ``factor``."""
    return {**s, **{k: s[k] * factor for k in ("median", "min", "max")}}


# ------------------------------------------------------------------------------ (d) evaluation and (e) demo
def demo_overrides(root: Path, device: str) -> list[str]:
    """The demo preset's `none` cell on ``device`` on the generated data at ``root`` (generated if absent)."""
    return ["experiment=demo", "cell=none", f"data.root={root}", "trainer.progress=false", f"trainer.device={device}"]


@contextmanager
def model_timer(model: torch.nn.Module, device: torch.device, in_training: bool):
    """Accumulate the seconds spent inside ``model``'s forward calls made in train (``in_training``) or eval
    mode, in the yielded one-element list; the hooks are removed on exit."""
    total, start = [0.0], [0.0]

    def pre(module, args) -> None:
        if module.training == in_training:
            start[0] = now(device)

    def post(module, args, output) -> None:
        if module.training == in_training:
            total[0] += now(device) - start[0]

    handles = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
    try:
        yield total
    finally:
        for h in handles:
            h.remove()


def eval_overrides(root: Path, device: str, n_val: int) -> list[str]:
    """The demo's `none` cell evaluating ``n_val`` generated images of VOC's size (short side 300–500, so that
    decoding and resizing cost what they cost on VOC), generated at ``root`` if absent."""
    return demo_overrides(root, device) + ["data.synth.train=20", f"data.synth.val={n_val}", "data.synth.min_side=300",
                                   "data.synth.max_side=500"]


def eval_mode_state(overrides: list[str], work: Path, mode: str | None):
    """The runner's state (``train.set_up``) for ``overrides`` with ``data.val_cache=mode`` (None: leave the
    key out, for a runner without it)."""
    from deeplab_dropout import train

    overrides = overrides + ([] if mode is None else [f"data.val_cache={mode}"])
    return train.set_up(compose_cfg(overrides), work / f"eval-{mode}")


def eval_section(bench: Bench, root: Path, work: Path, table: Table) -> dict:
    """(d): images/s of the runner's ``evaluate``, val cache in RAM vs off, interleaved (``make_val_loader``,
    which fills the cache, timed apart); also wall ÷ model time of the cached evaluation (for the projection)."""
    from deeplab_dropout import train

    n_val = 16 if bench.quick else 48
    overrides = eval_overrides(root, bench.device, n_val)
    states, out = {}, {"config": "demo none cell (resnet18, aspp 64, val short side 80, crop 65), generated val "
                                 "images 300–500 px"}
    log(f"(d) generating {n_val} VOC-sized val images and setting up the runner")
    for mode in ("off", "ram"):
        try:
            states[mode] = eval_mode_state(overrides, work, mode)
        except Exception as e:  # data.val_cache not in this runner (yet): say so, measure what there is
            out[f"unavailable_{mode}"] = error_line(e)
    if not states:
        states["current"] = eval_mode_state(overrides, work, None)
    build = {}
    for mode, s in states.items():  # the loader again, timed: with a cache, this is where it is filled
        build[mode] = timed(lambda s=s: setattr(s, "val_loader", train.make_val_loader(s.cfg, s.val_ds, s.runtime)),
                            s.runtime.device)
    fns = {m: (lambda s=s: train.evaluate(s.model, s.val_loader, s.cfg, s.runtime)) for m, s in states.items()}
    first = {m: timed(fn, torch.device(bench.device)) for m, fn in fns.items()}
    log(f"(d) timing evaluation ({', '.join(fns)}) × {bench.repeats} rounds")
    times = interleaved(fns, torch.device(bench.device), bench.repeats, warm=False)
    n_val = len(next(iter(states.values())).val_ds)
    out.update({"n_val": n_val, "loader_build_s": build, "first_call_s": first,
                "images_per_s": {m: spread([n_val / t for t in ts]) for m, ts in times.items()}})
    if "ram" in times and "off" in times:  # speed ratio = time off ÷ time ram, round by round
        out["ram_vs_off"] = spread(round_ratios(times["off"], times["ram"]))
    mode = "ram" if "ram" in states else next(iter(states))
    state = states[mode]
    with model_timer(state.model, state.runtime.device, in_training=False) as inside:
        wall = timed(fns[mode], state.runtime.device)
    out["wall_over_model"] = wall / inside[0]
    if "ram" in times:  # decode + resize + crop of each image, timed as the cache's fill
        out["cache_bound"] = cache_bound(build["ram"] / n_val, out["images_per_s"]["ram"]["median"])
    add_eval_rows(out, table)
    return out


def cache_bound(decode_s: float, cached_images_per_s: float) -> float:
    """The most any val cache can gain on this device: (decoding an image + evaluating it from the cache) ÷ the
    latter, per image: decoding, resizing and cropping are all a cache removes."""
    cached_s = 1 / cached_images_per_s
    return (decode_s + cached_s) / cached_s


def add_eval_rows(out: dict, table: Table) -> None:
    """The printed rows of section (d)."""
    cfg, ips = f"{out['config']}, {out['n_val']} images", out["images_per_s"]
    for mode, s in ips.items():
        table.add("(d)", f"eval val_cache={mode}, images/s", fmt_spread(s, "", 1), cfg)
    if "ram_vs_off" in out:
        table.add("(d)", "cached ÷ uncached eval speed", fmt_spread(out["ram_vs_off"]), cfg)
    else:
        reason = out.get("unavailable_ram", "data.val_cache not available")
        table.add("(d)", "cached vs uncached eval", f"unavailable ({reason})", cfg)
    if "cache_bound" in out:
        decode_ms = out["loader_build_s"]["ram"] / out["n_val"] * 1e3
        table.add("(d)", "  the most a cache can gain here", f"{out['cache_bound']:.2f}× (decode {decode_ms:.1f} ms "
                  f"+ cached eval {1e3 / out['images_per_s']['ram']['median']:.1f} ms an image)", "")
    table.add("(d)", "val loader build (cache fill), s", ", ".join(f"{m} {t:.2f}" for m, t in
                                                                 out["loader_build_s"].items()), cfg)
    table.add("(d)", "eval wall ÷ model forward time", f"{out['wall_over_model']:.2f}×", cfg)


@contextmanager
def phase_timers(module, names: tuple[str, ...], device: torch.device):
    """Replace each function ``names`` of ``module`` by a wrapper adding its seconds to the yielded dict; the
    runner calls them by their module-global names, so its own loop is what gets timed."""
    seconds = dict.fromkeys(names, 0.0)
    originals = {name: getattr(module, name) for name in names}

    def wrap(name: str, fn: Callable) -> Callable:
        def timed_call(*args, **kwargs):
            t = now(device)
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[name] += now(device) - t
        return timed_call

    for name, fn in originals.items():
        setattr(module, name, wrap(name, fn))
    try:
        yield seconds
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


@contextmanager
def demo_state(overrides: list[str], run_dir: Path):
    """The runner's state (``train.set_up``) of the composed ``overrides`` in ``run_dir``, with its TensorBoard
    logger as ``train.run`` opens it (closed on exit): what (e) and (i) drive epoch by epoch."""
    from deeplab_dropout import train
    from deeplab_dropout.tb import TBLogger, run_hparams

    cfg = compose_cfg(overrides)
    state = train.set_up(cfg, run_dir)
    state.tb = TBLogger(state.run_dir, run_hparams(cfg))
    try:
        yield state
    finally:
        state.tb.close()


def demo_run(overrides: list[str], run_dir: Path, device: torch.device) -> tuple[object, list[list[float]]]:
    """One demo run through the runner's ``run_epoch`` (train, evaluate, record, checkpoints as the demo writes
    them); returns its state and per epoch [wall, train_step, train_one_epoch, evaluate, eval forwards] seconds
    (the last epoch's wall with the final checkpoint)."""
    from deeplab_dropout import train

    with demo_state(overrides, run_dir) as state:
        epochs = []
        with phase_timers(train, ("train_step", "train_one_epoch", "evaluate"), device) as phase, \
                model_timer(state.model, device, in_training=False) as eval_model:
            for epoch in range(state.cfg.trainer.epochs):
                before = [phase["train_step"], phase["train_one_epoch"], phase["evaluate"], eval_model[0]]
                wall = timed(lambda e=epoch: train.run_epoch(state, e), device)
                after = [phase["train_step"], phase["train_one_epoch"], phase["evaluate"], eval_model[0]]
                epochs.append([wall] + [a - b for a, b in zip(after, before, strict=True)])
            epochs[-1][0] += timed(lambda: train.final_checkpoint(state), device)
    return state, epochs


def demo_section(bench: Bench, root: Path, work: Path, table: Table) -> dict:
    """(e): the demo's `none` cell run ``bench.repeats`` times in this process, one after another as the demo's
    sweep runs its 16 cells: wall time ÷ the time inside the model (train steps, eval-mode forwards), per run
    (the first one also pays the process's first-use costs: imports, fonts, kernel set-up), and per epoch."""
    overrides, device = demo_overrides(root, bench.device), torch.device(bench.device)
    log(f"(e) the demo's none cell, {bench.repeats} runs one after another")
    runs = []
    for r in range(bench.repeats):
        state, epochs = demo_run(overrides, work / f"demo-{r}", device)
        runs.append(epochs)
    return add_demo_rows(state.cfg, state, runs, table)


def add_demo_rows(cfg, state, runs: list[list[list[float]]], table: Table) -> dict:
    """Section (e)'s record and printed rows from each run's per-epoch [wall, train_step, train loop, evaluate,
    eval forwards] seconds."""
    totals = [[sum(e[i] for e in epochs) for i in range(5)] for epochs in runs]  # per run
    ratios = [wall / (steps + fwd) for wall, steps, _, _, fwd in totals]
    wall, steps, loop, evaluate, _ = (sum(t[i] for t in totals) / len(runs) for i in range(5))  # per-run means
    out = {"config": f"experiment=demo cell=none ({cfg.model.backbone}, crop {cfg.data.crop_size}, batch "
                     f"{cfg.trainer.batch_size}), {len(state.train_ds)} train / {len(state.val_ds)} val images, "
                     f"{len(runs[0])} epochs, {len(runs)} runs in one process",
           "runs": runs, "run_wall_s": [t[0] for t in totals], "wall_over_model": spread(ratios),
           "first_run_wall_over_model": ratios[0],
           "per_epoch_wall_over_model": spread([e[0] / (e[1] + e[4]) for epochs in runs for e in epochs]),
           "train_wall_over_steps": loop / steps, "eval_wall_s": evaluate, "record_s": wall - loop - evaluate}
    table.add("(e)", "demo run: epochs' wall ÷ time in model", f"{fmt_spread(out['wall_over_model'])} "
              f"({wall:.1f} s a run)", out["config"])
    table.add("(e)", "  the process's first run", f"{ratios[0]:.2f}×", "")
    table.add("(e)", "  per epoch", fmt_spread(out["per_epoch_wall_over_model"]), "")
    table.add("(e)", "  training loop ÷ train_step time", f"{out['train_wall_over_steps']:.2f}×", "")
    table.add("(e)", "  evaluate wall, record (rest), s a run", f"{evaluate:.2f}, {out['record_s']:.2f}", "")
    return out


# ------------------------------------------------------------------------------------------ (f) projection
def study_flops(backbone: str = "resnet101", size: int = 513) -> tuple[float, float]:
    """FLOPs per image of one train step (forward+backward) and of one val forward, counted on the meta device
    (nothing computed) at the study's crop."""
    from deeplab_dropout.model import build_model

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
    eval_precision = str(compose_cfg([]).trainer.get("eval_precision", "auto"))
    eval_rate = step["flop_per_s"]["ours_fp32" if eval_precision == "fp32" else "ours_auto"]["median"]
    eval_overhead = ev["wall_over_model"] if ev else 1.0
    train_overhead = demo["train_wall_over_steps"] if demo else 1.0
    assumptions = (f"ResNet-101 OS16 at 513²: {train_flops / 1e9:.0f} GFLOP per train image (fwd+bwd), "
                   f"{val_flops / 1e9:.0f} per val image (fwd); 150–250 train images (1464 × 0.1 per class), "
                   f"1449 val; 50 epochs, 31 runs; train at {rate / 1e9:.0f} GFLOP/s (our {step['auto_precision']}"
                   f" step in (a), {step['config']}), eval at {eval_rate / 1e9:.0f} (trainer.eval_precision="
                   f"{eval_precision}); eval × {eval_overhead:.2f} (wall ÷ model, (d)), train × "
                   f"{train_overhead:.2f} (loop ÷ steps, (e)); one device, runs one after another")
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

    from deeplab_dropout.model import build_model
    from deeplab_dropout.regularizers import DropBlock

    device = torch.device(bench.device)
    # Small on CPU (the cost of a regulariser is per activation, visible at any size); the bench's on CUDA.
    backbone, size, batch = ("resnet18", 65, 8) if device.type == "cpu" else (bench.backbone, bench.size, bench.batch)
    config = f"{backbone}, batch {batch} × {size}², fp32, {device}"
    small = Bench(backbone, size, batch, bench.device, bench.repeats, bench.gemm_n, bench.quick)
    x, y = fixed_batch(small, device)
    runtime, _ = runtime_for(small, "fp32")
    cells = ("none", "all-chandrop", "all-dropblock", "all-uout")
    fns = {}
    for cell in cells:
        torch.manual_seed(0)
        cfg = compose_cfg([f"cell={cell}", "model.pretrained=none", f"model.backbone={backbone}"])
        fns[cell] = make_step(build_model(cfg), x, y, runtime, "fp32").fn
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


MODELS = {"deeplabv3plus": [], "fcn": ["model=fcn_resnet101"], "fpn": ["model=fpn_resnet101"], "unet": ["model=unet"]}


def models_section(bench: Bench, table: Table) -> dict:
    """(h): each architecture's fp32 train step on the same input — FLOPs, images/s and time ÷ DeepLabv3+'s;
    the ResNet ones on the bench backbone (U-Net at its own width, model.unet_base_channels)."""
    from deeplab_dropout.model import build_model

    device = torch.device(bench.device)
    x, y = fixed_batch(bench, device)
    runtime, _ = runtime_for(bench, "fp32")
    steps = {}
    for name, overrides in MODELS.items():
        torch.manual_seed(0)
        backbone = [] if name == "unet" else [f"model.backbone={bench.backbone}"]
        cfg = compose_cfg([*overrides, "model.pretrained=none", *backbone])
        steps[name] = make_step(build_model(cfg), x, y, runtime, "fp32")
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
def malloc_probe(tuned: bool, root: Path, work: Path) -> float:
    """Wall seconds of the demo's `none` cell, every epoch through ``run_epoch`` and its final checkpoint, in
    this process with trainer.tune_malloc=``tuned``: the child side of (i)."""
    overrides = demo_overrides(root, "cpu") + [f"trainer.tune_malloc={str(tuned).lower()}"]
    _, epochs = demo_run(overrides, work, torch.device("cpu"))
    return sum(e[0] for e in epochs)


def probe_in_child(tuned: bool, root: Path, work: Path) -> float:
    """malloc_probe in a fresh Python process (the allocator's state is per process and only grows)."""
    import subprocess

    mode = "tuned" if tuned else "default"
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--malloc-probe", mode, str(root),
                           str(work)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"malloc probe ({mode}) failed: {error_line(RuntimeError(done.stderr or 'no output'))}")
    return float(done.stdout.strip().splitlines()[-1])


def malloc_section(bench: Bench, root: Path, work: Path, table: Table) -> dict:
    """(i): trainer.tune_malloc's speed-up, the demo's `none` run (as in (e)) with glibc's malloc as a process
    starts ÷ tuned, each run in a fresh process, the two orders alternating round by round."""
    if bench.device != "cpu":
        table.add("(i)", "trainer.tune_malloc", "measured on CPU only (--device cpu)", "")
        return {"unavailable": "CPU only"}
    log(f"(i) the demo's none run in fresh processes, trainer.tune_malloc false vs true × {bench.repeats} rounds")
    times: dict[str, list[float]] = {"default": [], "tuned": []}
    for r in range(bench.repeats):
        for tuned in ((False, True) if r % 2 == 0 else (True, False)):
            mode = "tuned" if tuned else "default"
            times[mode].append(probe_in_child(tuned, root, work / f"malloc-{mode}-{r}"))
    config = "experiment=demo cell=none, 8 epochs through run_epoch, one fresh process a run"
    out = {"config": config, "run_seconds": times,
           "default_vs_tuned": spread(round_ratios(times["default"], times["tuned"]))}
    table.add("(i)", "demo run, glibc malloc default ÷ tuned (time)", fmt_spread(out["default_vs_tuned"]), config)
    return out


# -------------------------------------------------------------------------------------------------- main
def machine() -> dict:
    """What the numbers were measured on."""
    flags = ""
    if Path("/proc/cpuinfo").exists():
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), "")
    info = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "native_bf16_cpu": any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))}
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name()
    return info


def make_bench(args: argparse.Namespace) -> Bench:
    """The step config and repeats of ``args``: the defaults of the device and mode, then explicit options."""
    cuda = args.device.startswith("cuda")
    defaults = {(False, False): ("resnet101", 321, 2, 5, 2048), (False, True): ("resnet50", 129, 2, 3, 2048),
                (True, False): ("resnet101", 513, 8, 10, 8192), (True, True): ("resnet101", 321, 8, 5, 8192)}
    backbone, size, batch, repeats, n = defaults[(cuda, args.quick)]
    return Bench(args.backbone or backbone, args.size or size, args.batch or batch, args.device,
                 args.repeats or repeats, args.gemm or n, args.quick)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="< 1 min on 2 CPU cores: smaller step config, "
                        "fewer repeats")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--backbone", help="resnet18 | resnet50 | resnet101 (default: by device and mode)")
    parser.add_argument("--size", type=int, help="square input side of the step sections")
    parser.add_argument("--batch", type=int, help="batch of the step sections")
    parser.add_argument("--repeats", type=int, help="interleaved timed rounds (default 5; 3 with --quick)")
    parser.add_argument("--gemm", type=int, help="side n of the n×n×n reference matmul")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: "
                        "step,eval,demo,project,reg,models,malloc")
    parser.add_argument("--json", default="outputs/bench.json", help="where to write the JSON record")
    parser.add_argument("--malloc-probe", nargs=3, metavar=("MODE", "ROOT", "WORK"), help=argparse.SUPPRESS)  # (i)
    return parser.parse_args(argv)


def guarded(section: str, table: Table, fn: Callable[[], dict]) -> dict:
    """``fn()``, or, where it fails (a runner mid-change, a missing key), a row and a record saying why, so
    that one broken section never hides the others."""
    try:
        return fn()
    except Exception as e:
        log(f"{section} failed: {error_line(e)}")
        table.add(section, "section", f"unavailable ({error_line(e)})", "")
        return {"unavailable": error_line(e)}


def run_sections(bench: Bench, skip: set[str], table: Table) -> None:
    """Every section not in ``skip``, in order, into ``table`` (its rows and its JSON record)."""
    rec = table.record
    if "step" not in skip:
        rec["step"] = guarded("(a)-(c)", table, lambda: step_section(bench, table))
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        root, work = Path(tmp) / "synth-voc-demo", Path(tmp) / "runs"
        if "demo" not in skip:
            rec["demo_epoch"] = guarded("(e)", table, lambda: demo_section(bench, root, work, table))
        if "eval" not in skip:
            rec["eval_cache"] = guarded("(d)", table, lambda: eval_section(bench, Path(tmp) / "synth-voc-sized",
                                                                           work, table))
        if "malloc" not in skip and not bench.quick:
            rec["malloc"] = guarded("(i)", table, lambda: malloc_section(bench, root, work, table))
    if "project" not in skip and "flop_per_s" in rec.get("step", {}):
        measured = {k: v for k in ("eval_cache", "demo_epoch") if "unavailable" not in (v := rec.get(k, {}))}
        rec["projection"] = guarded("(f)", table, lambda: projection_section(
            rec["step"], measured.get("eval_cache"), measured.get("demo_epoch"), table))
    if "reg" not in skip:
        rec["regularizers"] = guarded("(g)", table, lambda: regularizer_section(bench, table))
    if "models" not in skip:
        rec["models"] = guarded("(h)", table, lambda: models_section(bench, table))


def main(argv: list[str] | None = None) -> None:
    """Run the sections, print the table and the notes, write the JSON record."""
    args = parse_args(argv)
    if args.malloc_probe:  # a child of section (i): print its run's seconds, nothing else
        mode, root, work = args.malloc_probe
        print(malloc_probe(mode == "tuned", Path(root), Path(work)))
        return
    bench = make_bench(args)
    start = time.perf_counter()
    tune_malloc()  # what the runner does by default (trainer.tune_malloc=true): every section measures that
    table = Table(record={"machine": machine(), "bench": asdict(bench), "note": NOTE})
    run_sections(bench, {s.strip() for s in args.skip.split(",") if s.strip()}, table)
    table.record["seconds"] = time.perf_counter() - start
    m = table.record["machine"]
    print(f"bench{' --quick' if bench.quick else ''} on {m['cpu']} ({m['cpu_count']} CPUs, {m['torch_threads']} "
          f"torch threads, native bf16: {m['native_bf16_cpu']}{', ' + m['cuda'] if 'cuda' in m else ''}), "
          f"torch {m['torch']}, {table.record['seconds']:.0f} s")
    print(table.render())
    if "assumptions" in table.record.get("projection", {}):
        print(f"(f) assumptions: {table.record['projection']['assumptions']}")
    print(NOTE)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(table.record, indent=2) + "\n")
    tmp.replace(path)
    print(f"JSON: {path}")


if __name__ == "__main__":
    main()
