"""A run's progress as log lines (when stderr is not a terminal, or always with trainer.progress=false): every
trainer.log_every iterations and after each epoch, with the time elapsed, the run's ETA, images/s and the peak
memory, in the spirit of mmsegmentation's ``eta: 0:12:34 ... memory: ...`` lines. On a terminal the engine's
tqdm bars show the same live.
"""
from __future__ import annotations

import logging
import resource
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger("deeplab_dropout")


def duration(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``42s``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def peak_memory(device: torch.device) -> str:
    """The peak memory so far: the device's allocator on CUDA, the process's resident set on the CPU."""
    if device.type == "cuda":
        import torch

        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return f"{kib / (2**30 if sys.platform == 'darwin' else 2**20):.1f} GiB"


class RunProgress:
    """The clock of one run from its start (or resume) epoch to its last: elapsed time, ETA, log lines."""

    def __init__(self, start_epoch: int, epochs: int, steps_per_epoch: int, batch_size: int,
                 device: torch.device, log_every: int) -> None:
        self.epochs, self.steps, self.batch_size = epochs, steps_per_epoch, batch_size
        self.device, self.log_every = device, log_every
        self.first_it = start_epoch * steps_per_epoch  # iterations before this process started
        self.it: int | None = None  # the last global iteration taken (0-based)
        self.started = time.perf_counter()

    def eta(self, it: int) -> float | None:
        """Seconds left after global iteration ``it`` (0-based) at this process's pace so far."""
        done = it + 1 - self.first_it
        if done <= 0:
            return None
        return (time.perf_counter() - self.started) / done * (self.epochs * self.steps - it - 1)

    def step(self, epoch: int, step: int, loss: torch.Tensor, lr: float, drop_p: float) -> None:
        """After step ``step`` (0-based) of epoch ``epoch`` (0-based): a log line every ``log_every`` steps (only
        then is ``loss``, a detached 0-d tensor on the device, read)."""
        self.it = epoch * self.steps + step
        if self.log_every <= 0 or (step + 1) % self.log_every != 0:
            return
        it = self.it
        elapsed = time.perf_counter() - self.started
        rate = (it + 1 - self.first_it) * self.batch_size / elapsed
        log.info("epoch %d/%d  iter %d/%d  loss %.4f  lr %.2e  p %.3f  %.1f img/s  elapsed %s  eta %s  memory %s",
                 epoch + 1, self.epochs, step + 1, self.steps, loss.item(), lr, drop_p, rate, duration(elapsed),
                 duration(self.eta(it)), peak_memory(self.device))

    def epoch_summary(self, epoch: int, images: int, seconds: float) -> str:
        """``elapsed …  eta …  N img/s  memory …`` after epoch ``epoch`` (0-based) that trained ``images`` in
        ``seconds`` (evaluation included)."""
        elapsed = time.perf_counter() - self.started
        return (f"elapsed {duration(elapsed)}  eta {duration(self.eta((epoch + 1) * self.steps - 1))}  "
                f"{images / seconds if seconds > 0 else 0.0:.1f} img/s  memory {peak_memory(self.device)}")
