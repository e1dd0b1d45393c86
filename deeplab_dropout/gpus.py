"""One GPU per job when a sweep's jobs run side by side on one machine (`hydra/launcher=joblib`, or
`submitit_local`, or Ray without `num_gpus`), without CUDA_VISIBLE_DEVICES.

Each GPU index is a lock file in a directory the sweep's jobs share (``<hydra.sweep.dir>/.gpu_locks/<host>``); a
job holds ``flock`` on one of them while it runs, and waits when all are taken. The kernel drops the lock
when the holder exits, so a killed job never leaves a GPU claimed.
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger(__name__)

LOCK_DIR = ".gpu_locks"


def try_claim(lock_dir: Path, n_devices: int) -> tuple[int, int] | None:
    """(index, open lock fd) of the first free device of ``range(n_devices)``, or None if all are held."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    for index in range(n_devices):
        fd = os.open(lock_dir / f"gpu{index}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return index, fd
    return None


@contextmanager
def claim_device(lock_dir: Path, n_devices: int, poll_s: float = 2.0,
                 on_wait: Callable[[], None] | None = None) -> Iterator[int]:
    """Hold one device index of ``range(n_devices)`` for the ``with`` block, polling until one is free.

    ``on_wait`` is called once if every device is taken when we ask (a test's hook)."""
    claim = try_claim(Path(lock_dir), n_devices)
    if claim is None:
        log.info("all %d GPUs are busy; waiting for one (locks in %s)", n_devices, lock_dir)
        if on_wait is not None:
            on_wait()
        while (claim := try_claim(Path(lock_dir), n_devices)) is None:
            time.sleep(poll_s)
    index, fd = claim
    try:
        yield index
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def multirun_sweep_dir(config: DictConfig | str | Path | None) -> Path | None:
    """The sweep directory of a multirun job, from its config (with or without its ``hydra`` node) or given
    as a path; None outside a multirun."""
    if config is None or isinstance(config, str | Path):
        return None if config is None else Path(config)
    hydra = config.get("hydra")
    if hydra is None:
        from hydra.core.hydra_config import HydraConfig  # the runner's cfg has no `hydra` node
        hydra = HydraConfig.get() if HydraConfig.initialized() else None
    if hydra is None or hydra.mode != RunMode.MULTIRUN:
        return None
    return Path(hydra.sweep.dir)


@contextmanager
def gpu_for_job(config: DictConfig | str | Path | None, n_devices: int | None = None) -> Iterator[int | None]:
    """Run the ``with`` block on a GPU no other job of the sweep uses (it becomes torch's current device).

    A no-op (yields None) outside a multirun or with fewer than two visible GPUs."""
    sweep_dir = multirun_sweep_dir(config)
    if n_devices is None:
        import torch
        n_devices = torch.cuda.device_count()
    if sweep_dir is None or n_devices < 2:
        yield None
        return
    # Per host: jobs on other machines of a shared file system have GPUs of their own.
    with claim_device(sweep_dir / LOCK_DIR / socket.gethostname(), n_devices) as index:
        import torch
        if torch.cuda.is_available():
            # Not CUDA_VISIBLE_DEVICES: a joblib worker runs many jobs, and CUDA reads it only once.
            torch.cuda.set_device(index)
        log.info("job runs on GPU %d of %d", index, n_devices)
        yield index
