"""deeplab-dropout-report: Table 3/4 rows from results.json files, mean ± 95% t-interval over seeds."""
from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest

from deeplab_dropout.report import TABLE2_ORDER, main, summarize
from deeplab_dropout.results import write_json


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t, by bisection on the numerically integrated density."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))

    def cdf(t: float) -> float:
        x = np.linspace(0.0, t, 100_001)
        return 0.5 + np.trapezoid(c * (1 + x**2 / df) ** (-(df + 1) / 2), x)

    lo, hi = 0.0, 20.0
    for _ in range(50):
        lo, hi = ((lo + hi) / 2, hi) if cdf((lo + hi) / 2) < 0.975 else (lo, (lo + hi) / 2)
    return (lo + hi) / 2


def fake_run(root, cell: str, schedule: str, seed: int, miou: float, status: str = "completed") -> None:
    per_image = {"mean": miou + 0.1, "std": 0.2, "min": 0.0, "median": miou, "max": 1.0}
    best = {"epoch": 3, "miou": miou, "per_image_miou": per_image}
    write_json(root / f"cell={cell},schedule={schedule},seed={seed}" / "results.json", {
        "status": status, "cell": cell, "config": {"schedule": {"name": schedule}, "seed": seed},
        "best_epoch": 3, "best": best, "history": [best]})


def test_seeds_give_mean_and_t_interval(tmp_path):
    values = [0.41, 0.47, 0.44]
    for seed, v in enumerate(values):
        fake_run(tmp_path, "spp-chandrop", "linear", seed, v)
    fake_run(tmp_path, "none", "linear", 0, 0.3)
    table = summarize(json.loads(p.read_text()) for p in tmp_path.rglob("results.json"))
    mean, ci = table["linear"]["spp-chandrop"]["columns"]["miou"]
    assert mean == pytest.approx(statistics.fmean(values))
    assert ci == pytest.approx(t_quantile_975(2) * statistics.stdev(values) / math.sqrt(3), rel=1e-6)
    assert table["linear"]["none"]["columns"]["miou"] == (0.3, None)
    assert table["linear"]["spp-chandrop"]["n"] == 3


def test_report_orders_rows_like_table2_and_writes_files(tmp_path, capsys):
    for cell in ("all-uout", "none", "resnet-chandrop"):
        for schedule in ("constant", "linear"):
            fake_run(tmp_path, cell, schedule, 0, 0.5)
    fake_run(tmp_path, "upper-dropblock", "constant", 0, 0.5, status="failed")
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "### schedule = constant" in out and "### schedule = linear" in out
    constant = out.split("### schedule = linear")[0]
    rows = [line.split("|")[1].strip() for line in constant.splitlines() if line.startswith("| ") and "cell" not in line]
    assert rows == sorted(rows, key=TABLE2_ORDER.index)
    assert "failed×1" in out
    assert (tmp_path / "report.md").read_text() + "\n" == out
    assert "constant" in json.loads((tmp_path / "report.json").read_text())


def test_empty_dir_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: no results.json")
