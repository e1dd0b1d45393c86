"""Precision that fits the hardware, loader workers, the train/val caches (same numbers as uncached), timing
in results.json, and torch.compile without a recompile per dropout-ramp step."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import counting_backend, tiny_cfg
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import DataLoader

from deeplab_dropout import runtime as runtime_mod
from deeplab_dropout import train as train_mod
from deeplab_dropout.cli import InputError
from deeplab_dropout.config import ConfigError
from deeplab_dropout.data import get_datasets
from deeplab_dropout.data.cache import CachedValLoader, normalize_batch
from deeplab_dropout.runtime import cpu_has_native, resolve_device, resolve_workers, tune_malloc

FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 {extra}\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 {extra}\n"


@pytest.mark.parametrize(("extra", "bf16", "fp16"), [
    ("", False, False), ("avx512f avx512_bf16", True, False), ("amx_bf16 amx_tile", True, False),
    ("avx512_fp16", False, True),
])
def test_native_precision_from_cpu_flags(tmp_path, extra, bf16, fp16):
    info = tmp_path / "cpuinfo"
    info.write_text(FLAGS.format(extra=extra))
    assert cpu_has_native("bf16", info) is bf16 and cpu_has_native("fp16", info) is fp16


def test_without_cpuinfo_the_cpu_capability_decides(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not cpu_has_native("bf16", tmp_path / "missing")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512_AMX")
    assert cpu_has_native("bf16", tmp_path / "missing")


def cpu_cfg(voc_root, *overrides):
    return tiny_cfg(voc_root, "trainer.device=cpu", *overrides)


@pytest.mark.parametrize("native", [False, True])
def test_auto_precision_is_bf16_only_on_a_native_bf16_cpu(voc_root, monkeypatch, native):
    monkeypatch.setattr(runtime_mod, "cpu_has_native", lambda precision, *a: native and precision == "bf16")
    rt = resolve_device(cpu_cfg(voc_root, "trainer.precision=auto"))
    assert rt.amp_dtype == (torch.bfloat16 if native else None)
    assert rt.eval_amp_dtype is None  # eval_precision=fp32: metrics from fp32 logits
    same = resolve_device(cpu_cfg(voc_root, "trainer.precision=auto", "trainer.eval_precision=same"))
    assert same.eval_amp_dtype == rt.amp_dtype


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_explicit_low_precision_on_a_cpu_without_it_fails_before_training(voc_root, tmp_path, monkeypatch,
                                                                           precision):
    monkeypatch.setattr(runtime_mod, "cpu_has_native", lambda *a: False)
    with pytest.raises(ConfigError) as info:
        resolve_device(cpu_cfg(voc_root, f"trainer.precision={precision}"))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"trainer.precision={precision} is invalid on this CPU")
    assert "slow fallback kernel" in message and "trainer.precision=fp32 or auto" in message
    with pytest.raises(InputError, match=f"^trainer.precision={precision} is invalid"):
        train_mod.run(cpu_cfg(voc_root, f"trainer.precision={precision}"), tmp_path)
    assert not (tmp_path / "results.json").exists()  # failed before any work


def test_native_bf16_cpu_accepts_explicit_bf16(voc_root, monkeypatch):
    monkeypatch.setattr(runtime_mod, "cpu_has_native", lambda *a: True)
    assert resolve_device(cpu_cfg(voc_root, "trainer.precision=bf16")).amp_dtype == torch.bfloat16


@pytest.mark.parametrize(("setting", "cpus", "expected"), [
    ("auto", 1, 0), ("auto", 2, 0), ("auto", 4, 1), ("auto", 16, 4), ("auto", 128, 8), (3, 2, 3), (0, 64, 0)])
def test_workers(setting, cpus, expected):
    assert resolve_workers(setting, cpus) == expected


# A child process that asks glibc whether a 24 MiB block came from mmap (mallinfo2's count of mmapped blocks),
# with glibc's mmap threshold pinned at its 128 KiB start (no dynamic raise) unless the runner tunes it.
MMAP_PROBE = """
import ctypes, sys
from deeplab_dropout.runtime import tune_malloc
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype = MallInfo2, ctypes.c_void_p
tuned = tune_malloc() if sys.argv[1] == "tuned" else None
before = libc.mallinfo2().hblks
block = libc.malloc(24 << 20)
print(tuned, libc.mallinfo2().hblks - before)
"""


def mmapped_after(mode: str) -> tuple[str, int]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
    out = subprocess.run([sys.executable, "-c", MMAP_PROBE, mode], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.slow
@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tune_malloc_serves_large_blocks_from_the_heap():
    # Untuned, glibc maps a 24 MiB block afresh (page faults on every step's activations); tuned, the heap
    # serves it from memory kept for reuse.
    assert mmapped_after("default") == ("None", 1)
    assert mmapped_after("tuned") == ("True", 0)


@pytest.mark.parametrize(("system", "libc"), [("Linux", ("musl", "")), ("Darwin", ("", "")), ("Windows", ("", ""))])
def test_tune_malloc_leaves_other_allocators_alone(monkeypatch, system, libc):
    monkeypatch.setattr(runtime_mod.platform, "system", lambda: system)
    monkeypatch.setattr(runtime_mod.platform, "libc_ver", lambda: libc)
    monkeypatch.setattr(runtime_mod.ctypes, "CDLL", lambda name: pytest.fail("loaded a libc"))
    assert tune_malloc() is False


def test_cached_val_batches_equal_the_uncached_loader(voc_root):
    cfg = cpu_cfg(voc_root)
    _, val_ds, _ = get_datasets(cfg.data, seed=0)
    cached = CachedValLoader(val_ds, cfg.data, 4, torch.device("cpu"))
    plain = DataLoader(val_ds, batch_size=4, shuffle=False)
    assert len(cached) == len(plain) == 2  # 6 val images in batches of 4
    for (cached_img, mask8), (img, mask) in zip(cached, plain, strict=True):
        assert mask8.dtype == torch.uint8 and cached_img.dtype == torch.float32
        assert torch.equal(cached_img, img)  # normalised from uint8 on the device: bit for bit
        assert torch.equal(mask8.long(), mask)


def test_full_val_crop_cache_keeps_each_size(voc_root):
    cfg = cpu_cfg(voc_root, "data.val_crop=full")
    _, val_ds, _ = get_datasets(cfg.data, seed=0)
    cached = CachedValLoader(val_ds, cfg.data, 1, torch.device("cpu"))
    for i, (cached_img, mask8) in enumerate(cached):
        img, mask = val_ds[i]
        assert torch.equal(cached_img[0], img) and torch.equal(mask8[0].long(), mask)
        img8, _ = cached.item(i)  # the uint8 image a view shows
        assert img8.dtype == torch.uint8 and torch.equal(normalize_batch(img8[None], cfg.data)[0], img)


def test_train_cache_yields_the_same_augmented_samples(voc_root):
    cfg = cpu_cfg(voc_root)
    plain, _, _ = get_datasets(cfg.data, seed=3)
    cached, _, _ = get_datasets(cfg.data, seed=3)
    cached.preload()
    assert len(cached._decoded) == len(cached)
    for ds in (plain, cached):
        ds.epoch = 2
    for i in (0, 5, len(plain) - 1):
        (a, m), (b, n) = plain[i], cached[i]
        assert torch.equal(a, b) and torch.equal(m, n)


def history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "results.json").read_text())["history"]


def test_cached_and_uncached_runs_give_identical_metrics_and_record_timing(voc_root, tmp_path):
    runs = {}
    for name, cache in (("off", "off"), ("ram", "ram")):
        cfg = cpu_cfg(voc_root, "trainer.epochs=1", "trainer.max_train_steps=2", f"data.cache={cache}",
                      f"data.val_cache={cache}")
        train_mod.run(cfg, tmp_path / name)
        runs[name] = history(tmp_path / name)
    strip = [[{k: v for k, v in e.items() if k not in train_mod.TIMING_KEYS} for e in h] for h in runs.values()]
    assert strip[0] == strip[1]
    for entry in runs["ram"]:
        assert 0 <= entry["data_seconds"] <= entry["seconds"] and 0 < entry["eval_seconds"] <= entry["seconds"]


def test_compiled_run_changes_p_every_step_without_recompiling(voc_root, tmp_path, monkeypatch):
    dynamo = pytest.importorskip("torch._dynamo", reason="torch.compile is unavailable")

    compiles, counts = [], []

    backend = counting_backend(compiles)

    dynamo.reset()
    dynamo.list_backends()  # registers the built-in backends first
    from torch._dynamo.backends.registry import register_backend

    register_backend(backend, name="counting_test")
    cfg = cpu_cfg(voc_root, "cell=all-uout", "schedule=linear", "schedule.ramp_epochs=2", "trainer.epochs=2",
                  "trainer.max_train_steps=3", "trainer.max_val_images=2", "trainer.compile=true",
                  "trainer.compile_backend=counting_test")
    # Graphs compiled so far, at each optimiser step (after its forward).
    handle = register_optimizer_step_pre_hook(lambda *args: counts.append(len(compiles)))
    try:
        train_mod.run(cfg, tmp_path)
    except Exception as e:  # a platform where dynamo cannot trace at all
        if "dynamo" in type(e).__module__ or "Unsupported" in type(e).__name__:
            pytest.skip(f"torch.compile unavailable here: {e}")
        raise
    finally:
        handle.remove()
    ps = [e["drop_p"] for e in json.loads((tmp_path / "results.json").read_text())["history"]]
    # p = 0.2 * it / 14 (7 steps an epoch, 3 of them run): at each epoch's last step, iterations 2 and 9.
    assert ps == [pytest.approx(0.2 * it / 14) for it in (2, 9)]
    # Graphs compiled in epoch 1: train mode at p = 0 (no regulariser branch) and at p > 0, eval mode (its
    # batches and predictions); in epoch 2 p changes at every step and nothing compiles again.
    final = len(compiles)
    assert len(counts) == 6 and 1 <= counts[0] <= counts[1] <= counts[2] <= counts[3]
    assert counts[3] == counts[4] == counts[5] == final
