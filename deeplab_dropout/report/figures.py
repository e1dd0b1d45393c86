"""The report's figures: ΔmIoU vs none, the monitored metric's validation curves (one figure per schedule, each
run's best epoch starred), per-image mIoU boxes, the class IoU heat map and its Δ vs none per schedule, our Mean
mIoU against the paper's (when the report shows the paper's tables) and the image sheets of saved predictions.

Each ``*_figure`` function draws one Figure from plain data; ``draw_figures`` shapes that data from the report's
table rows and the runs' files, and saves each figure that has data as a PNG and a vector PDF.
"""
from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from deeplab_dropout.data.voc import IGNORE_INDEX, VOC_CLASSES, VOC_PALETTE  # noqa: E402
from deeplab_dropout.metrics import SegmentationMetrics, miou_from_counts  # noqa: E402
from deeplab_dropout.report.tables import Records  # noqa: E402
from deeplab_dropout.results import PREDICTIONS  # noqa: E402
from deeplab_dropout.rundir import RunResults  # noqa: E402
from deeplab_dropout.study import (  # noqa: E402
    BASELINE,
    BASELINE_COLOUR,
    CELLS,
    FAMILIES,
    FAMILY_COLORMAPS,
    SCHEDULES,
    cell_of,
    cell_shade,
    family,
    family_rank,
)

DPI = 100
SHEET_DPI = 80
MAX_SHEET_ROWS = 30
# The plots (each also as .pdf); {schedule}: one figure per schedule.
FILES = {"delta": "delta_vs_none.png", "curves": "curves_{schedule}.png", "per_image": "per_image.png",
         "class_iou": "class_iou.png", "class_delta": "class_iou_delta_{schedule}.png",
         "reference": "reference_vs_paper.png"}
DEFAULT_MONITOR = "miou"  # the monitor of a run whose config names none (older results)
BEST_MARKER = "*"
MEAN_STYLE = {"marker": "^", "markerfacecolor": "white", "markeredgecolor": "black"}  # per_image.png's mean
SCHEDULE_MARKERS = ("o", "s", "^", "D", "v")  # by schedule, in _schedules order (constant, linear, others)
OTHER_COLOUR = (0.5, 0.5, 0.5, 1.0)  # rows that are not a Table 2 cell (pretrained-base)
_EPOCH_PNG = re.compile(r"epoch_(\d+)\.png")


def save_figure(fig: plt.Figure, out: Path, dpi: int = DPI, pdf: bool = True) -> Path:
    """Write the figure as ``out`` (a PNG, parent folders made) and, with ``pdf``, as a vector PDF beside it
    (same name, .pdf), then free it: matplotlib keeps open figures alive otherwise. Returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, dpi=dpi)
        if pdf:
            fig.savefig(out.with_suffix(".pdf"), dpi=dpi)  # dpi: the raster images inside (image sheets)
    finally:
        plt.close(fig)
    return out


def _finite(values: Iterable[float | None]) -> list[float]:
    """The values that are numbers (None and NaN dropped: images with only void pixels have no mIoU)."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _schedules(names: Iterable[str]) -> list[str]:
    """Unique schedule names, constant then linear then the rest in first-seen order."""
    seen = list(dict.fromkeys(names))
    known = [s for s in SCHEDULES if s in seen]
    return known + [s for s in seen if s not in known]


def cell_colour(label: str, fallback_index: int = 0) -> tuple:
    """Colour of a run label: a shade of its dropout family when it starts with a Table-2 cell name."""
    cell = cell_of(label)
    if cell == BASELINE:
        return BASELINE_COLOUR
    if cell is None:
        return plt.get_cmap("tab10")(fallback_index % 10)
    colormap, position = cell_shade(cell)
    return plt.get_cmap(colormap)(position)


def counted(row: dict, by_path: dict[str, dict]) -> list[dict]:
    """The row's runs that count in its columns (completed, with a best epoch), as loaded."""
    return [by_path[r["path"]] for r in row["runs"] if r["seed"] in row["seeds"]]


def class_names_for(n: int) -> list[str]:
    """VOC's class names for 21 classes, else the class indices."""
    return list(VOC_CLASSES) if n == len(VOC_CLASSES) else [str(c) for c in range(n)]


# ---- (a) ΔmIoU vs none -------------------------------------------------------------------------------

