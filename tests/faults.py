"""Fault injection for the tests, through public hooks only (torch's global optimiser and module hooks, and
os.replace in a child process): an exception or a NaN at an exact training step, or a SIGKILL at an exact
moment of a `deeplab-dropout-train` process.

As a script: ``python tests/faults.py POINT:N[:SIGNAL] [overrides...]`` runs `deeplab-dropout-train` with the
overrides and sends itself SIGNAL (KILL by default; TERM, INT) at ``step:N`` (before the N-th optimiser step),
``eval:N`` (as the N-th evaluation starts) or ``last:N`` (in the N-th write of checkpoints/last.pt, its temp
file written, not yet renamed).
"""
from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook


def at_call(n: int, action: Callable[[], object]) -> Callable[[], None]:
    """A function that runs ``action`` on its ``n``-th call (1-based), and does nothing on the others."""
    calls = 0

    def tick() -> None:
        nonlocal calls
        calls += 1
        if calls == n:
            action()
    return tick


@contextmanager
def raise_at_step(n: int, error: BaseException) -> Iterator[None]:
    """Raise ``error`` before the ``n``-th optimiser step in this process (1-based, counting every optimiser)."""
    def fail() -> None:
        raise error

    tick = at_call(n, fail)
    handle = register_optimizer_step_pre_hook(lambda *args: tick())
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def nan_output_at_step(n: int, model_class: str = "DeepLabV3Plus") -> Iterator[list[int]]:
    """Make the ``n``-th training-mode forward of a ``model_class`` return NaN logits; yields the list of
    training forwards seen (its length: how many ran)."""
    seen: list[int] = []

    def hook(module, args, output):
        if type(module).__name__ != model_class or not module.training:
            return None
        seen.append(1)
        return output * float("nan") if len(seen) == n else None

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def main() -> None:
    point, n, *sig = sys.argv[1].split(":")
    signum = getattr(signal, f"SIG{sig[0] if sig else 'KILL'}")
    tick = at_call(int(n), lambda: os.kill(os.getpid(), signum))
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    if point == "step":
        register_optimizer_step_pre_hook(lambda *args: tick())
    elif point == "eval":
        from deeplab_dropout import engine

        evaluate = engine.evaluate

        def killing_evaluate(*args, **kwargs):
            tick()
            return evaluate(*args, **kwargs)
        engine.evaluate = killing_evaluate  # before the app imports it
    elif point == "last":
        replace = os.replace

        def killing_replace(src, dst, **kwargs):
            if Path(dst).name == "last.pt":
                tick()
            return replace(src, dst, **kwargs)
        os.replace = killing_replace
    else:
        raise SystemExit(f"unknown fault point {point!r}: step, eval or last")
    from deeplab_dropout.train import main as train_main

    train_main()


if __name__ == "__main__":
    main()
