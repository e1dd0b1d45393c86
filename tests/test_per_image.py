"""per_image.npz and predictions/: the record round-trips, a tiny run's results.json is recomputed from it
exactly, the predictions are the label maps of the right epochs, index.json names the best and worst
image, and the HParams tab lists Table 3's metrics."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from deeplab_dropout import train as train_mod
from deeplab_dropout.data import get_datasets
from deeplab_dropout.data.voc import VOC_PALETTE
from deeplab_dropout.engine import evaluate
from deeplab_dropout.metrics import iou_from_counts, miou_from_counts
from deeplab_dropout.results import PerImage, read_per_image, write_per_image
from deeplab_dropout.rundir import RunDir
from deeplab_dropout.tb import CAPTION_HEIGHT, HPARAM_METRICS, ImageViews

K = 21


def test_record_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    union = rng.integers(0, 500, size=(3, K))
    counts = np.stack([rng.integers(0, union + 1), union], axis=-1)  # intersection <= union
    ids = ["2007_000033", "a b", "ü"]
    write_per_image(tmp_path / "p.npz", ids, counts, 7)
    back = read_per_image(tmp_path / "p.npz")
    assert isinstance(back, PerImage) and back.ids == ids and back.epoch == 7
    assert back.counts.dtype == np.int32 and np.array_equal(back.counts, counts)
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_records_are_one_line_errors_naming_the_file(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, ids=np.array(["a"]), counts=np.zeros((1, K, 2), np.int32))  # no epoch
    with pytest.raises(ValueError, match=r"bad\.npz.*no epoch"):
        read_per_image(path)
    np.savez(path, ids=np.array(["a", "b"]), counts=np.zeros((1, K, 2), np.int32), epoch=np.array(1))
    with pytest.raises(ValueError, match=r"bad\.npz is not a per-image record"):
        read_per_image(path)
    path.write_text("not a zip")
    with pytest.raises(ValueError, match=r"cannot read .*bad\.npz") as err:
        read_per_image(path)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="outside"):
        write_per_image(path, ["a"], np.full((1, K, 2), 2**31), 1)
    with pytest.raises(ValueError, match=r"\(2, K, 2\)"):
        write_per_image(path, ["a", "b"], np.zeros((1, K, 2)), 1)


@pytest.fixture(scope="module")
def run(voc_root, tmp_path_factory):
    """Two epochs; max_val_images=3 with val batches of 4 evaluates the first 4 of the 6 val images; fixed
    images: one past that cut and the first."""
    val_ids = (voc_root / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").read_text().split()
    run_dir = tmp_path_factory.mktemp("run")
    cfg = tiny_cfg(voc_root, "cell=all-chandrop", "trainer.epochs=2", "trainer.max_train_steps=1",
                   "trainer.max_val_images=3", f"trainer.tb_images=[{val_ids[5]},{val_ids[0]}]")
    train_mod.run(cfg, run_dir)
    return run_dir, cfg, val_ids


def test_results_recomputed_exactly_from_the_record(run):
    run_dir, _, val_ids = run
    res = json.loads((run_dir / "results.json").read_text())
    rec = read_per_image(run_dir / "per_image.npz")
    assert rec.ids == val_ids[:4] and rec.counts.shape == (4, K, 2) and rec.epoch == res["best_epoch"]
    assert np.all(rec.counts[..., 0] <= rec.counts[..., 1])
    inter, union = rec.counts[..., 0].sum(0), rec.counts[..., 1].sum(0)
    best = res["best"]
    assert miou_from_counts(inter, union).item() == best["miou"]
    assert [None if math.isnan(v) else v for v in iou_from_counts(inter, union).tolist()] == best["class_iou"]
    image_miou = miou_from_counts(rec.counts[..., 0], rec.counts[..., 1])
    image_miou = image_miou[~image_miou.isnan()]
    assert image_miou.mean().item() == pytest.approx(best["per_image_miou"]["mean"], abs=1e-12)
    assert image_miou.min().item() == best["per_image_miou"]["min"]
    assert image_miou.max().item() == best["per_image_miou"]["max"]


def read_png(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img


def test_predictions_are_label_maps_of_each_epoch(run):
    run_dir, cfg, val_ids = run
    _, val_ds, _ = get_datasets(cfg.data, seed=cfg.seed)
    for image_id in (val_ids[5], val_ids[0]):
        folder = run_dir / "predictions" / image_id
        _, target = val_ds[val_ds.ids.index(image_id)]
        image = read_png(folder / "image.png")
        assert image.mode == "RGB" and image.size == (33, 33)
        truth = read_png(folder / "truth.png")
        assert truth.mode == "P" and truth.getpalette()[:768] == list(VOC_PALETTE)
        assert np.array_equal(np.asarray(truth), target.numpy())  # 255 (void) kept
        for epoch in (1, 2):
            pred = read_png(folder / f"epoch_{epoch:03d}.png")
            labels = np.asarray(pred)
            assert pred.mode == "P" and labels.shape == (33, 33) and labels.max() < K


def test_index_names_the_best_and_worst_image(run):
    run_dir, _, val_ids = run
    index = json.loads((run_dir / "predictions/index.json").read_text())
    res = json.loads((run_dir / "results.json").read_text())
    rec = read_per_image(run_dir / "per_image.npz")
    image_miou = miou_from_counts(rec.counts[..., 0], rec.counts[..., 1]).tolist()
    scored = {i: m for i, m in zip(rec.ids, image_miou, strict=True) if not math.isnan(m)}
    assert index["fixed"] == [val_ids[5], val_ids[0]] and index["best_epoch"] == res["best_epoch"]
    assert index["best"]["miou"] == max(scored.values())
    assert scored[index["best"]["id"]] == index["best"]["miou"]
    assert index["worst"]["miou"] == min(scored.values())
    assert scored[index["worst"]["id"]] == index["worst"]["miou"]
    for name in ("best", "worst"):
        assert (run_dir / "predictions" / index[name]["id"] / f"epoch_{res['best_epoch']:03d}.png").is_file()


def test_tensorboard_in_the_run_dir_with_table3_hparams_and_captioned_strips(run):
    run_dir, _, val_ids = run
    assert not (run_dir / "tb").exists() and list(run_dir.glob("events.out.tfevents.*"))
    ea = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    content = ea.PluginTagToContent("hparams")["_hparams_/experiment"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    assert [m.name.tag for m in experiment.metric_infos] == list(HPARAM_METRICS)
    assert [h.display_name for h in experiment.hparam_infos][:5] == ["cell", "schedule", "seed", "p", "dropout"]
    res = json.loads((run_dir / "results.json").read_text())
    best, stats = res["best"], res["best"]["per_image_miou"]
    expected = [best["miou"], stats["mean"], stats["min"], stats["median"], stats["max"], stats["std"],
                best["val_loss"], best["epoch"]]
    for tag, value in zip(HPARAM_METRICS, expected, strict=True):
        events = ea.Scalars(tag)
        assert [e.step for e in events] == [1, 2] and events[-1].value == pytest.approx(value, rel=1e-6)
    images = ea.Tags()["images"]
    fixed_tags = {f"val_images/{val_ids[5]}", f"val_images/{val_ids[0]}"}
    assert fixed_tags | {"val/easiest_image", "val/hardest_image"} <= set(images)
    event = ea.Images(f"val_images/{val_ids[0]}")[-1]
    # 33-pixel crops enlarged ×6 to reach 192, plus the caption band.
    assert (event.height, event.width) == (CAPTION_HEIGHT + 33 * 6, (3 * 33 + 8) * 6)
    assert [e.step for e in ea.Images(f"val_images/{val_ids[0]}")] == [1, 2]


def test_eval_epoch_uses_the_same_counts_as_training(run, tmp_path):
    """deeplab-dropout-eval of best.pt writes the run's per-image record (same weights, same images)."""
    from conftest import compose_cfg

    from deeplab_dropout.eval import run_eval

    run_dir, _, _ = run
    overrides = [f"checkpoint={run_dir / 'checkpoints/best.pt'}"]
    run_eval(compose_cfg(overrides, config_name="eval"), tmp_path, overrides)
    ours, theirs = read_per_image(tmp_path / "per_image.npz"), read_per_image(run_dir / "per_image.npz")
    assert ours.epoch == 1 and ours.ids == theirs.ids
    assert torch.equal(torch.from_numpy(ours.counts), torch.from_numpy(theirs.counts))


def test_fixed_image_captions_score_the_prediction_shown(run, tmp_path):
    """An evaluated fixed image takes evaluate's per-image mIoU, one past trainer.max_val_images is scored
    itself: both are the mIoU of the prediction its strip shows."""
    from test_plots import brute_miou

    _, cfg, _ = run
    state = train_mod.set_up(cfg, RunDir(tmp_path / "again"))
    views = ImageViews(None, state.run_dir, state.val_ds, state.val_loader, cfg.data, cfg.model.num_classes,
                       state.tb_indices)
    ev = evaluate(state.model, state.val_loader, state.runtime, state.criterion,
                  num_classes=cfg.model.num_classes, ignore_index=cfg.data.ignore_index,
                  max_images=cfg.trainer.max_val_images, keep=tuple(state.tb_indices))
    assert set(ev.preds) == {0}  # val_ids[0] evaluated, val_ids[5] past the cut
    for i in state.tb_indices:
        view = views.predict(state.model, state.runtime, i, ev.preds.get(i))
        expected = brute_miou(view.pred.numpy(), view.target.numpy())
        assert views.view_miou(view, i, ev) == pytest.approx(expected, abs=1e-12)
