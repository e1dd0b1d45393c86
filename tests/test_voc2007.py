"""`data=voc2007` (issue 13, item 1): the VOC 2007 layout (VOCdevkit/VOC2007) through the same generator, reader,
split and runner as VOC 2012, the year in every path, error and manifest, and torchvision's 2007 downloader."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torchvision.datasets
from conftest import SMALL, TINY, compose_cfg
from omegaconf import OmegaConf

from deeplab_dropout import train as train_mod
from deeplab_dropout.commands.data import main as data_main
from deeplab_dropout.config import ConfigError, validate
from deeplab_dropout.data import (
    DatasetError,
    VOCSegmentation,
    data_year,
    generate,
    make_split,
    prepare_root,
    read_split_ids,
    voc_dir,
)
from deeplab_dropout.data.split import class_presence, manifest_path
from deeplab_dropout.eval import run_eval
from deeplab_dropout.train import TIMING_KEYS

GEN = {"n_train": 8, "n_val": 4, "seed": 0, "min_side": 40, "max_side": 56}


def _tree(vdir: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under a VOC year folder."""
    return {str(p.relative_to(vdir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(vdir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def both_years(tmp_path_factory) -> Path:
    """One root holding the same generated dataset as VOC2012 and as VOC2007."""
    root = tmp_path_factory.mktemp("both")
    generate(root, **GEN)
    generate(root, **GEN, year="2007")
    return root


def _one_line(e: pytest.ExceptionInfo, *parts: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, (part, msg)
    return msg


def test_generated_2007_layout_is_the_2012_dataset_in_the_2007_folder(both_years):
    v07, v12 = voc_dir(both_years, "2007"), voc_dir(both_years, 2012)
    assert v07 == both_years / "VOCdevkit" / "VOC2007" and v12 == both_years / "VOCdevkit" / "VOC2012"
    sets = v07 / "ImageSets" / "Segmentation"
    train, val = read_split_ids(both_years, "train", "2007"), read_split_ids(both_years, "val", 2007)
    assert len(train) == GEN["n_train"] and len(val) == GEN["n_val"] and not set(train) & set(val)
    assert (sets / "trainval.txt").read_text().split() == train + val
    assert sorted(p.stem for p in (v07 / "JPEGImages").glob("*.jpg")) == sorted(train + val)
    assert sorted(p.stem for p in (v07 / "SegmentationClass").glob("*.png")) == sorted(train + val)
    # Same generator, same files: only the folder name differs.
    assert _tree(v07) == _tree(v12)
    ds = VOCSegmentation(both_years, "val", year=2007)
    assert ds.year == "2007" and ds.image_path(val[0]).parent == v07 / "JPEGImages" and len(ds) == GEN["n_val"]


def test_reuse_and_refusal_are_per_year(both_years, tmp_path):
    before = _tree(voc_dir(both_years, "2012"))
    assert generate(both_years, **GEN, year="2007") == both_years  # reused
    with pytest.raises(DatasetError) as e:
        generate(both_years, **{**GEN, "seed": 1}, year="2007")
    _one_line(e, str(voc_dir(both_years, "2007")), "refusing to overwrite")
    assert _tree(voc_dir(both_years, "2012")) == before
    # A foreign VOC2007 folder is refused; a foreign VOC2012 beside it is not the 2007 dataset's business.
    foreign = tmp_path / "real"
    (foreign / "VOCdevkit" / "VOC2007").mkdir(parents=True)
    (foreign / "VOCdevkit" / "VOC2012" / "keep.txt").parent.mkdir(parents=True)
    (foreign / "VOCdevkit" / "VOC2012" / "keep.txt").write_text("real data")
    with pytest.raises(DatasetError) as e:
        generate(foreign, **GEN, year="2007")
    _one_line(e, "VOC2007", "no synth.json")
    other = tmp_path / "other"
    (other / "VOCdevkit" / "VOC2012").mkdir(parents=True)
    generate(other, **GEN, year="2007")
    assert (voc_dir(other, "2007") / "synth.json").is_file() and list(voc_dir(other).iterdir()) == []


def test_reader_errors_name_the_2007_folder(tmp_path):
    generate(tmp_path / "r12", **GEN)  # VOC2012 only
    with pytest.raises(DatasetError) as e:
        read_split_ids(tmp_path / "r12", "train", "2007")
    _one_line(e, str(tmp_path / "r12" / "VOCdevkit" / "VOC2007"), "no VOCdevkit/VOC2007 folder", "data.year=2007")
    root = tmp_path / "r07"
    generate(root, **GEN, year="2007")
    with pytest.raises(DatasetError) as e:
        read_split_ids(root, "test", "2007")
    _one_line(e, str(voc_dir(root, "2007") / "ImageSets" / "Segmentation" / "test.txt"))
    first = read_split_ids(root, "train", "2007")[0]
    (voc_dir(root, "2007") / "SegmentationClass" / f"{first}.png").unlink()
    with pytest.raises(DatasetError) as e:
        VOCSegmentation(root, "train", year="2007")
    _one_line(e, "mask not found", str(voc_dir(root, "2007") / "SegmentationClass" / f"{first}.png"))
    with pytest.raises(DatasetError) as e:
        VOCSegmentation(root, "val", ids=["2007_000032"], year="2007")
    _one_line(e, str(voc_dir(root, "2007") / "ImageSets" / "Segmentation" / "val.txt"), "2007_000032")


def test_data_voc2007_composes_as_voc2012_with_year_and_full_train_list():
    c07, c12 = compose_cfg(["data=voc2007"]), compose_cfg([])
    d07, d12 = OmegaConf.to_container(c07.data), OmegaConf.to_container(c12.data)
    assert (d07["name"], d07["year"], d07["fraction"], d07["val_split"]) == ("voc2007", 2007, 1.0, "val")
    assert (d12["year"], d12["fraction"]) == (2012, 0.1)
    changed = {k for k in d07.keys() | d12.keys() if d07.get(k) != d12.get(k)}
    assert changed == {"name", "year", "fraction"}  # everything else: the shared voc2012.yaml
    validate(c07)
    assert data_year(c07.data) == "2007" and data_year(c12.data) == "2012"
    # As a user types it, data.year=2007 equals the preset's value: the same config (resume, sweep names, report).
    assert compose_cfg(["data.year=2007"]).data.year == d07["year"]


@pytest.mark.parametrize(("value", "parsed"), [("2007", 2007), ("2012", 2012), ("'2007'", "2007")])
def test_year_from_the_command_line_int_or_quoted_is_valid(value, parsed):
    cfg = compose_cfg([f"data.year={value}"])
    assert cfg.data.year == parsed and type(cfg.data.year) is type(parsed)  # Hydra's parse
    validate(cfg)
    assert data_year(cfg.data) == str(parsed)


@pytest.mark.parametrize("value", ["2010", "'2010'", "true", "2007.0"])
def test_other_years_are_a_one_line_config_error(value):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg([f"data.year={value}"]))
    _one_line(e, "data.year=", "is invalid: expected one of 2007, 2012")


def test_manifests_are_per_year_and_a_2012_manifest_is_refused_for_2007(both_years, tmp_path):
    cache = tmp_path / "cache"
    p12, m12 = make_split(both_years, 0.5, 0, cache_dir=cache)
    p07, m07 = make_split(both_years, 0.5, 0, cache_dir=cache, year=2007)
    assert p12.name == "VOC2012_train_per_class_frac0.5_seed0.json" and m12["year"] == "2012"
    assert p07.name == "VOC2007_train_per_class_frac0.5_seed0.json" and m07["year"] == "2007"
    assert p07 == manifest_path(both_years, 0.5, 0, cache_dir=cache, year="2007")
    assert m07["ids"] == m12["ids"]  # same generated data, same seeded draw
    assert sorted(q.name.split("_")[1] for q in cache.glob("presence_*.json")) == ["VOC2007", "VOC2012"]
    assert class_presence(both_years, "train", cache, year="2007") == class_presence(both_years, "train", cache)
    # The 2012 manifest (or one written before data.year existed) in the 2007 place is refused.
    legacy = {k: v for k, v in m12.items() if k != "year"}
    for record in (m12, legacy):
        p07.write_text(json.dumps(record))
        with pytest.raises(DatasetError) as e:
            make_split(both_years, 0.5, 0, cache_dir=cache, year="2007")
        _one_line(e, str(p07), "made for VOC2012, not VOC2007")
    # A 2012 manifest without a year (before data.year) stays valid for 2012.
    p12.write_text(json.dumps(legacy))
    assert make_split(both_years, 0.5, 0, cache_dir=cache)[1] == legacy


def test_cli_synth_and_split_with_year(tmp_path, capsys):
    out = tmp_path / "cli"
    assert data_main(["synth", "--year", "2007", "--out", str(out), "--train", "8", "--val", "4",
                      "--min-side", "40", "--max-side", "56"]) == 0
    assert Path(capsys.readouterr().out.splitlines()[-1]) == out
    assert (voc_dir(out, "2007") / "synth.json").is_file() and not voc_dir(out, "2012").exists()
    assert data_main(["split", "--root", str(out), "--year", "2007", "--fraction", "1.0"]) == 0
    manifest = Path(capsys.readouterr().out.splitlines()[-1])
    assert manifest == out / "splits" / "VOC2007_train_per_class_frac1_seed0.json"
    record = json.loads(manifest.read_text())
    assert record["year"] == "2007" and record["ids"] == read_split_ids(out, "train", "2007")
    # The default year is 2012, which this root lacks: the one-line error names the missing folder.
    with pytest.raises(SystemExit) as e:
        data_main(["split", "--root", str(out)])
    assert e.value.code == 2 and "VOCdevkit/VOC2012" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        data_main(["synth", "--year", "2010", "--out", str(out)])
    assert e.value.code == 2 and "invalid choice: '2010'" in capsys.readouterr().err


class FakeTorchvisionVOC:
    """Stands in for torchvision's VOCSegmentation: records the archives asked for and writes their lists."""

    calls: list[tuple[str, str, bool]] = []

    def __init__(self, root: str, year: str, image_set: str, download: bool) -> None:
        assert isinstance(year, str)  # torchvision's verify_str_arg needs the string
        self.calls.append((year, image_set, download))
        sets = Path(root) / "VOCdevkit" / f"VOC{year}" / "ImageSets" / "Segmentation"
        sets.mkdir(parents=True, exist_ok=True)
        for name in (["test"] if image_set == "test" else ["train", "val", "trainval"]):
            (sets / f"{name}.txt").write_text("000032\n")


@pytest.mark.parametrize(("overrides", "archives"), [
    (["data=voc2007"], [("2007", "trainval", True)]),
    (["data=voc2007", "data.val_split=test"], [("2007", "trainval", True), ("2007", "test", True)]),
    ([], [("2012", "trainval", True)]),
])
def test_download_fetches_the_years_archives_once(monkeypatch, tmp_path, overrides, archives):
    monkeypatch.setattr(torchvision.datasets, "VOCSegmentation", FakeTorchvisionVOC)
    monkeypatch.setattr(FakeTorchvisionVOC, "calls", [])
    data = compose_cfg([*overrides, f"data.root={tmp_path}", "data.download=true"]).data
    assert prepare_root(data) == tmp_path
    assert FakeTorchvisionVOC.calls == archives
    prepare_root(data)  # the lists are there now: nothing fetched again
    assert FakeTorchvisionVOC.calls == archives


def test_download_of_a_2012_test_list_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(torchvision.datasets, "VOCSegmentation", FakeTorchvisionVOC)
    monkeypatch.setattr(FakeTorchvisionVOC, "calls", [])
    data = compose_cfg([f"data.root={tmp_path}", "data.download=true", "data.val_split=test"]).data
    with pytest.raises(DatasetError) as e:
        prepare_root(data)
    _one_line(e, "VOC 2012 has no public test masks")
    assert FakeTorchvisionVOC.calls == []


def _tiny(root: Path, *overrides: str):
    return compose_cfg([*TINY, f"data.root={root}", *SMALL, "trainer.epochs=1", "trainer.max_val_images=4",
                        *overrides])


def _metrics(run_dir: Path) -> tuple[dict, list[dict]]:
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "completed"
    return res, [{k: v for k, v in e.items() if k not in TIMING_KEYS} for e in res["history"]]


def test_voc2007_trains_exactly_like_voc2012_on_the_same_images(both_years, tmp_path):
    train_mod.run(_tiny(both_years, "data=voc2012_full"), tmp_path / "12")
    train_mod.run(_tiny(both_years, "data=voc2007"), tmp_path / "07")
    (r12, h12), (r07, h07) = _metrics(tmp_path / "12"), _metrics(tmp_path / "07")
    assert h07 == h12 and len(h07) == 1  # the year only picks the folder
    assert (r12["split"]["year"], r07["split"]["year"]) == ("2012", "2007")
    assert r07["split"]["sha256"] == r12["split"]["sha256"] and r07["split"]["n_images"] == GEN["n_train"]
    assert Path(r07["split"]["manifest"]).name.startswith("VOC2007_")
    assert Path(r12["split"]["manifest"]).name.startswith("VOC2012_")


def test_synthetic_with_year_2007_generates_trains_and_evaluates(tmp_path):
    root = tmp_path / "synth07"
    synth = [f"data.synth.{k}={v}" for k, v in (("train", 8), ("val", 4), ("min_side", 40), ("max_side", 56))]
    train_mod.run(_tiny(root, "data=synthetic", "data.year=2007", "data.fraction=1.0", *synth), tmp_path / "run")
    res, history = _metrics(tmp_path / "run")
    assert sorted(p.name for p in (root / "VOCdevkit").iterdir()) == ["VOC2007"]
    manifest = json.loads(Path(res["split"]["manifest"]).read_text())
    assert Path(res["split"]["manifest"]).parent == root / "splits" and manifest["year"] == "2007"
    assert res["split"]["year"] == "2007" and manifest["ids"] == read_split_ids(root, "train", "2007")
    assert res["config"]["data"]["year"] == 2007 and len(history) == 1
    # Evaluating the checkpoint reads the 2007 val list again (its run's config) and gives the same numbers.
    overrides = [f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'best.pt'}"]
    entry = run_eval(compose_cfg(overrides, config_name="eval"), tmp_path / "eval", overrides)
    assert entry["miou"] == pytest.approx(history[0]["miou"], abs=1e-12)
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["split"] == res["split"]