def delta_rows(table: dict[str, list[dict]]) -> list[dict]:
    """``delta_figure``'s rows: every regularised row of every schedule."""
    out = []
    for schedule, rows in table.items():
        for row in rows:
            vs = row["vs_none"]
            if vs is not None:
                out.append({"label": row["label"], "type": family(row["cell"]), "schedule": schedule,
                            "delta": vs["delta"], "ci": vs.get("ci"), "excludes_zero": bool(vs.get("excludes_zero"))})
    return out


def _delta_cells(rows: list[dict]) -> list[tuple[str, str]]:
    """(label, type) on the x axis: grouped by dropout type in the paper's order, given order within."""
    kind: dict[str, str] = {}
    for r in rows:
        kind.setdefault(r["label"], r["type"])  # one x position per label, typed by its first row
    return sorted(kind.items(), key=lambda c: family_rank(c[1]))  # stable: given order kept per type


def _draw_delta_marker(ax: plt.Axes, x: float, row: dict, colour) -> None:
    """One schedule's ΔmIoU of one cell with its CI; filled when the CI excludes zero."""
    delta, ci = row["delta"], row.get("ci")
    if ci is not None and None not in ci:  # drawn as a capped segment: a CI need not contain its estimate
        ax.plot([x, x], list(ci), color=colour, lw=1.2, marker="_", ms=7)
    face = colour if row.get("excludes_zero") else "white"
    ax.scatter([x], [delta], s=40, facecolors=[face], edgecolors=[colour], zorder=3)


def delta_figure(rows: list[dict]) -> plt.Figure:
    """ΔmIoU vs the ``none`` cell with 95% CIs: cells grouped by type, one marker per schedule per cell."""
    if not rows:
        raise ValueError("delta_figure: no rows to draw")
    for i, r in enumerate(rows):
        missing = [k for k in ("label", "type", "schedule", "delta") if k not in r]
        if missing:
            raise ValueError(f"delta_figure: row {i} ({r.get('label', '?')}) lacks {', '.join(missing)}")
    cells = _delta_cells(rows)
    schedules = _schedules(r["schedule"] for r in rows)
    colours = {s: plt.get_cmap("tab10")(i) for i, s in enumerate(schedules)}
    width = 0.6 / len(schedules)
    x_of = {label: i for i, (label, _) in enumerate(cells)}
    fig, ax = plt.subplots(figsize=(max(8.0, 0.55 * len(cells) + 2.0), 4.5), layout="constrained")
    for r in rows:
        if r.get("delta") is None:
            continue  # no baseline for this schedule: the label stays on the axis, the marker goes
        j = schedules.index(r["schedule"])
        _draw_delta_marker(ax, x_of[r["label"]] + (j - (len(schedules) - 1) / 2) * width, r, colours[r["schedule"]])
    ax.axhline(0.0, color="grey", lw=0.8)
    for i in range(1, len(cells)):  # a faint rule between dropout types
        if cells[i][1] != cells[i - 1][1]:
            ax.axvline(i - 0.5, color="lightgrey", lw=0.8, ls="--")
    ax.set_xticks(range(len(cells)), [c[0] for c in cells], rotation=45, ha="right")
    ax.set_xlim(-0.7, len(cells) - 0.3)
    ax.set_ylabel("ΔmIoU vs none")
    ax.set_title("ΔmIoU vs none (95% paired bootstrap CI)")
    handles = [Line2D([], [], marker="o", ls="", color=colours[s], label=s) for s in schedules]
    handles += [Line2D([], [], marker="o", ls="", mfc="grey", mec="grey", label="filled: CI excludes 0"),
                Line2D([], [], marker="o", ls="", mfc="white", mec="grey", label="open: CI includes 0"),
                Line2D([], [], color="grey", ls="", marker="|", ms=12, mew=1.2, label="bar: 95% CI")]
    ax.legend(handles=handles, loc="best", fontsize="small")
    return fig


# ---- (b) validation curves of the monitored metric ---------------------------------------------------

def monitor_of(run: dict) -> str:
    """The metric a run picked its best epoch by (its config's ``trainer.monitor``)."""
    return (run["config"].get("trainer") or {}).get("monitor") or DEFAULT_MONITOR


