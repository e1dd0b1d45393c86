"""`deeplab-dropout-report DIR`: every run's results.json under DIR as the paper's Table 3/4, per schedule, with
its figures (``tables``: rows and files, ``stats``: intervals and the bootstrap, ``figures``: the plots)."""
from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from hydra.experimental.callback import Callback

from deeplab_dropout.cli import command
from deeplab_dropout.config import REPORT_OPTIONS
from deeplab_dropout.report.figures import draw_figures
from deeplab_dropout.report.reference import add_reference, reference_status
from deeplab_dropout.report.tables import (
    COLUMN_SETS,
    Records,
    load_runs,
    not_counted,
    summarize,
    write_report,
)
from deeplab_dropout.study import FAMILIES

__all__ = ["ReportCallback", "load_runs", "main", "report", "summarize"]


def from_runs(runs: list[dict], key: str) -> str:
    """The runs' ``report.<key>`` (their config's `report` node) when they agree, else its default."""
    values = {(run["config"].get("report") or {}).get(key) for run in runs} - {None}
    return values.pop() if len(values) == 1 else REPORT_OPTIONS[key][0]


def report(root: Path, n_boot: int = 2000, boot_seed: int = 0, sheets: Iterable[str] = FAMILIES[:1],
           figures: bool = True, columns: str = "paper", reference: str | None = None,
           statistics: str | None = None, loss_epoch: str | None = None) -> str:
    """Build the report of ``root``; write report.md (the column set ``columns``; the Table 3/4 columns over
    images or batches (``statistics``) with the Loss of the best or the lowest epoch (``loss_epoch``); the
    paper's Tables 3/4 beside ours with ``reference`` paper when the runs are VOC 2012), report.csv,
    report.json and (``figures``) the plots and image sheets there; return the markdown text. An option left
    None is the runs' own ``report.*`` when they agree, else the default."""
    if columns not in COLUMN_SETS:
        raise ValueError(f"columns={columns!r} is invalid: expected one of {', '.join(COLUMN_SETS)}")
    options = {"reference": reference, "statistics": statistics, "loss_epoch": loss_epoch}
    for key, value in options.items():
        if value is not None and value not in REPORT_OPTIONS[key]:
            raise ValueError(f"{key}={value!r} is invalid: expected one of {', '.join(REPORT_OPTIONS[key])}")
    root = Path(root)
    unusable: list[dict] = []
    runs = load_runs(root, unusable)
    if not runs:
        raise FileNotFoundError(f"no usable results.json under {root} (see the warnings)" if unusable
                                else f"no results.json under {root}")
    options = {key: value if value is not None else from_runs(runs, key) for key, value in options.items()}
    records = Records()  # each per_image.npz read once, for the bootstrap and the plots
    table = summarize(runs, n_boot, boot_seed, records, options["statistics"], options["loss_epoch"])
    shown = reference_status(runs, options["reference"], options["statistics"], options["loss_epoch"])
    if shown["shown"]:
        add_reference(table, shown["comparable"])
    drawn = draw_figures(root, table, runs, records, sheets) if figures else []
    return write_report(root, table, not_counted(table, unusable), drawn, columns,
                        {"n_boot": n_boot, "seed": boot_seed, "level": 0.95}, shown, options["statistics"],
                        options["loss_epoch"])


class ReportCallback(Callback):
    """At the end of a multirun: write and print the report (``hydra.callbacks.report.*`` are ``report``'s
    arguments, the sweep's ``report.*`` its statistics, Loss epoch and reference) and say where to point
    TensorBoard."""

    def __init__(self, n_boot: int = 2000, boot_seed: int = 0, sheets: Iterable[str] = FAMILIES[:1],
                 figures: bool = True, columns: str = "paper") -> None:
        checks = [(f"sheets={list(sheets)}", all(kind in FAMILIES for kind in sheets),
                   f"types among {', '.join(FAMILIES)}"), (f"n_boot={n_boot}", n_boot >= 1, "at least 1"),
                  (f"columns={columns!r}", columns in COLUMN_SETS, f"one of {', '.join(COLUMN_SETS)}")]
        for value, ok, expected in checks:
            if not ok:
                raise ValueError(f"hydra.callbacks.report: {value} is invalid: expected {expected}")
        self.options = {"n_boot": n_boot, "boot_seed": boot_seed, "sheets": list(sheets), "figures": figures,
                        "columns": columns}

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        shown = {key: config.report[key] for key in REPORT_OPTIONS} if "report" in config else {}
        try:
            print(report(sweep_dir, **self.options, **shown))
        except FileNotFoundError:
            return
        print(f"results: {sweep_dir}/*/results.json  report: {sweep_dir / 'report.md'} (.csv, .json, *.png)")
        print(f"tensorboard --logdir {sweep_dir}")


DESCRIPTION = """Read every run's results.json (and per_image.npz, predictions/) under DIR, searched
recursively, and write the study's tables there: report.md (the paper's Table 3/4 per schedule, ΔmIoU vs
`none` with a paired bootstrap CI, the ramp's bold), report.csv (one row per experiment × schedule, every
column), report.json (the same, nested), and the plots: delta_vs_none.png, curves.png, per_image.png,
class_iou.png, and image sheets sheet_<type>_<schedule>.png. For runs of VOC 2012 (not the generated data),
the paper's Tables 3/4 beside ours, with Δ vs paper where the columns measure the same thing, and
reference_vs_paper.png. Prints report.md."""
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
    parser.add_argument("--columns", choices=list(COLUMN_SETS), default="paper",
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
    print(report(args.dir, args.n_boot, args.boot_seed, args.sheets, figures=not args.no_figures,
                 columns=args.columns, reference=args.reference, statistics=args.statistics,
                 loss_epoch=args.loss_epoch))
    return 0
