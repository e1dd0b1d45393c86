"""Kill-safety and re-launching: a run SIGKILLed anywhere resumes to the uninterrupted numbers; completed runs
are skipped untouched, failed ones retried, trainer.rerun moves the old run aside; last.pt, permissions, NaN."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMALL, TINY, tiny_cfg
from faults import nan_output_at_step, raise_at_step
from test_train import assert_same_outputs

from deeplab_dropout import results as results_mod
from deeplab_dropout import rundir as rundir_mod
from deeplab_dropout import train as train_mod
from deeplab_dropout.results import BEST, LAST, load_checkpoint
from deeplab_dropout.rundir import BestWeights, RunDir, RunResults
from deeplab_dropout.train import TIMING_KEYS

FAULTS = Path(__file__).with_name("faults.py")

# Three short epochs (4 of the 7 steps each) with DropBlock everywhere, so dropout draws matter too.
RUN = ("cell=all-dropblock", "trainer.epochs=3", "trainer.max_train_steps=4", "trainer.max_val_images=2",
       "trainer.keep_last=true", "trainer.checkpoint_every=1")


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def metrics_only(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k not in TIMING_KEYS} for e in history]


@pytest.fixture(scope="module")
def straight(voc_root, tmp_path_factory) -> Path:
    """The uninterrupted run every killed-and-resumed one must match."""
    run_dir = tmp_path_factory.mktemp("straight")
    train_mod.run(tiny_cfg(voc_root, *RUN), run_dir)
    return run_dir


def run_cli(voc_root: Path, run_dir: Path, *overrides: str, kill_at: str | None = None):
    """`deeplab-dropout-train` in a child process; SIGKILLed at ``kill_at`` (see tests/faults.py) if given."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    args = [*TINY, "data=synthetic", f"data.root={voc_root}", "data.synth=null", *SMALL, *RUN, *overrides,
            f"hydra.run.dir={run_dir}"]
    command = ["-m", "deeplab_dropout.train"] if kill_at is None else [str(FAULTS), kill_at]
    return subprocess.run([sys.executable, *command, *args], cwd=run_dir.parent, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize(("kill_at", "workers", "resume_workers"), [
    ("step:7", 0, 2),  # mid-epoch 2 (4 steps run an epoch: its third step); resumed with other workers
    ("eval:2", 0, 0),  # as epoch 2's evaluation starts
    ("last:2", 2, 0),  # epoch 2's last.pt written to its temp file, not yet renamed
])
def test_sigkill_then_same_command_resumes_to_the_same_numbers(voc_root, tmp_path, straight, kill_at, workers,
                                                                resume_workers):
    run_dir = tmp_path / "run"
    killed = run_cli(voc_root, run_dir, f"trainer.num_workers={workers}", kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    cut = read_results(run_dir)
    assert cut["status"] == "running" and load_checkpoint(run_dir / LAST)["epoch"] == 1
    if kill_at.startswith("last"):  # the torn write is a temp file beside a good last.pt
        assert list((run_dir / "checkpoints").glob(".last.pt.*.tmp"))

    again = run_cli(voc_root, run_dir, f"trainer.num_workers={resume_workers}")
    assert again.returncode == 0, again.stderr[-2000:]
    res, ref = read_results(run_dir), read_results(straight)
    assert res["status"] == "completed" and metrics_only(res["history"]) == metrics_only(ref["history"])
    a, b = (load_checkpoint(d / LAST)["model"] for d in (straight, run_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)
    best = load_checkpoint(run_dir / BEST)
    assert best["epoch"] == res["best_epoch"] and best["metrics"] == res["best"]
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    assert_same_outputs(straight, run_dir)  # per_image.npz and predictions/ too


@pytest.mark.slow
def test_checkpoint_every_resumes_from_an_older_last_pt_to_the_same_numbers(voc_root, tmp_path, straight):
    # last.pt after epochs 2 and 3 (the last) only; killed in epoch 3's last.pt write (the second), when
    # results.json, per_image.npz and predictions/ already hold epoch 3: the resume re-trains epoch 3 from
    # epoch 2's state.
    run_dir = tmp_path / "run"
    killed = run_cli(voc_root, run_dir, "trainer.checkpoint_every=2", kill_at="last:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(read_results(run_dir)["history"]) == 3 and load_checkpoint(run_dir / LAST)["epoch"] == 2
    again = run_cli(voc_root, run_dir, "trainer.checkpoint_every=2")
    assert again.returncode == 0, again.stderr[-2000:]
    res, ref = read_results(run_dir), read_results(straight)
    assert res["status"] == "completed" and metrics_only(res["history"]) == metrics_only(ref["history"])
    a, b = (load_checkpoint(d / LAST)["model"] for d in (straight, run_dir))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_checkpoint(run_dir / BEST)["epoch"] == res["best_epoch"]
    assert_same_outputs(straight, run_dir)


def test_kill_between_last_and_best_writes_repairs_best_on_resume(voc_root, tmp_path, monkeypatch):
    real_save_best = RunDir.save_best

    def cut_at_epoch_2(self, best):
        if best.epoch == 2:
            raise SystemExit("killed")  # stands in for SIGKILL: epoch 2's last.pt is written, best.pt is not
        real_save_best(self, best)

    # Evaluated at epochs 2 and 3 only, so epoch 2 is the first best and its best.pt is the write cut off.
    cfg = tiny_cfg(voc_root, *RUN, "trainer.eval_every=2")
    monkeypatch.setattr(RunDir, "save_best", cut_at_epoch_2)  # also cuts the failure path's flush, as a kill
    with pytest.raises(SystemExit):
        train_mod.run(cfg, tmp_path)
    assert load_checkpoint(tmp_path / LAST)["epoch"] == 2 and not (tmp_path / BEST).exists()
    monkeypatch.setattr(RunDir, "save_best", real_save_best)
    train_mod.set_up(cfg, RunDir(tmp_path))  # resuming repairs best.pt before any training
    best = load_checkpoint(tmp_path / BEST)
    assert best["epoch"] == 2 and "optimizer" not in best
    last = load_checkpoint(tmp_path / LAST)["model"]
    assert all(torch.equal(best["model"][k], last[k]) for k in last)


def mtimes(run_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}


def test_completed_run_is_skipped_untouched_and_rerun_moves_it_aside(voc_root, tmp_path, caplog):
    cfg = tiny_cfg(voc_root, "trainer.epochs=1", "trainer.max_train_steps=2", "trainer.max_val_images=2")
    run_dir = tmp_path / "run"
    first = train_mod.run(cfg, run_dir)
    assert not (run_dir / LAST).exists() and (run_dir / BEST).exists()  # trainer.keep_last=false
    before = mtimes(run_dir)
    with caplog.at_level(logging.INFO, logger="deeplab_dropout"):
        assert train_mod.run(cfg, run_dir) == first
    assert f"skipping {run_dir}: already completed" in caplog.messages
    assert mtimes(run_dir) == before

    rerun = tiny_cfg(voc_root, "trainer.epochs=1", "trainer.max_train_steps=2", "trainer.max_val_images=2",
                     "trainer.rerun=true")
    assert train_mod.run(rerun, run_dir) == first
    aside = list(tmp_path.glob("run.old-*"))
    # Everything the run wrote moves aside; its lock stays with the folder (the process running there holds it).
    assert len(aside) == 1 and mtimes(aside[0]) == {k: v for k, v in before.items() if k != ".lock"}
    assert read_results(run_dir)["status"] == "completed"
    # The run it left is complete whatever trainer.rerun says (it only says what to do with the run dir).
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="deeplab_dropout"):
        train_mod.run(cfg, run_dir)
    assert f"skipping {run_dir}: already completed" in caplog.messages


def test_failed_run_without_checkpoint_is_retried_from_scratch(voc_root, tmp_path):
    cfg = tiny_cfg(voc_root, "trainer.epochs=1", "trainer.max_train_steps=2", "trainer.max_val_images=2")
    with raise_at_step(1, RuntimeError("boom")), pytest.raises(RuntimeError, match="boom"):
        train_mod.run(cfg, tmp_path)
    assert read_results(tmp_path)["status"] == "failed" and not (tmp_path / LAST).exists()
    train_mod.run(cfg, tmp_path)
    res = read_results(tmp_path)
    assert res["status"] == "completed" and len(res["history"]) == 1


def test_files_follow_the_umask(voc_root, tmp_path, monkeypatch):
    old = os.umask(0o022)
    results_mod._umask.cache_clear()
    try:
        train_mod.run(tiny_cfg(voc_root, "trainer.epochs=1", "trainer.max_train_steps=1",
                               "trainer.max_val_images=1"), tmp_path)
    finally:
        os.umask(old)
        results_mod._umask.cache_clear()
    for path in (tmp_path / "results.json", tmp_path / BEST):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_nan_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(voc_root, tmp_path):
    # The 7th training forward is epoch 2's third step (4 steps run of the 7 an epoch has).
    with nan_output_at_step(7) as calls, pytest.raises(FloatingPointError):
        train_mod.run(tiny_cfg(voc_root, *RUN), tmp_path)
    assert len(calls) == 7  # stopped at that step
    res = read_results(tmp_path)
    assert res["status"] == "failed" and len(res["history"]) == 1
    assert res["error"] == ("FloatingPointError: training loss is nan at epoch 2, iteration 10 "
                            "(the last good checkpoint is checkpoints/last.pt, epoch 1)")
    assert load_checkpoint(tmp_path / LAST)["epoch"] == 1


def test_best_pt_waits_for_a_checkpoint_and_holds_the_best_epochs_weights(voc_root, tmp_path, straight,
                                                                           monkeypatch):
    # last.pt every 2 epochs of 3 and not kept: best.pt is written at epoch 2's checkpoint (a best of epoch 1
    # or 2, before last.pt when it is epoch 1's) and after the run; never at a mere new best, never last.pt at 3.
    writes = []
    real_save = rundir_mod.save_checkpoint

    def recording(path, state):  # (file, its epoch, epochs trained when it is written: results.json is first)
        writes.append((Path(path).name, state["epoch"], len(read_results(tmp_path)["history"])))
        real_save(path, state)

    monkeypatch.setattr(rundir_mod, "save_checkpoint", recording)
    train_mod.run(tiny_cfg(voc_root, *RUN, "trainer.checkpoint_every=2", "trainer.keep_last=false"), tmp_path)
    ref = read_results(straight)
    best_epochs = [e["epoch"] for e in ref["history"] if e["epoch"] <= 2]
    early = max(best_epochs, key=lambda e: ref["history"][e - 1]["per_image_miou"]["mean"])
    expected = [("best.pt", early, 2)] if early < 2 else []
    expected += [("last.pt", 2, 2)] + ([("best.pt", 2, 2)] if early == 2 else [])
    if ref["best_epoch"] == 3:
        expected.append(("best.pt", 3, 3))
    assert writes == expected
    assert not (tmp_path / LAST).exists()
    a, b = (load_checkpoint(d / BEST) for d in (straight, tmp_path))
    assert a["epoch"] == b["epoch"] == ref["best_epoch"]
    assert metrics_only([a["metrics"]]) == metrics_only([b["metrics"]])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # a copy, not the live weights


def test_a_new_best_overwrites_the_waiting_copy_in_place_never_the_model():
    results = RunResults("unused.json", cell="none", config={}, split={}, monitor="miou")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    results.add_epoch({"epoch": 1, "miou": 0.1}, write=False)
    first = BestWeights.of(results, model.state_dict())
    kept = {k: v.clone() for k, v in first.record["model"].items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on: the copy must not follow the live weights
    assert all(torch.equal(first.record["model"][k], kept[k]) for k in kept)
    results.add_epoch({"epoch": 2, "miou": 0.2}, write=False)
    second = BestWeights.of(results, model.state_dict(), superseded=first)
    assert second.epoch == 2 and second.record["epoch"] == 2
    for k, v in model.state_dict().items():
        assert torch.equal(second.record["model"][k], v)
        assert second.record["model"][k].data_ptr() == first.record["model"][k].data_ptr()  # no new memory
        assert second.record["model"][k].data_ptr() != v.data_ptr()  # and never the model's own tensor
    wider = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5))  # shapes that don't fit
    third = BestWeights.of(results, wider.state_dict(), superseded=second)
    assert all(torch.equal(third.record["model"][k], v) for k, v in wider.state_dict().items())
    assert third.record["model"]["0.weight"].data_ptr() != second.record["model"]["0.weight"].data_ptr()


def test_a_failing_run_writes_the_best_weights_results_json_names(voc_root, tmp_path, straight):
    # Epoch 3's first step is the 9th (4 steps run an epoch). No checkpoint before epoch 5: the best waits in
    # memory until the failure.
    with raise_at_step(9, RuntimeError("out of memory")), pytest.raises(RuntimeError):
        train_mod.run(tiny_cfg(voc_root, *RUN, "trainer.checkpoint_every=5"), tmp_path)
    res = read_results(tmp_path)
    assert res["status"] == "failed" and not (tmp_path / LAST).exists()
    best = load_checkpoint(tmp_path / BEST)
    assert best["epoch"] == res["best_epoch"] and best["metrics"] == res["best"]


def test_a_run_saved_before_keys_were_added_resumes_and_shares_its_report_row(tmp_path):
    from conftest import compose_cfg
    from omegaconf import OmegaConf

    from deeplab_dropout.config import ConfigError
    from deeplab_dropout.saved_config import ADDED_COPIES, ADDED_KEYS, check_resumable, experiment_key

    def config(*overrides: str) -> dict:
        return OmegaConf.to_container(compose_cfg(list(overrides)), resolve=True)

    now = config()
    old = config()  # as an earlier version saved it: none of the added keys
    for key in [*ADDED_KEYS, *ADDED_COPIES]:
        *parents, leaf = key.split(".")
        node = old
        for part in parents:
            node = node[part]
        del node[leaf]
    del old["data"]["augment"]  # the whole node was new
    assert old != now
    check_resumable(old, now, tmp_path / "last.pt")  # no refusal
    assert experiment_key(old, "none") == experiment_key(now, "none")
    for changed in ("data.augment.repeats=2", "optim.t_max_epochs=3", "loss.class_weights=inverse_frequency"):
        with pytest.raises(ConfigError, match=changed.split("=")[0]):
            check_resumable(old, config(changed), tmp_path / "last.pt")
        assert experiment_key(old, "none") != experiment_key(config(changed), "none")
