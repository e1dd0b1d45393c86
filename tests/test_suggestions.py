"""A misspelt group option, key or value is answered with the closest right one ("did you mean ...?"), and a
key a `+` override adds inside one of our nodes (read by no code) is refused the same way; a sweep's folder
given to deeplab-dropout-eval names its runs. Each message is one line, asserted in full."""
from __future__ import annotations

import pytest
from conftest import compose_cfg
from hydra.errors import HydraException

from deeplab_dropout.cli import InputError, checkpoint_file, describe
from deeplab_dropout.config import ConfigError, defined_keys, validate
from deeplab_dropout.study import CELLS


def compose_error(override: str) -> str:
    """The line the commands print for an override Hydra refuses while composing."""
    with pytest.raises(HydraException) as info:
        compose_cfg([override])
    return describe(info.value)


def validate_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(list(overrides)))
    return str(info.value)


def test_a_misspelt_group_option_names_the_closest_and_lists_them_all():
    assert compose_error("cell=al-dropblock") == (
        "cell=al-dropblock is not an option of group cell; did you mean cell=all-dropblock? (options: "
        + ", ".join(sorted(CELLS)) + ")")
    assert compose_error("dropout=nothing-like-it") == (
        "dropout=nothing-like-it is not an option of group dropout (options: channel, dropblock, none, uout)")


@pytest.mark.parametrize("override, line", [
    ("trainer.epoch=3", "trainer.epoch is not a config key; did you mean trainer.epochs?"),
    ("dropout.pp=0.1", "dropout.pp is not a config key; did you mean dropout.p?"),
    ("data.augment.repets=2", "data.augment.repets is not a config key; did you mean data.augment.repeats?"),
    ("dropuot=channel", "dropuot is not a config key; did you mean dropout?"),
    ("my_note=1", "my_note is not a config key (use +my_note=... to add one)"),
])
def test_a_misspelt_key_names_the_closest_key(override, line):
    assert compose_error(override) == line


def test_a_key_with_nothing_close_inside_a_node_lists_the_nodes_keys():
    # No `+` advice there: a key added inside one of our nodes is refused (below).
    keys = list(compose_cfg().dropout.keys())
    assert compose_error("dropout.zzz=1") == f"dropout.zzz is not a config key (dropout has {', '.join(keys)})"


@pytest.mark.parametrize("override, line", [
    ("trainer.precision=bf61", "trainer.precision='bf61' is invalid: expected one of auto, fp32, bf16, fp16; "
                               "did you mean bf16?"),
    ("data.split_method=per-class", "data.split_method='per-class' is invalid: expected one of per_class, "
                                    "authors, min_cover; did you mean per_class?"),
    ("trainer.monitor=nothing", "trainer.monitor='nothing' is invalid: expected one of miou, pixel_acc, "
                                "per_image_miou_mean, batch_miou_mean"),
])
def test_a_misspelt_value_names_the_closest_allowed_value(override, line):
    assert validate_error(override) == line


@pytest.mark.parametrize("override, line", [
    ("+trainer.epoch=3", "trainer.epoch is not a config key; did you mean trainer.epochs?"),
    ("+dropout.pp=0.1", "dropout.pp is not a config key; did you mean dropout.p?"),
    ("+data.synth.trian=3", "data.synth.trian is not a config key; did you mean data.synth.train?"),
    ("+dropuot=channel", "dropuot is not a config key; did you mean dropout?"),
    ("+sed=1", "sed is not a config key; did you mean seed?"),
])
def test_a_key_added_inside_our_nodes_is_refused(override, line):
    assert validate_error("data=synthetic", override) == line


def test_a_key_added_inside_a_node_with_nothing_close_lists_the_nodes_keys():
    keys = defined_keys()["schedule"]
    assert validate_error("+schedule.zzz=1") == f"schedule.zzz is not a config key (schedule has {', '.join(keys)})"


def test_a_top_level_key_of_ones_own_and_every_options_keys_are_accepted():
    validate(compose_cfg(["+my_note=baseline"]))  # not close to any key or group of ours
    # A node's keys are the union over conf/'s files: a preset or an option's own keys are not refused.
    validate(compose_cfg(["data=synthetic", "data.synth.train=10"]))
    validate(compose_cfg(["experiment=demo"]))
    validate(compose_cfg(["model=unet", "model.unet_base_channels=8"]))
    assert {"synth", "augment"} <= set(defined_keys()["data"]) and "unet_base_channels" in defined_keys()["model"]


def sweep(root, names):
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "results.json").write_text("{}")
    return root


def test_a_sweep_folder_is_refused_with_its_runs(tmp_path):
    names = [f"cell=none,seed={i}" for i in range(7)]
    root = sweep(tmp_path / "demo", names)
    with pytest.raises(InputError) as info:
        checkpoint_file(root, "checkpoints/best.pt")
    shown = ", ".join(str(root / name) for name in sorted(names)[:5])
    assert str(info.value) == f"{root} is a sweep of 7 runs; give one of them: {shown}, …"
    (root / "multirun.yaml").write_text("")
    for name in names[1:]:
        (root / name / "results.json").unlink()
    with pytest.raises(InputError) as info:
        checkpoint_file(root, "checkpoints/best.pt")
    assert str(info.value) == f"{root} is a sweep of 1 run; give one of them: {root / names[0]}"


def test_a_run_dir_means_its_best_checkpoint(tmp_path):
    run = sweep(tmp_path, ["run"]) / "run"
    with pytest.raises(InputError) as info:  # a run without best.pt is not a sweep
        checkpoint_file(run, "checkpoints/best.pt")
    assert str(info.value) == f"checkpoint not found: {run / 'checkpoints/best.pt'}"
    (run / "checkpoints").mkdir()
    (run / "checkpoints/best.pt").write_bytes(b"")
    assert checkpoint_file(run, "checkpoints/best.pt") == run / "checkpoints/best.pt"
