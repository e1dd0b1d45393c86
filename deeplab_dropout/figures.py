"""What the report draws: the runs' data shaped for ``plots`` (ΔmIoU vs none, val mIoU curves, per-image
mIoU distributions, class IoU heat map) and the runs each image sheet shows."""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch

from deeplab_dropout import plots
from deeplab_dropout.compare import Records
from deeplab_dropout.data.voc import VOC_CLASSES
from deeplab_dropout.metrics import miou_from_counts
from deeplab_dropout.results import PREDICTIONS

SHEET_TYPES = ("chandrop", "dropblock", "uout")  # the Table 2 families; a sheet shows one, with `none`
FILES = {"delta": "delta_vs_none.png", "curves": "curves.png", "per_image": "per_image.png",
         "class_iou": "class_iou.png"}


def family(cell: str) -> str:
    """A Table 2 cell's dropout family (``all-uout`` → ``uout``); other names are their own family."""
    suffix = cell.rsplit("-", 1)[-1]
    return suffix if suffix in SHEET_TYPES else cell


def counted(row: dict, by_path: dict[str, dict]) -> list[dict]:
    """The row's runs that count in its columns (completed, with a best epoch), as loaded."""
    return [by_path[r["path"]] for r in row["runs"] if r["seed"] in row["seeds"]]


def delta_rows(table: dict[str, list[dict]]) -> list[dict]:
    """``plots.delta_plot``'s rows: every regularised row of every schedule."""
    out = []
    for schedule, rows in table.items():
        for row in rows:
            vs = row["vs_none"]
            if vs is not None:
                out.append({"label": row["label"], "type": family(row["cell"]), "schedule": schedule,
                            "delta": vs["delta"], "ci": vs.get("ci"), "excludes_zero": bool(vs.get("excludes_zero"))})
    return out


def curves(table: dict[str, list[dict]], by_path: dict[str, dict]) -> dict:
    """{schedule: {label: [[(epoch, val mIoU), ...] per seed]}} from the runs' histories."""
    return {schedule: {row["label"]: [[(e["epoch"], e["miou"]) for e in run["history"]
                                       if e.get("miou") is not None] for run in counted(row, by_path)]
                       for row in rows} for schedule, rows in table.items()}


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


def class_rows(table: dict[str, list[dict]], by_path: dict[str, dict]) -> list[tuple[str, list[float | None]]]:
    """(label, mean class IoU over the row's runs at their best epochs; None where no run has it) per experiment
    with counted runs, each once."""
    ious: dict[str, list[list]] = {}
    several = len(table) > 1
    for schedule, rows in table.items():
        for row in rows:
            label = row["label"] + (f" [{schedule}]" if several and not row["every_schedule"] else "")
            runs = counted(row, by_path)
            if runs:
                ious.setdefault(label, [run["best"].get("class_iou") or [] for run in runs])
    k = max((len(i) for runs in ious.values() for i in runs), default=0)
    if k == 0:  # results.json without class_iou (hand-made or old runs): nothing to draw
        return []
    out = []
    for label, runs in ious.items():
        values = [[i[c] for i in runs if c < len(i) and i[c] is not None] for c in range(k)]
        out.append((label, [sum(v) / len(v) if v else None for v in values]))
    return out


def sheet_runs(table: dict[str, list[dict]], schedule: str, kind: str, by_path: dict[str, dict]) -> list:
    """(label, run dir) for a sheet: `none` and each ``kind`` row under ``schedule``, its lowest seed's run."""
    chosen = []
    for row in table[schedule]:
        runs = counted(row, by_path)
        if runs and (row["cell"] == "none" or family(row["cell"]) == kind):
            run = min(runs, key=lambda r: r["config"]["seed"])
            chosen.append((f"{row['label']} (seed {run['config']['seed']})", Path(run["dir"])))
    return chosen


def class_names(n: int) -> list[str]:
    """VOC's class names for 21 classes, else the class indices."""
    return list(VOC_CLASSES) if n == len(VOC_CLASSES) else [str(c) for c in range(n)]


def draw_figures(root: Path, table: dict[str, list[dict]], runs: list[dict], records: Records,
                 sheets=SHEET_TYPES[:1]) -> list[Path]:
    """Draw the four plots (each one that has data) and the image sheets of ``sheets`` (dropout families) into
    ``root``; returns the files written. A sheet none of whose runs saved predictions is left out."""
    by_path = {r["path"]: r for r in runs}
    rows = class_rows(table, by_path)
    names = class_names(max((len(v) for _, v in rows), default=len(VOC_CLASSES)))
    dists = per_image_dists(table, by_path, records)
    plans = [(FILES["delta"], delta_rows(table), plots.delta_plot),
             (FILES["curves"], curves(table, by_path), plots.curves_plot),
             (FILES["per_image"], dists if any(v for d in dists.values() for v in d.values()) else {},
              plots.per_image_plot),
             (FILES["class_iou"], rows, partial(plots.class_iou_plot, class_names=names))]
    drawn = [draw(data, out=root / name) for name, data, draw in plans if data]
    for kind in sheets:
        for schedule in table:
            chosen = sheet_runs(table, schedule, kind, by_path)
            if not any(family(label.split(" ")[0]) == kind for label, _ in chosen) or not any(
                    (run_dir / PREDICTIONS / "index.json").is_file() for _, run_dir in chosen):
                continue  # no run of that family here, or none saved predictions (older runs)
            drawn.append(plots.image_sheet(chosen, root / f"sheet_{kind}_{schedule}.png", names))
    return drawn
