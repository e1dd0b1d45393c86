"""`deeplab-dropout-report DIR`: every run's results.json under DIR as the paper's Table 3/4, per schedule.

Rows are experiments: the runs whose resolved configs differ only in seed (and in keys that don't change
what is computed). A row shows each column's mean and 95% t-interval over the seeds of that one
experiment; two runs of one experiment with the same seed count once. A run without a regulariser
(`none`, `pretrained-base`) is the same experiment under every schedule, so it is shown in every table.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from deeplab_dropout.results import BEST, RESUME_FREE_KEYS, flatten, write_json

TABLE2_ORDER = ["pretrained-base", "none"] + [
    f"{where}-{kind}" for kind in ("chandrop", "dropblock", "uout")
    for where in ("resnet", "spp", "decoder", "upper", "all")]
# Cells without a regulariser: their dropout, placement and schedule groups change nothing computed.
UNREGULARISED = ("none", "pretrained-base")
REGULARISER_GROUPS = ("dropout", "placement", "schedule")
# Keys (and key prefixes) that never tell two experiments apart: they don't change what is computed.
IGNORED_KEYS = ("seed", *RESUME_FREE_KEYS, "trainer.tb_images", "trainer.tb_image_classes",
                "trainer.keep_last", "data.download", "checkpoint", "hydra")
# Two-sided 95% Student t quantiles for 1..30 degrees of freedom (beyond: the normal 1.96).
T95 = [12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
       2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
       2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272]
# Column key in report.json -> the paper's column name (Table 3/4), then ours.
COLUMNS = {"mean": "Mean mIoU", "std": "Std.", "min": "Worst mIoU", "median": "Med. mIoU", "max": "Best mIoU",
           "val_loss": "Loss", "miou": "mIoU (dataset)", "best_epoch": "Best epoch"}
PER_IMAGE = ("mean", "std", "min", "median", "max")
MARK = "†"
FOOTNOTE = f"{MARK} the same run(s) in every table: without a regulariser the schedule changes nothing"
ABSENT = "(unset)"


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def experiment_config(config: dict, cell: str) -> dict[str, Any]:
    """The flat resolved config that defines a run's experiment (no seed, nor keys that change nothing)."""
    ignored = IGNORED_KEYS + (REGULARISER_GROUPS if cell in UNREGULARISED else ())
    return {k: v for k, v in sorted(flatten(config).items()) if not _under(k, ignored)}


def experiment_key(config: dict, cell: str) -> str:
    """One string per experiment: equal for runs that compute the same thing up to the seed."""
    return f"{cell}|{json.dumps(experiment_config(config, cell), sort_keys=True)}"


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
    if not isinstance(per_image, dict) or not all(_number(per_image.get(k, "")) for k in PER_IMAGE):
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


