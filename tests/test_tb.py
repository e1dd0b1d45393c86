"""TensorBoard image strips: VOC colours, overlay only where there is an object, readable size."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deeplab_dropout.data.voc import VOC_PALETTE
from deeplab_dropout.tb import CAPTION_HEIGHT, colorize, overlay, strip


def test_colorize_uses_the_voc_palette():
    mask = torch.tensor([[0, 12], [255, 20]])
    rgb = colorize(mask)
    for (y, x), label in {(0, 0): 0, (0, 1): 12, (1, 0): 255, (1, 1): 20}.items():
        assert rgb[:, y, x].tolist() == VOC_PALETTE[3 * label: 3 * label + 3]


def test_overlay_blends_objects_and_leaves_background():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 8, 9), dtype=torch.uint8)
    mask = torch.zeros(8, 9, dtype=torch.long)
    mask[2:5, 3:7] = 15
    out = overlay(image, mask, alpha=0.5)
    assert torch.equal(out[:, mask == 0], image[:, mask == 0])
    colour = torch.tensor(VOC_PALETTE[45:48], dtype=torch.float32)[:, None]
    expected = (0.5 * image[:, mask == 15].float() + 0.5 * colour).round().to(torch.uint8)
    assert torch.equal(out[:, mask == 15], expected)


def test_strip_layout_and_scale():
    image = torch.zeros(3, 33, 40, dtype=torch.uint8)
    target = torch.zeros(33, 40, dtype=torch.long)
    out = strip(image, target, target, min_height=100)
    scale = 4  # ceil(100 / 33)
    assert out.shape == (3, 33 * scale, (3 * 40 + 2 * 4) * scale) and out.dtype == torch.uint8
    big = torch.zeros(3, 300, 40, dtype=torch.uint8)
    assert strip(big, torch.zeros(300, 40), torch.zeros(300, 40)).shape == (3, 300, 3 * 40 + 8)


def test_strip_titles_are_a_caption_band_above_each_panel():
    torch.manual_seed(1)
    image = torch.randint(0, 256, (3, 33, 40), dtype=torch.uint8)
    target = torch.randint(0, 21, (33, 40))
    pred = torch.randint(0, 21, (33, 40))
    plain = strip(image, target, pred, min_height=100)
    titled = strip(image, target, pred, min_height=100, titles=("2007_000033", "ground truth", "prediction"))
    assert titled.shape == (3, plain.shape[1] + CAPTION_HEIGHT, plain.shape[2])
    assert torch.equal(titled[:, CAPTION_HEIGHT:], plain)  # the strip itself is unchanged below the band
    band = titled[:, :CAPTION_HEIGHT]
    ink = (band < 128).all(0)  # dark text on white
    panel = (40 + 4) * 4  # each panel starts at a multiple of this (×4 enlargement)
    for i in range(3):
        assert ink[:, i * panel: i * panel + 40 * 4].sum() > 20, f"no text over panel {i}"
    assert (band[:, :, -4:] == 255).all() and not ink.all()
    empty = strip(image, target, pred, min_height=100, titles=("", "", ""))
    assert (empty[:, :CAPTION_HEIGHT] == 255).all()


def test_logged_image_decodes_to_the_same_pixels(tmp_path):
    from io import BytesIO

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from deeplab_dropout.tb import TBLogger

    img = torch.randint(0, 256, (3, 21, 34), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    logger = TBLogger(tmp_path, {"cell": "none"})
    logger.image("val_images/x", img, 3)
    logger.close()
    ea = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    ea.Reload()
    [event] = ea.Images("val_images/x")
    decoded = np.asarray(Image.open(BytesIO(event.encoded_image_string)))
    assert (event.step, event.height, event.width) == (3, 21, 34)
    assert np.array_equal(decoded, img.permute(1, 2, 0).numpy())


# ---- what TensorBoard shows of a sweep: HParams columns, tags, Δ vs none --------------------------------------

STUDY_ORDER = ["cell", "schedule", "seed", "p", "dropout", "placement", "backbone"]


def hparams_experiment(logdir):
    """The HParams tab's columns as TensorBoard's own plugin serves them for ``logdir`` (its sorting included),
    and how many runs declare columns."""
    from tensorboard import context
    from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context, metadata

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    plugin = backend_context.Context(base_plugin.TBContext(logdir=str(logdir), multiplexer=mux,
                                                          data_provider=MultiplexerDataProvider(mux, str(logdir))))
    ctx = context.RequestContext()
    tags = plugin.hparams_metadata(ctx, "")
    exp = plugin.experiment_from_metadata(ctx, "", True, tags, plugin.hparams_from_data_provider(ctx, "", None))
    declaring = [run for run, by_tag in tags.items() if metadata.EXPERIMENT_TAG in by_tag]
    return exp, declaring


def study_hparams(cell: str, p: float, seed: int = 0) -> dict:
    dropout, placement = ("none", "none") if cell == "none" else (cell.split("-")[1], cell.split("-")[0])
    return {"cell": cell, "schedule": "constant", "seed": seed, "p": p, "dropout": dropout,
            "placement": placement, "backbone": "resnet18"}


def test_run_hparams_are_in_the_documented_order(compose_config):
    from deeplab_dropout.tb import run_hparams

    cfg = compose_config(["cell=upper-dropblock", "schedule=linear", "seed=3", "model=deeplabv3plus_resnet18"])
    assert run_hparams(cfg) == {"cell": "upper-dropblock", "schedule": "linear", "seed": 3, "p": 0.2,
                                "dropout": "dropblock", "placement": "upper", "backbone": "resnet18"}
    assert list(run_hparams(cfg)) == STUDY_ORDER


def test_hparams_tab_lists_a_runs_columns_in_study_order_with_display_names(tmp_path):
    from deeplab_dropout.tb import TBLogger

    for cell, p in (("none", 0.0), ("spp-uout", 0.2)):
        TBLogger(tmp_path / f"cell={cell}", study_hparams(cell, p)).close()
    exp, declaring = hparams_experiment(tmp_path)
    assert [h.display_name for h in exp.hparam_infos] == STUDY_ORDER  # the plugin sorts by name
    assert [m.display_name for m in exp.metric_infos] == ["mIoU (dataset)", "Mean mIoU", "Worst mIoU", "Med. mIoU",
                                                          "Best mIoU", "Std.", "Loss", "Best epoch"]
    assert [m.name.tag for m in exp.metric_infos][:2] == ["val-best/miou", "val-best/per_image_miou_mean"]
    assert len(declaring) == 2  # each run alone would show its columns


def test_sweep_columns_are_the_hparams_that_vary_declared_once(tmp_path):
    from deeplab_dropout.tb import HPARAMS_FILE, TBLogger, read_session_start, write_sweep_columns

    runs = {"cell=none": study_hparams("none", 0.0), "cell=spp-uout": study_hparams("spp-uout", 0.2),
            "cell=all-uout,seed=1": study_hparams("all-uout", 0.2, seed=1)}
    for folder, hparams in runs.items():
        TBLogger(tmp_path / folder, hparams).close()
    write_sweep_columns(tmp_path)
    write_sweep_columns(tmp_path)  # the report run again: the same columns, still declared once
    exp, declaring = hparams_experiment(tmp_path)
    assert declaring == ["cell=all-uout,seed=1"]  # one run (the first), not a run "." of its own
    assert [h.display_name for h in exp.hparam_infos] == ["cell", "seed", "p", "dropout", "placement"]
    assert all(h.differs for h in exp.hparam_infos)
    assert sorted(exp.hparam_infos[0].domain_discrete) == ["all-uout", "none", "spp-uout"]
    assert (exp.hparam_infos[2].domain_interval.min_value, exp.hparam_infos[2].domain_interval.max_value) == (0, 0.2)
    assert [m.display_name for m in exp.metric_infos][:3] == ["ΔmIoU vs none", "mIoU (dataset)", "Mean mIoU"]
    for folder, hparams in runs.items():  # each run keeps its row
        row = read_session_start(tmp_path / folder / HPARAMS_FILE)
        assert [(name.split("_", 1)[1], value) for name, value in sorted(row.items())] == list(hparams.items())


def test_scalar_tags_group_train_then_val(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from deeplab_dropout.tb import TBLogger

    best = {"epoch": 2, "miou": 0.4, "val_loss": 0.7,
            "per_image_miou": {"mean": 0.5, "std": 0.1, "min": 0.2, "median": 0.55, "max": 0.9}}
    logger = TBLogger(tmp_path, study_hparams("none", 0.0))
    logger.log_scalars({"epoch": 1, "train_loss": 1.5, "lr": 0.007, "lr_head": 0.07, "drop_p": 0.1}, None)
    logger.log_scalars({"epoch": 2, "train_loss": 1.2, "lr": 0.006, "lr_head": 0.06, "drop_p": 0.2, **best,
                        "pixel_acc": 0.8}, best)
    logger.close()
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    values = {tag: [(e.step, round(e.value, 6)) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}
    assert values == {
        "train/loss": [(1, 1.5), (2, 1.2)], "train/lr": [(1, 0.007), (2, 0.006)],
        "train/lr_head": [(1, 0.07), (2, 0.06)], "train/drop_p": [(1, 0.1), (2, 0.2)],
        "val/loss": [(2, 0.7)], "val/miou": [(2, 0.4)], "val/pixel_acc": [(2, 0.8)],
        "val/per_image_miou_mean": [(2, 0.5)], "val-best/miou": [(2, 0.4)], "val-best/per_image_miou_mean": [(2, 0.5)],
        "val-best/per_image_miou_min": [(2, 0.2)], "val-best/per_image_miou_median": [(2, 0.55)],
        "val-best/per_image_miou_max": [(2, 0.9)], "val-best/per_image_miou_std": [(2, 0.1)],
        "val-best/loss": [(2, 0.7)], "val-best/epoch": [(2, 2)]}


def test_comparison_written_again_replaces_the_point(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from deeplab_dropout.tb import DELTA_TAG, write_comparison

    write_comparison(tmp_path, {DELTA_TAG: 0.25})
    write_comparison(tmp_path, {DELTA_TAG: -0.125})
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars(DELTA_TAG)] == [(0, -0.125)]


def dataset_miou(counts) -> float:
    """mIoU over the classes present: summed intersection / summed union, by hand."""
    inter, union = counts[..., 0].sum(0).astype(float), counts[..., 1].sum(0).astype(float)
    return float(np.mean([i / u for i, u in zip(inter, union, strict=True) if u > 0]))


@pytest.mark.slow
def test_report_writes_each_runs_delta_vs_none(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_report import fake_run

    from deeplab_dropout.report import report
    from deeplab_dropout.results import write_per_image
    from deeplab_dropout.tb import DELTA_TAG

    rng = np.random.default_rng(0)
    ids = [f"img{i}" for i in range(6)]
    counts = {}
    for cell in ("none", "spp-uout", "all-chandrop"):
        folder = fake_run(tmp_path, [f"cell={cell}"])
        union = rng.integers(50, 200, size=(6, 21))
        union[:, 10:] = 0  # classes 10.. absent
        counts[folder] = np.stack([rng.integers(0, 50, size=(6, 21)) * (union > 0), union], -1).astype(np.int32)
        write_per_image(tmp_path / folder / "per_image.npz", ids, counts[folder], 3)
    report(tmp_path, n_boot=5, figures=False)
    report(tmp_path, n_boot=5, figures=False)  # again: one point per run, not two
    base = dataset_miou(counts["cell=none,seed=0"])
    for folder, run_counts in counts.items():
        ea = EventAccumulator(str(tmp_path / folder))
        ea.Reload()
        [point] = ea.Scalars(DELTA_TAG)
        assert point.value == pytest.approx(dataset_miou(run_counts) - base, abs=1e-6), folder
