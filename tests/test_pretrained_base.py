"""`experiment=pretrained_base`: the paper's pretrained-base row, torchvision's DeepLabv3-ResNet101 from a
state dict of that model, fine-tuned 5 epochs at batch 6 without regularisation, reported as its own row
beside the evaluation-only one."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import compose_cfg
from torchvision.models.segmentation import deeplabv3_resnet101

from deeplab_dropout import train as train_mod
from deeplab_dropout.eval import run_eval
from deeplab_dropout.report import report
from deeplab_dropout.results import load_checkpoint


def test_the_preset_is_the_papers_fine_tuning():
    cfg = compose_cfg(["experiment=pretrained_base"])
    assert (cfg.model.arch, cfg.model.pretrained) == ("torchvision_deeplabv3", "coco_with_voc_labels")
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.dropout.name) == (5, 6, "none")


@pytest.mark.slow
def test_fine_tunes_5_epochs_from_a_state_dict_and_is_reported_beside_the_eval_only_row(voc_root, tmp_path):
    weights = tmp_path / "deeplabv3_resnet101.pth"
    torch.manual_seed(0)
    state = deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=21, aux_loss=True).state_dict()
    torch.save(state, weights)
    data = ["data=synthetic", f"data.root={voc_root}", "data.synth=null", "data.base_size=40", "data.crop_size=33",
            "trainer.device=cpu", "trainer.precision=fp32", "trainer.num_workers=0"]
    cfg = compose_cfg(["experiment=pretrained_base", f"model.pretrained={weights}", *data,
                       "trainer.max_train_steps=1", "trainer.max_val_images=2", "trainer.val_batch_size=2",
                       "trainer.keep_last=true"])
    run_dir = tmp_path / "sweep" / "fine-tuned"
    train_mod.run(cfg, run_dir)
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "completed" and res["cell"] == "pretrained-base"
    assert [e["epoch"] for e in res["history"]] == [1, 2, 3, 4, 5] and all("miou" in e for e in res["history"])
    # It started from the given weights and trained them.
    tuned = load_checkpoint(run_dir / "checkpoints/last.pt")["model"]
    assert not torch.equal(tuned["backbone.conv1.weight"], state["backbone.conv1.weight"])
    assert (run_dir / "per_image.npz").is_file() and (run_dir / "predictions/index.json").is_file()

    overrides = ["model=torchvision_deeplabv3_resnet101", f"model.pretrained={weights}", *data,
                 "trainer.max_val_images=2"]
    run_eval(compose_cfg(overrides, config_name="eval"), tmp_path / "sweep" / "as-it-comes", overrides)
    text = report(tmp_path / "sweep", n_boot=10, figures=False)
    # One row each (labelled with their folders, as runs whose configs differ beyond the cell).
    rows = [line.split(" | ")[0].lstrip("| ") for line in text.splitlines() if line.startswith("| pre")]
    assert sorted(r.split(" [")[0] for r in rows) == ["pretrained-base", "pretrained-base (no fine-tuning)"]
