"""`deeplab-dropout-report DIR`: every run's results.json under DIR as the paper's Table 3/4, per schedule.

Rows follow Table 2; with several seeds a cell shows the mean and a 95% t-interval over seeds.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from deeplab_dropout.results import write_json

TABLE2_ORDER = ["none"] + [f"{where}-{kind}" for kind in ("chandrop", "dropblock", "uout")
                           for where in ("resnet", "spp", "decoder", "upper", "all")]
# Two-sided 95% Student t quantiles for 1..30 degrees of freedom (beyond: the normal 1.96).
T95 = [12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
       2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
       2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272]
COLUMNS = ("miou", "mean", "std", "min", "median", "max")


def load_runs(root: Path) -> list[dict]:
    """Every results.json below ``root`` (unreadable ones are reported and skipped)."""
    runs = []
    for path in sorted(Path(root).rglob("results.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"warning: skipping {path}: {e}", file=sys.stderr)
            continue
        data["path"] = str(path.parent)
        runs.append(data)
    return runs


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% t-interval (None for a single value)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, None
    t = T95[len(values) - 2] if len(values) - 1 <= len(T95) else 1.96
    return m, t * statistics.stdev(values) / math.sqrt(len(values))


def summarize(runs: list[dict]) -> dict:
    """{schedule: {cell: {n, status, columns: {name: [mean, ci]}}}} from the best epoch of each run."""
    table: dict[str, dict[str, dict]] = {}
    for run in runs:
        schedule = run["config"]["schedule"]["name"]
        row = table.setdefault(schedule, {}).setdefault(run["cell"], {"runs": [], "status": []})
        row["status"].append(run["status"])
        if run.get("best"):
            best = run["best"]
            row["runs"].append({"miou": best["miou"], **best["per_image_miou"], "epoch": run["best_epoch"]})
    for rows in table.values():
        for row in rows.values():
            row["n"] = len(row["runs"])
            row["columns"] = {c: mean_ci([r[c] for r in row["runs"]]) if row["runs"] else (None, None)
                              for c in COLUMNS}
    return table


def format_table(table: dict) -> str:
    """Markdown tables, one per schedule, cells in Table 2 order."""
    out = []
    for schedule in sorted(table):
        rows = table[schedule]
        out.append(f"### schedule = {schedule}\n")
        out.append("| cell | runs | mIoU (dataset) | per-image mean | std | min | median | max | status |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for cell in sorted(rows, key=lambda c: (TABLE2_ORDER.index(c) if c in TABLE2_ORDER else 99, c)):
            row = rows[cell]
            cols = []
            for c in COLUMNS:
                m, ci = row["columns"][c]
                cols.append("–" if m is None else f"{m:.4f}" + (f" ± {ci:.4f}" if ci is not None else ""))
            status = ", ".join(f"{s}×{row['status'].count(s)}" for s in sorted(set(row["status"])))
            out.append(f"| {cell} | {row['n']} | " + " | ".join(cols) + f" | {status} |")
        out.append("")
    return "\n".join(out)


def report(root: Path) -> str:
    """Build the report of ``root``, write report.md and report.json there, return the text."""
    root = Path(root)
    runs = load_runs(root)
    if not runs:
        raise FileNotFoundError(f"no results.json under {root}")
    table = summarize(runs)
    text = f"# deeplab-dropout report: {root}\n\nBest epoch of each run (by its monitor); ± is a 95% " \
           f"t-interval over seeds.\n\n" + format_table(table)
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
    except (FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
