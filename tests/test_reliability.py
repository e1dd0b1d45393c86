"""Nothing lost, nothing mislabelled: one process per run dir, resume that checks its data, full disks, damaged
checkpoints, read-only datasets, signals, and a completed run's folder left untouched -- each by doing the real
thing (two processes, a changed dataset, a small tmpfs, a truncated file, a read-only mount, a signal)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SMALL, TINY

from deeplab_dropout.report import report

FAULTS = Path(__file__).with_name("faults.py")
# Three short epochs (2 steps each), a checkpoint after each, DropBlock everywhere so dropout draws matter; the
# whole train list (data.fraction=1.0), so one more training image is another split.
RUN = ("cell=all-dropblock", "model.aspp_channels=64", "data.fraction=1.0", "trainer.epochs=3", "trainer.max_train_steps=2",
       "trainer.max_val_images=2", "trainer.checkpoint_every=1")
NUMBERS = ("train_loss", "val_loss", "miou", "per_image_miou", "class_iou", "drop_p", "lr")


def args(voc_root: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [*TINY, "data=synthetic", f"data.root={voc_root}", "data.synth=null", *SMALL, *RUN, *overrides,
            f"hydra.run.dir={run_dir}"]


def train(voc_root: Path, run_dir: Path, *overrides: str, fault: str | None = None, **kwargs):
    """`deeplab-dropout-train` in a child process (with ``fault``: tests/faults.py's signal at that point)."""
    command = ["-m", "deeplab_dropout.train"] if fault is None else [str(FAULTS), fault]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, *command, *args(voc_root, run_dir, *overrides)], env=env,
                          capture_output=True, text=True, timeout=600, **kwargs)


def numbers(run_dir: Path) -> list[dict]:
    history = json.loads((run_dir / "results.json").read_text())["history"]
    return [{k: e[k] for k in NUMBERS} for e in history]


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")
            if p.is_file()}


def can_mount() -> bool:
    """Whether this machine lets the tests make mount namespaces (root with CAP_SYS_ADMIN: CI and sessions)."""
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "true"], capture_output=True).returncode == 0


needs_mounts = pytest.mark.skipif(not can_mount(), reason="needs `unshare -m` (root with CAP_SYS_ADMIN)")


@pytest.fixture(scope="module")
def reference(voc_root, tmp_path_factory) -> list[dict]:
    """The uninterrupted run's numbers, epoch by epoch."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = train(voc_root, run_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return numbers(run_dir)


@pytest.mark.slow
def test_two_processes_on_one_run_dir_one_runs_the_other_stops_naming_it(voc_root, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    procs = {cell: subprocess.Popen([sys.executable, "-m", "deeplab_dropout.train",
                                     *args(voc_root, run_dir, f"cell={cell}")], env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for cell in ("none", "spp-uout")}
    outcomes = {cell: (p.wait(timeout=600), p.stderr.read()) for cell, p in procs.items()}
    codes = sorted(code for code, _ in outcomes.values())
    assert codes == [0, 2], outcomes
    winner = next(cell for cell, (code, _) in outcomes.items() if code == 0)
    loser_err = next(err for code, err in outcomes.values() if code == 2)
    assert len(loser_err.splitlines()) == 1
    assert loser_err.startswith(f"error: {run_dir} is in use by pid ") and " on " in loser_err
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["cell"] == winner
    assert f"cell={winner}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    events = [p for p in run_dir.glob("events.out.tfevents.*") if not p.name.startswith("events.out.tfevents.0.")]
    assert len(events) == 1  # one run's event file (the .0.* files hold the HParams declarations)


@pytest.mark.slow
def test_resume_refuses_changed_data_and_resumes_on_the_same_data_moved(voc_root, tmp_path, reference):
    data = tmp_path / "data"
    shutil.copytree(voc_root, data, ignore=shutil.ignore_patterns("splits"))
    run_dir = tmp_path / "run"
    broken = train(data, run_dir, fault="step:3:KILL")  # killed in epoch 2, after epoch 1's checkpoint
    assert broken.returncode == -signal.SIGKILL

    changed = tmp_path / "changed"
    shutil.copytree(data, changed, ignore=shutil.ignore_patterns("splits"))
    voc = changed / "VOCdevkit" / "VOC2012"
    listed = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    shutil.copy(voc / "JPEGImages" / f"{listed[0]}.jpg", voc / "JPEGImages" / "extra.jpg")
    shutil.copy(voc / "SegmentationClass" / f"{listed[0]}.png", voc / "SegmentationClass" / "extra.png")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join([*listed, "extra"]) + "\n")
    refused = train(changed, run_dir)
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1
    assert refused.stderr.startswith(f"error: the data changed since {run_dir} started: its training split")
    assert "trainer.rerun=true" in refused.stderr

    moved = tmp_path / "moved"
    data.rename(moved)  # the same dataset elsewhere (its split cache too): a legitimate move
    resumed = train(moved, run_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in (run_dir / "train.log").read_text()
    assert numbers(run_dir) == reference


@pytest.mark.slow
@needs_mounts
def test_a_full_disk_fails_in_one_line_and_the_relaunch_completes_identically(voc_root, tmp_path, reference):
    # A 200 MiB tmpfs holds epoch 1's last.pt (98 MB) and best.pt (49 MB) but not epoch 2's last.pt beside them.
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    run_dir = disk / "run"
    cmd = " ".join([sys.executable, "-m", "deeplab_dropout.train", *(f"'{a}'" for a in args(voc_root, run_dir))])
    script = f"""
