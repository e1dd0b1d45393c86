"""Sweeps through Hydra's launcher plugins (extra `cluster`), one GPU per local job, and failure isolation."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import CONF_DIR, tiny_preset
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from deeplab_dropout.gpus import claim_device, gpu_for_job, try_claim


def test_gpu_pool_never_gives_one_device_to_two_jobs(tmp_path):
    holders = {0: 0, 1: 0}
    counted = threading.Lock()
    errors: list[str] = []
    claimed: list[int] = []

    def job() -> None:
        with claim_device(tmp_path, n_devices=2, poll_s=0.001) as index:
            with counted:
                holders[index] += 1
                claimed.append(index)
                if holders[index] > 1:
                    errors.append(f"two holders of GPU {index}")
            with counted:
                holders[index] -= 1

    threads = [threading.Thread(target=job) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and len(claimed) == 8 and set(claimed) <= {0, 1}


def test_gpu_pool_waiter_gets_the_released_device(tmp_path):
    held, release, waiting, got = threading.Event(), threading.Event(), threading.Event(), []

    def hold(index_out: list[int]) -> None:
        with claim_device(tmp_path, 2) as index:
            index_out.append(index)
            held.set()
            release.wait(timeout=30)

    first: list[int] = []
    holder = threading.Thread(target=hold, args=(first,))
    holder.start()
    with claim_device(tmp_path, 2) as second:
        assert held.wait(timeout=30)
        assert {first[0], second} == {0, 1} and try_claim(tmp_path, 2) is None  # the pool is full

        def wait_for_one() -> None:
            with claim_device(tmp_path, 2, poll_s=0.001, on_wait=waiting.set) as index:
                got.append(index)

        waiter = threading.Thread(target=wait_for_one)
        waiter.start()
        assert waiting.wait(timeout=30) and not got  # it waits while both are held
        release.set()
        holder.join(timeout=30)
        waiter.join(timeout=30)
    assert got == first


def test_gpu_for_job_is_a_no_op_without_several_gpus_or_outside_a_multirun(tmp_path):
    with gpu_for_job(tmp_path, n_devices=1) as index:
        assert index is None
    with gpu_for_job(None, n_devices=4) as index:
        assert index is None
    with gpu_for_job(tmp_path, n_devices=2) as index:  # a sweep dir: jobs of a multirun share its locks
        assert index in (0, 1) and (tmp_path / ".gpu_locks").is_dir()


def test_slurm_preset_composes_with_its_documented_keys():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.cpus_per_task=4",
            "hydra.launcher.mem_gb=16", "hydra.launcher.timeout_min=60"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_task, launcher.cpus_per_task, launcher.mem_gb,
            launcher.timeout_min) == ("gpu", 1, 4, 16, 60)
    assert launcher.max_num_timeout > 0  # requeued after a timeout; the run resumes from last.pt
    assert cfg.hydra.sweeper._target_.endswith("StudySweeper")


def test_ray_gpu_preset_reserves_one_gpu_per_job():
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=["hydra/launcher=ray_gpu", "hydra.launcher.ray.init.address=auto"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("RayLauncher")
    assert launcher.ray.remote.num_gpus == 1 and launcher.ray.init.address == "auto"


def sweep(tmp_path: Path, voc_root: Path, *args: str) -> subprocess.CompletedProcess:
    # One thread per job: several jobs share the 2 cores.
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "deeplab_dropout.train", "-m", *tiny_preset(tmp_path, voc_root),
                           *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def statuses(sweep_dir: Path) -> dict[str, str]:
    return {p.parent.name: json.loads(p.read_text())["status"] for p in sweep_dir.glob("*/results.json")}


@pytest.mark.slow
def test_submitit_local_sweep_of_2_cells(voc_root, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cells = ["none", "spp-uout"]
    proc = sweep(tmp_path, voc_root, "hydra/launcher=submitit_local", f"cell={','.join(cells)}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert statuses(tmp_path / "sweep") == {f"cell={c}": "completed" for c in cells}
    assert "| spp-uout | 1 |" in proc.stdout  # the report ran at the end


@pytest.mark.slow
def test_ray_sweep_of_2_cells_on_this_machine(voc_root, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    proc = sweep(tmp_path, voc_root, "hydra/launcher=ray", "cell=none,spp-uout")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert statuses(tmp_path / "sweep") == {"cell=none": "completed", "cell=spp-uout": "completed"}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_failed_run_does_not_stop_the_sweep_and_a_relaunch_trains_nothing_done(voc_root, tmp_path, launcher):
    if launcher == "joblib":
        pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    # data.val_split=nope passes validation (a value only the data can refute): that job fails as it sets up.
    args = ("cell=spp-uout", "data.val_split=val,nope,train", f"hydra/launcher={launcher}")
    if launcher == "joblib":  # jobs side by side, each in a process of its own
        args += ("hydra.launcher.n_jobs=2",)
    proc = sweep(tmp_path, voc_root, *args)
    assert proc.returncode != 0
    if launcher == "joblib":
        assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    bad = tmp_path / "sweep" / "cell=spp-uout,data.val_split=nope" / "results.json"
    failed = json.loads(bad.read_text())
    assert failed["status"] == "failed" and "nope.txt" in failed["error"] and "\n" not in failed["error"]
    runs = statuses(tmp_path / "sweep")
    assert runs == {"cell=spp-uout,data.val_split=val": "completed", "cell=spp-uout,data.val_split=train": "completed",
                    "cell=spp-uout,data.val_split=nope": "failed"}
    lines = proc.stderr.splitlines()
    at = lines.index("failed: 1 of 3 runs:")
    name, reason = lines[at + 1].strip().split(": ", 1)
    assert name == "cell=spp-uout,data.val_split=nope" and "split file not found" in reason
    assert sum(line.startswith("  cell=") for line in lines[at + 1:]) == 1  # one line per failed run

    if launcher != "basic":  # re-launching is the runner's, whatever the launcher: checked once
        return
    # The same command again: the completed runs are skipped untouched, the failed one is retried (and fails).
    done = {p: p.stat().st_mtime_ns for d in ("data.val_split=val", "data.val_split=train")
            for p in (tmp_path / "sweep" / f"cell=spp-uout,{d}").rglob("*")
            if p.is_file()}
    again = sweep(tmp_path, voc_root, *args)
    assert again.returncode != 0 and "failed: 1 of 1 runs:" in again.stderr  # only the failed run is launched
    assert {p: p.stat().st_mtime_ns for p in done} == done
    # The plan skips them: nothing is launched there (their .hydra/ and log untouched too).
    assert again.stdout.count(": completed: skipped") == 2
