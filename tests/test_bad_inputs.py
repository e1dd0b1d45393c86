"""Every bad input to `deeplab-dropout-train` ends with one stderr line, ``error: ...``, exit 2, and leaves a
completed run's files (in another run dir, or in the same one) as they were, and no run dir of its own
unless its results.json records the failure."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import SMALL, TINY, tiny_cfg
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf
from PIL import Image

from deeplab_dropout import train as train_mod
from deeplab_dropout.cli import InputError, run_job
from deeplab_dropout.commands import train as train_command
from deeplab_dropout.data.voc import voc_dir
from deeplab_dropout.results import write_json
from deeplab_dropout.rundir import RunDir


def base(root: Path, run_dir: Path) -> list[str]:
    return [*TINY, "data=synthetic", f"data.root={root}", "data.synth=null", *SMALL, "trainer.epochs=1",
            f"hydra.run.dir={run_dir}"]


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file a run wrote (Hydra rewrites its own .hydra/ and train.log, the run guard its .lock, on each
    call in a run dir)."""
    return {name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file() and not (name := str(p.relative_to(folder))).startswith(".hydra/")
            and not name.endswith(".log") and name != ".lock"}


@pytest.fixture(scope="module")
def completed(voc_root, tmp_path_factory) -> Path:
    """A completed one-epoch run (keeping last.pt), whose files no bad input may touch."""
    run_dir = tmp_path_factory.mktemp("completed")
    train_mod.run(tiny_cfg(voc_root, "trainer.epochs=1", "trainer.keep_last=true"), run_dir)
    return run_dir


def train(*args: str) -> subprocess.CompletedProcess:
    """`deeplab-dropout-train ARGS` through its real entry point, in this process (a subprocess per case
    would spend seconds starting up; test_a_failed_start_leaves_no_folder runs one)."""
    err, code = io.StringIO(), 0
    GlobalHydra.instance().clear()
    argv = sys.argv
    sys.argv = ["deeplab-dropout-train", *args]
    try:
        with contextlib.redirect_stderr(err):
            train_command.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
    return subprocess.CompletedProcess(args, code, "", err.getvalue())


def assert_one_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def check(completed: Path, root: Path, run_dir: Path, *overrides: str, expect: tuple[str, ...] = ()) -> None:
    """Run with ``overrides`` in ``run_dir``: one error line, exit 2, the completed run untouched, no run dir
    left unless it records the failure (results.json)."""
    before = snapshot(completed)
    assert_one_line(train(*base(root, run_dir), *overrides), *expect)
    assert snapshot(completed) == before
    assert not run_dir.exists() or (run_dir / "results.json").exists()


@pytest.fixture
def data_copy(voc_root, tmp_path) -> tuple[Path, Path]:
    """A copy of the generated dataset to corrupt, and its VOC2012 folder."""
    root = tmp_path / "data"
    shutil.copytree(voc_root, root)
    return root, voc_dir(root)


def train_ids(vdir: Path) -> list[str]:
    return (vdir / "ImageSets/Segmentation/train.txt").read_text().split()


def test_missing_data_root(completed, tmp_path):
    check(completed, tmp_path / "nowhere", tmp_path / "run", expect=("data root not found",))


def test_empty_data_root(completed, tmp_path):
    (tmp_path / "empty").mkdir()
    check(completed, tmp_path / "empty", tmp_path / "run", expect=("no VOCdevkit/VOC2012",))


def test_missing_split_file(completed, data_copy, tmp_path):
    root, vdir = data_copy
    (vdir / "ImageSets/Segmentation/train.txt").unlink()
    check(completed, root, tmp_path / "run", expect=("split file not found",))


def test_image_without_mask(completed, data_copy, tmp_path):
    root, vdir = data_copy
    for i in train_ids(vdir):
        (vdir / "SegmentationClass" / f"{i}.png").unlink()
    check(completed, root, tmp_path / "run", expect=("mask not found",))


def test_corrupt_jpeg(completed, data_copy, tmp_path):
    root, vdir = data_copy
    for i in train_ids(vdir):
        path = vdir / "JPEGImages" / f"{i}.jpg"
        path.write_bytes(path.read_bytes()[:200])
    check(completed, root, tmp_path / "run", expect=("corrupt or unreadable image",))


