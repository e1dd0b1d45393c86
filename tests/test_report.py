"""deeplab-dropout-report: rows are experiments (configs equal up to the seed), mean ± 95% t-interval
over the seeds of one experiment.

The results.json fixtures carry the real composed config, so the grouping is tested on what runs write.
"""
from __future__ import annotations

import copy
import csv
import functools
import json
import math
import shlex
import statistics
import subprocess
import sys

import numpy as np
import pytest
from conftest import compose_cfg
from omegaconf import OmegaConf

from deeplab_dropout.report import ReportCallback, load_runs, main, summarize
from deeplab_dropout.results import write_json
from deeplab_dropout.saved_config import experiment_key
from deeplab_dropout.study import TABLE_ORDER

PAPER_COLUMNS = ["Experiment", "runs", "Mean mIoU", "Std.", "Worst mIoU", "Med. mIoU", "Best mIoU", "Loss",
                 "mIoU (dataset)", "Best epoch", "ΔmIoU vs none [95% CI]", "status"]


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


@functools.cache
def resolved_config(overrides: tuple[str, ...], config_name: str) -> dict:
    """The resolved config a run with these overrides writes (composed once per override set)."""
    return OmegaConf.to_container(compose_cfg(list(overrides), config_name=config_name), resolve=True)


def metrics(v: float) -> dict:
    """A best-epoch entry whose every column is a different function of ``v``."""
    per_image = {"mean": v, "std": v / 4, "min": v - 0.2, "median": v + 0.01, "max": v + 0.3}
    return {"miou": v - 0.05, "val_loss": 1 - v, "pixel_acc": 0.5 + v / 2, "per_image_miou": per_image}


def fake_run(root, overrides: list[str], seed: int = 0, v: float | None = 0.5, *, cell: str | None = None,
             status: str = "completed", epoch: int = 3, folder: str | None = None,
             config_name: str = "train", extra: dict | None = None) -> str:
    """Write a results.json as a run with these overrides would (plus the top-level keys ``extra``); returns its
    folder name."""
    config = copy.deepcopy(resolved_config(tuple(overrides), config_name))
    config["seed"] = seed
    if cell is None:
        cell = next((o.split("=", 1)[1] for o in overrides if o.startswith("cell=")), "none")
    folder = folder or ",".join([*overrides, f"seed={seed}"])
    best = None if v is None else {"epoch": epoch, **metrics(v)}
    write_json(root / folder / "results.json", {
        "status": status, "cell": cell, "config": config, "best_epoch": None if v is None else epoch,
        "best": best, "history": [] if best is None else [best], **(extra or {})})
    return folder


def rows_of(table: dict, schedule: str, cell: str) -> list[dict]:
    return [row for row in table[schedule] if row["cell"] == cell]


def test_seeds_give_mean_and_t_interval(tmp_path):
    values, epochs = [0.41, 0.47, 0.44], [3, 7, 5]
    for seed, (v, epoch) in enumerate(zip(values, epochs, strict=True)):
        fake_run(tmp_path, ["cell=spp-chandrop", "schedule=linear"], seed, v, epoch=epoch)
    fake_run(tmp_path, ["schedule=linear"], 0, 0.3)
    table = summarize(load_runs(tmp_path))
    [row] = rows_of(table, "linear", "spp-chandrop")
    assert (row["label"], row["n"], row["seeds"]) == ("spp-chandrop", 3, [0, 1, 2])
    t = t_quantile_975(2)
    for column, of in [("mean", lambda v: v), ("min", lambda v: v - 0.2), ("val_loss", lambda v: 1 - v),
                       ("miou", lambda v: v - 0.05)]:
        expected = [of(v) for v in values]
        mean, ci = row["columns"][column]
        assert mean == pytest.approx(statistics.fmean(expected))
        assert ci == pytest.approx(t * statistics.stdev(expected) / math.sqrt(3), rel=1e-6)
    mean, ci = row["columns"]["best_epoch"]
    assert mean == pytest.approx(5) and ci == pytest.approx(t * 2 / math.sqrt(3), rel=1e-6)
    [none] = rows_of(table, "linear", "none")
    assert none["columns"]["mean"] == [0.3, None] and none["n"] == 1


