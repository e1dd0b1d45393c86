"""The report on a real smoke study (4 cells × 2 schedules × 2 seeds, trained in-process): its numbers equal
the runs' own files, recomputed here; the plots and an image sheet are drawn from the run data."""
from __future__ import annotations

import csv
import json
import shutil
import statistics

import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from PIL import Image

from deeplab_dropout.metrics import miou_from_counts
from deeplab_dropout.report import report
from deeplab_dropout.report.figures import FILES
from deeplab_dropout.report.tables import COLUMN_SETS, COLUMNS
from deeplab_dropout.results import PER_IMAGE, read_per_image
from deeplab_dropout.train import run

pytestmark = pytest.mark.slow  # a 16-run sweep fixture

CELLS = ("none", "all-chandrop", "spp-dropblock", "decoder-uout")
SCHEDULES = ("constant", "linear")
SEEDS = (0, 1)
N_BOOT = 300


@pytest.fixture(scope="module")
def study(voc_root, tmp_path_factory):
    """A sweep dir with the 14 distinct runs (`none` is one run per seed under both schedules) and its report."""
    sweep = tmp_path_factory.mktemp("study")
    val_ids = (voc_root / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").read_text().split()
    for cell in CELLS:
        for schedule in SCHEDULES[:1] if cell == "none" else SCHEDULES:
            ramp = ["schedule.ramp_epochs=1"] if schedule == "linear" else []
            for seed in SEEDS:
                cfg = tiny_cfg(voc_root, f"cell={cell}", f"schedule={schedule}", f"seed={seed}", *ramp,
                               "trainer.max_train_steps=1", f"trainer.tb_images=[{val_ids[0]},{val_ids[1]}]")
                run(cfg, sweep / f"cell={cell},schedule={schedule},seed={seed}")
    report(sweep, n_boot=N_BOOT)
    return sweep


def runs_of(sweep, cell: str, schedule: str) -> dict[int, dict]:
    """{seed: results.json} of a cell (`none`'s runs live under the constant schedule)."""
    schedule = "constant" if cell == "none" else schedule
    return {seed: json.loads((sweep / f"cell={cell},schedule={schedule},seed={seed}" / "results.json").read_text())
            for seed in SEEDS}


def dataset_miou(sweep, cell: str, schedule: str, seed: int) -> float:
    schedule = "constant" if cell == "none" else schedule
    record = read_per_image(sweep / f"cell={cell},schedule={schedule},seed={seed}" / PER_IMAGE)
    counts = torch.from_numpy(record.counts).long().sum(0)
    return miou_from_counts(counts[..., 0], counts[..., 1]).item()


def test_report_numbers_are_the_runs_numbers(study):
    tables = json.loads((study / "report.json").read_text())["tables"]
    assert list(tables) == list(SCHEDULES)
    for schedule in SCHEDULES:
        rows = {row["cell"]: row for row in tables[schedule]}
        assert set(rows) == set(CELLS)
        for cell, row in rows.items():
            runs = runs_of(study, cell, schedule)
            assert row["n"] == 2 and row["seeds"] == list(SEEDS)
            means = [r["best"]["per_image_miou"]["mean"] for r in runs.values()]
            assert row["columns"]["mean"][0] == pytest.approx(statistics.fmean(means), abs=1e-12)
            assert row["columns"]["miou"][0] == pytest.approx(statistics.fmean(r["best"]["miou"] for r in runs.values()),
                                                              abs=1e-12)
            if cell == "none":
                assert row["vs_none"] is None and row["every_schedule"]
                continue
            deltas = [dataset_miou(study, cell, schedule, s) - dataset_miou(study, "none", schedule, s) for s in SEEDS]
            # The record's recount is the run's own best.miou, so Δ is also the results.json difference.
            assert deltas == [runs[s]["best"]["miou"] - runs_of(study, "none", schedule)[s]["best"]["miou"]
                              for s in SEEDS]
            vs = row["vs_none"]
            assert vs["delta"] == pytest.approx(statistics.fmean(deltas), abs=1e-12)
            assert vs["method"] == "seeds+images" and vs["seeds"] == list(SEEDS) and vs["n_boot"] == N_BOOT
            lo, hi = vs["ci"]
            assert lo <= hi and vs["excludes_zero"] == (lo > 0 or hi < 0)


def test_ramp_bold_marks_the_columns_that_beat_the_constant_schedule(study):
    tables = json.loads((study / "report.json").read_text())["tables"]
    constant = {row["cell"]: row for row in tables["constant"]}
    for row in tables["linear"]:
        if row["cell"] == "none":
            continue
        higher = {c: row["columns"][c][0] > constant[row["cell"]]["columns"][c][0]
                  for c in ("mean", "min", "median", "max", "miou", "pixel_acc")}
        expected = [c for c, better in higher.items() if better]
        if row["columns"]["val_loss"][0] < constant[row["cell"]]["columns"]["val_loss"][0]:
            expected.append("val_loss")
        assert sorted(row["ramp_better"]) == sorted(expected)
    text = (study / "report.md").read_text()
    linear = text.split("### schedule = linear")[1]
    for row in tables["linear"]:
        line = next(ln for ln in linear.splitlines() if ln.startswith(f"| {row['label']}"))
        shown = set(row["ramp_better"]) & set(COLUMN_SETS["paper"])  # pixel_acc: report.csv/json only
        assert line.count("**") == 2 * len(shown)


def test_csv_has_one_row_per_experiment_and_schedule_with_the_json_values(study):
    with open(study / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    tables = json.loads((study / "report.json").read_text())["tables"]
    assert len(rows) == sum(len(t) for t in tables.values()) == 2 * len(CELLS)
    for flat in rows:
        [row] = [r for r in tables[flat["schedule"]] if r["label"] == flat["experiment"]]
        for column in COLUMNS:
            assert float(flat[column]) == pytest.approx(row["columns"][column][0], rel=1e-12)
        if row["vs_none"] is None:
            assert flat["delta_miou"] == ""
        else:
            assert float(flat["delta_miou"]) == pytest.approx(row["vs_none"]["delta"], rel=1e-12)
            assert [float(flat["delta_ci_low"]), float(flat["delta_ci_high"])] == pytest.approx(row["vs_none"]["ci"])


def png_pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_plots_and_sheet_are_pngs_drawn_from_the_runs(study, tmp_path):
    # Generated data: no paper reference, so no reference_vs_paper.png (tests/test_reference.py draws it).
    names = [f.format(schedule=s) for key, f in FILES.items() if key != "reference" for s in SCHEDULES]
    names = list(dict.fromkeys(names)) + ["sheet_chandrop_constant.png", "sheet_chandrop_linear.png"]
    assert not (study / FILES["reference"]).exists()
    assert len(names) == 9 and sorted(p.name for p in study.glob("*.png")) == sorted(names)
    for name in names:
        pixels = png_pixels(study / name)
        assert pixels.shape[0] >= 200 and pixels.shape[1] >= 300 and (study / name).stat().st_size > 10_000
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 8  # drawn, not a blank canvas
        assert (study / name).with_suffix(".pdf").read_bytes().startswith(b"%PDF")
    assert all(f"({name})" in (study / "report.md").read_text() for name in names)
    # Change one run's monitored metric in its history and one saved prediction: that schedule's curves and the
    # sheet change, nothing else (the plots read the best epoch from the per-image record, not the history).
    copy = tmp_path / "study"
    shutil.copytree(study, copy)
    run_dir = copy / "cell=all-chandrop,schedule=constant,seed=0"
    data = json.loads((run_dir / "results.json").read_text())
    assert data["config"]["trainer"]["monitor"] == "per_image_miou_mean"
    data["history"][0]["per_image_miou"]["mean"] = 0.99
    (run_dir / "results.json").write_text(json.dumps(data))
    index = json.loads((run_dir / "predictions" / "index.json").read_text())
    pred = run_dir / "predictions" / index["fixed"][0] / f"epoch_{data['best_epoch']:03d}.png"
    with Image.open(pred) as img:
        labels, palette = np.array(img), img.getpalette()
    labels[: labels.shape[0] // 2] = (labels[: labels.shape[0] // 2] + 7) % 21  # another class in the top half
    edited = Image.fromarray(labels, mode="P")
    edited.putpalette(palette)
    edited.save(pred)
    report(copy, n_boot=N_BOOT)
    changed = {name for name in names if not np.array_equal(png_pixels(study / name), png_pixels(copy / name))}
    assert changed == {"curves_constant.png", "sheet_chandrop_constant.png"}


def test_failed_runs_are_listed_with_their_error(study, tmp_path):
    copy = tmp_path / "study"
    shutil.copytree(study, copy)
    path = copy / "cell=spp-dropblock,schedule=linear,seed=1" / "results.json"
    data = json.loads(path.read_text())
    data.update(status="failed", error="FloatingPointError: training loss is nan at epoch 2")
    path.write_text(json.dumps(data))
    text = report(copy, n_boot=N_BOOT, figures=False)
    section = text.split("### Failed or incomplete runs")[1]
    assert "cell=spp-dropblock,schedule=linear,seed=1" in section and "training loss is nan at epoch 2" in section
    [row] = [r for r in json.loads((copy / "report.json").read_text())["tables"]["linear"]
             if r["cell"] == "spp-dropblock"]
    assert row["n"] == 1 and row["seeds"] == [0] and row["vs_none"]["method"] == "images"
