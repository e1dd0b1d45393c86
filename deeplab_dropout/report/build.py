"""The report of a folder of runs: tables (``tables``), LaTeX (``latex``), figures (``figures``), the paper's
reference (``reference``) and TensorBoard's comparison (``tb.show_comparison``), written together."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from deeplab_dropout.config import REPORT_OPTIONS
from deeplab_dropout.report.figures import draw_figures
from deeplab_dropout.report.latex import write_latex
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
from deeplab_dropout.tb import show_comparison


def from_runs(runs: list[dict], key: str) -> str:
    """The runs' ``report.<key>`` (their config's `report` node) when they agree, else its default."""
    values = {(run["config"].get("report") or {}).get(key) for run in runs} - {None}
    return values.pop() if len(values) == 1 else REPORT_OPTIONS[key][0]


def report(root: Path, n_boot: int = 2000, boot_seed: int = 0, sheets: Iterable[str] = FAMILIES[:1],
           figures: bool = True, columns: str = "paper", reference: str | None = None,
           statistics: str | None = None, loss_epoch: str | None = None) -> str:
    """Build the report of ``root``; write report.md (the column set ``columns``; the Table 3/4 columns over
    images or batches (``statistics``) with the Loss of the best or the lowest epoch (``loss_epoch``); the
    paper's Tables 3/4 beside ours with ``reference`` paper when the runs are VOC 2012), report.tex and
    report_tables.tex (the same tables in LaTeX), report.csv, report.json and (``figures``) the plots (PNG and
    PDF) and image sheets there; return the markdown text. An option left None is the runs' own ``report.*``
    when they agree, else the default."""
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
    incomplete: dict[str, list[dict]] = {}  # experiments without a counted run: listed, not tabled
    table = summarize(runs, n_boot, boot_seed, records, options["statistics"], options["loss_epoch"], incomplete)
    shown = reference_status(runs, options["reference"], options["statistics"], options["loss_epoch"])
    if shown["shown"]:
        add_reference(table, shown["comparable"])
    drawn, skipped = draw_figures(root, table, runs, records, sheets) if figures else ([], [])
    missing = not_counted(table, unusable, incomplete)
    write_latex(root, table, columns, options["statistics"], options["loss_epoch"], len(missing))
    show_comparison(root, table)  # TensorBoard: each run's Δ vs none, the HParams columns that vary
    return write_report(root, table, missing, drawn, columns,
                        {"n_boot": n_boot, "seed": boot_seed, "level": 0.95}, shown, options["statistics"],
                        options["loss_epoch"], skipped)