def monitor_curve(run: dict) -> dict:
    """One run's curve: ``points`` [(epoch, monitored value or None)] of its evaluated epochs, its
    ``best_epoch`` and the ``monitor``."""
    monitor, points = monitor_of(run), []
    for entry in run.get("history", []):
        if "miou" not in entry:  # an epoch without validation
            continue
        try:
            value = RunResults.monitor_value(entry, monitor)
        except (KeyError, TypeError):
            value = None
        points.append((entry["epoch"], value))
    return {"points": points, "best_epoch": run.get("best_epoch"), "monitor": monitor}


def val_curves(table: dict[str, list[dict]], by_path: dict[str, dict]) -> dict[str, dict[str, list[dict]]]:
    """{schedule: {label: [``monitor_curve`` of each counted run]}}."""
    return {schedule: {row["label"]: [monitor_curve(run) for run in counted(row, by_path)] for row in rows}
            for schedule, rows in table.items()}


def _points(curve: dict) -> list[tuple[int, float]]:
    """A curve's points that have a finite value."""
    return [(int(e), float(v)) for e, v in curve["points"] if v is not None and math.isfinite(v)]


def _mean_curve(curves: list[dict]) -> tuple[list[int], list[float]]:
    """Epoch-wise mean over the seeds that reached each epoch (NaN/None points left out)."""
    by_epoch: dict[int, list[float]] = {}
    for curve in curves:
        for epoch, value in _points(curve):
            by_epoch.setdefault(epoch, []).append(value)
    epochs = sorted(by_epoch)
    return epochs, [float(np.mean(by_epoch[e])) for e in epochs]


def _draw_curves(ax: plt.Axes, label: str, curves: list[dict], colour) -> Line2D | None:
    """Thin line per seed when there are several, a thick mean line, and each seed's best epoch as a star on
    its line; returns the legend handle."""
    for curve in curves:
        points = _points(curve)
        if len(curves) > 1 and points:
            ax.plot(*zip(*points, strict=True), color=colour, lw=0.7, alpha=0.45)
        best = dict(points).get(curve["best_epoch"])
        if best is not None:
            ax.plot([curve["best_epoch"]], [best], ls="", marker=BEST_MARKER, ms=11, color=colour, mec="black",
                    mew=0.6, zorder=4)
    epochs, mean = _mean_curve(curves)
    if not epochs:
        return None
    (line,) = ax.plot(epochs, mean, color=colour, lw=2.0, label=label, marker="." if len(epochs) < 3 else None)
    return line


def curves_figure(curves: dict[str, list[dict]], schedule: str) -> plt.Figure:
    """The monitored metric per epoch of one schedule's rows (``val_curves``' {label: curves}), one colour per
    cell (shades of its family), each run's best epoch starred; the y axis names the metric."""
    if not curves:
        raise ValueError("curves_figure: no curves to draw")
    monitors = list(dict.fromkeys(c["monitor"] for seeds in curves.values() for c in seeds)) or [DEFAULT_MONITOR]
    fig, ax = plt.subplots(figsize=(9.5, 5.0), layout="constrained")
    handles: dict[str, Line2D] = {}
    for i, (label, seeds) in enumerate(curves.items()):
        line = _draw_curves(ax, label, seeds, cell_colour(label, i))
        if line is not None:
            handles.setdefault(label, line)
    ax.set_title(f"validation {', '.join(monitors)} per epoch, schedule: {schedule}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{' / '.join(monitors)} (trainer.monitor)")
    ax.grid(alpha=0.3)
    marks = [Line2D([], [], ls="", marker=BEST_MARKER, ms=11, color="grey", mec="black", mew=0.6,
                    label=f"best epoch (max {' / '.join(monitors)})")]
    if any(len(seeds) > 1 for seeds in curves.values()):
        marks.append(Line2D([], [], color="grey", lw=0.7, label="thin: one seed; thick: their mean"))
    fig.legend([*handles.values(), *marks], [*handles, *(m.get_label() for m in marks)],
               loc="outside right upper", fontsize="small")
    return fig


# ---- (c) per-image mIoU distributions ----------------------------------------------------------------

def per_image_dists(table: dict[str, list[dict]], by_path: dict[str, dict], records: Records) -> dict:
    """{schedule: {label: per-image mIoUs of the row's runs at their best epochs, from per_image.npz}}."""
    out: dict[str, dict[str, list[float]]] = {}
    for schedule, rows in table.items():
        out[schedule] = {}
        for row in rows:
            values: list[float] = []
            for run in counted(row, by_path):
                record = records.get(run["dir"])
                if not isinstance(record, str):
                    counts = torch.from_numpy(record.counts).long()
                    values += [v for v in miou_from_counts(counts[..., 0], counts[..., 1]).tolist()
                               if not math.isnan(v)]
            out[schedule][row["label"]] = values
    return out