def test_corrupt_png(completed, data_copy, tmp_path):
    root, vdir = data_copy
    for i in train_ids(vdir):
        (vdir / "SegmentationClass" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    check(completed, root, tmp_path / "run", expect=("corrupt or unreadable mask",))


def _rewrite_masks(vdir: Path, change) -> None:
    for i in train_ids(vdir):
        path = vdir / "SegmentationClass" / f"{i}.png"
        with Image.open(path) as im:
            im.load()
            changed = change(im)
        changed.save(path)


def test_label_out_of_range(completed, data_copy, tmp_path):
    root, vdir = data_copy
    _rewrite_masks(vdir, lambda im: im.point(lambda v: 77 if v == 0 else v))
    check(completed, root, tmp_path / "run", expect=("mask outside {0..20, 255}", "77"))


def test_size_mismatch(completed, data_copy, tmp_path):
    root, vdir = data_copy
    _rewrite_masks(vdir, lambda im: im.resize((im.width + 3, im.height), Image.NEAREST))
    check(completed, root, tmp_path / "run", expect=("mask size differs from its image",))


@pytest.mark.parametrize("override, expect", [
    ("dropout.p=1.5", ("dropout.p=1.5", "[0, 1)")),
    ("dropout.block_size=0", ("dropout.block_size=0", "integer")),
    ("cell=nope", ("cell=nope", "upper-uout")),
    ("dropout=dropblok", ("dropout=dropblok", "channel, dropblock, none, uout")),
    ("placement=nope", ("placement=nope", "decoder")),
    ("trainer.foo=1", ("trainer.foo is not a config key (trainer has epochs, batch_size, ",)),
    ("trainer.epoch=3", ("trainer.epoch is not a config key; did you mean trainer.epochs?",)),
    ("+trainer.epoch=3", ("trainer.epoch is not a config key; did you mean trainer.epochs?",)),
    ("cell=al-dropblock", ("did you mean cell=all-dropblock? (options: all-chandrop, ",)),
    ("trainer.device=cuda", ("trainer.device", "CUDA")),
])
def test_bad_override(completed, voc_root, tmp_path, override, expect):
    if override == "trainer.device=cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    check(completed, voc_root, tmp_path / "run", override, expect=expect)


@pytest.fixture
def interrupted(completed, tmp_path) -> Path:
    """A copy of the completed run as if killed before it finished: the next call resumes from last.pt."""
    run_dir = tmp_path / "run"
    shutil.copytree(completed, run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    (run_dir / "results.json").write_text(json.dumps({**results, "status": "running"}))
    return run_dir


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_bad_checkpoint_in_the_run_dir(completed, interrupted, voc_root, damage):
    last = interrupted / "checkpoints/last.pt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:1000])
    else:
        torch.save({"x": 1}, last)
    before = snapshot(interrupted)
    check(completed, voc_root, interrupted, expect=("last.pt",))
    assert snapshot(interrupted) == before  # results.json, best.pt and tb of the earlier run included


@pytest.mark.slow  # two fresh processes (~5 s each on 2 busy cores)
def test_a_failed_start_leaves_no_folder(tmp_path):
    """Through the console scripts' entry points, in a fresh folder: Hydra made the run dir (.hydra/, the log)
    before the input was refused; nothing of the run's own was written, so the folder goes."""
    for name in ("cell=none", "cell=spp-uout"):
        (tmp_path / "sweep" / name).mkdir(parents=True)
        (tmp_path / "sweep" / name / "results.json").write_text("{}")
    commands = {"train": ["dropout.p=2"], "eval": ["sweep"]}
    procs = {name: subprocess.Popen([sys.executable, "-c", f"from deeplab_dropout.commands.{name} import main; "
                                     "main()", *args], cwd=tmp_path, text=True, stderr=subprocess.PIPE)
             for name, args in commands.items()}
    errors = {name: (proc.communicate(timeout=300)[1], proc.returncode) for name, proc in procs.items()}
    assert errors == {
        "train": ("error: dropout.p=2 is invalid: expected a number in [0, 1)\n", 2),
        "eval": ("error: sweep is a sweep of 2 runs; give one of them: sweep/cell=none, sweep/cell=spp-uout\n", 2)}
    # Hydra's hydra.run.dir (outputs/runs/<time>, outputs/eval/<time>) is gone; the folders above it stay.
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "outputs").rglob("*")) == [
        "outputs/eval", "outputs/runs"]


