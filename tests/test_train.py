"""The runner end to end on a tiny generated VOC-format dataset: results.json, TensorBoard, checkpoints,
LR/ramp schedules, determinism, exact resume, the 16-cell multirun and bad-input handling."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMALL, TINY, compose_cfg, tiny_cfg, tiny_preset
from faults import raise_at_step
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from deeplab_dropout import train as train_mod
from deeplab_dropout.cli import InputError
from deeplab_dropout.results import load_checkpoint, read_per_image
from deeplab_dropout.saved_config import resume_free_keys
from deeplab_dropout.train import PROFILE_KEYS, TIMING_KEYS

REPO = Path(__file__).resolve().parents[1]
HISTORY_KEYS = {"epoch", "train_loss", "val_loss", "miou", "pixel_acc", "class_iou", "per_image_miou", "lr",
                "drop_p", "iteration", "seconds", "data_seconds", "eval_seconds"}


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def metrics_only(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k not in TIMING_KEYS} for e in history]


def assert_same_outputs(a: Path, b: Path) -> None:
    """per_image.npz and every predictions/ file of two runs are equal (PNGs byte for byte)."""
    rec_a, rec_b = read_per_image(a / "per_image.npz"), read_per_image(b / "per_image.npz")
    assert rec_a.ids == rec_b.ids and rec_a.epoch == rec_b.epoch and (rec_a.counts == rec_b.counts).all()
    files_a = sorted(p.relative_to(a) for p in (a / "predictions").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in (b / "predictions").rglob("*") if p.is_file())
    assert files_a == files_b and Path("predictions/index.json") in files_a
    assert all((a / p).read_bytes() == (b / p).read_bytes() for p in files_a)


def test_single_run_leaves_results_tensorboard_checkpoints(voc_root, tmp_path):
    cfg = tiny_cfg(voc_root, "cell=upper-chandrop", "schedule=linear", "schedule.ramp_epochs=2",
                   "trainer.epochs=3", "trainer.keep_last=true")
    train_mod.run(cfg, tmp_path)
    res = read_results(tmp_path)

    assert res["status"] == "completed" and res["cell"] == "upper-chandrop"
    placement = res["config"]["placement"]
    assert res["config"]["dropout"]["name"] == "channel" and placement["spp"] and placement["decoder"]
    assert not placement["resnet"]
    manifest = json.loads(Path(res["split"]["manifest"]).read_text())
    assert res["split"]["sha256"] == manifest["sha256"] and res["split"]["per_class"] == manifest["per_class"]
    assert [e["epoch"] for e in res["history"]] == [1, 2, 3]
    for entry in res["history"]:
        assert HISTORY_KEYS <= entry.keys()
        assert len(entry["class_iou"]) == 21
        assert set(entry["per_image_miou"]) == {"mean", "std", "min", "median", "max"}
        assert 0 <= entry["miou"] <= 1 and 0 <= entry["pixel_acc"] <= 1
    # The best epoch is the one with the highest mean per-image mIoU (trainer.monitor, the authors' rule).
    best = max(res["history"], key=lambda e: e["per_image_miou"]["mean"])
    assert res["best_epoch"] == best["epoch"] and res["best"] == best

    # Poly LR on both groups and the linear ramp, recomputed from the formulas at each epoch's last step.
    n_train = res["split"]["n_images"]
    steps = n_train // 2  # drop_last with batch 2
    max_it = 3 * steps
    for entry in res["history"]:
        it = entry["epoch"] * steps - 1
        assert entry["lr"] == pytest.approx(0.007 * (1 - it / max_it) ** 0.9, rel=1e-12)
        assert entry["lr_head"] == pytest.approx(0.07 * (1 - it / max_it) ** 0.9, rel=1e-12)
        assert entry["drop_p"] == pytest.approx(0.2 * min(1.0, it / (2 * steps)), rel=1e-12)

    # TensorBoard writes into the run dir itself, so a sweep's runs are listed by their folder names.
    assert not (tmp_path / "tb").exists()
    ea = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    tags = ea.Tags()
    for tag in ("train/loss", "val/loss", "val/miou", "val/pixel_acc", "train/lr", "train/drop_p"):
        assert tag in tags["scalars"]
        assert [ev.step for ev in ea.Scalars(tag)] == [1, 2, 3]
    assert [ev.value for ev in ea.Scalars("val/miou")] == pytest.approx([e["miou"] for e in res["history"]])
    assert tags["images"], "no image summaries"
    assert any(t.startswith("val/easiest_image") for t in tags["images"])
    hparams = ea.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in hparams and "_hparams_/session_start_info" in hparams

    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    best_ckpt = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert last["epoch"] == 3 and best_ckpt["epoch"] == res["best_epoch"]
    assert "iteration" not in last  # results.json's history has it; resuming never read it
    assert set(last["model"]) == set(best_ckpt["model"])
    assert "optimizer" in last and "optimizer" not in best_ckpt  # best.pt: weights, no optimiser state
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


@pytest.mark.slow
def test_same_seed_same_numbers_whatever_the_workers_other_seed_differs(voc_root, tmp_path):
    # Each sample's augmentation derives from (seed, epoch, index), not from the worker that loads it, and
    # the shuffle order from the loader's generator, reseeded every epoch (hence two epochs).
    runs = {}
    for name, seed, workers in (("a", 0, 0), ("b", 0, 0), ("w2", 0, 2), ("c", 1, 2)):
        cfg = tiny_cfg(voc_root, "cell=all-dropblock", "trainer.epochs=2", "trainer.max_val_images=2",
                       f"trainer.num_workers={workers}", f"seed={seed}")
        train_mod.run(cfg, tmp_path / name)
        runs[name] = metrics_only(read_results(tmp_path / name)["history"])
    assert runs["a"] == runs["b"] == runs["w2"]
    assert runs["a"] != runs["c"]


def test_augmentation_leaves_the_global_rng_alone(voc_root):
    # In the main process (num_workers=0) loading a sample must not move the RNG that dropout draws from.
    from deeplab_dropout.data import get_datasets

    train_ds, _, _ = get_datasets(tiny_cfg(voc_root).data, seed=0)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = train_ds[3]
    assert torch.equal(torch.get_rng_state(), state)
    train_ds.epoch = 1
    other_epoch = train_ds[3]
    train_ds.epoch = 0
    assert torch.equal(train_ds[3][0], first[0]) and not torch.equal(other_epoch[0], first[0])


def test_resume_free_keys_are_config_keys():
    # conf/train.yaml lists them once (sweep directory names leave them out); a typo there would make
    # resuming refuse a change it should allow, and the report split one experiment in two.
    cfg = compose_cfg([])
    assert resume_free_keys() and "experiment" not in resume_free_keys()
    assert all(OmegaConf.select(cfg, key, default="<absent>") != "<absent>" for key in resume_free_keys())


@pytest.mark.slow
def test_resume_after_interrupt_matches_uninterrupted(voc_root, tmp_path):
    overrides = ("cell=spp-uout", "schedule=linear", "schedule.ramp_epochs=2", "trainer.epochs=3",
                 "trainer.keep_last=true", "trainer.checkpoint_every=1")
    train_mod.run(tiny_cfg(voc_root, *overrides), tmp_path / "straight")
    straight = read_results(tmp_path / "straight")

    steps = straight["history"][0]["iteration"]  # an epoch's
    with raise_at_step(steps + 1, KeyboardInterrupt()), pytest.raises(KeyboardInterrupt):  # epoch 2's first step
        train_mod.run(tiny_cfg(voc_root, *overrides), tmp_path / "resumed")
    cut = read_results(tmp_path / "resumed")
    assert cut["status"] == "failed" and len(cut["history"]) == 1 and "KeyboardInterrupt" in cut["error"]

    train_mod.run(tiny_cfg(voc_root, *overrides, "trainer.resume=auto"), tmp_path / "resumed")
    resumed = read_results(tmp_path / "resumed")
    assert resumed["status"] == "completed"
    assert metrics_only(resumed["history"]) == metrics_only(straight["history"])
    assert_same_outputs(tmp_path / "straight", tmp_path / "resumed")
    a = load_checkpoint(tmp_path / "straight/checkpoints/last.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed/checkpoints/last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_config_and_never(voc_root, tmp_path):
    train_mod.run(tiny_cfg(voc_root, "trainer.epochs=1"), tmp_path)
    before = (tmp_path / "results.json").read_bytes()
    with pytest.raises(InputError, match="dropout.name"):
        train_mod.run(tiny_cfg(voc_root, "trainer.epochs=1", "cell=spp-uout"), tmp_path)
    with pytest.raises(InputError, match="trainer.resume=never"):
        train_mod.run(tiny_cfg(voc_root, "trainer.epochs=1", "trainer.resume=never"), tmp_path)
    assert (tmp_path / "results.json").read_bytes() == before
    # The same config again (a re-run sweep) finds the run complete and changes nothing it recorded.
    again = train_mod.run(tiny_cfg(voc_root, "trainer.epochs=1"), tmp_path)
    res = read_results(tmp_path)
    assert res["status"] == "completed" and res["history"] == json.loads(before)["history"]
    assert again == res["best"]["per_image_miou"]["mean"]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "deeplab_dropout.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_multirun_trains_each_distinct_run_once_and_ends_with_the_report(voc_root, tmp_path):
    # The whole paper matrix's 31 of 32 jobs is tests/test_sweep.py's composition check; here the same rule end
    # to end on 2 cells x 2 schedules. The shrinking goes in an experiment preset (as a user would), so the
    # sweep directories are named by the swept overrides only.
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "cell=none,spp-uout", "schedule=constant,linear", *tiny_preset(tmp_path, voc_root),
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(sweep.glob("*/results.json"))
    # `none` has no regulariser, so its ramp changes nothing: it is trained once (3 runs, not 4).
    assert len(results) == 3 and not (sweep / "cell=none,schedule=linear").exists()
    seen = set()
    for path in results:
        res = json.loads(path.read_text())
        assert res["status"] == "completed"
        schedule = res["config"]["schedule"]["name"]
        # Directories are named by the overrides that matter, like the paper's tables.
        assert path.parent.name == f"cell={res['cell']},schedule={schedule}"
        seen.add((res["cell"], schedule))
    assert seen == {("none", "constant"), ("spp-uout", "constant"), ("spp-uout", "linear")}
    assert "cell=none,schedule=linear: repeats cell=none,schedule=constant: skipped" in proc.stderr + proc.stdout
    # The multirun ends with the Table 3/4 report of its runs; `none` is shown under both schedules.
    assert (sweep / "report.md").is_file() and proc.stdout.count("| spp-uout | 1 |") == 1
    assert proc.stdout.count("| spp-uout ‡ | 1 |") == 1  # the 30-epoch ramp of a 1-epoch run: marked
    assert proc.stdout.count("| none † | 1 |") == 2


# The console script's path, as a subprocess: one line and exit 2 (tests/test_bad_inputs.py holds every bad
# input, in-process, and tests/test_config.py every invalid value).
@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(voc_root, tmp_path):
    proc = run_cli(*TINY, "data=synthetic", f"data.root={voc_root}", "data.synth=null", *SMALL, "dropout.p=1.5",
                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0] == "error: dropout.p=1.5 is invalid: expected a number in [0, 1)", proc.stderr


def constant_background_miou(val_ds) -> float:
    from deeplab_dropout.metrics import SegmentationMetrics
    metrics = SegmentationMetrics()
    for i in range(len(val_ds)):
        _, target = val_ds[i]
        metrics.update(torch.zeros_like(target), target)
    return metrics.compute()["miou"]


@pytest.mark.slow
def test_demo_none_cell_learns(tmp_path):
    # Exactly the demo's configuration (generated data, ResNet-18, its epochs), cell `none`.
    cfg = compose_cfg(["experiment=demo", "cell=none", f"data.root={tmp_path / 'synth'}"])
    train_mod.run(cfg, tmp_path / "run")
    best = read_results(tmp_path / "run")["best"]["miou"]
    from deeplab_dropout.data import get_datasets
    _, val_ds, _ = get_datasets(cfg.data)
    baseline = constant_background_miou(val_ds)
    assert best >= 3 * baseline, (best, baseline)


def test_profile_records_where_each_epochs_time_went_and_changes_no_number(voc_root, tmp_path):
    overrides = ("trainer.epochs=2", "trainer.max_train_steps=2", "trainer.max_val_images=2")
    for name, profile in (("plain", "false"), ("profiled", "true")):
        train_mod.run(tiny_cfg(voc_root, *overrides, f"trainer.profile={profile}"), tmp_path / name)
    plain, profiled = (read_results(tmp_path / name)["history"] for name in ("plain", "profiled"))
    assert metrics_only(plain) == [{k: v for k, v in e.items() if k not in PROFILE_KEYS}
                                   for e in metrics_only(profiled)]
    assert all(not set(PROFILE_KEYS) & e.keys() for e in plain)
    for e in profiled:
        parts = e["data_seconds"] + e["step_seconds"] + e["eval_seconds"]
        # The epoch's own seconds end before it is recorded; bookkeeping counts the recording too.
        assert 0 < e["step_seconds"] < e["seconds"] and e["bookkeeping_seconds"] > 0
        assert parts + e["bookkeeping_seconds"] >= e["seconds"]
