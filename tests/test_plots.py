"""The report's figures: drawn from the data they are given, saved as valid PNGs of the expected size."""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgba
from PIL import Image

from deeplab_dropout.data.voc import VOC_CLASSES, VOC_PALETTE
from deeplab_dropout.report.figures import (
    DPI,
    SHEET_DPI,
    class_delta_figure,
    class_delta_rows,
    class_iou_figure,
    curves_figure,
    delta_figure,
    monitor_curve,
    panel_epochs,
    per_image_figure,
    reference_figure,
    save_figure,
    sheet_figure,
)
from deeplab_dropout.study import cell_shade

CLASSES = list(VOC_CLASSES)


def png(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Check ``path`` is a valid PNG over 10 kB (of ``size`` pixels if given) and return its pixels."""
    assert path.is_file() and path.stat().st_size > 10_000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        if size is not None:
            assert im.size == size
        return np.asarray(im.convert("RGB"))


def inches(fig, dpi: int = DPI) -> tuple[int, int]:
    """Pixel size a figure saves to (figsize × dpi), for comparison with the PNG."""
    w, h = fig.get_size_inches()
    return round(w * dpi), round(h * dpi)


# ---- (a) delta plot ----------------------------------------------------------------------------------

def delta_rows() -> list[dict]:
    """Five cells (one of an unknown type) × two schedules, in a scrambled type order."""
    rows = []
    cells = [("mystery-cell", "mystery"), ("spp-uout", "uout"), ("all-chandrop", "chandrop"),
             ("resnet-dropblock", "dropblock"), ("spp-chandrop", "chandrop")]
    for i, (label, kind) in enumerate(cells):
        for j, schedule in enumerate(("linear", "constant")):
            d = 0.01 * (i - 2) + 0.005 * j
            rows.append({"label": label, "type": kind, "schedule": schedule, "delta": d,
                         "ci": [d - 0.01, d + 0.01], "excludes_zero": abs(d) > 0.01})
    return rows


def test_delta_plot_groups_cells_by_type_and_fills_significant_markers(tmp_path):
    rows = delta_rows()
    fig = delta_figure(rows)
    out = save_figure(fig, tmp_path / "sub" / "delta.png")
    assert out == tmp_path / "sub" / "delta.png" and not plt.fignum_exists(fig.number)  # saved, then freed
    png(out, inches(fig))
    ax = fig.axes[0]
    # chandrop, dropblock, uout, then unknown types; given order kept within a type.
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "all-chandrop", "spp-chandrop", "resnet-dropblock", "spp-uout", "mystery-cell"]
    assert ax.get_title() == "ΔmIoU vs none (95% paired bootstrap CI)"
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["constant", "linear"]
    markers = [c for c in ax.collections if c.get_offsets().shape == (1, 2)]  # errorbars are LineCollections
    assert len(markers) == len(rows)
    for m in markers:
        y = m.get_offsets()[0, 1]
        filled = not np.allclose(m.get_facecolors()[0], to_rgba("white"))
        assert filled == (abs(y) > 0.01)
    assert any(np.allclose(line.get_ydata(), 0.0) for line in ax.lines)  # the zero line
    # Every kind of mark has a legend entry: schedule colours, filled and open markers, the CI bar.
    assert [t.get_text() for t in ax.get_legend().get_texts()][2:] == [
        "filled: CI excludes 0", "open: CI includes 0", "bar: 95% CI"]


def test_save_figure_writes_a_vector_pdf_beside_the_png(tmp_path):
    out = save_figure(delta_figure(delta_rows()), tmp_path / "delta.png")
    pdf = (tmp_path / "delta.pdf").read_bytes()
    assert out == tmp_path / "delta.png" and pdf.startswith(b"%PDF")
    assert b"/Subtype /Image" not in pdf  # lines and glyphs, no raster
    save_figure(delta_figure(delta_rows()), tmp_path / "png-only.png", pdf=False)
    assert not (tmp_path / "png-only.pdf").exists()


def test_delta_plot_changes_with_one_value_and_skips_missing_baseline(tmp_path):
    rows = delta_rows()
    a = png(save_figure(delta_figure(rows), tmp_path / "a.png"))
    rows[3] = {**rows[3], "delta": rows[3]["delta"] + 0.02}
    b = png(save_figure(delta_figure(rows), tmp_path / "b.png"))
    assert a.shape == b.shape and not np.array_equal(a, b)
    rows[0] = {**rows[0], "delta": None, "ci": None}
    rows[1] = {**rows[1], "ci": None}
    ax = delta_figure(rows).axes[0]
    assert "mystery-cell" in [t.get_text() for t in ax.get_xticklabels()]  # label kept, marker gone
    assert len([c for c in ax.collections if c.get_offsets().shape == (1, 2)]) == len(rows) - 1
    with pytest.raises(ValueError, match="no rows"):
        delta_figure([])


# ---- (b) curves --------------------------------------------------------------------------------------

def curve(points: list, best: int | None, monitor: str = "per_image_miou_mean") -> dict:
    return {"points": points, "best_epoch": best, "monitor": monitor}


def curves() -> dict:
    """One schedule's rows: a cell with three seeds (a NaN point, a shorter seed), `none`, a label outside
    Table 2 with a missing point."""
    seeds = [curve([(1, 0.10), (2, 0.20), (3, 0.30)], 3), curve([(1, 0.20), (2, 0.40), (3, math.nan)], 2),
             curve([(1, 0.60), (2, 0.30)], 1)]
    return {"all-chandrop": seeds, "none": [curve([(1, 0.2), (2, 0.25), (3, 0.3)], 3)],
            "spp-uout": [curve([(1, 0.15), (2, 0.2)], 2)], "my-run": [curve([(1, 0.05), (2, None)], 1)]}


def test_curves_plot_seed_mean_family_colours_and_a_star_at_each_best_epoch(tmp_path):
    fig = curves_figure(curves(), schedule="linear")
    png(save_figure(fig, tmp_path / "curves.png"), inches(fig))
    [ax] = fig.axes
    assert ax.get_title() == "validation per_image_miou_mean per epoch, schedule: linear"
    assert ax.get_ylabel() == "per_image_miou_mean (trainer.monitor)"
    lines = {line.get_label(): line for line in ax.lines if not line.get_label().startswith("_")}
    mean = lines["all-chandrop"]
    assert list(mean.get_xdata()) == [1, 2, 3]
    # Mean over the seeds that have a (finite) value at each epoch.
    np.testing.assert_allclose(mean.get_ydata(), [0.3, 0.3, 0.3])  # epoch 1: mean, not median (0.2)
    unlabelled = [line for line in ax.lines if line.get_label().startswith("_")]
    thin = [line for line in unlabelled if line.get_linestyle() == "-"]
    assert len(thin) == 3 and all(line.get_linewidth() < mean.get_linewidth() for line in thin)
    # Each run's best epoch starred on its own line, in the line's colour.
    stars = {(float(line.get_xdata()[0]), float(line.get_ydata()[0])): line.get_color()
             for line in unlabelled if line.get_marker() == "*"}
    assert set(stars) == {(3, 0.30), (2, 0.40), (1, 0.60), (3, 0.3), (2, 0.2), (1, 0.05)}
    assert stars[(2, 0.40)] == mean.get_color() and to_rgba(stars[(3, 0.3)]) == (0, 0, 0, 1)  # none: black
    r, g, b, _ = mean.get_color()
    assert b > r  # chandrop family: blues
    r, g, b, _ = lines["spp-uout"].get_color()
    assert r > b  # uout family: oranges
    assert to_rgba(lines["none"].get_color()) == (0, 0, 0, 1)
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == [
        "all-chandrop", "none", "spp-uout", "my-run", "best epoch (max per_image_miou_mean)",
        "thin: one seed; thick: their mean"]
    assert legend.legend_handles[4].get_marker() == "*"


def test_curves_plot_names_every_monitor_and_changes_with_one_value(tmp_path):
    data = curves()
    a = png(save_figure(curves_figure(data, "constant"), tmp_path / "a.png"))
    data["none"][0]["points"][1] = (2, 0.6)
    b = png(save_figure(curves_figure(data, "constant"), tmp_path / "b.png"))
    assert a.shape == b.shape and not np.array_equal(a, b)
    data["my-run"][0]["monitor"] = "miou"
    assert curves_figure(data, "constant").axes[0].get_ylabel() == "per_image_miou_mean / miou (trainer.monitor)"
    with pytest.raises(ValueError, match="no curves"):
        curves_figure({}, "constant")


def test_monitor_curve_reads_the_metric_the_best_epoch_is_picked_by():
    history = [{"epoch": 1, "miou": 0.1, "per_image_miou": {"mean": 0.5}, "batch_miou": [0.2, 0.4]},
               {"epoch": 2, "train_loss": 1.0},  # not evaluated: no point
               {"epoch": 3, "miou": 0.3, "per_image_miou": {"mean": 0.7}, "batch_miou": [0.6, None, 0.9]}]

    def run(monitor: str | None) -> dict:
        return {"config": {"trainer": {} if monitor is None else {"monitor": monitor}}, "history": history,
                "best_epoch": 3}

    assert monitor_curve(run("per_image_miou_mean")) == curve([(1, 0.5), (3, 0.7)], 3)
    assert monitor_curve(run("batch_miou_mean"))["points"] == [(1, pytest.approx(0.3)), (3, pytest.approx(0.75))]
    assert monitor_curve(run(None)) == curve([(1, 0.1), (3, 0.3)], 3, "miou")  # older runs: dataset mIoU


# ---- (c) per-image distributions ---------------------------------------------------------------------

def test_per_image_plot_whiskers_at_min_and_max_and_changes_with_data(tmp_path):
    rng = np.random.default_rng(0)
    # A tight bulk and two far points: Tukey whiskers (1.5 IQR) would leave them as fliers.
    values = (rng.uniform(0.5, 0.55, 50).tolist() + [0.02, 0.97])
    dists = {"constant": {"none": values, "all-uout": [0.5, math.nan, 0.7, 0.2], "empty": []},
             "linear": {"none": values[:10]}}
    fig = per_image_figure(dists)
    out = save_figure(fig, tmp_path / "dist.png")
    png(out, inches(fig))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["none", "all-uout", "empty"]
    assert all(t.get_rotation() == 45 for t in ax.get_xticklabels())
    # Whiskers, caps, boxes and medians are drawn lines; fliers and means are markers only.
    ends = np.concatenate([line.get_ydata() for line in ax.lines if line.get_linestyle() != "None"])
    assert np.isclose(ends, min(values)).any() and np.isclose(ends, max(values)).any()
    assert np.isclose(ends, 0.2).any() and np.isclose(ends, 0.7).any()  # NaN left out, not a whisker
    # The legend names every mark: the mean's marker as drawn, the median line, the box and whiskers.
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["mean", "median", "box: quartiles; whiskers: worst, best"]
    means = [line for line in ax.lines if line.get_linestyle() == "None" and len(line.get_ydata())]  # no fliers
    assert means and {line.get_marker() for line in means} == {legend.legend_handles[0].get_marker()} == {"^"}
    a = png(out)
    dists["constant"]["none"] = values[:-1] + [0.01]
    b = png(save_figure(per_image_figure(dists), tmp_path / "b.png"))
    assert a.shape == b.shape and not np.array_equal(a, b)


# ---- (d) class IoU heat map --------------------------------------------------------------------------

def iou_rows(n: int) -> list[tuple[str, list]]:
    """``n`` rows of random class IoUs, one of them None."""
    rng = np.random.default_rng(n)
    rows = [(f"cell-{i}", rng.uniform(0, 1, len(CLASSES)).tolist()) for i in range(n)]
    rows[0][1][5] = None
    return rows


def test_class_iou_plot_annotates_greys_missing_and_changes_with_data(tmp_path):
    rows = iou_rows(4)
    fig = class_iou_figure(rows, CLASSES)
    a = png(save_figure(fig, tmp_path / "iou.png"), inches(fig))
    ax = fig.axes[0]
    assert len(ax.texts) == 4 * len(CLASSES) - 1  # one number per known value
    assert ax.images[0].get_clim() == (0.0, 1.0)
    assert (a == 211).all(axis=-1).any()  # the None cell in lightgrey (211, 211, 211)
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
    rows[2][1][7] = 1.0 - rows[2][1][7]
    b = png(save_figure(class_iou_figure(rows, CLASSES), tmp_path / "b.png"))
    assert not np.array_equal(a, b)
    assert not class_iou_figure(iou_rows(26), CLASSES).axes[0].texts  # too many rows to annotate


def test_class_iou_plot_rejects_a_row_of_the_wrong_length(tmp_path):
    with pytest.raises(ValueError, match="row 'cell-1' has 3 values, expected 21"):
        class_iou_figure([("cell-0", [0.1] * 21), ("cell-1", [0.1] * 3)], CLASSES)


def test_class_delta_rows_subtract_each_rows_none_per_class():
    def run(path: str, ious: list) -> dict:
        return {"path": path, "best": {"class_iou": ious}}

    by_path = {"n0": run("n0", [0.5, 0.2, None]), "n1": run("n1", [0.7, 0.4, None]),
               "a0": run("a0", [0.9, 0.1, 0.3]), "a1": run("a1", [0.5, None, 0.5]), "b0": run("b0", [0.1, 0.1, 0.1])}

    def row(label: str, paths: list[str], baseline: str | None) -> dict:
        return {"label": label, "runs": [{"path": p, "seed": i} for i, p in enumerate(paths)],
                "seeds": list(range(len(paths))), "vs_none": None if baseline is None else {"baseline": baseline}}

    rows = [row("none", ["n0", "n1"], None), row("all-uout", ["a0", "a1"], "none"), row("spp-uout", ["b0"], None)]
    [(label, deltas)] = class_delta_rows(rows, by_path)  # spp-uout has no `none` to compare with
    # Class 0: mean(0.9, 0.5) − mean(0.5, 0.7); class 1: 0.1 (a1 has none) − 0.3; class 2: none has no IoU.
    assert label == "all-uout" and deltas[:2] == pytest.approx([0.1, -0.2]) and deltas[2] is None


def test_class_delta_plot_centres_its_colours_on_zero_and_names_the_schedule(tmp_path):
    rows = [("all-uout", [0.1 * (c % 5 - 2) for c in range(len(CLASSES))]), ("spp-uout", [0.02] * len(CLASSES))]
    rows[1][1][3] = None
    fig = class_delta_figure(rows, CLASSES, schedule="linear")
    a = png(save_figure(fig, tmp_path / "delta.png"), inches(fig))
    ax = fig.axes[0]
    assert ax.get_title() == "class IoU minus none's, schedule: linear"
    assert ax.images[0].get_clim() == pytest.approx((-0.2, 0.2))  # symmetric: white is "same as none"
    assert ax.texts[0].get_text() == "-0.20" and len(ax.texts) == 2 * len(CLASSES) - 1
    assert (a == 211).all(axis=-1).any()  # the None cell in lightgrey
    with pytest.raises(ValueError, match="row 'x' has 2 values, expected 21"):
        class_delta_figure([("x", [0.0, 0.1])], CLASSES, "linear")


# ---- (e) ours vs the paper --------------------------------------------------------------------------

def reference_points() -> list[dict]:
    return [{"label": "none", "cell": "none", "schedule": "constant", "ours": 0.45, "ci": None, "paper": 0.49},
            {"label": "all-chandrop", "cell": "all-chandrop", "schedule": "linear", "ours": 0.6, "ci": 0.05,
             "paper": 0.59},
            {"label": "spp-uout", "cell": "spp-uout", "schedule": "constant", "ours": 0.5, "ci": 0.02,
             "paper": 0.50},
            {"label": "pretrained-base", "cell": "pretrained-base", "schedule": "linear", "ours": 0.8, "ci": None,
             "paper": 0.81}]


def test_reference_plot_marks_schedules_colours_families_and_draws_y_equals_x(tmp_path):
    points = reference_points()
    fig = reference_figure(points)
    a = png(save_figure(fig, tmp_path / "a.png"), inches(fig))
    ax = fig.axes[0]
    lines = [line for line in ax.lines if line.get_marker() != "_" and len(line.get_xdata()) == 1]  # not caps
    assert [line.get_marker() for line in lines] == ["o", "s", "o", "s"]  # constant circle, linear square
    colours = [to_rgba(line.get_color()) for line in lines]
    assert np.allclose(colours[0], (0, 0, 0, 1))  # none black, a cell its family's shade
    for colour, cell in zip(colours[1:3], ("all-chandrop", "spp-uout"), strict=True):
        colormap, position = cell_shade(cell)
        assert np.allclose(colour, plt.get_cmap(colormap)(position))
    assert [(line.get_xdata()[0], line.get_ydata()[0]) for line in lines] == [(p["paper"], p["ours"]) for p in points]
    diagonal = [line for line in ax.lines if len(line.get_xdata()) == 2]
    assert len(diagonal) == 1 and np.allclose(diagonal[0].get_xdata(), diagonal[0].get_ydata())
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "schedule: constant", "schedule: linear", "chandrop", "uout", "none", "pretrained-base", "y = x",
        "bar: 95% CI over seeds"]
    points[2] = {**points[2], "ours": 0.55}
    b = png(save_figure(reference_figure(points), tmp_path / "b.png"))
    assert a.shape == b.shape and not np.array_equal(a, b)
    with pytest.raises(ValueError, match="no points"):
        reference_figure([])


# ---- (5) image sheets --------------------------------------------------------------------------------

def save_label(path: Path, labels: np.ndarray) -> None:
    """Write a label map as a palette PNG with the VOC palette, as the trainer does."""
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(VOC_PALETTE)
    im.save(path)


def truth_map(seed: int) -> np.ndarray:
    """A 48×48 label map: background, a person box with a void edge."""
    truth = np.zeros((48, 48), np.uint8)
    truth[10:30, 8 + seed:28 + seed] = 15  # person
    truth[10:30, 8 + seed] = 255  # void border
    return truth


def pred_map(truth: np.ndarray, epoch: int) -> np.ndarray:
    """A prediction that differs from the truth differently at each epoch (and adds a cow)."""
    pred = np.where(truth == 255, 0, truth).astype(np.uint8)
    pred[:epoch * 4, :] = 0  # later epochs wrong differently
    pred[40:, :6 * epoch] = 10  # cow
    return pred


def make_run(root: Path, name: str, epochs: list[int], best: int) -> Path:
    """A run directory with predictions/ (two fixed images, a best and a worst) and results.json."""
    run = root / name
    pred_dir = run / "predictions"
    rng = np.random.default_rng(len(name))
    ids = ["2007_000033", "2007_000042", "2007_000061", "2007_000099"]
    for n, image_id in enumerate(ids):
        folder = pred_dir / image_id
        folder.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / "image.png")
        truth = truth_map(n)
        save_label(folder / "truth.png", truth)
        for e in (epochs if n < 2 else [best]):  # fixed images every epoch, best/worst at best epochs
            save_label(folder / f"epoch_{e:03d}.png", pred_map(truth, e))
    index = {"fixed": ids[:2], "best_epoch": best, "best": {"id": ids[2], "miou": 0.91},
             "worst": {"id": ids[3], "miou": 0.12}}
    (pred_dir / "index.json").write_text(json.dumps(index))
    history = [{"epoch": e, "miou": 0.1 * e} for e in epochs]
    (run / "results.json").write_text(json.dumps({"history": history, "best_epoch": best}))
    return run


def brute_miou(pred: np.ndarray, truth: np.ndarray) -> float:
    """mIoU over the classes in truth or prediction, void pixels left out, counted pixel by pixel."""
    valid = truth != 255
    ious = []
    for c in set(truth[valid].tolist()) | set(pred[valid].tolist()):
        inter = np.sum(valid & (pred == c) & (truth == c))
        union = np.sum(valid & ((pred == c) | (truth == c)))
        ious.append(inter / union)
    return float(np.mean(ious))


@pytest.mark.parametrize(("saved", "best", "expected"), [
    ([1, 2, 3, 4, 5], 4, [1, 2, 4]),  # midpoint 2.5: tie, the earlier epoch
    ([1, 3, 5, 8], 8, [1, 5, 8]),     # midpoint 4.5 → 5
    ([1, 2, 3], 1, [1]),              # all three coincide
    ([1, 2], 2, [1, 2]),
    ([2, 4, 6], 5, [2, 4]),           # best not saved: nearest saved epoch, earlier on a tie
    ([], 3, []),
])
def test_panel_epochs_first_middle_best(saved, best, expected):
    assert panel_epochs(saved, best) == expected


def test_image_sheet_panels_titles_and_legend(tmp_path):
    runs = [("all-chandrop", make_run(tmp_path, "a", [1, 2, 3, 4, 5], 4)),
            ("none", make_run(tmp_path, "b", [1, 2, 3], 3))]
    fig = sheet_figure(runs, CLASSES)
    png(save_figure(fig, tmp_path / "sheet.png", dpi=SHEET_DPI), inches(fig, SHEET_DPI))
    titles = [ax.get_title() for ax in fig.axes]
    truth = truth_map(0)
    for e in (1, 2, 4):  # run a: first, middle, best
        assert f"epoch {e} · mIoU {brute_miou(pred_map(truth, e), truth):.2f}" in titles
    assert "epoch 3 · mIoU" not in " ".join(titles[:6])
    assert titles.count("2007_000033") == 2 and titles.count("ground truth") == 2 * (2 + 2)
    assert "best: 2007_000061" in titles and "epoch 4 · mIoU 0.91" in titles and "epoch 3 · mIoU 0.12" in titles
    assert fig.axes[0].get_ylabel() == "all-chandrop\nbest epoch 4 · mIoU 0.40"
    assert len(fig.axes) == 6 * (3 + 3)  # per run: 2 fixed rows + 1 best/worst row, 6 columns
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["background", "cow", "person", "void"]


def test_image_sheet_changes_with_a_prediction_and_skips_runs_without_predictions(tmp_path, capsys):
    run = make_run(tmp_path, "a", [1, 2, 3], 3)
    bare = tmp_path / "bare"
    bare.mkdir()
    runs = [("all-uout", run), ("bare-run", bare)]
    a = png(save_figure(sheet_figure(runs, CLASSES), tmp_path / "a.png", dpi=SHEET_DPI))
    assert "bare-run" in capsys.readouterr().err
    save_label(run / "predictions" / "2007_000033" / "epoch_002.png", np.full((48, 48), 15, np.uint8))
    b = png(save_figure(sheet_figure(runs, CLASSES), tmp_path / "b.png", dpi=SHEET_DPI))
    assert a.shape == b.shape and not np.array_equal(a, b)
    capsys.readouterr()
    with pytest.raises(ValueError, match="none of 2 run"):
        sheet_figure([("bare-run", bare), ("gone", tmp_path / "gone")], CLASSES)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "gone" in err[1]


def test_image_sheet_names_a_broken_file(tmp_path):
    run = make_run(tmp_path, "a", [1, 2], 2)
    (run / "predictions" / "2007_000042" / "truth.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"2007_000042.truth\.png"):
        sheet_figure([("x", run)], CLASSES)
    save_label(run / "predictions" / "2007_000042" / "truth.png", truth_map(1))
    save_label(run / "predictions" / "2007_000042" / "epoch_001.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"2007_000042.epoch_001\.png: pred shape"):
        sheet_figure([("x", run)], CLASSES)


def test_delta_plot_names_a_row_with_missing_keys(tmp_path):
    rows = delta_rows()
    del rows[2]["schedule"]
    with pytest.raises(ValueError, match=r"row 2 \(spp-uout\) lacks schedule"):
        delta_figure(rows)
