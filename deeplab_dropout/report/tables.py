"""The report's tables: every run's results.json grouped into experiments, one row per experiment and schedule
(mean and 95% t-interval over its seeds), compared with `none` and with the constant schedule, and written as
report.md, report.csv and report.json.

Rows are experiments: the runs whose resolved configs differ only in seed (and in keys that don't change
what is computed). Two runs of one experiment with the same seed count once. A run without a regulariser
(`none`, `pretrained-base`) is the same experiment under every schedule, so it is shown in every table.
`none` for a row is the experiment that differs only in the regulariser groups (dropout, placement,
schedule): same model, data, optimiser and trainer, so ΔmIoU is the regulariser's alone.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shlex
import statistics
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from deeplab_dropout import paper
from deeplab_dropout.config import REPORT_COLUMNS, one_line
from deeplab_dropout.report.stats import mean_ci, paired_bootstrap
from deeplab_dropout.results import BEST, PER_IMAGE, atomic_write, read_per_image, write_json
from deeplab_dropout.rundir import RunDir
from deeplab_dropout.saved_config import REGULARISER_GROUPS, experiment_config, experiment_key
from deeplab_dropout.study import BASELINE, CONSTANT, PRETRAINED_BASE, TABLE_ORDER, UNREGULARISED

# Column key in report.json -> the paper's column name (Table 3/4), then ours.
COLUMNS = {"mean": "Mean mIoU", "std": "Std.", "min": "Worst mIoU", "median": "Med. mIoU", "max": "Best mIoU",
           "val_loss": "Loss", "miou": "mIoU (dataset)", "pixel_acc": "Pixel accuracy", "best_epoch": "Best epoch"}
# The columns report.md shows (report.csv/json hold them all): the study's Table 3/4, or the VOC 2007 course
# report's table (pixel accuracy and IoU at each run's best epoch).
COLUMN_SETS = dict(zip(REPORT_COLUMNS, (("mean", "std", "min", "median", "max", "val_loss", "miou", "best_epoch"),
                                        ("pixel_acc", "miou", "val_loss", "best_epoch")), strict=True))
PER_IMAGE_COLUMNS = ("mean", "std", "min", "median", "max")
# Columns where the ramp can be "better than without scheduling" (Table 4's bold), and which way is better.
HIGHER_IS_BETTER = {"mean": True, "min": True, "median": True, "max": True, "miou": True, "pixel_acc": True,
                    "val_loss": False}
MARK = "†"
DELTA, UP, DOWN = "ΔmIoU vs none [95% CI]", "▲", "▼"
NOT_COMPARABLE = "n/c"  # a paper column that does not measure what ours does
FOOTNOTE = f"{MARK} the same run(s) in every table: without a regulariser the schedule changes nothing"
ABSENT = "(unset)"
RAMP_MARK = "‡"  # a ramped schedule that ended below its dropout.p (``ramp_shortfall``)
RAMP_TOLERANCE = 1e-9
MAX_LABEL_KEYS = 3  # a row label lists at most this many distinguishing keys (else its sweep folder)


# ---- loading runs ------------------------------------------------------------------------------------

def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _number(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def check_run(data: Any) -> str | None:
    """What is missing or odd in a loaded results.json (None if the report can use it)."""
    if not isinstance(data, dict):
        return "not a JSON object"
    if not isinstance(data.get("status"), str) or not isinstance(data.get("cell"), str):
        return "no status or cell"
    config = data.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("schedule"), dict):
        return "no config.schedule"
    if not isinstance(config["schedule"].get("name"), str):
        return "no config.schedule.name"
    if not isinstance(config.get("seed"), int) or isinstance(config.get("seed"), bool):
        return "no integer config.seed"
    best = data.get("best")
    if best is None:
        return None
    per_image = best.get("per_image_miou") if isinstance(best, dict) else None
    if not isinstance(per_image, dict) or not all(_number(per_image.get(k, "")) for k in PER_IMAGE_COLUMNS):
        return "best.per_image_miou is missing or not numbers"
    scalars = (best.get("miou", ""), best.get("val_loss", ""), data.get("best_epoch", ""))
    if not all(_number(v) for v in scalars):
        return "best.miou, best.val_loss or best_epoch is missing or not a number"
    return None


def eval_command(run_dir: Path) -> str | None:
    """The shell command that evaluates the run in ``run_dir`` again (None if it has no best checkpoint)."""
    if not (run_dir / BEST).is_file():
        return None
    return f"deeplab-dropout-eval {shlex.quote(str(run_dir.resolve()))}"


def results_files(root: Path) -> list[Path]:
    """Every results.json below ``root``, sorted, following symlinked folders (a comparison folder of
    ``ln -s RUN_DIR cmp/name`` links): a folder reached twice (two links to one run, a link loop) is read
    once, under the first path reached, in sorted order."""
    found, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        subfolders.sort()
        if "results.json" in files:
            found.append(Path(folder) / "results.json")
    return sorted(found)


def load_runs(root: Path, unusable: list[dict] | None = None) -> list[dict]:
    """Every usable results.json below ``root`` (``results_files``), with ``path`` (its folder relative to
    ``root``), ``dir`` (the folder) and ``eval`` (the command that evaluates it again) added.

    Unreadable or odd files are skipped with a warning on stderr (and appended to ``unusable`` as
    ``{path, status: "unreadable", error}``), so one bad run never hides the others.
    """
    root = Path(root)
    runs = []
    for path in results_files(root):
        try:
            data = json.loads(path.read_text())
            problem = check_run(data)
        except (OSError, ValueError) as e:
            problem = one_line(e)
        if problem is not None:
            print(f"warning: skipping {path}: {problem}", file=sys.stderr)
            if unusable is not None:
                unusable.append({"path": str(path.parent.relative_to(root)), "status": "unreadable",
                                 "error": f"results.json: {problem}"})
            continue
        data.update(path=str(path.parent.relative_to(root)), dir=str(path.parent), eval=eval_command(path.parent))
        if data["status"] == "running":  # killed (SIGKILL, a lost node) if no live process holds it
            data["status"] = RunDir(path.parent).status() or data["status"]
        runs.append(data)
    return runs


def describe(values: list[float]) -> dict[str, float | None]:
    """pandas' describe() of ``values`` as the authors' notebook read it: mean, std (ddof 1), min, median, max."""
    if not values:
        return dict.fromkeys(PER_IMAGE_COLUMNS)
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "min": min(values), "median": statistics.median(values),
            "max": max(values)}


def epoch_loss(entry: dict, statistics: str) -> float | None:
    """An evaluated epoch's validation loss: over the whole set (image), or the mean of its batches' (batch)."""
    if statistics == "image":
        return entry.get("val_loss")
    losses = [v for v in entry.get("batch_loss") or [] if v is not None]
    return sum(losses) / len(losses) if losses else None


def best_values(run: dict, statistics: str = "image", loss_epoch: str = "best") -> dict[str, float | None] | None:
    """The table's columns from a completed run's best epoch (None when it has none to count): the per-image
    mIoU statistics over validation images (``statistics`` image) or describe() over the per-batch mean mIoU
    (batch, the authors'); Loss at the best epoch, or the lowest over the evaluated epochs (``loss_epoch``
    min, the authors')."""
    best = run.get("best")
    if run["status"] != "completed" or best is None:
        return None
    if statistics == "batch":
        spread = describe([v for v in best.get("batch_miou") or [] if v is not None])
    else:
        spread = {k: best["per_image_miou"][k] for k in PER_IMAGE_COLUMNS}
    loss = epoch_loss(best, statistics)
    if loss_epoch == "min":
        losses = [v for e in run.get("history", []) if "miou" in e and (v := epoch_loss(e, statistics)) is not None]
        loss = min(losses) if losses else None
    values = {**spread, "val_loss": loss, "miou": best["miou"], "pixel_acc": best.get("pixel_acc"),
              "best_epoch": run["best_epoch"]}
    # An undefined metric (NaN, written as null) is left out of that column, not averaged in.
    return {k: v if v is not None and math.isfinite(v) else None for k, v in values.items()}


# ---- experiments and rows ----------------------------------------------------------------------------

def group_experiments(runs: Iterable[dict]) -> dict[str, dict]:
    """{experiment key: {cell, config, schedules, runs, duplicates}}: one run per seed, others duplicates."""
    experiments: dict[str, dict] = {}
    for run in runs:
        key = experiment_key(run["config"], run["cell"])
        exp = experiments.setdefault(key, {"cell": run["cell"], "config": experiment_config(
            run["config"], run["cell"]), "schedules": set(), "by_seed": {}, "duplicates": []})
        exp["schedules"].add(run["config"]["schedule"]["name"])
        exp["by_seed"].setdefault(run["config"]["seed"], []).append(run)
    for exp in experiments.values():
        exp["runs"] = []
        for seed, same in sorted(exp.pop("by_seed").items()):
            # A completed run with a best epoch is the one that counts; ties keep the first path.
            kept = min(same, key=lambda r: (r["status"] != "completed", r.get("best") is None))
            exp["runs"].append(kept)
            exp["duplicates"] += [{"path": r["path"], "seed": seed, "status": r["status"],
                                   "same_as": kept["path"]} for r in same if r is not kept]
    return experiments


def schedule_tables(experiments: dict[str, dict]) -> dict[str, list[str]]:
    """{schedule name: experiment keys}: regularised ones under their schedule, the others under every one."""
    regularised = {k for k, e in experiments.items() if e["cell"] not in UNREGULARISED}
    schedules = {s for k in regularised for s in experiments[k]["schedules"]} or {
        s for e in experiments.values() for s in e["schedules"]}
    return {s: [k for k, e in experiments.items() if k not in regularised or s in e["schedules"]]
            for s in sorted(schedules)}


def differing_keys(configs: list[dict], keep: Callable[[str], bool] = lambda key: True) -> set[str]:
    """The keys (passing ``keep``) whose values are not the same in all ``configs`` (absent is a value)."""
    keys = {k for c in configs for k in c if keep(k)}
    return {k for k in keys if len({json.dumps(c.get(k, ABSENT), sort_keys=True) for c in configs}) > 1}


def report_wide_keys(experiments: dict[str, dict]) -> dict[bool, set[str]]:
    """Keys outside the regulariser groups that differ in the report, per family (pretrained-base or not).

    ``model.*`` is compared only within a family: torchvision's COCO model differs from ours by definition,
    and its cell name already says so.
    """
    def outside(key: str) -> bool:
        return not _under(key, REGULARISER_GROUPS)

    everywhere = differing_keys([e["config"] for e in experiments.values()],
                                lambda k: outside(k) and not _under(k, ("model",)))
    wide = {}
    for family in (True, False):
        configs = [e["config"] for e in experiments.values() if (e["cell"] == PRETRAINED_BASE) == family]
        wide[family] = everywhere | differing_keys(configs, lambda k: outside(k) and _under(k, ("model",)))
    return wide


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def common_folder(runs: list[dict]) -> str | None:
    """The run folder name the runs share once their ``seed=N`` part is left out (a sweep's override dirname,
    e.g. ``recipe=unet``), or None."""
    names = {",".join(part for part in Path(r["path"]).name.split(",") if not re.fullmatch(r"seed=\d+", part))
             for r in runs}
    return names.pop() if len(names) == 1 and "" not in names else None


def row_label(exp: dict, shown: dict[str, Any]) -> str:
    """The cell and its distinguishing key values; with more than MAX_LABEL_KEYS of them, the cell and the
    sweep folder the runs share (the keys stay in ``keys``, report.csv and report.json)."""
    folder = common_folder(exp["runs"])
    if len(shown) > MAX_LABEL_KEYS and folder:
        return f"{exp['cell']} [{folder}]"
    listed = ", ".join(f"{k}={_show(v)}" for k, v in shown.items())
    return exp["cell"] + (f" [{listed}]" if shown else "")


def make_row(exp: dict, keys: set[str], every_schedule: bool, statistics: str = "image",
             loss_epoch: str = "best") -> dict:
    """A table row: label, the distinguishing key values, seeds, runs, duplicates, columns (``best_values``'
    with ``statistics`` and ``loss_epoch``), status counts."""
    shown = {k: exp["config"].get(k, ABSENT) for k in sorted(keys)}
    label = row_label(exp, shown)
    counted = [(r, v) for r in exp["runs"] if (v := best_values(r, statistics, loss_epoch)) is not None]
    columns = {}
    for c in COLUMNS:
        values = [v[c] for _, v in counted if v[c] is not None]
        columns[c] = list(mean_ci(values)) if values else [None, None]
    status: dict[str, int] = {}
    for r in exp["runs"]:
        status[r["status"]] = status.get(r["status"], 0) + 1
    finals = [final for r, _ in counted if (final := final_drop_p(r)) is not None]
    return {"label": label, "cell": exp["cell"], "every_schedule": every_schedule, "keys": shown,
            "n": len(counted), "seeds": [r["config"]["seed"] for r, _ in counted],
            "runs": [{"path": r["path"], "seed": r["config"]["seed"], "status": r["status"],
                      "error": r.get("error"), "eval": r.get("eval"), "final_drop_p": r.get("final_drop_p")}
                     for r in exp["runs"]],
            "duplicates": exp["duplicates"], "columns": columns, "status": dict(sorted(status.items())),
            "vs_none": None, "ramp_better": [], "final_drop_p": min(finals) if finals else None,
            "ramp_incomplete": None if every_schedule else ramp_shortfall([r for r, _ in counted])}


def final_drop_p(run: dict) -> float | None:
    """The dropout p a run's schedule reached at its last training iteration (results.json's ``final_drop_p``;
    None in older results)."""
    value = run.get("final_drop_p")
    return float(value) if _number(value) and value is not None and math.isfinite(value) else None


def ramp_shortfall(runs: list[dict]) -> dict | None:
    """``{"reached": [lowest, highest], "p": dropout.p}`` when a ramped (not constant) schedule ended below its
    ``dropout.p`` (``final_drop_p`` in results.json, by more than RAMP_TOLERANCE) in any of ``runs``: the run
    stopped before the ramp was full (``trainer.epochs`` < ``schedule.ramp_epochs``). None otherwise, and for
    runs without ``final_drop_p`` (older results)."""
    short = []
    for run in runs:
        final, p = final_drop_p(run), (run["config"].get("dropout") or {}).get("p")
        if run["config"]["schedule"]["name"] == CONSTANT or final is None or not _number(p) or p is None:
            continue
        if final < p - RAMP_TOLERANCE:
            short.append((final, p))
    if not short:
        return None
    finals = [final for final, _ in short]
    return {"reached": [min(finals), max(finals)], "p": short[0][1]}


def _order(row: dict) -> tuple[int, str]:
    cell = row["cell"]
    return (TABLE_ORDER.index(cell) if cell in TABLE_ORDER else len(TABLE_ORDER), row["label"])


def counted_runs(exp: dict) -> list[dict]:
    """The runs of an experiment that count in the table: completed, with a best epoch."""
    return [r for r in exp["runs"] if best_values(r) is not None]


# ---- comparisons: Δ vs none, the ramp vs the constant schedule ---------------------------------------

def strip_groups(config: dict, groups: tuple[str, ...]) -> dict:
    """``config`` (flat) without the keys under ``groups``."""
    return {k: v for k, v in config.items() if not _under(k, groups)}


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


def baseline_key(key: str, keys: list[str], experiments: dict[str, dict]) -> str | None:
    """The `none` experiment among ``keys`` that differs from ``key`` only in the regulariser groups."""
    target = strip_groups(experiments[key]["config"], REGULARISER_GROUPS)
    return next((k for k in keys if experiments[k]["cell"] == BASELINE and experiments[k]["config"] == target),
                None)


def constant_key(key: str, keys: list[str], experiments: dict[str, dict]) -> str | None:
    """The experiment among ``keys`` (the constant schedule's) that differs from ``key`` only in the schedule."""
    exp = experiments[key]
    target = strip_groups(exp["config"], ("schedule",))
    return next((k for k in keys if experiments[k]["cell"] == exp["cell"]
                 and strip_groups(experiments[k]["config"], ("schedule",)) == target), None)


def compare(tables: dict[str, dict[str, dict]], experiments: dict[str, dict], n_boot: int, boot_seed: int,
            records: Records) -> None:
    """Fill each regularised row's ``vs_none`` (ΔmIoU, paired bootstrap; ``baseline``: the label of its `none`
    row) and, under a ramped schedule, ``ramp_better`` (the columns that beat the constant schedule).
    ``tables``: {schedule: {key: row}}."""
    for schedule, rows in tables.items():
        keys = list(rows)
        for key, row in rows.items():
            if row["cell"] in UNREGULARISED:
                continue
            base = baseline_key(key, keys, experiments)
            row["vs_none"] = vs_none(counted_runs(experiments[key]),
                                     None if base is None else counted_runs(experiments[base]),
                                     records, n_boot, boot_seed)
            if base is not None:
                row["vs_none"]["baseline"] = rows[base]["label"]  # the `none` row it is compared with
            if schedule != CONSTANT and CONSTANT in tables:
                const = constant_key(key, list(tables[CONSTANT]), experiments)
                row["ramp_better"] = ramp_better(row, None if const is None else tables[CONSTANT][const])


def label_rows(experiments: dict[str, dict], statistics: str, loss_epoch: str) -> dict[str, dict[str, dict]]:
    """{schedule: {key: row}} of ``experiments``, each row labelled by the keys that tell it apart from the
    other experiments given (``differing_keys`` among those of its cell and schedule, ``report_wide_keys``)."""
    wide = report_wide_keys(experiments)
    tables: dict[str, dict[str, dict]] = {}
    for schedule, keys in schedule_tables(experiments).items():
        tables[schedule] = {}
        for key in keys:
            exp = experiments[key]
            same_cell = [experiments[k]["config"] for k in keys if experiments[k]["cell"] == exp["cell"]]
            distinguishing = differing_keys(same_cell) | wide[exp["cell"] == PRETRAINED_BASE]
            tables[schedule][key] = make_row(exp, distinguishing, exp["cell"] in UNREGULARISED, statistics,
                                             loss_epoch)
    return tables


def summarize(runs: Iterable[dict], n_boot: int = 2000, boot_seed: int = 0,
              records: Records | None = None, statistics: str = "image", loss_epoch: str = "best",
              incomplete: dict[str, list[dict]] | None = None) -> dict[str, list[dict]]:
    """{schedule: [row, ...]} in Table 2 order, one row per experiment with a counted run (see ``make_row`` for
    a row's fields), each regularised row compared with `none` (``vs_none``, ``n_boot`` resamples seeded by
    ``boot_seed``).

    Rows are labelled among the experiments that have a counted run only: a failed or running sweep beside
    finished runs changes no label. The experiments without one (every run failed, running, or without a best
    epoch) are no rows: their rows, labelled among all experiments, go to ``incomplete`` ({schedule: rows})
    when it is given, for the list of runs not counted.

    ``runs`` are results.json contents as ``load_runs`` returns them (checked, with ``path`` and ``dir``);
    ``records`` reads their per_image.npz (pass one to share what it read).
    """
    experiments = group_experiments(runs)
    counted = {key: exp for key, exp in experiments.items() if counted_runs(exp)}
    tables = label_rows(counted, statistics, loss_epoch)
    compare(tables, counted, n_boot, boot_seed, records or Records())
    if incomplete is not None:
        for schedule, rows in label_rows(experiments, statistics, loss_epoch).items():
            left = [row for key, row in rows.items() if key not in counted]
            if left:
                incomplete[schedule] = sorted(left, key=_order)
    return {schedule: sorted(rows.values(), key=_order) for schedule, rows in tables.items()}


# ---- report.md, report.csv, report.json --------------------------------------------------------------

def cell_text(column: str, mean: float | None, ci: float | None) -> str:
    """A column's value as the tables show it: mean ± the CI half-width (the best epoch as an epoch), – if
    missing."""
    if mean is None:
        return "–"
    if column != "best_epoch":
        return f"{mean:.4f}" + ("" if ci is None else f" ± {ci:.4f}")
    if ci is None:  # one run: its epoch as it is
        return f"{mean:g}"
    return f"{mean:.1f} ± {ci:.1f}"


def delta_text(vs: dict | None) -> str:
    """ΔmIoU vs none as the tables show it: Δ [CI], ▲/▼ where the CI excludes 0; – for a row without a
    regulariser, n/a where it could not be computed."""
    if vs is None:  # not a regularised row
        return "–"
    if vs["delta"] is None:
        return "n/a"
    lo, hi = vs["ci"]
    mark = (f" {UP}" if lo > 0 else f" {DOWN}") if vs["excludes_zero"] else ""
    return f"{vs['delta']:+.4f} [{lo:+.4f}, {hi:+.4f}]{mark}"


def marked_label(row: dict) -> str:
    """A row's label with its marks: † the same run(s) under every schedule, ‡ a ramp that ended below p."""
    return (row["label"] + (f" {MARK}" if row["every_schedule"] else "")
            + (f" {RAMP_MARK}" if row.get("ramp_incomplete") else ""))


def row_text(row: dict) -> str:
    """A row's label as a markdown table shows it (``marked_label``)."""
    return marked_label(row).replace("|", "\\|")


def format_row(row: dict, shown: tuple[str, ...] = COLUMN_SETS["paper"]) -> str:
    """One markdown table line of the columns ``shown``; those a ramp improved (over the constant schedule) in
    bold."""
    label = row_text(row)
    cols = [cell_text(c, *row["columns"][c]) for c in shown]
    cols = [f"**{text}**" if c in row["ramp_better"] else text for c, text in zip(shown, cols, strict=True)]
    status = ", ".join(f"{s}×{n}" for s, n in row["status"].items())
    return f"| {label} | {row['n']} | " + " | ".join(cols) + f" | {delta_text(row['vs_none'])} | {status} |"


def ramp_notes(rows: list[dict]) -> list[str]:
    """The ‡ lines of a table: ``‡ ramp incomplete: p reached 0.052 of 0.2``, one per distinct shortfall, naming
    its rows unless it is the only one."""
    groups: dict[str, list[str]] = {}
    for row in rows:
        short = row.get("ramp_incomplete")
        if short:
            lo, hi = (f"{v:.3g}" for v in short["reached"])
            reached = lo if lo == hi else f"{lo}–{hi}"
            groups.setdefault(f"p reached {reached} of {short['p']:g}", []).append(row["label"])
    if len(groups) == 1:
        return [f"{RAMP_MARK} ramp incomplete: {text}" for text in groups]
    return [f"{RAMP_MARK} ramp incomplete: {text} ({', '.join(labels)})" for text, labels in groups.items()]


def table_notes(rows: list[dict]) -> list[str]:
    """What a table's marks and gaps mean: †, ‡, duplicates counted once, Δ that could not be computed."""
    notes = [FOOTNOTE] if any(row["every_schedule"] for row in rows) else []
    notes += ramp_notes(rows)
    notes += [f"note: {row['label']}: seed {d['seed']} of {d['path']} ({d['status']}) is the same run as "
              f"{d['same_as']}, counted once" for row in rows for d in row["duplicates"]]
    notes += [f"note: {row['label']}: no Δ vs none: {row['vs_none']['reason']}" for row in rows
              if row["vs_none"] is not None and row["vs_none"]["delta"] is None]
    return notes


def _paper_text(column: str, ref: dict, comparable: list[str]) -> str:
    value = f"{ref['values'][column]:.2f}"
    if column not in comparable:
        return f"{value} ({NOT_COMPARABLE})"
    delta = ref["delta"][column]
    return value + ("" if delta is None else f" (Δ {delta:+.4f})")


def format_reference(rows: list[dict], reference: dict) -> list[str]:
    """The paper's table beside the rows it has (its value and Δ vs paper per column), with the n/c note;
    no lines when no row has one."""
    rows = [row for row in rows if "paper" in row]
    if not rows:
        return []
    out = [f"The paper's Table {rows[0]['paper']['table']} beside these rows: its value (Δ vs paper = ours − "
           "paper)", "", "| Experiment | " + " | ".join(COLUMNS[c] for c in paper.COLUMNS) + " |",
           "|---" * (len(paper.COLUMNS) + 1) + "|"]
    for row in rows:
        out.append(f"| {row_text(row)} | " + " | ".join(_paper_text(c, row["paper"], reference["comparable"])
                                                for c in paper.COLUMNS) + " |")
    return out + ([""] + [reference["note"]] if reference.get("note") else [])


def reference_line(reference: dict | None) -> str | None:
    """report.md's one line on the paper's tables: where they are shown, or why not (None: not asked about)."""
    if reference is None:
        return None
    if not reference["shown"]:
        return f"paper reference: not shown: {reference['reason']}"
    compared = ", ".join(COLUMNS[c] for c in reference["comparable"])
    tables = " and ".join(f"{t.number} ({t.schedule})" for t in paper.TABLES.values())
    return (f"paper reference: the paper's Tables {tables} under each table of that schedule; "
            f"Δ vs paper = ours − paper in {compared}, {NOT_COMPARABLE} where the paper's statistics "
            f"(over validation batches of {paper.BATCH_SIZE}) do not measure what ours do")


def format_table(table: dict[str, list[dict]], columns: str = "paper", reference: dict | None = None) -> str:
    """Markdown tables of the column set ``columns`` (COLUMN_SETS), one per schedule, with the notes and the
    paper's table beside them (when ``reference`` is shown)."""
    out, shown = [], COLUMN_SETS[columns]
    for schedule, rows in table.items():
        out.append(f"### schedule = {schedule}\n")
        out.append("| Experiment | runs | " + " | ".join(COLUMNS[c] for c in shown) + f" | {DELTA} | status |")
        out.append("|---" * (len(shown) + 4) + "|")
        out += [format_row(row, shown) for row in rows]
        notes = table_notes(rows)
        out += [""] + notes if notes else []
        beside = format_reference(rows, reference) if reference and reference["shown"] else []
        out += [""] + beside if beside else []
        out.append("")
    return "\n".join(out)


def not_counted(table: dict[str, list[dict]], unusable: list[dict],
                incomplete: dict[str, list[dict]] | None = None) -> list[dict]:
    """Every run that is in no column (failed, running, no best epoch) of the ``table``'s rows or of the
    ``incomplete`` rows (``summarize``'s experiments without a counted run), and every unreadable results.json."""
    seen, out = set(), []
    for schedule, rows in [*table.items(), *(incomplete or {}).items()]:
        for row in rows:
            for r in row["runs"]:
                if r["path"] in seen or (r["status"] == "completed" and r["seed"] in row["seeds"]):
                    continue
                seen.add(r["path"])
                out.append({"path": r["path"], "experiment": row["label"], "schedule": schedule,
                            "seed": r["seed"], "status": r["status"], "error": r.get("error"),
                            "eval": r.get("eval")})
    return out + unusable


def format_not_counted(runs: list[dict]) -> str:
    """The section listing the runs that are not in the tables, with their errors."""
    if not runs:
        return ""
    lines = ["\n### Failed or incomplete runs (not in the tables)\n", "| run | experiment | schedule | seed | status "
             "| error |", "|---|---|---|---|---|---|"]
    for r in runs:
        cells = [r["path"], r.get("experiment", "?"), r.get("schedule", "?"), r.get("seed", "?"), r["status"],
                 r.get("error") or "–"]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


EVAL_SEPARATOR = "; "  # between a row's eval commands in report.csv: the field pastes as one shell line
CSV_FIELDS = ["schedule", "experiment", "cell", "every_schedule", "n", "seeds",
              *[f"{c}{suffix}" for c in COLUMNS for suffix in ("", "_ci95")],
              "delta_miou", "delta_ci_low", "delta_ci_high", "delta_excludes_zero", "delta_method", "delta_note",
              "ramp_better", "status", "runs", "final_drop_p", "eval"]
# Added at the end when the paper's tables are shown: its table number, each column's value and Δ vs paper.
REFERENCE_FIELDS = ["paper_table", *[f"{kind}_{c}" for c in paper.COLUMNS for kind in ("paper", "delta_paper")]]


def csv_rows(table: dict[str, list[dict]]) -> list[dict]:
    """One flat row per experiment × schedule, every column of the tables (CIs and Δ included)."""
    out = []
    for schedule, rows in table.items():
        for row in rows:
            flat = {"schedule": schedule, "experiment": row["label"], "cell": row["cell"],
                    "every_schedule": row["every_schedule"], "n": row["n"],
                    "seeds": " ".join(map(str, row["seeds"])), "ramp_better": " ".join(row["ramp_better"]),
                    "status": " ".join(f"{s}={n}" for s, n in row["status"].items()),
                    "runs": " ".join(r["path"] for r in row["runs"]), "final_drop_p": row["final_drop_p"],
                    "eval": EVAL_SEPARATOR.join(r["eval"] for r in row["runs"] if r.get("eval"))}
            for c, (mean, ci) in row["columns"].items():
                flat[c], flat[f"{c}_ci95"] = mean, ci
            vs = row["vs_none"] or {}
            ci = vs.get("ci") or [None, None]
            flat.update(delta_miou=vs.get("delta"), delta_ci_low=ci[0], delta_ci_high=ci[1],
                        delta_excludes_zero=vs.get("excludes_zero"), delta_method=vs.get("method"),
                        delta_note=vs.get("reason"))
            if "paper" in row:
                ref = row["paper"]
                flat["paper_table"] = ref["table"]
                for c in paper.COLUMNS:
                    flat[f"paper_{c}"], flat[f"delta_paper_{c}"] = ref["values"][c], ref["delta"][c]
            out.append(flat)
    return out


def write_csv(path: Path, rows: list[dict], fields: list[str] = CSV_FIELDS) -> None:
    """``rows`` as CSV with the ``fields`` header (None as an empty field), written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: "" if v is None else v for k, v in row.items()} for row in rows])
    atomic_write(path, lambda f: f.write(buffer.getvalue().encode()))


STATISTICS_TEXT = {
    "image": "Mean/Std./Worst/Med./Best mIoU are over validation images",
    "batch": "Mean/Std./Worst/Med./Best mIoU are describe() (std ddof 1) over the mean mIoU of consecutive "
             "batches of trainer.batch_size validation images in list order, as the authors' notebook"}
LOSS_TEXT = {"best": "Loss is the validation loss",
             "min": "Loss is the lowest validation loss over the evaluated epochs, as the authors' notebook"}


def header(statistics: str = "image", loss_epoch: str = "best") -> str:
    """The paragraph under report.md's title: what the rows, columns and marks are."""
    return HEADER.format(statistics=STATISTICS_TEXT[statistics], loss=LOSS_TEXT[loss_epoch])


HEADER = ("Best epoch of each run (by its monitor). ± is a 95% t-interval over the seeds of one experiment; "
          "rows are experiments: runs whose resolved configs differ only in seed. {statistics}; {loss}. "
          f"{DELTA}: dataset mIoU minus that of `none` (same experiment without a regulariser), paired by seed "
          "and validation image, [95% bootstrap CI]; "
          f"{UP}/{DOWN}: the CI excludes 0. Bold (under a ramped schedule): better than the same experiment "
          "with the constant schedule, as the paper's Table 4. Pixel accuracy: correct valid pixels over all "
          "valid pixels.")




def eval_line(table: dict[str, list[dict]]) -> str:
    """report.md's line on where the commands that evaluate each run again are ('' when no run has one)."""
    if not any(r.get("eval") for rows in table.values() for row in rows for r in row["runs"]):
        return ""
    return ("\nEvaluate a run again: the command of each run with a best checkpoint is in report.csv's `eval` "
            "column and in report.json (`eval` of each run of a row).\n")


def figures_text(figures: list[Path], notes: list[str]) -> str:
    """report.md's figures: the notes on the ones not drawn, then each PNG (a PDF of it lies beside)."""
    text = "".join(f"\n{note}\n" for note in notes)
    if figures:
        text += "\nEach figure is also a vector PDF beside its PNG (same name, `.pdf`).\n"
    return text + "".join(f"\n![{p.stem}]({p.name})\n" for p in figures)


def write_report(root: Path, table: dict[str, list[dict]], missing: list[dict], figures: list[Path],
                 columns: str, bootstrap: dict, reference: dict | None = None, statistics: str = "image",
                 loss_epoch: str = "best", figure_notes: Iterable[str] = ()) -> str:
    """Write report.md (the column set ``columns``, the paper's tables if ``reference`` shows them, the figures
    linked, ``figure_notes`` on those not drawn), report.csv and report.json into ``root``; return the markdown
    text."""
    line = reference_line(reference)
    text = (f"# deeplab-dropout report: {root}\n" + ("" if line is None else f"{line}\n")
            + f"\n{header(statistics, loss_epoch)}\n\n"
            + format_table(table, columns, reference)
            + format_not_counted(missing)
            + eval_line(table)
            + figures_text(figures, list(figure_notes)))
    atomic_write(root / "report.md", lambda f: f.write(text.encode()))
    shown = reference is not None and reference["shown"]
    write_csv(root / "report.csv", csv_rows(table), CSV_FIELDS + REFERENCE_FIELDS if shown else CSV_FIELDS)
    write_json(root / "report.json", {"tables": table, "not_counted": missing, "figures": [p.name for p in figures],
                                      "bootstrap": bootstrap, **({} if reference is None else {"reference": reference}),
                                      **({} if (statistics, loss_epoch) == ("image", "best") else
                                         {"statistics": statistics, "loss_epoch": loss_epoch})})
    return text