def _draw_boxes(ax: plt.Axes, dists: dict[str, list[float]]) -> None:
    """Box per cell, whiskers at min and max (the paper's Worst/Median/Best), mean as a triangle."""
    labels = list(dists)
    data = [_finite(dists[lab]) for lab in labels]
    boxes = ax.boxplot([d if d else [math.nan] for d in data], whis=(0, 100), showmeans=True,
                       patch_artist=True, widths=0.6, medianprops={"color": "black"}, meanprops=MEAN_STYLE)
    for i, (patch, label) in enumerate(zip(boxes["boxes"], labels, strict=True)):
        patch.set_facecolor(cell_colour(label, i))
        patch.set_alpha(0.6)
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=45, ha="right")


def per_image_figure(dists: dict[str, dict[str, list[float]]]) -> plt.Figure:
    """Per-image mIoU distribution of every cell as box plots, one subplot per schedule."""
    if not dists:
        raise ValueError("per_image_figure: no distributions to draw")
    schedules = _schedules(dists)
    n_cells = max(len(dists[s]) for s in schedules)
    fig, axes = plt.subplots(1, len(schedules), figsize=(max(4.0, 0.5 * n_cells + 1.5) * len(schedules), 4.5),
                             sharey=True, squeeze=False, layout="constrained")
    for ax, schedule in zip(axes[0], schedules, strict=True):
        if dists[schedule]:
            _draw_boxes(ax, dists[schedule])
        ax.set_title(f"schedule: {schedule}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("per-image mIoU")
    legend = [Line2D([], [], ls="", **MEAN_STYLE, label="mean"), Line2D([], [], color="black", label="median"),
              Patch(facecolor="lightgrey", edgecolor="black", label="box: quartiles; whiskers: worst, best")]
    fig.legend(handles=legend, loc="outside right upper", fontsize="small")
    return fig


# ---- (d) class IoU heat map --------------------------------------------------------------------------

def mean_class_iou(runs: list[dict]) -> list[float | None]:
    """Each class's IoU at the runs' best epochs, averaged over the runs that have it (None where none does)."""
    ious = [run["best"].get("class_iou") or [] for run in runs]
    k = max((len(i) for i in ious), default=0)
    values = [[i[c] for i in ious if c < len(i) and i[c] is not None] for c in range(k)]
    return [sum(v) / len(v) if v else None for v in values]


def class_rows(table: dict[str, list[dict]], by_path: dict[str, dict]) -> list[tuple[str, list[float | None]]]:
    """(label, mean class IoU over the row's runs at their best epochs; None where no run has it) per experiment
    with counted runs, each once; [] when no run recorded class IoU (hand-made or old results)."""
    rows: dict[str, list[float | None]] = {}
    several = len(table) > 1
    for schedule, table_rows in table.items():
        for row in table_rows:
            label = row["label"] + (f" [{schedule}]" if several and not row["every_schedule"] else "")
            runs = counted(row, by_path)
            if runs:
                rows.setdefault(label, mean_class_iou(runs))
    k = max((len(v) for v in rows.values()), default=0)
    return [(label, values + [None] * (k - len(values))) for label, values in rows.items()] if k else []


def class_delta_rows(rows: list[dict], by_path: dict[str, dict]) -> list[tuple[str, list[float | None]]]:
    """(label, each class's IoU minus its `none` row's) for one schedule's regularised rows that have a `none`
    to compare with (``vs_none["baseline"]``); None where either has no IoU for the class."""
    by_label = {row["label"]: row for row in rows}
    out = []
    for row in rows:
        base = by_label.get((row["vs_none"] or {}).get("baseline"))
        mine = mean_class_iou(counted(row, by_path))
        theirs = [] if base is None else mean_class_iou(counted(base, by_path))
        if base is None or not mine or not theirs:
            continue
        k = max(len(mine), len(theirs))
        mine, theirs = mine + [None] * (k - len(mine)), theirs + [None] * (k - len(theirs))
        out.append((row["label"], [None if a is None or b is None else a - b
                                   for a, b in zip(mine, theirs, strict=True)]))
    return out


def _heat_map(rows: list[tuple[str, list[float | None]]], class_names: list[str], name: str, cmap: str,
              limits: tuple[float, float], fmt: str, dark: Callable[[float], bool], colorbar: str,
              title: str | None = None) -> plt.Figure:
    """Cells × classes heat map of ``rows``, None drawn grey, each value written (``fmt``, white where ``dark``)
    while they fit; ``name`` (the caller) in the error for a row of the wrong length."""
    if not rows:
        raise ValueError(f"{name}: no rows to draw")
    k = len(class_names)
    for label, values in rows:
        if len(values) != k:
            raise ValueError(f"{name}: row {label!r} has {len(values)} values, expected {k} classes")
    grid = np.array([[math.nan if v is None else float(v) for v in values] for _, values in rows])
    fig, ax = plt.subplots(figsize=(0.5 * k + 3.0, 0.32 * len(rows) + (2.6 if title else 2.2)), layout="constrained")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=plt.get_cmap(cmap).with_extremes(bad="lightgrey"),
                      vmin=limits[0], vmax=limits[1], aspect="auto")
    if len(rows) <= 25:  # beyond that the numbers no longer fit their cells
        for (i, j), v in np.ndenumerate(grid):
            if math.isfinite(v):
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=6,
                        color="white" if dark(v) else "black")
    ax.set_xticks(range(k), class_names, rotation=60, ha="right")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, label=colorbar)
    return fig


