"""Per-iteration schedules as pure functions of the step: the learning rate (poly, cosine, cosine with
restarts) and the dropout ramp.

Being pure functions of the global step makes them exactly resumable: a resumed run recomputes p and lr.
config.validate checks the schedule values; these functions trust them.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig


def poly_lr(base_lr: float, it: int, max_it: int, power: float = 0.9) -> float:
    """DeepLab's poly policy: base_lr * (1 - it/max_it)^power, 0 from it >= max_it on."""
    return base_lr * max(0.0, 1.0 - it / max_it) ** power


def cosine_lr(base_lr: float, it: int, period: int, eta_min: float = 0.0) -> float:
    """Cosine annealing: eta_min + (base_lr - eta_min)(1 + cos(pi * it/period))/2, then eta_min from it >= period.

    Holding eta_min differs from torch's CosineAnnealingLR, which climbs back to base_lr over the next period.
    """
    return eta_min + (base_lr - eta_min) * (1.0 + math.cos(math.pi * min(it, period) / period)) / 2.0


def cosine_restarts_lr(base_lr: float, it: int, period: int, eta_min: float = 0.0) -> float:
    """SGDR with T_0 = period, T_mult = 1 (torch's CosineAnnealingWarmRestarts): back to base_lr every period."""
    return cosine_lr(base_lr, it % period, period, eta_min)


def lr_at(optim: DictConfig, base_lr: float, it: int, steps_per_epoch: int, epochs: int) -> float:
    """The LR at iteration ``it`` of a parameter group peaking at ``base_lr``, under ``optim`` (the optim config:
    schedule, poly_power, lr, eta_min, t_max_epochs). ``poly`` decays over all ``epochs``; the cosines over
    t_max_epochs epochs of iterations. optim.eta_min is the floor of the group at optim.lr (the backbone); a group
    at k x optim.lr floors at k x eta_min, so both groups keep the same shape."""
    if optim.schedule == "poly":
        return poly_lr(base_lr, it, epochs * steps_per_epoch, optim.poly_power)
    period = max(1, round(optim.t_max_epochs * steps_per_epoch))  # whole iterations: restarts land on a step
    eta_min = optim.eta_min * base_lr / optim.lr
    anneal = cosine_lr if optim.schedule == "cosine" else cosine_restarts_lr
    return anneal(base_lr, it, period, eta_min)


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
