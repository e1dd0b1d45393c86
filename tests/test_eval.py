"""deeplab-dropout-eval: a checkpoint evaluated with its run's config reproduces the run's numbers;
torchvision's DeepLabv3 (the pretrained-base row) evaluates with the same metrics code."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import compose_cfg, tiny_cfg
from torchvision.models.segmentation import DeepLabV3_ResNet101_Weights, deeplabv3_resnet101

from deeplab_dropout import train as train_mod
from deeplab_dropout.cli import InputError
from deeplab_dropout.config import ConfigError
from deeplab_dropout.eval import run_eval
from deeplab_dropout.model import build_model


@pytest.fixture(scope="module")
def trained(voc_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    train_mod.run(tiny_cfg(voc_root, "cell=upper-uout", "trainer.epochs=2", "trainer.keep_last=true"), run_dir)
    return run_dir


def eval_cfg(*overrides: str):
    return compose_cfg(list(overrides), config_name="eval")


def test_checkpoint_reproduces_its_runs_metrics(trained, tmp_path):
    overrides = [f"checkpoint={trained / 'checkpoints/best.pt'}"]
    entry = run_eval(eval_cfg(*overrides), tmp_path, overrides)
    run = json.loads((trained / "results.json").read_text())
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["status"] == "completed" and len(res["history"]) == 1
    assert res["cell"] == "upper-uout" and res["split"] == run["split"]
    assert res["checkpoint"]["epoch"] == run["best_epoch"]
    # Same weights, same val data and transform, same metrics code: the same numbers.
    for key in ("miou", "pixel_acc", "class_iou", "per_image_miou", "val_loss"):
        assert entry[key] == run["best"][key]
    assert res["config"]["model"]["backbone"] == "resnet18"  # the run's config, not eval.yaml's default


def test_overrides_win_over_the_checkpoints_config(trained, tmp_path):
    overrides = [f"checkpoint={trained / 'checkpoints/last.pt'}", "data.val_crop=full",
                 "trainer.max_val_images=3"]
    run_eval(eval_cfg(*overrides), tmp_path, overrides)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["config"]["data"]["val_crop"] == "full" and res["config"]["trainer"]["max_val_images"] == 3
    assert res["config"]["dropout"]["name"] == "uout"


def test_torchvision_deeplabv3_pretrained_base_row(voc_root, tmp_path):
    weights = tmp_path / "tv.pth"
    torch.manual_seed(3)
    state = deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=21, aux_loss=True).state_dict()
    torch.save(state, weights)
    overrides = ["model=torchvision_deeplabv3_resnet101", f"model.pretrained={weights}", "data=synthetic",
                 f"data.root={voc_root}", "data.synth=null", "data.base_size=40", "data.crop_size=33",
                 "trainer=smoke"]
    cfg = eval_cfg(*overrides)
    model = build_model(cfg)
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"backbone", "aspp", "decoder"}
    assert model.state_dict()["aspp.convs.0.0.weight"].equal(state["classifier.0.convs.0.0.weight"])
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    entry = run_eval(cfg, tmp_path, overrides)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["cell"] == "pretrained-base (no fine-tuning)" and res["status"] == "completed"
    assert len(entry["class_iou"]) == 21 and 0 <= entry["miou"] <= 1


def test_torchvision_weights_offline_is_one_line(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(DeepLabV3_ResNet101_Weights, "get_state_dict", offline)
    with pytest.raises(ConfigError) as err:
        build_model(eval_cfg("model=torchvision_deeplabv3_resnet101"))
    assert "\n" not in str(err.value) and "model.pretrained=none" in str(err.value)
    with pytest.raises(ValueError, match="no regulariser sites"):
        build_model(eval_cfg("model=torchvision_deeplabv3_resnet101", "model.pretrained=none", "cell=spp-uout"))


def test_a_sweep_folder_is_refused_with_its_runs(tmp_path):
    sweep = tmp_path / "sweep"
    for name in ("cell=none", "cell=upper-uout"):
        (sweep / name).mkdir(parents=True)
        (sweep / name / "results.json").write_text("{}")
    with pytest.raises(InputError) as err:
        run_eval(eval_cfg(f"checkpoint={sweep}"), tmp_path / "eval")
    assert str(err.value) == (f"{sweep} is a sweep of 2 runs; give one of them: {sweep / 'cell=none'}, "
                              f"{sweep / 'cell=upper-uout'}")
    assert not (tmp_path / "eval/results.json").exists()


@pytest.mark.slow
def test_missing_checkpoint_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="nope.pt"):
        run_eval(eval_cfg(f"checkpoint={tmp_path / 'nope.pt'}"), tmp_path)
    proc = subprocess.run([sys.executable, "-m", "deeplab_dropout.eval", f"checkpoint={tmp_path / 'nope.pt'}",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint not found")


@pytest.mark.slow
def test_eval_takes_a_sweep_run_dir_as_its_first_argument(voc_root, tmp_path):
    """The path as the runner wrote it (``=`` and ``,`` in a sweep folder's name), unescaped."""
    run_dir = tmp_path / "sweep" / "cell=none,schedule=constant"
    train_mod.run(tiny_cfg(voc_root, "trainer.epochs=1"), run_dir)
    proc = subprocess.run([sys.executable, "-m", "deeplab_dropout.eval", str(run_dir),
                           f"hydra.run.dir={tmp_path / 'eval'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    run = json.loads((run_dir / "results.json").read_text())
    res = json.loads((tmp_path / "eval/results.json").read_text())
    assert res["checkpoint"]["path"] == str(run_dir / "checkpoints/best.pt")
    for key in ("miou", "per_image_miou", "class_iou", "val_loss"):
        assert res["history"][0][key] == run["best"][key]