def class_iou_figure(rows: list[tuple[str, list[float | None]]], class_names: list[str]) -> plt.Figure:
    """Heat map of per-class IoU, cells × classes, colour bar 0..1, None drawn grey."""
    return _heat_map(rows, class_names, "class_iou_figure", "viridis", (0.0, 1.0), ".2f", lambda v: v < 0.5, "IoU")


def class_delta_figure(rows: list[tuple[str, list[float | None]]], class_names: list[str],
                       schedule: str) -> plt.Figure:
    """Heat map of each cell's class IoU minus its `none`'s, cells × classes, diverging colours centred on 0
    (blue: the cell is better), None drawn grey; the schedule in the title."""
    limit = max([abs(v) for _, values in rows for v in values if v is not None and math.isfinite(v)] + [0.01])
    return _heat_map(rows, class_names, "class_delta_figure", "RdBu", (-limit, limit), "+.2f",
                     lambda v: abs(v) > 0.6 * limit, "IoU − none's IoU", f"class IoU minus none's, schedule: {schedule}")


# ---- (e) ours vs the paper -------------------------------------------------------------------------

def reference_points(table: dict[str, list[dict]]) -> list[dict]:
    """``reference_figure``'s points: every row with the paper's value and a Mean mIoU of ours, each row once
    per schedule: {label, cell, schedule, ours, ci, paper}."""
    return [{"label": row["label"], "cell": row["cell"], "schedule": schedule, "ours": row["columns"]["mean"][0],
             "ci": row["columns"]["mean"][1], "paper": row["paper"]["values"]["mean"]}
            for schedule, rows in table.items() for row in rows
            if "paper" in row and row["columns"]["mean"][0] is not None]


def _row_colour(cell: str) -> tuple:
    """`none` black, a Table 2 cell a shade of its family, anything else (pretrained-base) grey."""
    if cell == BASELINE:
        return BASELINE_COLOUR
    if cell not in CELLS:
        return OTHER_COLOUR
    colormap, position = cell_shade(cell)
    return plt.get_cmap(colormap)(position)


