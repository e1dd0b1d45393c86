"""The paper's Tables 3 and 4 as data, and beside the report's rows: only for runs on VOC 2012, Δ vs paper only
in the columns that measure the same thing, a one-line note otherwise."""
from __future__ import annotations

import csv
import json
import statistics

import pytest
from test_report import fake_run

from deeplab_dropout.paper import COLUMNS, TABLE_3, TABLE_4, TABLES, comparable_columns
from deeplab_dropout.report import main, report
from deeplab_dropout.report.tables import CSV_FIELDS
from deeplab_dropout.study import TABLE_ORDER

FIGURE = "reference_vs_paper.png"


def test_tables_hold_the_papers_rows_and_values():
    assert TABLES["constant"] is TABLE_3 and TABLES["linear"] is TABLE_4
    assert (TABLE_3.number, TABLE_4.number) == (3, 4)
    for table in (TABLE_3, TABLE_4):
        assert len(table.rows) == 17 and list(table.rows) == list(TABLE_ORDER)
        assert all(list(values) == ["mean", "std", "min", "median", "max", "val_loss"]
                   for values in table.rows.values())
        assert table.rows["pretrained-base"]["max"] == 0.99
    # Typed again from the paper, independently of paper.py.
    assert TABLE_3.rows["all-chandrop"]["mean"] == 0.55
    assert TABLE_4.rows["all-chandrop"]["mean"] == 0.59 and TABLE_4.rows["all-chandrop"]["val_loss"] == 0.05
    assert TABLE_3.rows["resnet-dropblock"]["min"] == 0.21
    assert dict(TABLE_4.rows["upper-uout"]) == {"mean": 0.52, "std": 0.12, "min": 0.23, "median": 0.54,
                                                "max": 0.79, "val_loss": 0.06}


def test_comparable_columns_depend_on_the_statistics():
    assert comparable_columns() == comparable_columns("image") == ("mean",)
    assert comparable_columns("batch", "min") == COLUMNS
    assert comparable_columns("batch") == tuple(c for c in COLUMNS if c != "val_loss")
    with pytest.raises(ValueError, match="statistics='epoch' is invalid"):
        comparable_columns("epoch")


def voc_sweep(root) -> dict[tuple[str, str], list[float]]:
    """none, and two cells × two schedules (two seeds each) on VOC 2012; returns {(cell, schedule): means}."""
    means = {}
    fake_run(root, [], 0, 0.45)
    for cell in ("all-chandrop", "resnet-dropblock"):
        for schedule in ("constant", "linear"):
            values = [0.50, 0.56] if schedule == "constant" else [0.58, 0.61]
            for seed, v in enumerate(values):
                fake_run(root, [f"cell={cell}", f"schedule={schedule}"], seed, v)
            means[cell, schedule] = values
    return means


