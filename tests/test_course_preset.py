"""experiment=voc2007_course: every recipe composes with the course report's values, each recipe adds exactly its
own technique to the row it builds on, the preset sweeps every recipe, and a smoke version of the whole sweep
trains and reports on generated VOC 2007 data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CONF_DIR, compose_cfg
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from test_train import run_cli

from deeplab_dropout.config import validate
from deeplab_dropout.study import cell_name

RECIPES = sorted(p.stem for p in (Path(CONF_DIR) / "recipe").glob("*.yaml"))
# Each row of the report's Table 5: the row it builds on and the keys (flattened) it changes, with their values.
AUGMENT = {"data.flip_p": 0.5, "data.augment.rotation_degrees": 180, "data.augment.repeats": 4}
DROPOUT = {"dropout.name": "channel", "dropout.p": 0.5, "placement.spp": True}
ROWS = {
    "cosine": ("baseline", {"optim.schedule": "cosine_restarts"}),
    "augment": ("cosine", AUGMENT),
    "weighted_ce": ("augment", {"loss.class_weights": "log_inverse_frequency"}),
    "dropout": ("baseline", DROPOUT),
    "dropout_augment": ("augment", DROPOUT),
    "fcn_resnet101": ("weighted_ce", {"model.name": "fcn_resnet101", "model.arch": "fcn",
                                      "model.pretrained": "coco_with_voc_labels", "model.freeze_backbone": True}),
    "unet": ("weighted_ce", {"model.name": "unet", "model.arch": "unet"}),
}


def course(recipe: str) -> dict:
    """The flattened train config of ``experiment=voc2007_course recipe=<recipe>``."""
    cfg = compose_cfg(["experiment=voc2007_course", f"recipe={recipe}"])
    validate(cfg)
    return flat(OmegaConf.to_container(cfg))


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_baseline_is_the_reports_section_3_1():
    cfg = course("baseline")
    expected = {
        "model.name": "course_fcn", "model.pretrained": "none", "optim.name": "adamw", "optim.lr": 0.01,
        "optim.head_lr_mult": 1, "optim.schedule": "poly", "optim.poly_power": 0,  # constant LR: no scheduler
        "loss.name": "ce", "loss.class_weights": "none", "loss.batch_average": False, "dropout.name": "none",
        "data.flip_p": 0.0, "data.blur_p": 0.0, "data.augment.rotation_degrees": 0, "data.augment.repeats": 1,
        # shared by every row (the experiment): all 209 VOC 2007 train images, 224 crops, batch 16, best IoU
        "data.name": "voc2007", "data.year": 2007, "data.fraction": 1.0, "data.crop_size": 224,
        "data.base_size": 256, "data.scale_range": [1.0, 1.0], "trainer.batch_size": 16,
        "trainer.monitor": "miou", "trainer.epochs": 100, "trainer.early_stop_patience": 20,
    }
    assert {k: cfg[k] for k in expected} == expected
    assert (cfg["optim.eta_min"], cfg["optim.t_max_epochs"]) == (1e-5, 20)  # the cosine rows' eq. 1 values


@pytest.mark.parametrize("recipe", list(ROWS))
def test_each_row_adds_only_its_technique_to_the_row_it_builds_on(recipe):
    base_name, changes = ROWS[recipe]
    base, cfg = course(base_name), course(recipe)
    changed = {k: cfg.get(k) for k in base.keys() | cfg.keys() if base.get(k) != cfg.get(k)}
    if recipe in ("fcn_resnet101", "unet"):  # another model: its own keys come and go; the rest is the row's
        changed = {k: v for k, v in changed.items() if not k.startswith("model.") or k in changes}
    assert changed == changes


def test_rows_record_the_study_cell_of_their_dropout():
    cells = {r: cell_name(compose_cfg(["experiment=voc2007_course", f"recipe={r}"])) for r in RECIPES}
    assert cells == {r: "spp-chandrop" if r.startswith("dropout") else "none" for r in RECIPES}


def test_preset_sweeps_every_recipe_and_reports_the_course_columns():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=voc2007_course"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert sorted(cfg.hydra.sweeper.params.recipe.split(",")) == RECIPES and len(RECIPES) == 8
    assert cfg.hydra.callbacks.report.columns == "course"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):  # one row, as the preset's comment says
        one = compose(config_name="train", overrides=["experiment=voc2007_course", "recipe=unet", "hydra.mode=RUN"],
                      return_hydra_config=True)
    assert str(one.hydra.mode) == "RunMode.RUN" and one.model.name == "unet"


def test_other_runs_configs_gain_no_key():
    """The recipe group defaults to null: configs (and the resume check of old runs) stay as they were."""
    for overrides in ([], ["experiment=paper"], ["model=unet", "cell=spp-uout"]):
        cfg = compose_cfg(overrides)
        assert "recipe" not in cfg and "course" not in OmegaConf.to_yaml(cfg)


@pytest.mark.slow
def test_smoke_sweep_completes_every_recipe(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("experiment=voc2007_course_smoke", f"data.root={tmp_path / 'voc'}", f"hydra.sweep.dir={sweep}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/results.json")}
    assert sorted(runs) == [f"recipe={r}" for r in RECIPES]
    for name, res in runs.items():
        assert res["status"] == "completed", name
        assert len(res["history"]) == 1 and 0 <= res["best"]["pixel_acc"] <= 1
        assert res["config"]["data"]["year"] == 2007 and res["config"]["trainer"]["monitor"] == "miou"
    models = {name: res["config"]["model"]["name"] for name, res in runs.items()}
    assert models["recipe=unet"] == "unet" and models["recipe=fcn_resnet101"] == "fcn_resnet101"
    assert {models[f"recipe={r}"] for r in RECIPES if r not in ("unet", "fcn_resnet101")} == {"course_fcn"}
    assert "Pixel accuracy" in (sweep / "report.md").read_text()
