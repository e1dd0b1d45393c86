"""optim.schedule (poly, cosine, cosine_restarts) and optim=adamw, and trainer.early_stop_patience: closed forms
recomputed here, torch's own schedulers as an independent implementation, histories built by hand, tiny runs."""
from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import compose_cfg, tiny_cfg
from faults import raise_at_step
from test_train import metrics_only, read_results

from deeplab_dropout import train as train_mod
from deeplab_dropout.config import ConfigError, validate
from deeplab_dropout.results import BEST, LAST, load_checkpoint
from deeplab_dropout.rundir import RunDir, RunResults
from deeplab_dropout.schedules import cosine_lr, cosine_restarts_lr, lr_at

SPE = 7  # steps per epoch


def closed_form(base: float, eta_min: float, t, period: int):
    """Cosine annealing from ``base`` to ``eta_min`` at step(s) ``t`` of a ``period``-step cosine (numpy)."""
    return eta_min + (base - eta_min) * (1 + np.cos(np.pi * np.asarray(t, dtype=np.float64) / period)) / 2


def optim_cfg(*overrides: str):
    return compose_cfg(["optim.lr=0.01", "optim.head_lr_mult=10", "optim.eta_min=1e-4", "optim.t_max_epochs=3",
                        "trainer.epochs=10", *overrides])