def test_runs_differing_in_dropout_p_are_two_rows(tmp_path, capsys):
    groups = {"0.2": [0.40, 0.44], "0.5": [0.60, 0.66]}
    for p, values in groups.items():
        for seed, v in enumerate(values):
            fake_run(tmp_path, ["cell=all-chandrop", f"dropout.p={p}"], seed, v)
    table = summarize(load_runs(tmp_path))
    rows = {row["label"]: row for row in rows_of(table, "constant", "all-chandrop")}
    assert set(rows) == {"all-chandrop [dropout.p=0.2]", "all-chandrop [dropout.p=0.5]"}
    for p, values in groups.items():
        row = rows[f"all-chandrop [dropout.p={p}]"]
        assert row["n"] == 2 and row["keys"] == {"dropout.p": float(p)}
        assert row["columns"]["mean"][0] == pytest.approx(statistics.fmean(values))
    assert main([str(tmp_path), "--no-figures"]) == 0
    assert "| all-chandrop [dropout.p=0.5] | 2 | 0.6300 ± " in capsys.readouterr().out


def test_backbones_are_never_one_row_and_columns_are_the_papers(tmp_path, capsys):
    r18 = ["model=deeplabv3plus_resnet18"]
    fake_run(tmp_path, [], 0, 0.4)
    fake_run(tmp_path, r18, 0, 0.3)
    fake_run(tmp_path, ["cell=spp-uout"], 0, 0.5)
    fake_run(tmp_path, ["cell=all-chandrop", *r18], 0, 0.35)
    table = summarize(load_runs(tmp_path))
    labels = {row["label"] for row in table["constant"]}
    assert labels == {"none [model.backbone=resnet101, model.name=deeplabv3plus_resnet101]",
                      "none [model.backbone=resnet18, model.name=deeplabv3plus_resnet18]",
                      "spp-uout [model.backbone=resnet101, model.name=deeplabv3plus_resnet101]",
                      "all-chandrop [model.backbone=resnet18, model.name=deeplabv3plus_resnet18]"}
    assert all(row["n"] == 1 for row in table["constant"])
    assert main([str(tmp_path), "--no-figures"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| Experiment"))
    assert [c.strip() for c in header.strip("|").split("|")] == PAPER_COLUMNS


def test_course_columns_show_pixel_accuracy_and_miou(tmp_path, capsys):
    for seed, v in enumerate((0.4, 0.6)):
        fake_run(tmp_path, ["cell=spp-uout"], seed, v)
    fake_run(tmp_path, [], 0, 0.3)
    assert main([str(tmp_path), "--no-figures", "--columns", "course"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("| Experiment"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "Experiment", "runs", "Pixel accuracy", "mIoU (dataset)", "Loss", "Best epoch", "ΔmIoU vs none [95% CI]",
        "status"]
    row = next(line for line in lines if line.startswith("| spp-uout"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    half = 12.706 * statistics.stdev([0.7, 0.8]) / math.sqrt(2)  # t(0.975, 1 df) · s / √n
    assert cells[2] == f"{0.75:.4f} ± {half:.4f}" and cells[3].startswith(f"{0.45:.4f} ± ")
    csv_header = (tmp_path / "report.csv").read_text().splitlines()[0].split(",")
    assert {"pixel_acc", "mean", "std"} <= set(csv_header)  # the csv keeps every column
    with pytest.raises(ValueError, match="columns='table5' is invalid: expected one of paper, course"):
        ReportCallback(columns="table5")


def test_rows_that_differ_in_many_keys_are_labelled_by_their_sweep_folder(tmp_path):
    many = ["optim=adamw", "data.flip_p=0.1", "data.blur_p=0.1", "loss.class_weights=inverse_frequency"]
    for seed in (0, 1):
        fake_run(tmp_path, many, seed, 0.4 + seed / 10, folder=f"recipe=heavy,seed={seed}")
    fake_run(tmp_path, [], 0, 0.3, folder="recipe=plain,seed=0")
    fake_run(tmp_path, ["data.flip_p=0.1"], 0, 0.3, folder="recipe=flip")
    rows = summarize(load_runs(tmp_path))["constant"]
    labels = {row["label"]: row for row in rows}  # the cell's rows differ in 5 keys: each labelled by its folder
    assert set(labels) == {"none [recipe=heavy]", "none [recipe=plain]", "none [recipe=flip]"}
    heavy = labels["none [recipe=heavy]"]
    assert heavy["n"] == 2 and {"data.flip_p", "data.blur_p", "optim.name"} <= set(heavy["keys"])


def test_none_is_one_run_shown_under_every_schedule(tmp_path, capsys):
    fake_run(tmp_path, ["schedule=constant"], 0, 0.4)
    fake_run(tmp_path, ["cell=spp-uout", "schedule=constant"], 0, 0.5)
    fake_run(tmp_path, ["cell=spp-uout", "schedule=linear"], 0, 0.55)
    table = summarize(load_runs(tmp_path))
    assert list(table) == ["constant", "linear"]
    for schedule in table:
        [none] = rows_of(table, schedule, "none")
        assert none["every_schedule"] and none["n"] == 1 and none["label"] == "none"
        assert [r["path"] for r in none["runs"]] == ["schedule=constant,seed=0"]
        assert [row["n"] for row in rows_of(table, schedule, "spp-uout")] == [1]
    assert main([str(tmp_path), "--no-figures"]) == 0
    out = capsys.readouterr().out
    for part in out.split("### schedule = ")[1:]:
        assert "| none † | 1 | 0.4000 |" in part
        assert "† the same run(s) in every table" in part


def test_same_seed_under_two_schedules_counts_once(tmp_path, capsys):
    kept0 = fake_run(tmp_path, ["schedule=constant"], 0, 0.40)
    dup0 = fake_run(tmp_path, ["schedule=linear"], 0, 0.90)
    dup1 = fake_run(tmp_path, ["schedule=constant"], 1, None, status="failed")
    kept1 = fake_run(tmp_path, ["schedule=linear"], 1, 0.46)
    table = summarize(load_runs(tmp_path))
    assert list(table) == ["constant", "linear"]  # only unregularised runs: their own schedules
    for schedule in table:
        [row] = table[schedule]
        assert row["n"] == 2 and row["seeds"] == [0, 1] and row["status"] == {"completed": 2}
        assert row["columns"]["mean"][0] == pytest.approx(0.43)
        assert [r["path"] for r in row["runs"]] == [kept0, kept1]
        assert {(d["path"], d["same_as"]) for d in row["duplicates"]} == {(dup0, kept0), (dup1, kept1)}
    assert main([str(tmp_path), "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert f"seed 0 of {dup0} (completed) is the same run as {kept0}, counted once" in out
    report_json = json.loads((tmp_path / "report.json").read_text())
    assert {d["path"] for d in report_json["tables"]["linear"][0]["duplicates"]} == {dup0, dup1}


def test_report_orders_rows_like_table2_and_writes_files(tmp_path, capsys):
    fake_run(tmp_path, ["model=torchvision_deeplabv3_resnet101"], 0, 0.8, cell="pretrained-base",
             config_name="eval", folder="eval-pretrained-base")
    fake_run(tmp_path, [], 0, 0.5)
    for cell in ("all-uout", "resnet-chandrop"):
        for schedule in ("constant", "linear"):
            fake_run(tmp_path, [f"cell={cell}", f"schedule={schedule}"], 0, 0.5)
    fake_run(tmp_path, ["cell=upper-dropblock", "schedule=constant"], 0, None, status="failed")
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "### schedule = constant" in out and "### schedule = linear" in out
    # VOC 2012 runs: the paper's Table 3 follows the table, its rows in the same order.
    constant, beside = out.split("### schedule = linear")[0].split("The paper's Table 3 beside these rows")

    def labels(text: str) -> list[str]:
        return [line.split("|")[1].strip().removesuffix(" †") for line in text.splitlines()
                if line.startswith("| ") and "Experiment" not in line]

    rows = labels(constant)
    # The COCO model differs from ours in model.*: its cell name says so, no row needs a key list. The failed
    # experiment is no row: it is listed with the runs not counted.
    assert rows == ["pretrained-base", "none", "resnet-chandrop", "all-uout"]
    assert rows == sorted(rows, key=TABLE_ORDER.index)
    assert labels(beside) == rows
    failed = out.split("### Failed or incomplete runs")[1]
    assert "| cell=upper-dropblock,schedule=constant,seed=0 | upper-dropblock | constant | 0 | failed |" in failed
    assert (tmp_path / "report.md").read_text() + "\n" == out
    # Runs without per-image records, class IoU or predictions: the plots that have data, no image sheet.
    # No per_image.npz: no Δ vs none, so no Δ plot but a note saying so.
    pngs = {"curves_constant.png", "curves_linear.png", "reference_vs_paper.png"}
    assert {p.name for p in tmp_path.glob("*.png")} == pngs
    assert "Not drawn: delta_vs_none.png: no ΔmIoU vs none could be computed" in out
    assert {p.name for p in tmp_path.glob("*.pdf")} == {name.replace(".png", ".pdf") for name in pngs}
    report_json = json.loads((tmp_path / "report.json").read_text())
    assert [row["label"] for row in report_json["tables"]["linear"]] == ["pretrained-base", "none", "resnet-chandrop",
                                                                "all-uout"]


def test_odd_results_json_is_skipped_with_a_warning(tmp_path, capsys):
    fake_run(tmp_path, ["cell=spp-uout"], 0, 0.5)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    write_json(tmp_path / "no-config" / "results.json", {"status": "completed", "cell": "none"})
    odd = fake_run(tmp_path, ["cell=spp-uout"], 1, 0.5)
    data = json.loads((tmp_path / odd / "results.json").read_text())
    data["best"]["per_image_miou"] = "0.5"
    write_json(tmp_path / odd / "results.json", data)
    assert main([str(tmp_path), "--no-figures"]) == 0
    captured = capsys.readouterr()
    warnings = captured.err.splitlines()
    assert len(warnings) == 3 and all(w.startswith("warning: skipping ") for w in warnings)
    assert all(any(name in w for w in warnings) for name in ("broken", "no-config", odd))
    assert "| spp-uout | 1 |" in captured.out


def test_experiment_key_ignores_seed_and_the_schedule_of_unregularised_runs():
    def key(*overrides: str, seed: int = 0) -> str:
        config = copy.deepcopy(resolved_config(tuple(overrides), "train"))
        config["seed"] = seed
        return experiment_key(config, next((o[5:] for o in overrides if o.startswith("cell=")), "none"))

    assert key("schedule=constant") == key("schedule=linear", seed=3) == key("data.root=/elsewhere")
    assert key("cell=spp-uout", "schedule=constant") != key("cell=spp-uout", "schedule=linear")
    assert key("cell=spp-uout") == key("cell=spp-uout", "trainer.num_workers=0", seed=1)
    assert key("cell=spp-uout") != key("cell=spp-uout", "dropout.p=0.5")
    assert key() != key("model=deeplabv3plus_resnet18")


def test_empty_dir_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path), "--no-figures"]) == 2
    assert capsys.readouterr().err.startswith("error: no results.json")


def test_each_run_with_a_best_checkpoint_gets_a_pasteable_eval_command(tmp_path, capsys):
    kept = fake_run(tmp_path, ["cell=spp-uout", "schedule=constant"], 0, 0.5)
    fake_run(tmp_path, ["cell=spp-uout", "schedule=constant"], 1, 0.6)  # no checkpoint: no command
    (tmp_path / kept / "checkpoints").mkdir()
    (tmp_path / kept / "checkpoints/best.pt").write_bytes(b"")
    assert main([str(tmp_path), "--no-figures"]) == 0
    row = json.loads((tmp_path / "report.json").read_text())["tables"]["constant"][0]
    commands = {r["seed"]: r["eval"] for r in row["runs"]}
    assert commands[1] is None
    assert shlex.split(commands[0]) == ["deeplab-dropout-eval", str((tmp_path / kept).resolve())]
    with open(tmp_path / "report.csv", newline="") as f:
        [flat] = list(csv.DictReader(f))
    assert flat["eval"] == commands[0]  # the run without a checkpoint has none
    out = capsys.readouterr().out
    assert "report.csv's `eval` column" in out and commands[0] not in out


def test_help_says_what_it_reads_and_writes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: deeplab-dropout-report")
    for name in ("results.json", "per_image.npz", "report.md", "report.csv", "report.json", "report.tex",
                 "report_tables.tex", "delta_vs_none.png", "curves_<schedule>.png", "class_iou_delta_<schedule>.png",
                 "sheet_<type>_<schedule>.png", "PDF", "deeplab-dropout-report outputs/demo", "--n-boot", "--sheets"):
        assert name in out, name


def test_bad_report_options_fail_in_one_line(tmp_path, capsys):
    fake_run(tmp_path, ["cell=spp-uout"], 0, 0.5)
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--n-boot", "0"])
    assert exit_info.value.code == 2 and "--n-boot=0 is invalid" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"sheets=\['blocks'\] is invalid: expected types among chandrop"):
        ReportCallback(sheets=["blocks"])
    assert not (tmp_path / "report.md").exists()


def test_symlinked_run_folders_are_read_once_each(tmp_path, capsys):
    runs = tmp_path / "runs"
    fake_run(runs, [], 0, 0.4, folder="a")
    fake_run(runs, ["cell=spp-uout"], 0, 0.5, folder="b")
    cmp = tmp_path / "cmp"
    cmp.mkdir()
    (cmp / "none").symlink_to(runs / "a")  # ln -s RUN_DIR cmp/name
    (cmp / "spp").symlink_to(runs / "b")
    (cmp / "spp-again").symlink_to(runs / "b")  # the same run twice: read once
    (cmp / "loop").symlink_to(cmp)  # a link loop ends
    assert [r["path"] for r in load_runs(cmp)] == ["none", "spp"]
    assert main([str(cmp), "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert "| none † | 1 | 0.4000 |" in out and "| spp-uout | 1 | 0.5000 |" in out


def test_a_failed_sweep_beside_finished_runs_changes_no_label(tmp_path, capsys):
    fake_run(tmp_path, [], 0, 0.4)
    for cell in ("resnet-chandrop", "spp-uout"):
        fake_run(tmp_path, [f"cell={cell}"], 0, 0.5)
        fake_run(tmp_path, [f"cell={cell}", "dropout.p=0.9"], 0, None, status="failed")  # another p, all failed
    fake_run(tmp_path, ["cell=spp-uout"], 1, None, status="running")  # a seed still running: same experiment
    # Its process: another one, holding the run dir's lock as a training process does.
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from deeplab_dropout.rundir import RunDir; "
                               f"RunDir({str(tmp_path / 'cell=spp-uout,seed=1')!r}).lock(); print('held', flush=True); "
                               "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    assert main([str(tmp_path), "--no-figures", "--reference", "none"]) == 0
    holder.communicate("")  # the process ends: its lock is free, the run is shown as gone
    assert main([str(tmp_path), "--no-figures", "--reference", "none"]) == 0
    held, gone = capsys.readouterr().out.split("# deeplab-dropout report")[1:]
    assert "completed×1, interrupted (process gone)×1 |" in gone
    out = held
    tables, failed = out.split("### Failed or incomplete runs")
    labels = [line.split("|")[1].strip() for line in tables.splitlines() if line.startswith("| ")
              and "Experiment" not in line]
    assert labels == ["none †", "resnet-chandrop", "spp-uout"]
    assert "| spp-uout | 1 | 0.5000 |" in tables and "completed×1, running×1 |" in tables
    listed = [line.split("|")[1:3] for line in failed.splitlines() if line.startswith("| cell=")]
    assert sorted((path.strip(), label.strip()) for path, label in listed) == [
        ("cell=resnet-chandrop,dropout.p=0.9,seed=0", "resnet-chandrop [dropout.p=0.9]"),
        ("cell=spp-uout,dropout.p=0.9,seed=0", "spp-uout [dropout.p=0.9]"),
        ("cell=spp-uout,seed=1", "spp-uout")]
    report_json = json.loads((tmp_path / "report.json").read_text())
    assert [row["label"] for row in report_json["tables"]["constant"]] == ["none", "resnet-chandrop", "spp-uout"]
    assert len(report_json["not_counted"]) == 3


def test_a_ramp_that_ended_below_its_p_is_marked(tmp_path, capsys):
    ramp = ["schedule=linear", "schedule.ramp_epochs=30"]
    fake_run(tmp_path, [*ramp], 0, 0.4, extra={"final_drop_p": 0.0})  # none: no dropout, never marked
    fake_run(tmp_path, ["cell=all-chandrop", *ramp], 0, 0.5, extra={"final_drop_p": 0.052})
    fake_run(tmp_path, ["cell=all-chandrop", *ramp], 1, 0.5, extra={"final_drop_p": 0.052})
    fake_run(tmp_path, ["cell=spp-uout", *ramp], 0, 0.5, extra={"final_drop_p": 0.2 - 1e-12})  # full
    fake_run(tmp_path, ["cell=upper-uout", *ramp], 0, 0.5)  # older results: no final_drop_p
    fake_run(tmp_path, ["cell=decoder-uout", *ramp, "dropout.p=0.5"], 0, 0.5, extra={"final_drop_p": 0.1})
    fake_run(tmp_path, ["cell=resnet-uout", "schedule=constant"], 0, 0.5, extra={"final_drop_p": 0.1})
    assert main([str(tmp_path), "--no-figures", "--reference", "none"]) == 0
    out = capsys.readouterr().out
    linear = out.split("### schedule = linear")[1]
    marked = {line.split("|")[1].strip() for line in linear.splitlines() if "‡ |" in line}
    assert marked == {"all-chandrop ‡", "decoder-uout ‡"}
    # Two shortfalls: one line each, naming its rows.
    assert "‡ ramp incomplete: p reached 0.052 of 0.2 (all-chandrop)" in linear
    assert "‡ ramp incomplete: p reached 0.1 of 0.5 (decoder-uout)" in linear
    assert "‡" not in out.split("### schedule = linear")[0]  # constant: p is p from the start
    with open(tmp_path / "report.csv", newline="") as f:
        final = {(r["schedule"], r["experiment"]): r["final_drop_p"] for r in csv.DictReader(f)}
    assert final[("linear", "all-chandrop")] == "0.052" and final[("linear", "upper-uout")] == ""
    assert final[("constant", "resnet-uout")] == "0.1"


def test_one_shortfall_is_one_note_and_the_seeds_range_is_shown(tmp_path, capsys):
    ramp = ["cell=all-chandrop", "schedule=linear"]
    fake_run(tmp_path, ramp, 0, 0.5, extra={"final_drop_p": 0.05})
    fake_run(tmp_path, ramp, 1, 0.5, extra={"final_drop_p": 0.1})
    assert main([str(tmp_path), "--no-figures"]) == 0
    out = capsys.readouterr().out
    assert "| all-chandrop ‡ | 2 |" in out and "\n‡ ramp incomplete: p reached 0.05–0.1 of 0.2\n" in out
    row = json.loads((tmp_path / "report.json").read_text())["tables"]["linear"][0]
    assert row["final_drop_p"] == 0.05 and row["ramp_incomplete"] == {"reached": [0.05, 0.1], "p": 0.2}


def test_without_none_the_delta_figures_are_a_note_not_an_empty_axis(tmp_path, capsys):
    fake_run(tmp_path, ["cell=spp-uout"], 0, 0.5)
    fake_run(tmp_path, ["cell=all-uout"], 0, 0.6)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert ("Not drawn: delta_vs_none.png, class_iou_delta_constant.png: no `none` run in this folder to compare "
            "with.") in out
    assert not (tmp_path / "delta_vs_none.png").exists() and (tmp_path / "curves_constant.png").exists()
