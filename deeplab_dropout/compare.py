"""The report's comparisons: each regularised experiment against `none` (ΔmIoU with a paired bootstrap CI,
from the runs' per-image records) and each ramped schedule against the constant one (the paper's bold).

`none` here is the experiment that differs only in the regulariser groups (dropout, placement, schedule):
same model, data, optimiser and trainer, so the difference is the regulariser's alone.
"""
from __future__ import annotations

import math
from pathlib import Path

from deeplab_dropout.results import PER_IMAGE, read_per_image
from deeplab_dropout.stats import paired_bootstrap

BASELINE = "none"
CONSTANT = "constant"
# Columns where the ramp can be "better than without scheduling" (Table 4's bold), and which way is better.
HIGHER_IS_BETTER = {"mean": True, "min": True, "median": True, "max": True, "miou": True, "pixel_acc": True,
                    "val_loss": False}


def strip_groups(config: dict, groups: tuple[str, ...]) -> dict:
    """``config`` (flat) without the keys under ``groups``."""
    return {k: v for k, v in config.items() if not any(k == g or k.startswith(g + ".") for g in groups)}


class Records:
    """Per-image records of run directories, each read once; a missing or bad one is remembered as a reason."""

    def __init__(self) -> None:
        self._cache: dict[str, object] = {}

    def get(self, run_dir: str | Path):
        """The run's PerImage, or a one-line reason (str) why there is none."""
        key = str(run_dir)
        if key not in self._cache:
            path = Path(run_dir) / PER_IMAGE
            try:
                self._cache[key] = read_per_image(path) if path.is_file() else f"no {PER_IMAGE} in {run_dir}"
            except (OSError, ValueError) as e:
                self._cache[key] = f"{path}: {e}"
        return self._cache[key]

    def by_seed(self, runs: list[dict]) -> tuple[dict, list[str]]:
        """{seed: PerImage} of the runs that have a record, and the reasons for those that don't."""
        found, missing = {}, []
        for run in runs:
            record = self.get(run["dir"])
            if isinstance(record, str):
                missing.append(record)
            else:
                found[run["config"]["seed"]] = record
        return found, missing


def vs_none(cell_runs: list[dict], base_runs: list[dict] | None, records: Records, n_boot: int,
            seed: int) -> dict:
    """ΔmIoU (dataset mIoU) of ``cell_runs`` against ``base_runs`` (the `none` runs), paired by seed and image:
    the bootstrap's result, or ``{"delta": None, "reason": ...}`` when it cannot be computed."""
    if base_runs is None:
        return {"delta": None, "reason": f"no '{BASELINE}' run of the same experiment"}
    cell, cell_missing = records.by_seed(cell_runs)
    base, base_missing = records.by_seed(base_runs)
    if not cell or not base:
        reasons = cell_missing + base_missing
        return {"delta": None, "reason": reasons[0] if reasons else "no completed runs"}
    try:
        return paired_bootstrap(cell, base, n_boot=n_boot, seed=seed)
    except ValueError as e:
        return {"delta": None, "reason": str(e)}


def ramp_better(row: dict, constant_row: dict | None) -> list[str]:
    """The columns in which ``row`` (a ramped schedule) beats the same experiment under the constant schedule."""
    if constant_row is None:
        return []
    better = []
    for column, higher in HIGHER_IS_BETTER.items():
        mine, theirs = row["columns"][column][0], constant_row["columns"][column][0]
        if mine is None or theirs is None or not (math.isfinite(mine) and math.isfinite(theirs)):
            continue
        if (mine > theirs) if higher else (mine < theirs):
            better.append(column)
    return better