def load_runs(root: Path) -> list[dict]:
    """Every usable results.json below ``root``, with ``path`` (its folder relative to ``root``) added.

    Unreadable or odd files are skipped with a warning on stderr, so one bad run never hides the others.
    """
    root = Path(root)
    runs = []
    for path in sorted(root.rglob("results.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            print(f"warning: skipping {path}: {e}", file=sys.stderr)
            continue
        problem = check_run(data)
        if problem is not None:
            print(f"warning: skipping {path}: {problem}", file=sys.stderr)
            continue
        data["path"] = str(path.parent.relative_to(root))
        data["eval"] = eval_command(path.parent)
        runs.append(data)
    return runs


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% t-interval (None for a single value)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, None
    t = T95[len(values) - 2] if len(values) - 1 <= len(T95) else 1.96
    return m, t * statistics.stdev(values) / math.sqrt(len(values))


def best_values(run: dict) -> dict[str, float | None] | None:
    """The table's columns from a completed run's best epoch (None when it has none to count)."""
    best = run.get("best")
    if run["status"] != "completed" or best is None:
        return None
    values = {**{k: best["per_image_miou"][k] for k in PER_IMAGE}, "val_loss": best["val_loss"],
              "miou": best["miou"], "best_epoch": run["best_epoch"]}
    # An undefined metric (NaN, written as null) is left out of that column, not averaged in.
    return {k: v if v is not None and math.isfinite(v) else None for k, v in values.items()}


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
        configs = [e["config"] for e in experiments.values() if (e["cell"] == "pretrained-base") == family]
        wide[family] = everywhere | differing_keys(configs, lambda k: outside(k) and _under(k, ("model",)))
    return wide


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def make_row(exp: dict, keys: set[str], every_schedule: bool) -> dict:
    """A table row: label, the distinguishing key values, seeds, runs, duplicates, columns, status counts."""
    shown = {k: exp["config"].get(k, ABSENT) for k in sorted(keys)}
    listed = ", ".join(f"{k}={_show(v)}" for k, v in shown.items())
    label = exp["cell"] + (f" [{listed}]" if shown else "")
    counted = [(r, v) for r in exp["runs"] if (v := best_values(r)) is not None]
    columns = {}
    for c in COLUMNS:
        values = [v[c] for _, v in counted if v[c] is not None]
        columns[c] = list(mean_ci(values)) if values else [None, None]
    status: dict[str, int] = {}
    for r in exp["runs"]:
        status[r["status"]] = status.get(r["status"], 0) + 1
    return {"label": label, "cell": exp["cell"], "every_schedule": every_schedule, "keys": shown,
            "n": len(counted), "seeds": [r["config"]["seed"] for r, _ in counted],
            "runs": [{"path": r["path"], "seed": r["config"]["seed"], "status": r["status"],
                      "eval": r.get("eval")} for r in exp["runs"]],
            "duplicates": exp["duplicates"], "columns": columns, "status": dict(sorted(status.items()))}


def _order(row: dict) -> tuple[int, str]:
    cell = row["cell"]
    return (TABLE2_ORDER.index(cell) if cell in TABLE2_ORDER else len(TABLE2_ORDER), row["label"])


def summarize(runs: Iterable[dict]) -> dict[str, list[dict]]:
    """{schedule: [row, ...]} in Table 2 order, one row per experiment (see ``make_row`` for a row's fields).

    ``runs`` are results.json contents as ``load_runs`` returns them (checked, with ``path``).
    """
    experiments = group_experiments(runs)
    wide = report_wide_keys(experiments)
    table = {}
    for schedule, keys in schedule_tables(experiments).items():
        rows = []
        for key in keys:
            exp = experiments[key]
            same_cell = [experiments[k]["config"] for k in keys if experiments[k]["cell"] == exp["cell"]]
            distinguishing = differing_keys(same_cell) | wide[exp["cell"] == "pretrained-base"]
            rows.append(make_row(exp, distinguishing, every_schedule=exp["cell"] in UNREGULARISED))
        table[schedule] = sorted(rows, key=_order)
    return table


def _cell_text(column: str, mean: float | None, ci: float | None) -> str:
    if mean is None:
        return "–"
    if column != "best_epoch":
        return f"{mean:.4f}" + ("" if ci is None else f" ± {ci:.4f}")
    if ci is None:  # one run: its epoch as it is
        return f"{mean:g}"
    return f"{mean:.1f} ± {ci:.1f}"


def format_row(row: dict) -> str:
    """One markdown table line."""
    label = (row["label"] + (f" {MARK}" if row["every_schedule"] else "")).replace("|", "\\|")
    cols = [_cell_text(c, *row["columns"][c]) for c in COLUMNS]
    status = ", ".join(f"{s}×{n}" for s, n in row["status"].items())
    return f"| {label} | {row['n']} | " + " | ".join(cols) + f" | {status} |"


def format_table(table: dict[str, list[dict]]) -> str:
    """Markdown tables, one per schedule, with the footnote and duplicate notes under each."""
    out = []
    for schedule, rows in table.items():
        out.append(f"### schedule = {schedule}\n")
        out.append("| Experiment | runs | " + " | ".join(COLUMNS.values()) + " | status |")
        out.append("|---" * (len(COLUMNS) + 3) + "|")
        out += [format_row(row) for row in rows]
        notes = [FOOTNOTE] if any(row["every_schedule"] for row in rows) else []
        notes += [f"note: {row['label']}: seed {d['seed']} of {d['path']} ({d['status']}) is the same run as "
                  f"{d['same_as']}, counted once" for row in rows for d in row["duplicates"]]
        out += [""] + notes if notes else []
        commands = [f"- {row['label']}, seed {r['seed']}: `{r['eval']}`" for row in rows for r in row["runs"]
                    if r.get("eval")]
        out += ["", "Evaluate a run again:", ""] + commands if commands else []
        out.append("")
    return "\n".join(out)


HEADER = ("Best epoch of each run (by its monitor). ± is a 95% t-interval over the seeds of one experiment; "
          "rows are experiments: runs whose resolved configs differ only in seed. Mean/Std./Worst/Med./Best "
          "mIoU are over validation images; Loss is the validation loss.")


def report(root: Path) -> str:
    """Build the report of ``root``, write report.md and report.json there, return the text."""
    root = Path(root)
    runs = load_runs(root)
    if not runs:
        found = root.is_dir() and any(root.rglob("results.json"))
        raise FileNotFoundError(f"no usable results.json under {root} (see the warnings)" if found
                                else f"no results.json under {root}")
    table = summarize(runs)
    text = f"# deeplab-dropout report: {root}\n\n{HEADER}\n\n" + format_table(table)
    (root / "report.md").write_text(text)
    write_json(root / "report.json", table)
    return text


class ReportCallback(Callback):
    """At the end of a multirun: print the report and where to point TensorBoard."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            print(report(sweep_dir))
        except FileNotFoundError:
            return
        print(f"results: {sweep_dir}/*/results.json  report: {sweep_dir / 'report.md'}")
        print(f"tensorboard --logdir {sweep_dir}")


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    parser = argparse.ArgumentParser(prog="deeplab-dropout-report", description=__doc__)
    parser.add_argument("dir", type=Path, help="a run or sweep directory (searched recursively)")
    args = parser.parse_args(argv)
    try:
        print(report(args.dir))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
