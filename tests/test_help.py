"""`--help` of `deeplab-dropout-train` and `deeplab-dropout-eval` (conf/hydra/help/): a description, the
commands a newcomer needs and the real config groups, through the real entry points, which print it without
importing torch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from deeplab_dropout.config import CONF_DIR

REPO = Path(__file__).resolve().parents[1]
SPLIT = "----- next help -----"
pytestmark = pytest.mark.slow  # every test reads the commands' --help, run as subprocesses
# The console script's entry point (pyproject.toml: MODULE:main) once per FLAG, in one process per command;
# last, whether torch was imported.
SCRIPT = f"""
import importlib, sys
from hydra.core.global_hydra import GlobalHydra
module, *flags = sys.argv[1:]
for flag in flags:
    sys.argv = ["deeplab-dropout-" + module.rpartition(".")[2], flag]
    try:
        importlib.import_module(module).main()
    except SystemExit as e:  # Hydra exits 0 after printing a help
        if e.code:
            raise
    GlobalHydra.instance().clear()
    print({SPLIT!r}, flush=True)
print("torch imported:", "torch" in sys.modules)
"""
CALLS = {"deeplab_dropout.commands.train": ["--help", "-h", "--hydra-help"],
         "deeplab_dropout.commands.eval": ["--help", "-h"]}


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """The stdout of every call in CALLS, by name ("train --help"); each process checked to exit 0."""
    procs = {module: subprocess.Popen([sys.executable, "-c", SCRIPT, module, *flags], cwd=REPO, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for module, flags in CALLS.items()}
    outputs = {}
    for module, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{module} exited {proc.returncode}: {err}"
        *texts, rest = out.split(SPLIT + "\n")
        assert rest == "torch imported: False\n" and len(texts) == len(CALLS[module]), out
        command = module.rpartition(".")[2]
        outputs.update({f"{command} {flag}": text for flag, text in zip(CALLS[module], texts, strict=True)})
    return outputs


def test_the_console_scripts_are_these_entry_points():
    text = (REPO / "pyproject.toml").read_text()
    for module in CALLS:
        assert f'deeplab-dropout-{module.rpartition(".")[2]} = "{module}:main"' in text


def config_groups() -> list[str]:
    """`group: option, ...` for every app group under conf/, read from the files, as Hydra lists them."""
    groups = sorted(p for p in Path(CONF_DIR).iterdir() if p.is_dir() and p.name != "hydra")
    return [f"{g.name}: {', '.join(sorted(f.stem for f in g.glob('*.yaml')))}" for g in groups]


def test_train_help_describes_examples_and_groups(helps):
    text = helps["train --help"]
    assert text.startswith("deeplab-dropout-train: train DeepLabv3+")
    for command in ("deeplab-dropout-train experiment=demo\n",
                    "deeplab-dropout-train cell=all-chandrop schedule=linear data.root=/data/voc\n",
                    "deeplab-dropout-train -m 'cell=glob(*)' schedule=constant,linear",
                    "experiment=paper",
                    "deeplab-dropout-report outputs/multirun/"):
        assert command in text
    for key in ("data.root", "data.fraction", "data.split_method", "model.pretrained", "dropout.p",
                "dropout.block_size", "schedule.ramp_epochs", "trainer.epochs", "trainer.batch_size",
                "trainer.device", "trainer.precision", "seed"):
        assert f"\n  {key} " in text, key
    for output in ("results.json", "per_image.npz", "predictions/", "checkpoints/", "TensorBoard"):
        assert output in text
    assert "--cfg job" in text and "--hydra-help" in text and "--multirun,-m" in text  # Hydra's flags


def test_eval_help_describes_usage(helps):
    text = helps["eval --help"]
    assert text.startswith("deeplab-dropout-eval: evaluate a trained checkpoint")
    for command in ("deeplab-dropout-eval RUN_DIR [overrides]\n",
                    "deeplab-dropout-eval checkpoint=RUN/checkpoints/best.pt\n",
                    "deeplab-dropout-eval model=torchvision_deeplabv3_resnet101 data.root=/data/voc\n"):
        assert command in text
    assert "pretrained-base" in text and "results.json" in text
    assert "== Keys most often overridden" not in text  # eval's own help, not train's (both override hydra/help)
    # A newcomer who starts here learns the demo and the study's commands too.
    for command in ("deeplab-dropout-train experiment=demo\n", "deeplab-dropout-eval outputs/demo/cell=none\n",
                    "deeplab-dropout-train cell=all-chandrop schedule=linear data.root=/data/voc\n",
                    "deeplab-dropout-train -m 'cell=glob(*)' schedule=constant,linear data.root=/data/voc\n"):
        assert command in text


@pytest.mark.parametrize("name", ["train --help", "eval --help"])
def test_help_lists_the_real_groups_without_boilerplate(helps, name):
    lines = helps[name].splitlines()
    groups = config_groups()
    assert any(g.startswith("cell: ") and "all-chandrop" in g for g in groups)  # the check is not vacuous
    assert any(g.startswith("dropout: ") and "dropblock" in g for g in groups)
    start = lines.index(groups[0])
    assert lines[start:start + len(groups)] == groups
    assert "powered by hydra" not in helps[name].lower()
    assert "\nmodel:\n" not in helps[name]  # the config itself is left to --cfg job


def test_short_flag_and_hydra_help(helps):
    assert helps["train -h"] == helps["train --help"]
    assert helps["eval -h"] == helps["eval --help"]
    hydra_help = helps["train --hydra-help"]
    assert hydra_help.startswith("Hydra (") and "hydra/launcher:" in hydra_help