def reference_figure(points: list[dict]) -> plt.Figure:
    """Our Mean mIoU (95% CI over seeds as error bars) against the paper's, one marker per cell and schedule
    (colour: the cell's family, shape: the schedule), with the line y = x."""
    if not points:
        raise ValueError("reference_figure: no points to draw")
    schedules = _schedules(p["schedule"] for p in points)
    markers = {s: SCHEDULE_MARKERS[i % len(SCHEDULE_MARKERS)] for i, s in enumerate(schedules)}
    fig, ax = plt.subplots(figsize=(7.5, 6.0), layout="constrained")
    for p in points:
        colour = _row_colour(p["cell"])
        ax.errorbar([p["paper"]], [p["ours"]], yerr=None if p["ci"] is None else [[p["ci"]], [p["ci"]]],
                    fmt=markers[p["schedule"]], color=colour, mec="black", mew=0.5, ms=7, capsize=3, zorder=3)
        ax.annotate(p["label"], (p["paper"], p["ours"]), xytext=(4, 3), textcoords="offset points", fontsize=6)
    ends = [v for p in points for v in (p["paper"], p["ours"] - (p["ci"] or 0), p["ours"] + (p["ci"] or 0))]
    lo, hi = min(ends) - 0.02, max(ends) + 0.02
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--", label="y = x", zorder=1)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("paper's Mean mIoU (Tables 3 and 4)")
    ax.set_ylabel("our Mean mIoU (95% CI over seeds)")
    ax.set_title("Mean mIoU: ours vs the paper's")
    ax.grid(alpha=0.3)
    kinds = list(dict.fromkeys(family(p["cell"]) for p in points))
    handles = [Line2D([], [], marker=markers[s], ls="", color="grey", label=f"schedule: {s}") for s in schedules]
    handles += [Patch(color=plt.get_cmap(FAMILY_COLORMAPS[k])(0.7) if k in FAMILY_COLORMAPS else _row_colour(k),
                      label=k) for k in sorted(kinds, key=family_rank)]
    handles.append(Line2D([], [], color="grey", ls="--", label="y = x"))
    if any(p["ci"] is not None for p in points):
        handles.append(Line2D([], [], color="grey", ls="", marker="|", ms=12, mew=1.2, label="bar: 95% CI over seeds"))
    ax.legend(handles=handles, loc="best", fontsize="small")
    return fig


# ---- (f) image sheets --------------------------------------------------------------------------------

def sheet_runs(table: dict[str, list[dict]], schedule: str, kind: str, by_path: dict[str, dict]) -> list:
    """(label, run dir) for a sheet: `none` and each ``kind`` row under ``schedule``, its lowest seed's run."""
    chosen = []
    for row in table[schedule]:
        runs = counted(row, by_path)
        if runs and (row["cell"] == BASELINE or family(row["cell"]) == kind):
            run = min(runs, key=lambda r: r["config"]["seed"])
            chosen.append((f"{row['label']} (seed {run['config']['seed']})", Path(run["dir"])))
    return chosen


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``, or a one-line ValueError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _load_png(path: Path, label_map: bool) -> np.ndarray:
    """An RGB (H, W, 3) array, or an (H, W) label map from a palette/greyscale PNG; one-line error if bad."""
    try:
        with Image.open(path) as im:
            if label_map and im.mode not in ("P", "L"):
                raise ValueError(f"{path}: label map must be a palette PNG, got mode {im.mode}")
            return np.array(im if label_map else im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"cannot read {path}: {type(e).__name__}") from None


def _colourise(labels: np.ndarray) -> np.ndarray:
    """Label map → RGB with the VOC palette (void 255 keeps its cream colour)."""
    return np.asarray(VOC_PALETTE, dtype=np.uint8).reshape(256, 3)[labels]


def _saved_epochs(folder: Path) -> list[int]:
    """Epochs with a saved prediction in one image folder, ascending."""
    found = (_EPOCH_PNG.fullmatch(p.name) for p in folder.glob("epoch_*.png"))
    return sorted(int(m.group(1)) for m in found if m)


def panel_epochs(saved: list[int], best: int) -> list[int]:
    """First, middle and best epoch among ``saved`` (middle = nearest the midpoint), duplicates dropped."""
    if not saved:
        return []
    first = saved[0]
    best = best if best in saved else min(saved, key=lambda e: (abs(e - best), e))
    middle = min(saved, key=lambda e: (abs(e - (first + best) / 2), e))
    return list(dict.fromkeys([first, middle, best]))


