"""`fidelity=authors_code`: every choice where the authors' code differs from the paper's text at once, the
documented table kept in step with it, and the report's statistics as the authors' notebook computed them."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import compose_cfg, tiny_preset
from omegaconf import OmegaConf

from deeplab_dropout.report import report
from deeplab_dropout.report.tables import best_values
from deeplab_dropout.saved_config import flatten

REPO_ROOT = Path(__file__).resolve().parents[1]
# What the authors' code does where the paper's text says otherwise or nothing (docs/paper-vs-code.md).
AUTHORS_CODE = {
    "placement.resnet_sites": "first_block", "dropout.uout_shared": True, "schedule.granularity": "epoch",
    "data.split_method": "authors", "data.label_pad": 0, "data.val_list": "per_class",
    "model.align_corners": True, "trainer.drop_last": False, "trainer.monitor": "batch_miou_mean",
    "trainer.precision": "fp32", "report.statistics": "batch", "report.loss_epoch": "min",
}


def group_keys(option: str) -> dict:
    """The keys conf/fidelity/<option>.yaml sets, flattened, but the preset's own name."""
    data = yaml.safe_load((REPO_ROOT / "conf" / "fidelity" / f"{option}.yaml").read_text())
    return {k: v for k, v in flatten(data).items() if k != "fidelity"}


def test_authors_code_composes_to_exactly_the_listed_values_and_paper_to_the_defaults():
    assert group_keys("authors_code") == AUTHORS_CODE and group_keys("paper") == {}
    authors = compose_cfg(["fidelity=authors_code", "cell=all-uout", "schedule=linear"])
    default, paper = compose_cfg(["cell=all-uout", "schedule=linear"]), compose_cfg(["fidelity=paper"])
    assert authors.fidelity == "authors_code" and default.fidelity == paper.fidelity == "paper"
    for key, value in AUTHORS_CODE.items():
        assert OmegaConf.select(authors, key) == value, key
        assert OmegaConf.select(default, key) != value, key  # a real difference from the default
    assert OmegaConf.to_container(paper) == OmegaConf.to_container(compose_cfg([]))


def test_the_docs_table_names_every_key_of_the_switch():
    # docs/paper-vs-code.md's rows give each of the authors' choices as `key=value`.
    text = (REPO_ROOT / "docs" / "paper-vs-code.md").read_text()
    documented = dict(re.findall(r"`([a-z_]+\.[a-z_.]+)=([^`]+)`", text))
    shown = {k: json.dumps(v) if isinstance(v, bool) else str(v) for k, v in AUTHORS_CODE.items()}
    assert {k: documented.get(k) for k in shown} == shown
    assert "fidelity=authors_code" in text


def run_entry(epoch: int, batch_miou: list, batch_loss: list, val_loss: float, mean: float) -> dict:
    return {"epoch": epoch, "miou": 0.3, "pixel_acc": 0.8, "val_loss": val_loss, "batch_miou": batch_miou,
            "batch_loss": batch_loss, "per_image_miou": {"mean": mean, "std": 0.1, "min": 0.0, "median": mean,
                                                         "max": 1.0}}


def test_batch_statistics_and_the_lowest_loss_epoch_recomputed():
    history = [run_entry(1, [0.2, 0.4, None], [0.09, 0.07, 0.05], 0.06, 0.35),
               run_entry(2, [0.5, 0.3, 0.45, 0.1], [0.08, 0.06, 0.07, 0.03], 0.07, 0.30)]
    run = {"status": "completed", "best": history[1], "best_epoch": 2, "history": history}
    image = best_values(run)
    assert (image["mean"], image["std"], image["val_loss"]) == (0.30, 0.1, 0.07)
    batch = best_values(run, "batch", "min")
    values = np.array([0.5, 0.3, 0.45, 0.1])
    expected = {"mean": values.mean(), "std": values.std(ddof=1), "min": 0.1, "median": np.median(values),
                "max": 0.5}
    assert {k: batch[k] for k in expected} == pytest.approx(expected)
    # The Loss column: the epoch whose batches' mean loss is lowest (epoch 2: 0.06 against 0.07).
    assert batch["val_loss"] == pytest.approx(0.06)
    assert best_values(run, "image", "min")["val_loss"] == 0.06  # over images: the lowest val_loss
    assert best_values(run, "batch", "best")["val_loss"] == pytest.approx(0.06)


@pytest.mark.slow
def test_a_smoke_sweep_of_the_authors_code_is_reported_as_its_own_rows(voc_root, tmp_path):
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "deeplab_dropout.train", "-m", "cell=spp-uout", "fidelity=paper,authors_code",
               # all images (the authors' floor of 10% keeps none of 24) in whole batches (a last batch of one
               # cannot train the pooling BatchNorm)
               "data.fraction=1.0", "trainer.drop_last=true", *tiny_preset(tmp_path, voc_root)]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {(r := json.loads(p.read_text()))["config"]["fidelity"]: r for p in sweep.glob("*/results.json")}
    assert set(runs) == {"paper", "authors_code"}
    authors = runs["authors_code"]
    assert authors["status"] == "completed" and authors["config"]["trainer"]["monitor"] == "batch_miou_mean"
    assert all("batch_miou" in e for e in authors["history"])
    text = report(sweep, n_boot=10, figures=False, statistics="image")
    rows = [line for line in text.splitlines() if line.startswith("| spp-uout")]
    assert len(rows) == 2  # two experiments: the paper's text and the authors' code
    assert "over validation images" in text
    assert "over the mean mIoU of consecutive batches" in report(sweep, n_boot=10, figures=False, statistics="batch")
