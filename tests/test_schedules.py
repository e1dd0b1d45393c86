"""The dropout ramp and the poly learning rate are exact, pure functions of the step."""
from __future__ import annotations

import pytest

from deeplab_dropout.schedules import drop_p, poly_lr, scheduled_drop_p


def test_poly_lr_start_mid_end():
    assert poly_lr(7e-3, 0, 1000) == 7e-3
    assert poly_lr(7e-3, 500, 1000) == pytest.approx(7e-3 * 0.5**0.9)
    assert poly_lr(7e-3, 500, 1000, power=1.0) == pytest.approx(3.5e-3)
    assert poly_lr(7e-3, 1000, 1000) == 0.0
    assert poly_lr(7e-3, 1200, 1000) == 0.0
    lrs = [poly_lr(1.0, i, 100) for i in range(101)]
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))


def test_linear_ramp_iteration():
    p, spe, ramp = 0.2, 10, 30
    T = spe * ramp
    assert drop_p(p, 0, spe, ramp) == 0.0
    assert drop_p(p, T // 2, spe, ramp) == pytest.approx(p / 2)
    assert drop_p(p, T, spe, ramp) == pytest.approx(p)
    assert drop_p(p, 10 * T, spe, ramp) == pytest.approx(p)
    for t in range(0, T + 1, 7):
        assert drop_p(p, t, spe, ramp) == pytest.approx(p * t / T)
    # A function of the step alone: p at step t is the same whatever was computed before (as in a resumed run).
    for granularity in ("iteration", "epoch"):
        forward = [drop_p(p, t, spe, ramp, granularity) for t in range(2 * T)]
        assert [drop_p(p, t, spe, ramp, granularity) for t in reversed(range(2 * T))] == forward[::-1]


def test_epoch_granularity_steps_once_per_epoch():
    p, spe, ramp = 0.2, 7, 4
    values = [drop_p(p, t, spe, ramp, "epoch") for t in range(spe * (ramp + 2))]
    for epoch in range(ramp + 2):
        in_epoch = values[epoch * spe:(epoch + 1) * spe]
        assert len(set(in_epoch)) == 1
        assert in_epoch[0] == pytest.approx(p * min(1, epoch / ramp))
    changes = [t for t in range(1, len(values)) if values[t] != values[t - 1]]
    assert changes == [e * spe for e in range(1, ramp + 1)]


def test_constant_is_a_zero_ramp():
    assert all(drop_p(0.2, t, 5, 0) == 0.2 for t in range(50))
    assert all(drop_p(0.2, t, 5, 0, "epoch") == 0.2 for t in range(50))


def test_scheduled_drop_p_from_config(compose_config):
    spe = 11
    lin = compose_config(["cell=all-chandrop", "schedule=linear"])
    T = lin.schedule.ramp_epochs * spe
    p = lin.dropout.p
    assert scheduled_drop_p(lin, 0, spe) == 0.0
    assert scheduled_drop_p(lin, T // 2, spe) == pytest.approx(p * (T // 2) / T)
    assert scheduled_drop_p(lin, T, spe) == pytest.approx(p)
    assert scheduled_drop_p(lin, 3 * T, spe) == pytest.approx(p)
    const = compose_config(["cell=all-chandrop", "schedule=constant"])
    assert all(scheduled_drop_p(const, t, spe) == p for t in (0, 1, T // 2, T, 5 * T))
    ep = compose_config(["cell=all-chandrop", "schedule=linear", "schedule.granularity=epoch"])
    assert scheduled_drop_p(ep, spe - 1, spe) == 0.0
    assert scheduled_drop_p(ep, spe, spe) == pytest.approx(p / ep.schedule.ramp_epochs)
    # The values decide, not the name (constant.yaml is ramp_epochs: 0; config.validate keeps the two agreeing).
    renamed = compose_config(["cell=all-chandrop", "schedule=linear", "schedule.name=constant"])
    assert [scheduled_drop_p(renamed, t, spe) for t in (0, T // 2, T)] == pytest.approx([0.0, p * (T // 2) / T, p])
