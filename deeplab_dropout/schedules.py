"""Per-iteration schedules as pure functions of the step: poly learning rate and the dropout ramp.

Being pure functions of the global step makes them exactly resumable: a resumed run recomputes p and lr.
config.validate checks the schedule values; these functions trust them.
"""
from __future__ import annotations


def poly_lr(base_lr: float, it: int, max_it: int, power: float = 0.9) -> float:
    """DeepLab's poly policy: base_lr * (1 - it/max_it)^power, 0 from it >= max_it on."""
    return base_lr * max(0.0, 1.0 - it / max_it) ** power


def drop_p(p: float, step: int, steps_per_epoch: int, ramp_epochs: float,
           granularity: str = "iteration") -> float:
    """ScheduledDropPath ramp: p * min(1, t/T) with T = ramp_epochs epochs; ramp_epochs == 0 is constant p.

    ``iteration`` grows p every step; ``epoch`` uses t = completed epochs, so p is constant within an epoch.
    """
    if ramp_epochs == 0:
        return float(p)
    if granularity == "iteration":
        frac = step / (ramp_epochs * steps_per_epoch)
    else:
        frac = (step // steps_per_epoch) / ramp_epochs
    return float(p) * min(1.0, frac)


def scheduled_drop_p(cfg, step: int, steps_per_epoch: int) -> float:
    """The drop probability at global training step ``step`` for a composed config (dropout + schedule).

    The ramp length decides (``constant`` is ramp_epochs 0); schedule.name only labels the run.
    """
    return drop_p(float(cfg.dropout.p), step, steps_per_epoch, float(cfg.schedule.ramp_epochs),
                  str(cfg.schedule.granularity))