mount -t tmpfs -o size=200m tmpfs {disk}
{cmd} >{out}/first.out 2>{out}/first.err; echo $? >{out}/first.rc
cp {run_dir}/results.json {out}/failed.json; ls -a {run_dir}/checkpoints >{out}/left.txt
mount -o remount,size=600m {disk}
{cmd} >{out}/again.out 2>{out}/again.err; echo $? >{out}/again.rc
cp {run_dir}/results.json {out}/done.json
"""
    subprocess.run(["unshare", "-m", "sh", "-c", script], check=True, timeout=900,
                   env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert (out / "first.rc").read_text().strip() == "1"
    err = (out / "first.err").read_text().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: no space left on device writing {run_dir / 'checkpoints'}")
    assert err[0].endswith("free); the run is resumable from epoch 2")
    failed = json.loads((out / "failed.json").read_text())
    assert failed["status"] == "failed" and failed["error"] == err[0].removeprefix("error: ")
    assert not [name for name in (out / "left.txt").read_text().split() if name.endswith(".tmp")]
    assert (out / "again.rc").read_text().strip() == "0", (out / "again.err").read_text()[-2000:]
    done = json.loads((out / "done.json").read_text())
    assert done["status"] == "completed"
    assert [{k: e[k] for k in NUMBERS} for e in done["history"]] == reference


@pytest.mark.slow
def test_a_truncated_best_pt_is_rebuilt_from_last_pt(voc_root, tmp_path, reference):
    run_dir = tmp_path / "run"
    broken = train(voc_root, run_dir, fault="step:3:KILL")
    assert broken.returncode == -signal.SIGKILL
    best = run_dir / "checkpoints" / "best.pt"
    assert json.loads((run_dir / "results.json").read_text())["best_epoch"] == 1  # the epoch of last.pt
    best.write_bytes(best.read_bytes()[:1000])
    resumed = train(voc_root, run_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert numbers(run_dir) == reference
    import torch

    assert torch.load(best, weights_only=True)["epoch"] == json.loads((run_dir / "results.json").read_text())[
        "best_epoch"]


@pytest.mark.slow
@needs_mounts
def test_a_read_only_dataset_trains_with_its_manifests_in_the_cache_dir(voc_root, tmp_path):
    data, mount, cache = tmp_path / "data", tmp_path / "ro", tmp_path / "cache"
    shutil.copytree(voc_root, data, ignore=shutil.ignore_patterns("splits"))
    mount.mkdir()
    run_dir = tmp_path / "run"
    cmd = " ".join([sys.executable, "-m", "deeplab_dropout.train",
                    *(f"'{a}'" for a in args(mount, run_dir, "trainer.epochs=1"))])
    split = f"{sys.executable} -m deeplab_dropout.data split --root {mount} --fraction 1.0"
    script = f"mount --bind {data} {mount} && mount -o remount,ro,bind {mount} && {cmd} && {split}"
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0", "XDG_CACHE_HOME": str(cache)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (data / "splits").exists()
    manifests = list(cache.glob("deeplab-dropout/splits/*/VOC2012_train_per_class_frac1_seed0.json"))
    assert len(manifests) == 1
    assert json.loads((run_dir / "results.json").read_text())["split"]["manifest"] == str(manifests[0])
    assert proc.stdout.splitlines()[-1] == str(manifests[0])  # `deeplab-dropout-data split` found it there


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [("TERM", 143), ("INT", 130)])
def test_a_signal_ends_the_run_as_interrupted_and_the_relaunch_completes(voc_root, tmp_path, reference, sig, code):
    run_dir = tmp_path / "run"
    start = time.monotonic()
    stopped = train(voc_root, run_dir, fault=f"step:4:{sig}")  # epoch 2's second step, after epoch 1's checkpoint
    assert stopped.returncode == code
    assert time.monotonic() - start < 120
    lines = stopped.stderr.splitlines()
    assert lines == ["interrupted at epoch 2, iteration 1; run the same command to resume from epoch 2"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "interrupted" and len(results["history"]) == 1
    again = train(voc_root, run_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert numbers(run_dir) == reference


@pytest.mark.slow
def test_a_killed_run_is_shown_as_interrupted_process_gone(voc_root, tmp_path):
    sweep = tmp_path / "sweep"
    killed = train(voc_root, sweep / "killed", fault="step:3:KILL")
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((sweep / "killed" / "results.json").read_text())["status"] == "running"
    text = report(sweep, n_boot=10, figures=False)
    assert "| killed | all-dropblock | constant | 0 | interrupted (process gone) |" in text


@pytest.mark.slow
def test_relaunching_a_completed_run_changes_no_byte_and_no_mtime(voc_root, tmp_path):
    run_dir = tmp_path / "run"
    first = train(voc_root, run_dir, "trainer.epochs=1")
    assert first.returncode == 0, first.stderr[-2000:]
    before = tree(run_dir)
    again = train(voc_root, run_dir, "trainer.epochs=1")
    assert again.returncode == 0 and f"skipping {run_dir}: already completed" in again.stdout
    assert tree(run_dir) == before


def test_a_changed_config_is_refused_naming_the_key_the_user_changed(voc_root, tmp_path):
    from conftest import tiny_cfg
    from omegaconf import OmegaConf

    from deeplab_dropout.rundir import RunDir

    ran = OmegaConf.to_container(tiny_cfg(voc_root, "trainer.epochs=3", "optim.schedule=cosine"), resolve=True)
    (tmp_path / "results.json").write_text(json.dumps({"status": "failed", "config": ran, "history": []}))
    # trainer.epochs also moves optim.t_max_epochs (derived from it): the message names the one the user changed.
    with pytest.raises(ValueError) as refused:
        RunDir(tmp_path).launch_state(tiny_cfg(voc_root, "trainer.epochs=5", "optim.schedule=cosine"))
    assert str(refused.value) == (
        f"{tmp_path / 'results.json'} was trained with a different config (trainer.epochs: 3 -> 5); give another "
        "hydra.run.dir (hydra.sweep.dir for -m), or trainer.rerun=true to move that run aside and start again")


def test_synth_removes_what_a_killed_generator_left_and_refuses_a_file(tmp_path):
    from deeplab_dropout.data.synth import generate
    from deeplab_dropout.data.voc import DatasetError

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid no live process has now
    (tmp_path / "VOCdevkit").mkdir()
    abandoned = tmp_path / f".synth-{dead.pid}-abcd"
    (abandoned / "VOCdevkit").mkdir(parents=True)
    alive = tmp_path / f".synth-{os.getpid()}-efgh"  # a generator running now (this process) keeps its own
    alive.mkdir()
    generate(tmp_path, n_train=2, n_val=1, min_side=16, max_side=16)
    assert not abandoned.exists() and alive.exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(DatasetError, match="file is not a folder"):
        generate(tmp_path / "file", n_train=2, n_val=1)