def _failing_job(cfg, run_dir: Path):
    raise InputError("data root not found: nowhere")


@pytest.mark.parametrize("mode, extra, kept", [
    (RunMode.RUN, None, False),  # only what Hydra wrote: removed
    (RunMode.RUN, "results.json", True),  # a run's own record (an earlier run's, or this one's "failed")
    (RunMode.RUN, "notes.txt", True),  # anything else a user put there
    (RunMode.MULTIRUN, None, True),  # a sweep's job: its failure is recorded there
])
def test_only_a_single_runs_untouched_run_dir_is_removed(tmp_path, monkeypatch, capsys, mode, extra, kept):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra/config.yaml").write_text("{}")
    (run_dir / "train.log").write_text("")
    (run_dir / ".lock").write_text("")
    if extra:
        (run_dir / extra).write_text("{}")
    hydra_cfg = SimpleNamespace(mode=mode, runtime=SimpleNamespace(output_dir=str(run_dir)),
                                job=SimpleNamespace(name="train"))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hydra_cfg))
    with pytest.raises((SystemExit, InputError)):
        run_job(_failing_job, tiny_cfg(tmp_path / "nowhere"))
    assert capsys.readouterr().err == "error: data root not found: nowhere\n"
    assert run_dir.exists() == kept
    if mode == RunMode.MULTIRUN:
        assert json.loads((run_dir / "results.json").read_text())["status"] == "failed"


def test_unwritable_output_dir(completed, voc_root, tmp_path):
    if os.geteuid() == 0:  # root writes anywhere: use a path below a regular file instead
        (tmp_path / "file").write_text("")
        run_dir = tmp_path / "file" / "sub"
    else:
        parent = tmp_path / "locked"
        parent.mkdir(mode=0o500)
        run_dir = parent / "sub"
    try:
        check(completed, voc_root, run_dir, expect=(str(run_dir),))
    finally:
        if os.geteuid() != 0:
            (tmp_path / "locked").chmod(0o700)


def _as_multirun_job(monkeypatch, run_dir: Path) -> None:
    hydra_cfg = SimpleNamespace(mode=RunMode.MULTIRUN, runtime=SimpleNamespace(output_dir=str(run_dir)))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: hydra_cfg))


def test_a_multirun_job_records_its_bad_input_and_raises(voc_root, tmp_path, monkeypatch, capsys):
    cfg = tiny_cfg(tmp_path / "nowhere", "cell=spp-uout")
    _as_multirun_job(monkeypatch, tmp_path / "job")
    with pytest.raises(InputError):  # Hydra marks the job FAILED; the sweep goes on
        run_job(train_mod.run, cfg)
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: data root not found") and "\n" not in line
    results = json.loads((tmp_path / "job/results.json").read_text())
    assert results["status"] == "failed" and results["error"] == line.removeprefix("error: ")
    assert results["cell"] == "spp-uout" and results["config"]["data"]["root"] == str(tmp_path / "nowhere")


def test_a_multirun_job_never_overwrites_a_completed_run(completed, tmp_path, monkeypatch, capsys):
    before = snapshot(completed)
    _as_multirun_job(monkeypatch, completed)
    with pytest.raises(InputError):
        run_job(train_mod.run, tiny_cfg(tmp_path / "nowhere", "trainer.resume=never"))
    assert capsys.readouterr().err.startswith("error: ")
    assert snapshot(completed) == before


def test_record_failure_makes_an_earlier_error_one_line(tmp_path):
    path = tmp_path / "results.json"
    cfg = tiny_cfg(tmp_path)
    config = OmegaConf.to_container(cfg, resolve=True)
    write_json(path, {"status": "failed", "cell": "none", "config": config,
                      "error": "DatasetError: a\nlong\ntraceback"})
    RunDir(tmp_path).record_failure(cfg, "corrupt or unreadable image: x.jpg")
    data = json.loads(path.read_text())
    assert data["status"] == "failed" and data["error"] == "corrupt or unreadable image: x.jpg"
    # Another config's run (the one a refusal protects) is left as it was.
    other = tmp_path / "other" / "results.json"
    write_json(other, {"status": "running", "cell": "none", "config": {**config, "seed": 7}})
    before = other.read_bytes()
    RunDir(other.parent).record_failure(cfg, "trained with a different config")
    assert other.read_bytes() == before