def reference_lines(report_md: str, schedule: str) -> dict[str, list[str]]:
    """{row label: its cells} of the paper's table under the table of ``schedule``."""
    part = report_md.split(f"### schedule = {schedule}")[1].split("### schedule")[0]
    beside = part.split("beside these rows")[1]
    rows = [line.strip("|").split("|") for line in beside.splitlines() if line.startswith("| ")]
    return {cells[0].strip().removesuffix(" †"): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_voc2012_report_shows_the_papers_tables_and_delta_vs_paper(tmp_path):
    means = voc_sweep(tmp_path)
    assert main([str(tmp_path), "--n-boot", "10"]) == 0
    report_md = (tmp_path / "report.md").read_text()
    assert "paper reference: the paper's Tables 3 (constant) and 4 (linear)" in report_md
    assert "The paper's Table 3 beside these rows" in report_md and "The paper's Table 4 beside" in report_md
    assert report_md.count("n/c: not comparable: the paper's Std.") == 2
    csv_rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    report_json = json.loads((tmp_path / "report.json").read_text())
    assert report_json["reference"]["shown"] and report_json["reference"]["comparable"] == ["mean"]
    for (cell, schedule), values in means.items():
        paper = {3: TABLE_3, 4: TABLE_4}[3 if schedule == "constant" else 4].rows[cell]
        delta = statistics.fmean(values) - paper["mean"]
        cells = reference_lines(report_md, schedule)[cell]
        assert cells[0] == f"{paper['mean']:.2f} (Δ {delta:+.4f})"
        assert cells[1:] == [f"{paper[c]:.2f} (n/c)" for c in ("std", "min", "median", "max", "val_loss")]
        [row] = [r for r in csv_rows if (r["cell"], r["schedule"]) == (cell, schedule)]
        assert float(row["paper_mean"]) == paper["mean"] and float(row["delta_paper_mean"]) == pytest.approx(delta)
        assert float(row["paper_std"]) == paper["std"] and row["delta_paper_std"] == ""
        [nested] = [r for r in report_json["tables"][schedule] if r["cell"] == cell]
        assert nested["paper"]["delta"]["mean"] == pytest.approx(delta) and nested["paper"]["delta"]["min"] is None
    # none is in both tables, against each table's own row.
    for schedule in ("constant", "linear"):
        assert reference_lines(report_md, schedule)["none"][0] == f"0.49 (Δ {0.45 - 0.49:+.4f})"
    header = (tmp_path / "report.csv").read_text().splitlines()[0].split(",")
    assert header[:len(CSV_FIELDS)] == CSV_FIELDS and header[len(CSV_FIELDS):][:3] == [
        "paper_table", "paper_mean", "delta_paper_mean"]
    assert (tmp_path / FIGURE).is_file() and FIGURE in report_json["figures"] and f"]({FIGURE})" in report_md

    (tmp_path / FIGURE).unlink()
    assert main([str(tmp_path), "--n-boot", "10", "--reference", "none"]) == 0
    report_md = (tmp_path / "report.md").read_text()
    assert "beside these rows" not in report_md and "n/c" not in report_md and "Δ vs paper" not in report_md
    assert "paper reference: not shown: reference: none" in report_md
    assert (tmp_path / "report.csv").read_text().splitlines()[0].split(",") == CSV_FIELDS
    report_json = json.loads((tmp_path / "report.json").read_text())
    assert not report_json["reference"]["shown"] and not (tmp_path / FIGURE).exists()
    assert all("paper" not in row for rows in report_json["tables"].values() for row in rows)


def test_generated_data_shows_no_reference_and_says_why(tmp_path):
    fake_run(tmp_path, ["data=synthetic"], 0, 0.4)
    fake_run(tmp_path, ["data=synthetic", "cell=all-chandrop"], 0, 0.5)
    assert main([str(tmp_path), "--n-boot", "10"]) == 0
    report_md = (tmp_path / "report.md").read_text()
    notes = [line for line in report_md.splitlines() if line.startswith("paper reference")]
    assert notes == ["paper reference: not shown: the runs are not VOC 2012 (data=synthetic)"]
    assert report_md.splitlines()[1] == notes[0] and "beside these rows" not in report_md
    assert (tmp_path / "report.csv").read_text().splitlines()[0].split(",") == CSV_FIELDS
    report_json = json.loads((tmp_path / "report.json").read_text())
    assert report_json["reference"] == {"shown": False, "reason": notes[0].split("not shown: ")[1]}
    assert not (tmp_path / FIGURE).exists()


def test_a_mixed_report_names_the_data_that_is_not_voc2012(tmp_path):
    fake_run(tmp_path, [], 0, 0.4)
    fake_run(tmp_path, ["data=voc2007"], 0, 0.5, cell="none")
    assert main([str(tmp_path), "--no-figures"]) == 0
    assert ("paper reference: not shown: the runs are not VOC 2012 (data=voc2007, data.year=2007)"
            in (tmp_path / "report.md").read_text())


def test_bad_reference_option_fails_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--reference", "table9"])
    assert exit_info.value.code == 2 and "--reference: invalid choice: 'table9'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="reference='table9' is invalid: expected one of paper, none"):
        report(tmp_path, reference="table9")

