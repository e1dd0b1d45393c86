"""`deeplab-dropout-report DIR`: every run's results.json under DIR as the paper's Table 3/4, per schedule, with
its figures (``build.report`` writes them all: ``tables``: rows and files, ``latex``: the tables for a paper,
``stats``: intervals and the bootstrap, ``figures``: the plots).

This module stays light (no torch, no matplotlib): Hydra instantiates ``ReportCallback`` whenever a training run
starts, and ``--help`` should be instant. ``report``, ``load_runs`` and ``summarize`` are loaded on first use.
"""
from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from deeplab_dropout.cli import command
from deeplab_dropout.config import REPORT_COLUMNS, REPORT_OPTIONS
from deeplab_dropout.study import FAMILIES

__all__ = ["ReportCallback", "load_runs", "main", "report", "summarize"]
LAZY = {"report": "deeplab_dropout.report.build", "load_runs": "deeplab_dropout.report.tables",
        "summarize": "deeplab_dropout.report.tables"}


def __getattr__(name: str) -> Any:
    if name in LAZY:
        import importlib

        return getattr(importlib.import_module(LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ReportCallback(Callback):
    """At the end of a multirun: write and print the report (``hydra.callbacks.report.*`` are ``report``'s
    arguments, the sweep's ``report.*`` its statistics, Loss epoch and reference) and say where to point
    TensorBoard."""

    def __init__(self, n_boot: int = 2000, boot_seed: int = 0, sheets: Iterable[str] = FAMILIES[:1],
                 figures: bool = True, columns: str = "paper") -> None:
        checks = [(f"sheets={list(sheets)}", all(kind in FAMILIES for kind in sheets),
                   f"types among {', '.join(FAMILIES)}"), (f"n_boot={n_boot}", n_boot >= 1, "at least 1"),
                  (f"columns={columns!r}", columns in REPORT_COLUMNS, f"one of {', '.join(REPORT_COLUMNS)}")]
        for value, ok, expected in checks:
            if not ok:
                raise ValueError(f"hydra.callbacks.report: {value} is invalid: expected {expected}")
        self.options = {"n_boot": n_boot, "boot_seed": boot_seed, "sheets": list(sheets), "figures": figures,
                        "columns": columns}

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        shown = {key: config.report[key] for key in REPORT_OPTIONS} if "report" in config else {}
        from deeplab_dropout.report.build import report

        try:
            print(report(sweep_dir, **self.options, **shown))
        except FileNotFoundError:
            return
        print(f"results: {sweep_dir}/*/results.json  report: {sweep_dir / 'report.md'} "
              "(.tex, .csv, .json, *.png, *.pdf)")
        print(f"tensorboard --logdir {sweep_dir}")


DESCRIPTION = """Read every run's results.json (and per_image.npz, predictions/) under DIR, searched
recursively (symlinked run folders followed), and write the study's tables there: report.md (the paper's
Table 3/4 per schedule, ΔmIoU vs `none` with a paired bootstrap CI, the ramp's bold, ‡ where a ramp ended
below its p), report.tex (the same tables as a LaTeX document: pdflatex report.tex) and report_tables.tex
(the tables alone, for \\input), report.csv (one row per experiment × schedule, every column, the eval
commands), report.json (the same, nested), and the plots, each as PNG and PDF: delta_vs_none.png,
curves_<schedule>.png, per_image.png, class_iou.png, class_iou_delta_<schedule>.png, and image sheets
sheet_<type>_<schedule>.png. For runs of VOC 2012 (not the generated data), the paper's Tables 3/4 beside
ours, with Δ vs paper where the columns measure the same thing, and reference_vs_paper.png. Prints
report.md."""
EPILOG = f"""examples:
  deeplab-dropout-report outputs/demo
  deeplab-dropout-report multirun/2026-11-29/10-00-00 --n-boot 10000 --sheets {" ".join(FAMILIES)}"""


@command
def main(argv: list[str] | None = None) -> int:
    """`deeplab-dropout-report`: an unreadable DIR or file is one line and exit 2."""
    parser = argparse.ArgumentParser(prog="deeplab-dropout-report", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path, help="a run or sweep directory (searched recursively)")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for ΔmIoU (default 2000)")
    parser.add_argument("--boot-seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    parser.add_argument("--sheets", nargs="*", default=[FAMILIES[0]], choices=FAMILIES, metavar="TYPE",
                        help=f"image sheets for these dropout types ({', '.join(FAMILIES)}; default {FAMILIES[0]})")
    parser.add_argument("--no-figures", action="store_true", help="write the tables only")
    parser.add_argument("--columns", choices=list(REPORT_COLUMNS), default="paper",
                        help="report.md's columns: paper (Table 3/4, default) | course (the VOC 2007 course "
                        "report's: pixel accuracy, mIoU); report.csv/json hold every column")
    parser.add_argument("--reference", choices=REPORT_OPTIONS["reference"],
                        help="paper: the paper's Tables 3/4 beside ours when the runs are VOC 2012 | none "
                        "(default: the runs' report.reference, else paper)")
    parser.add_argument("--statistics", choices=REPORT_OPTIONS["statistics"],
                        help="Table 3/4 columns over validation images | batch: over batches of trainer.batch_size "
                        "images, as the authors (default: the runs' report.statistics, else image)")
    parser.add_argument("--loss-epoch", choices=REPORT_OPTIONS["loss_epoch"],
                        help="the Loss column at the best epoch | min: the lowest over the epochs, as the authors "
                        "(default: the runs' report.loss_epoch, else best)")
    args = parser.parse_args(argv)
    if args.n_boot < 1:
        parser.error(f"--n-boot={args.n_boot} is invalid: must be at least 1")
    from deeplab_dropout.report.build import report  # torch, matplotlib: after the arguments are known good

    print(report(args.dir, args.n_boot, args.boot_seed, args.sheets, figures=not args.no_figures,
                 columns=args.columns, reference=args.reference, statistics=args.statistics,
                 loss_epoch=args.loss_epoch))
    return 0
