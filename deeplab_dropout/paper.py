"""The paper's own numbers: Table 3 ("mIoU and Loss metrics for experiments", constant dropout) and Table 4
("... using ScheduledDropPath with n = 30", the ramp) of Spilsbury & Camps (2019), typed from the paper as data.

The rows are the paper's, in its order (pretrained-base, none, then each dropout family over the five placements,
as ``study.TABLE_ORDER``), held here as data and keyed by the study's names rather than spelled again; the
columns are keyed as the report's (``mean, std, min, median, max, val_loss``). Table 3 is the ``constant``
schedule, Table 4 ``linear``.

The paper's statistics are not ours: as the authors' notebook computed them, each is describe() over the mean
mIoU of consecutive validation batches of 8 images at the best epoch, and Loss comes from the epoch of lowest
validation loss. Only the columns that measure the same thing as a report's are compared with it
(``comparable_columns``).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from deeplab_dropout.config import REPORT_OPTIONS
from deeplab_dropout.study import CELLS, CONSTANT, PRETRAINED_BASE

COLUMNS = ("mean", "std", "min", "median", "max", "val_loss")  # Mean mIoU, Std., Worst, Med., Best mIoU, Loss
STATISTICS = REPORT_OPTIONS["statistics"]  # a report's statistics: over validation images, or the paper's batches
BATCH_SIZE = 8  # the paper's validation batches
ROWS = (PRETRAINED_BASE, *CELLS)  # the rows of both tables, in the paper's order (study.TABLE_ORDER's)


@dataclass(frozen=True)
class PaperTable:
    """One of the paper's tables: its number, title, the schedule it reports, and {row: {column: value}}."""

    number: int
    title: str
    schedule: str
    rows: Mapping[str, Mapping[str, float]]


def _table(number: int, title: str, schedule: str, values: tuple[tuple[float, ...], ...]) -> PaperTable:
    """A PaperTable from rows of values in ROWS order, each in COLUMNS order (checked)."""
    rows = {}
    for row, numbers in zip(ROWS, values, strict=True):
        rows[row] = MappingProxyType(dict(zip(COLUMNS, numbers, strict=True)))
    return PaperTable(number, title, schedule, MappingProxyType(rows))


TABLE_3 = _table(3, "mIoU and Loss metrics for experiments", CONSTANT, (
    # Mean  Std.  Worst Med.  Best  Loss
    (0.81, 0.09, 0.55, 0.82, 0.99, 0.02),  # pretrained-base
    (0.49, 0.10, 0.26, 0.50, 0.65, 0.06),  # none
    (0.56, 0.09, 0.35, 0.50, 0.77, 0.05),  # resnet-chandrop
    (0.54, 0.10, 0.28, 0.53, 0.74, 0.06),  # spp-chandrop
    (0.50, 0.09, 0.32, 0.53, 0.67, 0.06),  # decoder-chandrop
    (0.49, 0.09, 0.28, 0.50, 0.68, 0.07),  # upper-chandrop
    (0.55, 0.11, 0.27, 0.55, 0.76, 0.06),  # all-chandrop
    (0.45, 0.10, 0.21, 0.45, 0.74, 0.08),  # resnet-dropblock
    (0.47, 0.09, 0.29, 0.46, 0.72, 0.06),  # spp-dropblock
    (0.51, 0.09, 0.34, 0.50, 0.68, 0.07),  # decoder-dropblock
    (0.51, 0.10, 0.30, 0.51, 0.77, 0.07),  # upper-dropblock
    (0.48, 0.10, 0.28, 0.47, 0.69, 0.07),  # all-dropblock
    (0.50, 0.11, 0.31, 0.49, 0.74, 0.06),  # resnet-uout
    (0.50, 0.11, 0.29, 0.50, 0.74, 0.06),  # spp-uout
    (0.48, 0.10, 0.31, 0.45, 0.72, 0.07),  # decoder-uout
    (0.56, 0.09, 0.31, 0.57, 0.72, 0.05),  # upper-uout
    (0.52, 0.10, 0.31, 0.51, 0.76, 0.06),  # all-uout
))

TABLE_4 = _table(4, "mIoU and Loss metrics for experiments using ScheduledDropPath with n = 30", "linear", (
    # Mean  Std.  Worst Med.  Best  Loss
    (0.81, 0.09, 0.55, 0.82, 0.99, 0.02),  # pretrained-base
    (0.49, 0.10, 0.26, 0.50, 0.65, 0.06),  # none
    (0.53, 0.11, 0.30, 0.50, 0.54, 0.06),  # resnet-chandrop (Best < Mean as printed)
    (0.50, 0.10, 0.28, 0.51, 0.75, 0.06),  # spp-chandrop
    (0.47, 0.09, 0.28, 0.48, 0.68, 0.07),  # decoder-chandrop
    (0.53, 0.10, 0.34, 0.53, 0.74, 0.06),  # upper-chandrop
    (0.59, 0.09, 0.39, 0.59, 0.78, 0.05),  # all-chandrop
    (0.51, 0.10, 0.28, 0.52, 0.69, 0.07),  # resnet-dropblock
    (0.52, 0.11, 0.31, 0.52, 0.75, 0.06),  # spp-dropblock
    (0.55, 0.11, 0.32, 0.56, 0.73, 0.05),  # decoder-dropblock
    (0.53, 0.13, 0.29, 0.57, 0.74, 0.06),  # upper-dropblock
    (0.49, 0.10, 0.28, 0.47, 0.69, 0.07),  # all-dropblock
    (0.50, 0.11, 0.31, 0.49, 0.74, 0.06),  # resnet-uout
    (0.50, 0.10, 0.28, 0.51, 0.75, 0.06),  # spp-uout
    (0.50, 0.10, 0.34, 0.49, 0.78, 0.07),  # decoder-uout
    (0.52, 0.12, 0.23, 0.54, 0.79, 0.06),  # upper-uout
    (0.51, 0.11, 0.29, 0.52, 0.76, 0.06),  # all-uout
))

TABLES = MappingProxyType({t.schedule: t for t in (TABLE_3, TABLE_4)})  # {schedule: the paper's table of it}


def paper_values(schedule: str, row: str) -> PaperTable | None:
    """The paper's table that has ``row`` (a ROWS name) under ``schedule``, or None."""
    table = TABLES.get(schedule)
    return table if table is not None and row in table.rows else None


def comparable_columns(statistics: str = "image", loss_epoch: str = "best") -> tuple[str, ...]:
    """The COLUMNS a report with these statistics shares with the paper: with ``image`` (over validation
    images) only Mean mIoU (the mean of equal batches' means is the mean over images); with ``batch`` (the
    paper's describe() over batches of 8) the five mIoU columns, and the Loss too with ``loss_epoch`` min
    (the paper's: the epoch of lowest validation loss)."""
    if statistics not in STATISTICS:
        raise ValueError(f"statistics={statistics!r} is invalid: expected one of {', '.join(STATISTICS)}")
    if statistics != "batch":
        return COLUMNS[:1]
    return COLUMNS if loss_epoch == "min" else tuple(c for c in COLUMNS if c != "val_loss")