def _image_miou(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> float:
    """Per-image mIoU of a prediction, with the training code's metric (void pixels ignored)."""
    metrics = SegmentationMetrics(num_classes=num_classes, ignore_index=IGNORE_INDEX)
    metrics.update(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(truth.astype(np.int64)))
    return float(metrics.image_miou[0])


def _fmt(miou: float | None) -> str:
    """mIoU for a title; 'n/a' when it is missing or NaN."""
    return "n/a" if miou is None or not math.isfinite(miou) else f"{miou:.2f}"


def _fixed_row(folder: Path, image_id: str, best: int, num_classes: int) -> list[tuple]:
    """Panels (kind, array, title) of one fixed image: image, truth, prediction at first/middle/best epoch."""
    truth = _load_png(folder / "truth.png", label_map=True)
    panels = [("rgb", _load_png(folder / "image.png", label_map=False), image_id),
              ("label", truth, "ground truth")]
    for epoch in panel_epochs(_saved_epochs(folder), best):
        path = folder / f"epoch_{epoch:03d}.png"
        pred = _load_png(path, label_map=True)
        try:
            miou = _image_miou(pred, truth, num_classes)
        except ValueError as e:  # shape or label mismatch: say which file
            raise ValueError(f"{path}: {e}") from None
        panels.append(("label", pred, f"epoch {epoch} · mIoU {_fmt(miou)}"))
    return panels


def _extreme_panels(pred_dir: Path, which: str, entry: dict, best: int) -> list[tuple]:
    """Image, truth and best-epoch prediction of the run's best or worst image, titled from index.json."""
    folder = pred_dir / str(entry["id"])
    return [("rgb", _load_png(folder / "image.png", label_map=False), f"{which}: {entry['id']}"),
            ("label", _load_png(folder / "truth.png", label_map=True), "ground truth"),
            ("label", _load_png(folder / f"epoch_{best:03d}.png", label_map=True),
             f"epoch {best} · mIoU {_fmt(entry.get('miou'))}")]


def _run_heading(label: str, run_dir: Path, best: int) -> str:
    """Row label: the run's label and, when results.json has it, the dataset mIoU at the best epoch."""
    path = run_dir / "results.json"
    if not path.is_file():
        return label
    entry = next((h for h in _read_json(path).get("history", []) if h.get("epoch") == best), {})
    return f"{label}\nbest epoch {best} · mIoU {_fmt(entry.get('miou'))}"


def _run_rows(label: str, run_dir: Path, num_classes: int) -> list[tuple[str, list[tuple]]] | None:
    """(heading, panels) rows of one run, or None (with a warning on stderr) when it saved no predictions."""
    pred_dir = Path(run_dir) / PREDICTIONS
    index_path = pred_dir / "index.json"
    if not index_path.is_file():
        print(f"warning: image sheet skips {label!r}: no {index_path}", file=sys.stderr)
        return None
    index = _read_json(index_path)
    best = index.get("best_epoch")
    if best is None:  # index written before any best epoch: fall back to the run's record
        best = _read_json(Path(run_dir) / "results.json").get("best_epoch")
    if not isinstance(best, int):
        raise ValueError(f"{index_path}: no integer best_epoch")
    heading = _run_heading(label, Path(run_dir), best)
    rows = [(heading, _fixed_row(pred_dir / str(i), str(i), best, num_classes)) for i in index.get("fixed", [])]
    if index.get("best") and index.get("worst"):
        extremes = _extreme_panels(pred_dir, "best", index["best"], best)
        rows.append((heading, extremes + _extreme_panels(pred_dir, "worst", index["worst"], best)))
    return rows


def _class_legend(rows: list[tuple[str, list[tuple]]], class_names: list[str]) -> list[Patch]:
    """Legend patches for the classes (and void) present in the label maps shown."""
    present = set()
    for _, panels in rows:
        for kind, array, _ in panels:
            if kind == "label":
                present.update(int(v) for v in np.unique(array))
    palette = np.asarray(VOC_PALETTE, dtype=float).reshape(256, 3) / 255
    names = {c: (class_names[c] if c < len(class_names) else str(c)) for c in present}
    names.update({IGNORE_INDEX: "void"} if IGNORE_INDEX in present else {})
    return [Patch(facecolor=palette[c], edgecolor="grey", label=names[c]) for c in sorted(present)]


def _draw_sheet(rows: list[tuple[str, list[tuple]]], class_names: list[str]) -> plt.Figure:
    """Grid of panels, one row per entry, run heading on the left, class legend below."""
    ncols = max(len(panels) for _, panels in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(2.0 * ncols + 0.8, 2.2 * len(rows) + 0.9),
                             squeeze=False, layout="constrained")
    for r, (heading, panels) in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            if c >= len(panels):
                ax.axis("off")
                continue
            kind, array, title = panels[c]
            ax.imshow(_colourise(array) if kind == "label" else array, interpolation="nearest")
            ax.set_title(title, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(heading, fontsize=7)
    legend = _class_legend(rows, class_names)
    fig.legend(handles=legend, loc="outside lower center", ncol=min(len(legend), 8), fontsize="small")
    return fig


def sheet_figure(runs: list[tuple[str, Path]], class_names: list[str]) -> plt.Figure:
    """Paper-style sheet from runs' ``predictions/``: fixed images at first/middle/best epoch, best and worst."""
    rows: list[tuple[str, list[tuple]]] = []
    for label, run_dir in runs:
        run_rows = _run_rows(label, Path(run_dir), len(class_names))
        if run_rows is not None:
            rows.extend(run_rows)
    if not rows:
        raise ValueError(f"sheet_figure: none of {len(runs)} run(s) has predictions/index.json with images")
    if len(rows) > MAX_SHEET_ROWS:  # keep the PNG a size a report can embed
        print(f"warning: image sheet shows the first {MAX_SHEET_ROWS} of {len(rows)} rows", file=sys.stderr)
        rows = rows[:MAX_SHEET_ROWS]
    return _draw_sheet(rows, class_names)


# ---- all of them -------------------------------------------------------------------------------------

def delta_notes(table: dict[str, list[dict]], deltas: list[dict], compared: list[str]) -> list[str]:
    """report.md's notes on the Δ vs none figures left out, so that none is an empty axis: delta_vs_none.png
    when no row has a Δ (``deltas``), class_iou_delta_<schedule>.png for each schedule with regularised rows
    not in ``compared`` (the schedules where a row has a `none` row to compare with)."""
    regularised = [s for s, rows in table.items() if any(row["vs_none"] is not None for row in rows)]
    left = [FILES["class_delta"].format(schedule=s) for s in regularised if s not in compared]
    no_delta = bool(regularised) and not deltas
    if not any(row["cell"] == BASELINE for rows in table.values() for row in rows):
        left = [FILES["delta"]] * no_delta + left
        return [f"Not drawn: {', '.join(left)}: no `none` run in this folder to compare with."] if left else []
    notes = [f"Not drawn: {FILES['delta']}: no ΔmIoU vs none could be computed (the notes under the tables "
             "say why)."] if no_delta else []
    return notes + [f"Not drawn: {name}: no regularised row of that schedule has a `none` of the same "
                    "experiment to compare with." for name in left]


def draw_figures(root: Path, table: dict[str, list[dict]], runs: list[dict], records: Records,
                 sheets: Iterable[str] = FAMILIES[:1]) -> tuple[list[Path], list[str]]:
    """Draw the plots that have data (ours vs the paper only where rows have the paper's values; the Δ vs none
    plots only where a `none` row is there to compare with) and the image sheets of ``sheets`` (dropout families)
    into ``root``, each as PNG and PDF; returns the PNGs written and notes on the Δ figures left out. A sheet none
    of whose runs saved predictions is left out."""
    by_path = {r["path"]: r for r in runs}
    rows = class_rows(table, by_path)
    names = class_names_for(max((len(v) for _, v in rows), default=len(VOC_CLASSES)))
    dists = per_image_dists(table, by_path, records)
    deltas = [r for r in delta_rows(table) if r["delta"] is not None]
    curves = val_curves(table, by_path)
    plans = [(FILES["delta"], delta_rows(table) if deltas else [], delta_figure)]
    plans += [(FILES["curves"].format(schedule=s), curves[s], partial(curves_figure, schedule=s)) for s in table]
    plans += [(FILES["per_image"], dists if any(v for d in dists.values() for v in d.values()) else {},
               per_image_figure),
              (FILES["class_iou"], rows, partial(class_iou_figure, class_names=names))]
    compared = [s for s, rows in table.items() if any((row["vs_none"] or {}).get("baseline") for row in rows)]
    plans += [(FILES["class_delta"].format(schedule=s), class_delta_rows(table[s], by_path),
               partial(class_delta_figure, class_names=names, schedule=s)) for s in compared]
    plans.append((FILES["reference"], reference_points(table), reference_figure))
    drawn = [save_figure(draw(data), root / name) for name, data, draw in plans if data]
    for kind in sheets:
        for schedule in table:
            chosen = sheet_runs(table, schedule, kind, by_path)
            if not any(family(label.split(" ")[0]) == kind for label, _ in chosen) or not any(
                    (run_dir / PREDICTIONS / "index.json").is_file() for _, run_dir in chosen):
                continue  # no run of that family here, or none saved predictions (older runs)
            drawn.append(save_figure(sheet_figure(chosen, names), root / f"sheet_{kind}_{schedule}.png",
                                     dpi=SHEET_DPI))
    return drawn, delta_notes(table, deltas, compared)
