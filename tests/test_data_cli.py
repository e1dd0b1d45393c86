"""`deeplab-dropout-data`: synth and split subcommands, manifest path last, one-line errors with exit 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deeplab_dropout.commands.data import main
from deeplab_dropout.data import VOC_CLASSES, VOCSegmentation

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "data"
    assert main(["synth", "--out", str(out), "--train", "40", "--val", "4", "--seed", "2",
                 "--min-side", "40", "--max-side", "56"]) == 0
    return out


def test_synth_prints_root_and_writes_voc_layout(synth_root, capsys, tmp_path):
    assert len(VOCSegmentation(synth_root, "train")) == 40
    out = tmp_path / "again"
    main(["synth", "--out", str(out), "--train", "3", "--val", "2", "--min-side", "32", "--max-side", "40"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert Path(lines[-1]) == out and (out / "VOCdevkit" / "VOC2012" / "synth.json").is_file()


def test_split_prints_table_and_manifest_path_last(synth_root, capsys):
    assert main(["split", "--root", str(synth_root), "--fraction", "0.1", "--seed", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    manifest = Path(lines[-1])
    assert manifest.is_file()
    data = json.loads(manifest.read_text())
    assert data["fraction"] == 0.1 and data["seed"] == 0
    table = "\n".join(lines[:-1])
    for c in (1, 10, 20):
        assert VOC_CLASSES[c] in table
    assert f"total: {len(data['ids'])}" in table


def test_split_method_authors_prints_comparison_and_manifest_last(synth_root, capsys):
    assert main(["split", "--root", str(synth_root), "--method", "authors", "--fraction", "0.2", "--seed", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    manifest = Path(lines[-1])
    data = json.loads(manifest.read_text())
    assert data["method"] == "authors" and manifest.name == "VOC2012_train_authors_frac0.2_seed3.json"
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines[:-1] if ln.split()}
    assert {"per_class", "authors", "min_cover", "pool"} <= set(rows)
    assert rows["authors"] == [str(len(data["ids"])), str(data["n_unique"]), f"{data['mean_classes']:.3f}"]
    assert rows["pool"][:2] == [str(len(VOCSegmentation(synth_root, "train")))] * 2
    # The comparison is computed, not written: only the chosen method's manifest exists for this seed.
    assert [p.name for p in manifest.parent.glob("*seed3.json")] == [manifest.name]


def test_split_rejects_unknown_method(synth_root, capsys):
    with pytest.raises(SystemExit) as e:
        main(["split", "--root", str(synth_root), "--method", "greedy"])
    assert e.value.code == 2 and "per_class" in capsys.readouterr().err


def test_bad_root_exits_2_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["split", "--root", str(tmp_path / "missing")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "missing" in err


@pytest.mark.slow
def test_module_entry_point(synth_root, tmp_path):
    run = [sys.executable, "-m", "deeplab_dropout.data", "split", "--root"]
    ok = subprocess.run([*run, str(synth_root), "--seed", "1"], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    last = ok.stdout.strip().splitlines()[-1]
    assert Path(last).is_file() and Path(last).name == "VOC2012_train_per_class_frac0.1_seed1.json"
    bad = subprocess.run([*run, str(tmp_path / "nope")], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    err = bad.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert "nope" in err and "VOCdevkit" in err