class TwoPart(torch.nn.Module):
    """The parameter layout make_optimizer expects: ``backbone`` and the rest (the head)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Conv2d(3, 4, 1)
        self.head = torch.nn.Conv2d(4, 2, 1)

    def set_drop_p(self, p: float) -> None:
        self.p = p


def group_lrs(cfg, it: int) -> list[float]:
    """Both groups' LR after the run's schedules at iteration ``it`` (the code path training runs)."""
    model = TwoPart()
    optimizer = train_mod.make_optimizer(model, cfg)
    train_mod.make_schedules(cfg, optimizer, model, SPE)(it)
    return [g["lr"] for g in optimizer.param_groups]


@pytest.mark.parametrize("schedule", ["cosine", "cosine_restarts"])
def test_cosines_equal_the_closed_form_on_both_groups(schedule):
    cfg = optim_cfg(f"optim.schedule={schedule}")
    T = 3 * SPE
    # The head group (lr x 10) floors at eta_min x 10: both groups keep the same shape.
    groups = [(0.01, 1e-4), (0.1, 1e-3)]
    for it in (0, 1, T // 2, T - 1, T, T + 1, 2 * T - 1, 2 * T, 2 * T + 5, 10 * SPE - 1):
        t = min(it, T) if schedule == "cosine" else it % T
        expected = [closed_form(base, eta_min, t, T) for base, eta_min in groups]
        assert group_lrs(cfg, it) == pytest.approx(expected, rel=1e-12, abs=0)
    assert group_lrs(cfg, 0) == pytest.approx([0.01, 0.1], rel=1e-15)
    assert group_lrs(cfg, T) == pytest.approx([1e-4, 1e-3] if schedule == "cosine" else [0.01, 0.1], rel=1e-12)


def test_cosine_holds_eta_min_after_t_max_and_restarts_jump_back_at_multiples():
    T, base, eta_min = 3 * SPE, 0.01, 1e-4
    held = [cosine_lr(base, it, T, eta_min) for it in range(T, 5 * T)]
    assert held == [pytest.approx(eta_min, rel=1e-12)] * len(held)
    lrs = [cosine_restarts_lr(base, it, T, eta_min) for it in range(4 * T)]
    rises = [it for it in range(1, len(lrs)) if lrs[it] > lrs[it - 1]]
    assert rises == [T, 2 * T, 3 * T]  # strictly falling inside each period, back to base at each multiple
    assert all(lrs[k * T] == base for k in range(4))
    assert lrs[T - 1] == pytest.approx(closed_form(base, eta_min, T - 1, T), rel=1e-12) and lrs[T - 1] > eta_min


def test_epoch_values_match_torch_schedulers():
    # torch steps its schedulers once per epoch, with one eta_min for all groups: one scheduler per group.
    t_max, epochs, mult = 4, 13, 10
    cfg = compose_cfg(["optim.lr=0.01", f"optim.head_lr_mult={mult}", "optim.eta_min=1e-4",
                       f"optim.t_max_epochs={t_max}", f"trainer.epochs={epochs}"])
    for schedule, make in (("cosine_restarts", torch.optim.lr_scheduler.CosineAnnealingWarmRestarts),
                           ("cosine", torch.optim.lr_scheduler.CosineAnnealingLR)):
        cfg.optim.schedule = schedule
        for base, eta_min in ((0.01, 1e-4), (0.1, 1e-3)):
            opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
            sched = make(opt, t_max, eta_min=eta_min)
            for epoch in range(epochs):
                ours = lr_at(cfg.optim, base, epoch * SPE, SPE, epochs)
                if schedule == "cosine_restarts" or epoch <= t_max:
                    assert ours == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), (schedule, epoch)
                else:  # torch's CosineAnnealingLR climbs back to base over the next t_max; ours holds eta_min
                    assert ours == pytest.approx(eta_min, rel=1e-12)
                    assert opt.param_groups[0]["lr"] > 1.5 * eta_min or (epoch - t_max) % (2 * t_max) == 0
                opt.step()
                sched.step()


def test_poly_stays_the_default_and_decays_over_the_whole_run():
    cfg = compose_cfg(["trainer.epochs=10"])
    assert cfg.optim.schedule == "poly" and cfg.optim.t_max_epochs == 10  # T_max defaults to the whole run
    max_it = 10 * SPE
    for it in (0, 5, max_it // 2, max_it - 1):
        expected = [b * (1 - it / max_it) ** 0.9 for b in (0.007, 0.07)]
        assert group_lrs(cfg, it) == pytest.approx(expected, rel=1e-12)


def test_adamw_preset_builds_two_groups_with_the_reports_values():
    cfg = compose_cfg(["optim=adamw"])
    o = cfg.optim
    assert (o.schedule, o.lr, o.eta_min, o.t_max_epochs, o.head_lr_mult) == ("cosine_restarts", 0.01, 1e-5, 20, 1)
    model = TwoPart()
    opt = train_mod.make_optimizer(model, cfg)
    assert type(opt) is torch.optim.AdamW
    back, head = opt.param_groups
    assert [id(p) for p in back["params"]] == [id(p) for p in model.backbone.parameters()]
    assert [id(p) for p in head["params"]] == [id(p) for p in model.head.parameters()]
    for g, lr in ((back, 0.01), (head, 0.01)):
        assert (g["lr"], g["base_lr"], g["betas"], g["eps"], g["weight_decay"], g["foreach"]) == (
            lr, lr, (0.9, 0.999), 1e-8, 0.01, True)
    sgd = train_mod.make_optimizer(model, compose_cfg([]))
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[1]["lr"] == pytest.approx(0.07)
    assert (sgd.param_groups[0]["momentum"], sgd.param_groups[0]["nesterov"]) == (0.9, False)


def test_adamw_first_step_decays_weights_decoupled_from_the_gradient():
    cfg = compose_cfg(["optim=adamw", "optim.weight_decay=0.5", "optim.lr=0.1"])
    model = TwoPart()
    p0 = model.backbone.weight.detach().clone()
    opt = train_mod.make_optimizer(model, cfg)
    model.backbone.weight.grad = g = torch.randn_like(p0)
    opt.step()
    # Step 1: bias-corrected moments are g and g^2; the decay multiplies the weights, outside Adam's moments.
    lr, eps = 0.1, 1e-8
    expected = p0 * (1 - lr * 0.5) - lr * g / (g.abs() + eps)
    torch.testing.assert_close(model.backbone.weight.detach(), expected, rtol=1e-6, atol=1e-7)


def entry(epoch: int, value: float | None, miou: float | None = None) -> dict:
    """A history entry; ``value`` None = an epoch without evaluation."""
    if value is None:
        return {"epoch": epoch, "train_loss": 1.0}
    return {"epoch": epoch, "miou": value if miou is None else miou, "per_image_miou": {"mean": value}}


def stop_epoch(history: list[dict], patience: int | None, monitor: str = "per_image_miou_mean") -> int | None:
    """The first epoch after which the run stops (should_stop on the history so far, as the loop asks it)."""
    for k in range(1, len(history) + 1):
        results = RunResults("unused.json", cell="", config={}, split={}, monitor=monitor)
        results.restore(history[:k])
        if results.should_stop(patience):
            return history[k - 1]["epoch"]
    return None


@pytest.mark.parametrize(("values", "patience", "expected"), [
    ([0.1, 0.3, 0.2, 0.3, 0.25, 0.4], 3, 5),       # best at 2; the tie at 4 is no improvement
    ([0.1, 0.3, 0.2, 0.3, 0.25, 0.4], 4, None),    # epoch 6 would have been the 4th: improved instead
    ([0.1, 0.2, 0.15, 0.3, 0.29, 0.28], 2, 6),     # an improvement (epoch 4) resets the count
    ([0.5, 0.5, 0.5, 0.5], 2, 3),                  # ties only: the first epoch stays the best
    ([0.5, 0.4], 1, 2),
    ([0.1, 0.2, 0.3, 0.4], 1, None),               # always improving
    ([math.nan, math.nan, 0.1, 0.0], 2, 2),        # NaN (no valid pixel) is never an improvement
    ([0.5, 0.4, 0.3, 0.2], None, None),            # off
])
def test_early_stop_epoch_on_constructed_histories(values, patience, expected):
    history = [entry(i + 1, v) for i, v in enumerate(values)]
    assert stop_epoch(history, patience) == expected


def test_early_stop_counts_evaluated_epochs_only():
    # trainer.eval_every=2: evaluated at 2, 4, 6, 8; the best at 2, then 4 and 6 do not beat it.
    history = [entry(e, None if e % 2 else {2: 0.3, 4: 0.2, 6: 0.1, 8: 0.5}[e]) for e in range(1, 9)]
    assert stop_epoch(history, 2) == 6
    assert stop_epoch(history, 1) == 4  # not 3: epoch 3 was not evaluated
    assert stop_epoch(history, 3) is None


def test_early_stop_follows_the_monitor():
    # mIoU keeps improving while the per-image mean does not.
    history = [entry(1, 0.5, miou=0.1), entry(2, 0.4, miou=0.2), entry(3, 0.3, miou=0.3)]
    assert stop_epoch(history, 2) == 3
    assert stop_epoch(history, 2, monitor="miou") is None


def scripted_monitor(monkeypatch, values: list[float]) -> Callable:
    """Record evaluated epochs as usual, but with ``values`` (in order) as the per-image mIoU mean: the monitor;
    returns the real RunResults.add_epoch."""
    real, left = RunResults.add_epoch, list(values)

    def add_epoch(self, entry, write=True):
        if "miou" in entry and left:
            entry["per_image_miou"] = {**entry["per_image_miou"], "mean": left.pop(0)}
        return real(self, entry, write)

    monkeypatch.setattr(RunResults, "add_epoch", add_epoch)
    return real


def test_run_stops_early_completes_and_a_resumed_cut_decides_the_same(voc_root, tmp_path, monkeypatch, caplog):
    overrides = ("trainer.epochs=5", "trainer.max_train_steps=1", "trainer.max_val_images=1",
                 "trainer.early_stop_patience=1", "trainer.checkpoint_every=1")
    real_add_epoch = scripted_monitor(monkeypatch, [0.5, 0.7, 0.7, 0.9])  # best at 2, the tie at 3 ends it (patience 1)
    real_save = RunDir.save_checkpoints

    def interrupt_the_final_checkpoint(self, results, training, best) -> None:
        if training is None:  # the final checkpoint (trainer.keep_last=false): last.pt of epoch 3 is written
            raise KeyboardInterrupt
        real_save(self, results, training, best)

    monkeypatch.setattr(RunDir, "save_checkpoints", interrupt_the_final_checkpoint)
    with pytest.raises(KeyboardInterrupt):  # cut after epoch 3 was recorded, before the run could finish
        train_mod.run(tiny_cfg(voc_root, *overrides), tmp_path)
    assert read_results(tmp_path)["status"] == "failed" and load_checkpoint(tmp_path / LAST)["epoch"] == 3

    monkeypatch.setattr(RunDir, "save_checkpoints", real_save)
    monkeypatch.setattr(RunResults, "add_epoch", real_add_epoch)  # the resume reads the scripted history
    with caplog.at_level(logging.INFO, logger="deeplab_dropout"), \
            raise_at_step(1, AssertionError("the resumed run trained again")):
        train_mod.run(tiny_cfg(voc_root, *overrides), tmp_path)
    res = read_results(tmp_path)
    assert (res["status"], res["stopped_early"], res["stopped_epoch"], res["best_epoch"]) == ("completed", True, 3, 2)
    assert [e["epoch"] for e in res["history"]] == [1, 2, 3]
    assert "early stop after epoch 3" in caplog.text
    # Like any completion: last.pt removed (trainer.keep_last=false), best.pt holds the best epoch.
    assert not (tmp_path / LAST).exists() and load_checkpoint(tmp_path / BEST)["epoch"] == 2
    before = (tmp_path / "results.json").read_bytes()
    train_mod.run(tiny_cfg(voc_root, *overrides), tmp_path)  # a later launch skips the completed run
    assert (tmp_path / "results.json").read_bytes() == before


def test_adamw_cosine_restarts_resume_exactly(voc_root, tmp_path, monkeypatch):
    overrides = ("optim=adamw", "optim.lr=1e-3", "optim.t_max_epochs=1", "trainer.epochs=2",
                 "trainer.max_train_steps=2", "trainer.max_val_images=1", "trainer.keep_last=true",
                 "trainer.checkpoint_every=1")
    real = RunDir.save_checkpoints

    def snapshot_after_epoch_1(self, results, training, best) -> None:
        real(self, results, training, best)
        if results.history[-1]["epoch"] == 1:  # what a kill now would leave: results.json "running", last.pt
            shutil.copytree(self.path, tmp_path / "resumed")

    monkeypatch.setattr(RunDir, "save_checkpoints", snapshot_after_epoch_1)
    train_mod.run(tiny_cfg(voc_root, *overrides), tmp_path / "straight")
    monkeypatch.setattr(RunDir, "save_checkpoints", real)
    res = read_results(tmp_path / "straight")
    assert (res["stopped_early"], res["stopped_epoch"]) == (False, None)  # ran every epoch
    straight = res["history"]
    # The recorded LR (each epoch's last step) is the cosine's, restarted at epoch 2 (iteration spe).
    spe = straight[1]["iteration"] - straight[0]["iteration"]
    for e in straight:
        t = (e["iteration"] - 1) % spe
        assert e["lr"] == pytest.approx(closed_form(1e-3, 1e-5, t, spe), rel=1e-12)

    assert load_checkpoint(tmp_path / "resumed" / LAST)["epoch"] == 1
    assert read_results(tmp_path / "resumed")["status"] == "running"
    train_mod.run(tiny_cfg(voc_root, *overrides), tmp_path / "resumed")
    assert metrics_only(read_results(tmp_path / "resumed")["history"]) == metrics_only(straight)
    a, b = (load_checkpoint(tmp_path / d / LAST) for d in ("straight", "resumed"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and {"step", "exp_avg", "exp_avg_sq"} <= state_a[0].keys()
    assert all(torch.equal(state_a[i][k], state_b[i][k]) for i in state_a for k in state_a[i])


@pytest.mark.parametrize(("overrides", "message"), [
    (["optim.schedule=linear"], "optim.schedule='linear' is invalid: expected one of poly, cosine, cosine_restarts"),
    (["optim.eta_min=-1e-5"], "optim.eta_min=-1e-05 is invalid"),
    (["optim=adamw", "optim.eta_min=0.01"], "optim.eta_min=0.01 is invalid: expected a number in [0, optim.lr=0.01)"),
    (["optim.schedule=cosine", "optim.t_max_epochs=0.5"], "optim.t_max_epochs=0.5 is invalid"),
    (["optim=adamw", "optim.betas=[0.9,1.0]"], "optim.betas=[0.9, 1.0] is invalid: expected two numbers in [0, 1)"),
    (["optim=adamw", "optim.betas=[0.9]"], "optim.betas=[0.9] is invalid"),
    (["optim=adamw", "optim.eps=0"], "optim.eps=0 is invalid"),
    (["optim=adamw", "optim.momentum=0.9"], "optim.momentum=0.9 is invalid: expected null with optim.name=adamw"),
    (["optim.name=adamw"], "optim.name='adamw' is invalid: expected the optimiser's own option file: optim=adamw"),
    (["optim.name=adam"], "optim.name='adam' is invalid: expected one of sgd_poly, adamw"),
    (["optim.nesterov=true", "optim.momentum=0"], "optim.nesterov=True is invalid"),
    (["trainer.early_stop_patience=0"], "trainer.early_stop_patience=0 is invalid: expected an integer in [1, inf)"),
    (["trainer.early_stop_patience=1.5"], "trainer.early_stop_patience=1.5 is invalid"),
    (["trainer.early_stop_patience=true"], "trainer.early_stop_patience=True is invalid"),
])
def test_invalid_optim_and_patience_values_fail_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(overrides))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_valid_combinations_pass():
    for overrides in (["optim=adamw"], ["optim=adamw", "optim.schedule=poly", "optim.poly_power=0"],
                      ["optim.schedule=cosine"], ["optim.schedule=cosine_restarts", "optim.t_max_epochs=2.5"],
                      ["trainer.early_stop_patience=3", "trainer.eval_every=2"]):
        validate(compose_cfg(overrides))
