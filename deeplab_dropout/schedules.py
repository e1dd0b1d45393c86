"""Per-iteration schedules as pure functions of the step: poly learning rate and the dropout ramp.

Being pure functions of the global step makes them exactly resumable: a resumed run recomputes p and lr.
"""
from __future__ import annotations

GRANULARITIES = ("iteration", "epoch")
SCHEDULE_NAMES = ("constant", "linear")


def poly_lr(base_lr: float, it: int, max_it: int, power: float = 0.9) -> float:
    """DeepLab's poly policy: base_lr * (1 - it/max_it)^power, 0 from it >= max_it on."""
    if max_it <= 0:
        raise ValueError(f"poly_lr: max_it must be > 0, got {max_it}")
    if it < 0:
        raise ValueError(f"poly_lr: it must be >= 0, got {it}")
    return base_lr * max(0.0, 1.0 - it / max_it) ** power


def drop_p(p: float, step: int, steps_per_epoch: int, ramp_epochs: float,
           granularity: str = "iteration") -> float:
    """ScheduledDropPath ramp: p * min(1, t/T) with T = ramp_epochs epochs; ramp_epochs == 0 is constant p.

    ``iteration`` grows p every step; ``epoch`` uses t = completed epochs, so p is constant within an epoch.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is invalid: expected one of {', '.join(GRANULARITIES)}")
    if steps_per_epoch <= 0:
        raise ValueError(f"drop_p: steps_per_epoch must be > 0, got {steps_per_epoch}")
    if ramp_epochs < 0:
        raise ValueError(f"drop_p: ramp_epochs must be >= 0, got {ramp_epochs}")
    if step < 0:
        raise ValueError(f"drop_p: step must be >= 0, got {step}")
    if ramp_epochs == 0:
        return float(p)
    if granularity == "iteration":
        frac = step / (ramp_epochs * steps_per_epoch)
    else:
        frac = (step // steps_per_epoch) / ramp_epochs
    return float(p) * min(1.0, frac)


def scheduled_drop_p(cfg, step: int, steps_per_epoch: int) -> float:
    """The drop probability at global training step ``step`` for a composed config (dropout + schedule)."""
    name = cfg.schedule.name
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"schedule.name={name!r} is invalid: expected one of {', '.join(SCHEDULE_NAMES)}")
    p = float(cfg.dropout.p)
    if name == "constant":
        return p
    return drop_p(p, step, steps_per_epoch, float(cfg.schedule.ramp_epochs), str(cfg.schedule.granularity))
