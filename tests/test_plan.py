"""A sweep planned before it starts: every job validated (one line per bad one, nothing made), the plan mode's
rows and statuses, another sweep's runs refused, a preset's single run, the ramp warning, progress lines and
the time estimate."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL, tiny_cfg, tiny_preset
from omegaconf import OmegaConf

from deeplab_dropout.estimate import estimate_seconds, flops_per_image, images_per_epoch
from deeplab_dropout.plan import SweepProgress
from deeplab_dropout.rundir import RunDir
from deeplab_dropout.runtime import resolve_device


def train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "deeplab_dropout.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def tree(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its mtime (ns)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_a_sweep_with_an_invalid_job_runs_nothing_and_makes_no_folder(voc_root, tmp_path):
    proc = train("-m", *tiny_preset(tmp_path, voc_root), "cell=spp-uout", "dropout.p=0.1,2,0.2", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: job cell=spp-uout,dropout.p=2: dropout.p=2 is invalid: expected a number in [0, 1)"]
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_plan_mode_shows_each_job_s_status_and_another_config_is_refused(voc_root, tmp_path):
    preset = tiny_preset(tmp_path, voc_root)
    sweep = tmp_path / "sweep"
    done = train("-m", *preset, "cell=spp-uout", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    before = tree(sweep)

    plan = train("-m", *preset, "cell=none,spp-uout", "schedule=constant,linear", "hydra.sweeper.plan=true",
                 cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr[-2000:]
    rows = {line.split()[1]: line for line in plan.stdout.splitlines() if re.match(r"\d+  ", line)}
    assert set(rows) == {"cell=none,schedule=constant", "cell=none,schedule=linear",
                         "cell=spp-uout,schedule=constant", "cell=spp-uout,schedule=linear"}
    assert "repeats cell=none,schedule=constant: skipped" in rows["cell=none,schedule=linear"]
    assert re.search(r"\snew\s+\d+s$", rows["cell=none,schedule=constant"])
    # The completed run was made by `cell=spp-uout` alone: its folder has another name than this sweep's
    # cell=spp-uout,schedule=constant, which is therefore a new run.
    assert f"4 jobs in {sweep}: 3 to run, 1 skipped or invalid; estimated" in plan.stdout
    assert tree(sweep) == before  # the plan wrote nothing

    again = train("-m", *preset, "cell=spp-uout", "hydra.sweeper.plan=true", cwd=tmp_path)
    assert "completed: skipped" in again.stdout and "0 to run" in again.stdout

    # Another config into the folder of a completed sweep of the same cell: refused in one line, nothing touched.
    other = train("-m", *preset, "cell=spp-uout", "dropout.p=0.3", cwd=tmp_path)
    assert other.returncode == 2
    assert other.stderr.splitlines() == [
        f"error: {sweep} holds completed runs of another sweep: cell=spp-uout differs from this sweep's "
        "cell=spp-uout,dropout.p=0.3 in dropout.p (0.2 there, 0.3 here); give a new hydra.sweep.dir, or "
        "trainer.rerun=true to add this sweep's runs beside them"]
    assert tree(sweep) == before
    accepted = train("-m", *preset, "cell=spp-uout", "dropout.p=0.3", "trainer.rerun=true",
                     "hydra.sweeper.plan=true", cwd=tmp_path)
    assert accepted.returncode == 0 and "1 to run" in accepted.stdout


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "rows", "to_run"), [("demo", 16, 16), ("paper", 32, 31)])
def test_the_study_presets_plan_their_matrix(tmp_path, preset, rows, to_run):
    proc = train("-m", f"experiment={preset}", f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.sweeper.plan=true",
                 cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = [line for line in proc.stdout.splitlines() if re.match(r"\d+  ", line)]
    assert len(table) == rows
    total = proc.stdout.splitlines()[-1]
    assert total.startswith(f"{rows} jobs in {tmp_path / 'sweep'}: {to_run} to run")
    assert re.search(r"estimated (\d+h\d\dm|\d+m\d\ds|\d+s) on cpu", total)
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_a_preset_sweep_given_one_cell_is_one_run_in_hydra_run_dir(voc_root, tmp_path):
    cwd, run_dir = tmp_path / "cwd", tmp_path / "one"
    cwd.mkdir()
    proc = train("experiment=demo", "cell=spp-uout", f"hydra.run.dir={run_dir}", f"data.root={voc_root}",
                 "data.synth=null", *SMALL, "trainer.epochs=1", "trainer.max_train_steps=1",
                 "trainer.max_val_images=2", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(cwd.iterdir()) == []
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_a_ramp_longer_than_the_run_is_said_and_recorded(voc_root, tmp_path):
    run_dir = tmp_path / "run"
    cfg_args = ["model=deeplabv3plus_resnet18", "model.pretrained=none", "trainer=smoke", "data=synthetic",
                f"data.root={voc_root}", "data.synth=null", *SMALL, "cell=spp-uout", "schedule=linear",
                "trainer.epochs=3", "trainer.max_train_steps=2", "trainer.max_val_images=2", "trainer.log_every=1"]
    proc = train(*cfg_args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    steps = results["history"][0]["iteration"]  # the steps of epoch 1: trainer.max_train_steps=2 at most
    # p·t/T at the last iteration t = 3·steps − 1 of a T = 30 epochs ramp (steps per epoch: the loader's length).
    loader_steps = results["split"]["n_images"] // 2  # trainer.batch_size=2, the last partial batch dropped
    expected = 0.2 * ((3 - 1) * loader_steps + steps - 1) / (30 * loader_steps)
    assert results["final_drop_p"] == pytest.approx(expected, rel=1e-12)
    assert results["history"][-1]["drop_p"] == pytest.approx(expected, rel=1e-12)
    log = (run_dir / "train.log").read_text()
    assert (f"schedule.ramp_epochs=30 is longer than the run (trainer.epochs=3): p reaches {expected:.3g} of "
            "dropout.p=0.2 by its last iteration") in log
    # Without a terminal: a line per trainer.log_every iterations with the run's ETA and memory.
    lines = re.findall(r"epoch (\d)/3  iter (\d)/2  loss [\d.]+  lr \S+  p [\d.]+  [\d.]+ img/s  elapsed \S+  "
                       r"eta \S+  memory [\d.]+ GiB", log)
    assert lines == [(str(e), str(i)) for e in (1, 2, 3) for i in (1, 2)]


def test_sweep_progress_counts_the_jobs_finished_since_it_started(tmp_path):
    progress = SweepProgress([str(tmp_path / name) for name in ("a", "b", "c", "d")], started=0.0)
    stamps = {"a": ("completed", "2030-01-01T00:00:00"), "b": ("failed", "2030-01-01T00:00:00"),
              "c": ("completed", "1969-12-31T00:00:00")}  # c finished before this sweep started: not counted
    for name, (status, stamp) in stamps.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"status": status, "finished_at": stamp}))
    line = progress.line()
    assert line.startswith("sweep: 2/4 jobs done (1 failed), ")
    elapsed, eta = re.search(r"(\S+) elapsed, ETA (\S+)$", line).groups()
    assert eta == elapsed  # 2 of 4 done: as long again


def test_launch_state_says_what_a_launch_would_do_without_doing_it(voc_root, tmp_path):
    cfg = tiny_cfg(voc_root, "cell=spp-uout")
    run_dir = RunDir(tmp_path)
    assert run_dir.launch_state(cfg) == "new"
    config = OmegaConf.to_container(cfg, resolve=True)
    (tmp_path / "results.json").write_text(json.dumps({"status": "failed", "config": config, "history": []}))
    assert run_dir.launch_state(cfg) == "starts again (failed before its first checkpoint)"
    (tmp_path / "results.json").write_text(json.dumps({"status": "completed", "config": config, "history": []}))
    before = tree(tmp_path)
    assert run_dir.launch_state(cfg) == "completed: skipped"
    with pytest.raises(ValueError, match=r"different config \(dropout.p: 0.2 -> 0.3"):
        run_dir.launch_state(tiny_cfg(voc_root, "cell=spp-uout", "dropout.p=0.3"))
    assert run_dir.launch_state(tiny_cfg(voc_root, "cell=spp-uout", "trainer.rerun=true")).startswith(
        "new (trainer.rerun=true")
    assert tree(tmp_path) == before


def test_the_estimate_counts_the_images_and_flops_a_run_will_see(voc_root):
    cfg = tiny_cfg(voc_root, "trainer.epochs=2", "trainer.max_train_steps=null", "trainer.max_val_images=null")
    ids = (voc_root / "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt").read_text().split()
    val = (voc_root / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").read_text().split()
    n_train = round(len(ids) * cfg.data.fraction)
    assert images_per_epoch(cfg) == (n_train // 2 * 2, len(val))  # batch 2, the last partial batch dropped
    train_flops, val_flops = flops_per_image(cfg)
    # The backward pass costs about twice the forward (less: no gradient for the input image).
    assert 2.5 * val_flops < train_flops <= 3 * val_flops
    runtime = resolve_device(cfg)
    one, two = (estimate_seconds(tiny_cfg(voc_root, f"trainer.epochs={e}", "trainer.max_train_steps=null",
                                          "trainer.max_val_images=null"), runtime) for e in (1, 2))
    assert two == pytest.approx(2 * one, rel=1e-9) and math.isfinite(one) and one > 0


def test_plan_mode_on_a_single_run_says_to_add_m_and_makes_nothing(tmp_path):
    proc = train("hydra.sweeper.plan=true", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: hydra.sweeper.plan=true plans a multirun, and this is a single run; add -m to see its plan"]
    assert list(tmp_path.iterdir()) == []
