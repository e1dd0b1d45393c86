"""Where and how the model runs: device, precision that fits the hardware, memory format, loader workers.

``resolve_device`` turns trainer.device/precision/eval_precision/channels_last (``auto`` included) into one
``Runtime``; ``cpu_has_native`` is the one hardware probe (tests mock it). ``tune_malloc`` keeps freed
activation memory in the process (glibc) instead of handing it back to the OS after every step.
"""
from __future__ import annotations

import ctypes
import os
import platform
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from deeplab_dropout.config import ConfigError

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CPUINFO = Path("/proc/cpuinfo")
# CPU flags with native low-precision matmul/conv kernels; without them oneDNN takes a reference path.
NATIVE_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}
# glibc mallopt parameters and the values tune_malloc sets (see there).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_TUNING = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 1 << 30, M_TOP_PAD: 64 << 20}


def cpu_has_native(precision: str = "bf16", cpuinfo: Path = CPUINFO) -> bool:
    """Whether this CPU runs ``precision`` (bf16 or fp16) convolutions natively: from the /proc/cpuinfo flags,
    else (no cpuinfo) from torch's CPU capability (only AMX implies it there)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return "AMX" in torch.backends.cpu.get_cpu_capability().upper()
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[-1].split())
    return any(flag in flags for flag in NATIVE_FLAGS[precision])


def resolve_precision(requested: str, device: torch.device) -> str:
    """fp32/bf16/fp16 for trainer.precision=``requested`` on ``device``: ``auto`` picks bf16 on CUDA with bf16
    (fp16 on older CUDA), bf16 on CPUs with native bf16, else fp32; a low precision the CPU lacks fails here."""
    if device.type == "cuda":
        if requested == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return requested
    if requested == "auto":
        return "bf16" if cpu_has_native("bf16") else "fp32"
    if requested != "fp32" and not cpu_has_native(requested):
        flags = "/".join(NATIVE_FLAGS[requested])
        raise ConfigError(f"trainer.precision={requested} is invalid on this CPU: it has no {flags}, so {requested} "
                          "convolutions take a slow fallback kernel (16-45x slower than fp32); use "
                          "trainer.precision=fp32 or auto")
    return requested


@dataclass(frozen=True)
class Runtime:
    """Where and how the model runs: trainer.device, precision, eval_precision and channels_last resolved."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None: fp32
    channels_last: bool
    eval_amp_dtype: torch.dtype | None = None  # evaluation's autocast dtype (None: fp32 logits)

    def autocast(self, dtype: torch.dtype | None | str = "train"):
        """Mixed precision in ``amp_dtype`` (or ``dtype``) on the device, or a no-op for fp32."""
        dtype = self.amp_dtype if dtype == "train" else dtype
        if dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def eval_autocast(self):
        """Evaluation's precision: fp32 unless trainer.eval_precision=same."""
        return self.autocast(self.eval_amp_dtype)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` on the device (in channels_last memory format if configured)."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def __str__(self) -> str:
        def name(dtype):
            return "fp32" if dtype is None else str(dtype).split(".")[-1]

        return (f"{self.device} ({name(self.amp_dtype)}, eval {name(self.eval_amp_dtype)}, "
                f"channels_last={self.channels_last})")


def resolve_device(cfg: DictConfig) -> Runtime:
    """The Runtime of trainer.device/precision/eval_precision/channels_last, ``auto`` resolved for this
    machine (ConfigError for a device or precision it lacks)."""
    t = cfg.trainer
    name = "cuda" if t.device == "auto" and torch.cuda.is_available() else t.device
    device = torch.device("cpu" if name == "auto" else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={t.device!r} is invalid: CUDA is not available here")
    amp_dtype = AMP_DTYPES[resolve_precision(t.precision, device)]
    eval_dtype = amp_dtype if t.get("eval_precision", "fp32") == "same" else None
    channels_last = t.channels_last
    if channels_last == "auto":  # CUDA only: faster there (tensor cores); not shown faster on CPU
        channels_last = device.type == "cuda"
    return Runtime(device, amp_dtype, bool(channels_last), eval_dtype)


def tune_malloc() -> bool:
    """Make glibc's malloc keep freed memory for reuse (trainer.tune_malloc); False where libc is not glibc.

    By default glibc serves each block above its mmap threshold (128 KiB at start, rising with what is freed)
    with a fresh mmap and returns freed memory at the top of the heap to the OS, so every CPU step
    page-faults its activations and gradients in anew (the kernel zeroes each page). Serving blocks up to 32 MiB from the heap and keeping up to 1 GiB of freed heap
    makes later steps reuse warm pages: the demo's runs 1.12-1.15x faster (scripts/bench.py section (i)).
    Only where memory comes from changes, never a computed number; the price is up to 1 GiB of freed memory
    the process keeps (the demo's peak 1.24 GB against 1.14 GB), as jemalloc/tcmalloc do by default.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in MALLOC_TUNING.items())


def resolve_workers(setting: int | str, cpu_count: int | None = None) -> int:
    """Loader worker processes for trainer.num_workers=``setting``: ``auto`` leaves the model the cores, with
    one worker per 4 CPUs (none on 1-3 cores, where workers would take the model's cores), at most 8."""
    if setting != "auto":
        return int(setting)
    n = cpu_count if cpu_count is not None else len(os.sched_getaffinity(0))
    return min(8, n // 4)
