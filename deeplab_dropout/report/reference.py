"""The paper's Tables 3 and 4 beside the report's rows: shown only for the paper's matrix on VOC 2012, with
Δ vs paper (ours − paper) in the columns that measure the same thing as ours (``paper.comparable_columns``).

``reference_status`` says whether the runs qualify (and why not), ``add_reference`` puts the paper's values and
the Δ into each row the paper has (``row["paper"]``); ``tables`` writes them and ``figures`` plots them.
"""
from __future__ import annotations

from collections.abc import Iterable

from deeplab_dropout.config import REPORT_OPTIONS
from deeplab_dropout.paper import BATCH_SIZE, COLUMNS, comparable_columns, paper_values
from deeplab_dropout.saved_config import run_config

PAPER, NONE = REPORT_OPTIONS["reference"]  # the report's `reference` option
STATISTICS = REPORT_OPTIONS["statistics"][0]  # the default statistics of the per-image columns (the paper's: batch)
PAPER_YEAR = 2012
GENERATED = "synthetic"  # the `data` option of the generated dataset


def data_of(run: dict) -> str:
    """A run's data as its config names it: ``data=voc2012`` (and ``data.year=…`` when not 2012)."""
    config = run_config(run["config"])
    year = config.get("data.year")
    return f"data={config.get('data.name')}" + ("" if year == PAPER_YEAR else f", data.year={year}")


def is_paper_data(run: dict) -> bool:
    """Whether a run trained on VOC 2012 (``data.year`` 2012, not the generated dataset)."""
    config = run_config(run["config"])
    return config.get("data.year") == PAPER_YEAR and config.get("data.name") != GENERATED


def reference_status(runs: Iterable[dict], reference: str = PAPER, statistics: str = STATISTICS,
                     loss_epoch: str = "best") -> dict:
    """Whether the report shows the paper's tables: ``{"shown": True, "statistics", "comparable", "note"}`` for
    VOC 2012 runs with ``reference`` paper, else ``{"shown": False, "reason": ...}``."""
    if reference not in (PAPER, NONE):
        raise ValueError(f"reference={reference!r} is invalid: expected one of {PAPER}, {NONE}")
    if reference == NONE:
        return {"shown": False, "reason": f"reference: {NONE}"}
    other = sorted({data_of(r) for r in runs if not is_paper_data(r)})
    if other:
        return {"shown": False, "reason": f"the runs are not VOC 2012 ({'; '.join(other)})"}
    return {"shown": True, "statistics": statistics, "comparable": list(comparable_columns(statistics, loss_epoch)),
            "note": not_comparable_note(statistics, loss_epoch)}


def not_comparable_note(statistics: str = STATISTICS, loss_epoch: str = "best") -> str | None:
    """Why the columns outside ``comparable_columns`` are not compared (None when all are)."""
    comparable = comparable_columns(statistics, loss_epoch)
    if set(comparable) == set(COLUMNS):
        return None
    if statistics == "batch":
        return ("n/c: not comparable: the paper's Loss is from the epoch of lowest validation loss, ours at the "
                "best epoch (report.loss_epoch=min compares it)")
    return (f"n/c: not comparable: the paper's Std. and Worst/Med./Best mIoU are over the mean mIoU of "
            f"validation batches of {BATCH_SIZE} and its Loss is from the epoch of lowest validation loss; ours "
            "are over validation images, Loss at the best epoch")


def add_reference(table: dict[str, list[dict]], comparable: Iterable[str] = comparable_columns()) -> None:
    """Give each row the paper has (same cell, schedule) ``paper``: {table, values, delta}, Δ = ours − paper in
    the ``comparable`` columns (None elsewhere, or where ours is missing)."""
    comparable = tuple(comparable)
    for schedule, rows in table.items():
        for row in rows:
            source = paper_values(schedule, row["cell"])
            if source is None:
                continue
            values = dict(source.rows[row["cell"]])
            ours = {c: row["columns"][c][0] for c in COLUMNS}
            delta = {c: None if c not in comparable or ours[c] is None else ours[c] - values[c] for c in COLUMNS}
            row["paper"] = {"table": source.number, "values": values, "delta": delta}
