"""All TensorBoard output of a run, into the run directory itself (so ``tensorboard --logdir SWEEP`` names
runs by their sweep folder): HParams, each epoch's scalars, and the image views: captioned image | truth |
prediction strips in the VOC palette (fixed val images, and the easiest and hardest one at each new best
epoch), saved as PNGs under predictions/ too. After a sweep, the report adds what a run cannot know
(``show_comparison``): each run's ΔmIoU vs `none`, and HParams columns for only the hyper-parameters that vary.

Tag groups sort alphabetically in TensorBoard and it opens the first two: ``train/`` (loss, lr, lr_head,
drop_p), then ``val/``; the best-so-far values the HParams tab reads are under ``val-best/``, after them in
both the Time Series and the Scalars dashboard (which sorts ``_`` before letters, ``-`` after ``/``)."""
from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard import SummaryWriter

from deeplab_dropout.config import ConfigError
from deeplab_dropout.data.cache import CachedValLoader
from deeplab_dropout.data.split import class_presence
from deeplab_dropout.data.transforms import denormalize
from deeplab_dropout.data.voc import VOC_PALETTE
from deeplab_dropout.engine import Evaluation, labels
from deeplab_dropout.metrics import SegmentationMetrics
from deeplab_dropout.results import atomic_write
from deeplab_dropout.rundir import RunDir
from deeplab_dropout.runtime import Runtime
from deeplab_dropout.study import BASELINE, cell_name, placement_name

# The HParams tab's metric columns: each run's values at its best epoch (Table 3's columns, the paper's five
# first: the tab shows five by default), each also written as a best-so-far scalar under its tag; the tab
# shows the display name.
HPARAM_METRICS = {"val-best/miou": "mIoU (dataset)", "val-best/per_image_miou_mean": "Mean mIoU",
                  "val-best/per_image_miou_min": "Worst mIoU", "val-best/per_image_miou_median": "Med. mIoU",
                  "val-best/per_image_miou_max": "Best mIoU", "val-best/per_image_miou_std": "Std.",
                  "val-best/loss": "Loss", "val-best/epoch": "Best epoch"}
# Written by the report into each run: its experiment's ΔmIoU vs `none` (report.md's column; 0 for `none`).
DELTA_TAG, DELTA_NAME = "val/delta_miou_vs_none", "ΔmIoU vs none"
# Event files of fixed names, so that writing one again replaces it. "0" sorts them before the run's own
# growing file (TensorBoard's Python loader reads a folder's files in name order and follows the last one).
HPARAMS_FILE = "events.out.tfevents.0.hparams"  # a run's HParams row (and, until the report, the columns)
COMPARISON_FILE = "events.out.tfevents.0.comparison"  # the report's Δ vs none, in each run folder
EXPERIMENT_FILE = "events.out.tfevents.0.experiment"  # the report's HParams columns, in one run folder
KEEP_ALL_BYTES = 64 * 2**20  # uint8 label maps kept from an evaluation, at most
CAPTION_HEIGHT = 14  # pixels of the title band above each strip (PIL's default font is ~11 high)


PALETTE = torch.tensor(VOC_PALETTE, dtype=torch.uint8).reshape(256, 3)  # label -> RGB


def colorize(mask: torch.Tensor) -> torch.Tensor:
    """(H, W) integer labels -> (3, H, W) uint8 in the VOC palette (255 = void is its cream colour)."""
    return PALETTE[mask.long().clamp(0, 255).cpu()].permute(2, 0, 1)


def overlay(image: torch.Tensor, mask: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    """The VOC colours of ``mask`` blended over a uint8 (3, H, W) image; background (0) is left clear."""
    blend = (1 - alpha) * image.float() + alpha * colorize(mask).float()
    return torch.where((mask.cpu() != 0)[None], blend.round(), image.float()).to(torch.uint8)


def strip(image: torch.Tensor, target: torch.Tensor, pred: torch.Tensor, min_height: int = 192,
          titles: Sequence[str] | None = None) -> torch.Tensor:
    """uint8 (3, H, W): image | ground truth overlay | prediction overlay, side by side with white gaps,
    enlarged (nearest) to at least ``min_height`` so that small crops stay readable in TensorBoard; with
    ``titles`` (one per panel), a white caption band on top."""
    image = image.cpu()
    sep = torch.full((3, image.shape[-2], 4), 255, dtype=torch.uint8)
    out = torch.cat([image, sep, overlay(image, target), sep, overlay(image, pred)], dim=-1)
    scale = -(-min_height // out.shape[-2])  # ceil
    if scale > 1:
        out = out.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    if titles is None:
        return out
    lefts = [i * (image.shape[-1] + 4) * max(scale, 1) for i in range(3)]
    return torch.cat([caption_band(out.shape[-1], titles, lefts), out], dim=-2)


def caption_band(width: int, titles: Sequence[str], lefts: Sequence[int]) -> torch.Tensor:
    """uint8 (3, CAPTION_HEIGHT, width): white, with each title in black from its x offset in ``lefts``."""
    from PIL import Image, ImageDraw, ImageFont

    band = Image.new("RGB", (width, CAPTION_HEIGHT), "white")
    draw, font = ImageDraw.Draw(band), ImageFont.load_default()
    for title, left in zip(titles, lefts, strict=True):
        draw.text((left + 2, 1), title, fill="black", font=font)
    return torch.from_numpy(np.asarray(band).copy()).permute(2, 0, 1)


def run_hparams(cfg: DictConfig) -> dict:
    """The run's row in the HParams tab: its cell, the study's axes, seed and backbone, in the order of the
    tab's columns (it shows the first five by default, so the paper's axes come first)."""
    return {"cell": cell_name(cfg), "schedule": cfg.schedule.name, "seed": int(cfg.seed),
            "p": float(cfg.dropout.p), "dropout": cfg.dropout.name, "placement": placement_name(cfg),
            "backbone": cfg.model.backbone}


def pick_tb_images(cfg: DictConfig, val_ds) -> list[int]:
    """Indices of the fixed val images: trainer.tb_images by id, else the first containing each class of
    trainer.tb_image_classes (the paper's tvmonitor and cow images)."""
    if cfg.trainer.tb_images is not None:
        missing = [i for i in cfg.trainer.tb_images if i not in val_ds.ids]
        if missing:
            raise ConfigError(f"trainer.tb_images={list(cfg.trainer.tb_images)} is invalid: "
                              f"{missing} not in the val list")
        return [val_ds.ids.index(i) for i in cfg.trainer.tb_images]
    presence = class_presence(cfg.data.root, cfg.data.val_split, cfg.data.get("cache_dir"), val_ds.year)
    picked = []
    for cls in cfg.trainer.tb_image_classes:
        first = next((i for i, id_ in enumerate(val_ds.ids) if cls in presence.get(id_, ())), None)
        if first is not None and first not in picked:
            picked.append(first)
    return picked


def best_and_worst(image_miou: Sequence[float]) -> tuple[int, int]:
    """Indices of the images with the highest and the lowest mIoU (NaN, an image without classes, is
    neither)."""
    scores = torch.tensor(image_miou, dtype=torch.float64).nan_to_num(nan=math.inf)
    return int(scores.masked_fill(scores.isinf(), -math.inf).argmax()), int(scores.argmin())


def best_scalars(best: dict | None) -> dict[str, float | None]:
    """HPARAM_METRICS' values at the best epoch so far (from its results.json entry; None before one)."""
    if best is None:
        return dict.fromkeys(HPARAM_METRICS)
    stats = best["per_image_miou"]
    values = [best["miou"], stats["mean"], stats["min"], stats["median"], stats["max"], stats["std"],
              best["val_loss"], best["epoch"]]
    return dict(zip(HPARAM_METRICS, values, strict=True))


# ---- HParams: the plugin's protos, in event files of their own ----------------------------------------------
# The plugin lists hyper-parameters sorted by name (those that vary first), whatever order they are declared
# in: each name carries its position ("1_cell", "2_schedule", ...) and the tab shows the display name.

def hparam_names(keys: Iterable[str]) -> dict[str, str]:
    """{key: its name in the HParams protos}: the key prefixed with its 1-based position (zero-padded, so
    that the names sort in the keys' order)."""
    keys = list(keys)
    width = len(str(len(keys)))
    return {key: f"{i:0{width}d}_{key}" for i, key in enumerate(keys, 1)}


def display_name(name: str) -> str:
    """A hyper-parameter's name as the tab shows it: without its position prefix (if it has one)."""
    position, _, key = name.partition("_")
    return key if position.isdigit() and key else name


def plugin_summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> Summary:
    """A summary of the HParams plugin (``tag``: its experiment, session start or end tag), as the plugin's
    ``metadata.create_summary_metadata`` makes it but serialised deterministically (its maps in key order), so
    the same data are the same bytes in every process."""
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME,
                                        content=data.SerializeToString(deterministic=True))
    return Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin),
                                        tensor=metadata.NULL_TENSOR)])


def session_start(hparams: dict) -> Summary:
    """A run's row: ``hparams`` ({name: str, bool or number}) as the plugin's session start info."""
    info = plugin_data_pb2.SessionStartInfo()
    for name, value in hparams.items():
        if isinstance(value, bool):
            info.hparams[name].bool_value = value
        elif isinstance(value, str):
            info.hparams[name].string_value = value
        else:
            info.hparams[name].number_value = value
    return plugin_summary(metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(
        session_start_info=info, version=metadata.PLUGIN_DATA_VERSION))


def hparam_info(name: str, values: list, differs: bool) -> api_pb2.HParamInfo:
    """A column of the tab: ``name``'s type and domain from the ``values`` runs have (numbers: an interval;
    strings and booleans: the distinct values, for the tab's check-box filter)."""
    info = api_pb2.HParamInfo(name=name, display_name=display_name(name), differs=differs)
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        info.type = api_pb2.DATA_TYPE_FLOAT64
        info.domain_interval.min_value, info.domain_interval.max_value = min(values), max(values)
    else:
        kind = bool if all(isinstance(v, bool) for v in values) else str
        info.type = api_pb2.DATA_TYPE_BOOL if kind is bool else api_pb2.DATA_TYPE_STRING
        distinct = sorted({v if kind is bool else str(v) for v in values})
        info.domain_discrete.extend(distinct)  # a ListValue: bools and strings become their kinds of Value
    return info


def experiment(columns: dict[str, list], differs: bool, metrics: dict[str, str]) -> Summary:
    """The tab's columns: the hyper-parameters ``columns`` ({name: the values runs have}), then ``metrics``
    ({scalar tag: display name}) in that order."""
    exp = api_pb2.Experiment(
        hparam_infos=[hparam_info(name, values, differs) for name, values in columns.items()],
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=shown)
                      for tag, shown in metrics.items()])
    return plugin_summary(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(
        experiment=exp, version=metadata.PLUGIN_DATA_VERSION))


def write_events(path: Path, summaries: Sequence[tuple[int, Summary]]) -> None:
    """An event file at ``path`` holding ``summaries`` ((step, summary) pairs), replacing any (atomically, so
    that TensorBoard never reads half of it). The events carry no wall time, so the same summaries make the
    same bytes: a file that already holds them is left untouched (a report run again changes no run folder)."""
    buffer = io.BytesIO()
    records = RecordWriter(buffer)
    records.write(Event(file_version="brain.Event:2").SerializeToString())
    for step, summary in summaries:
        records.write(Event(step=step, summary=summary).SerializeToString(deterministic=True))
    content = buffer.getvalue()
    if path.is_file() and path.read_bytes() == content:
        return
    atomic_write(path, lambda f: f.write(content))


def read_session_start(path: Path) -> dict:
    """The hyper-parameters ({name: value}) of the session start info in event file ``path`` ({} if none)."""
    for event in EventFileLoader(str(path)).Load():
        for value in event.summary.value:
            if value.tag == metadata.SESSION_START_INFO_TAG:
                info = metadata.parse_session_start_info_plugin_data(value.metadata.plugin_data.content)
                return {name: getattr(v, v.WhichOneof("kind")) for name, v in info.hparams.items()}
    return {}


class TBLogger:
    """A SummaryWriter in the run directory that declares the run's hyper-parameters once, at the start."""

    def __init__(self, log_dir: Path, hparam_dict: dict) -> None:
        self.writer = SummaryWriter(log_dir=str(log_dir))
        # Written at the start (not via add_hparams at the end) so running and failed runs show in the
        # HParams tab too, in this run's folder rather than a timestamped sub-run, and in a file of its own:
        # the report rewrites it without the columns (the tab reads the columns of one run only, any one).
        hparams = {hparam_names(hparam_dict)[key]: value for key, value in hparam_dict.items()}
        columns = {name: [value] for name, value in hparams.items()}
        write_events(Path(log_dir) / HPARAMS_FILE, [(0, experiment(columns, False, HPARAM_METRICS)),
                                                     (0, session_start(hparams))])

    def log_scalars(self, entry: dict, best: dict | None) -> None:
        """One results.json history entry at step = its epoch; the val scalars (and the best so far, for the
        HParams tab) only if the epoch was evaluated."""
        step = entry["epoch"]
        self.scalars({"train/loss": entry["train_loss"], "train/lr": entry["lr"], "train/lr_head": entry["lr_head"],
                      "train/drop_p": entry["drop_p"]}, step)
        if "miou" not in entry:
            return
        self.scalars({"val/loss": entry["val_loss"], "val/miou": entry["miou"],
                      "val/pixel_acc": entry["pixel_acc"], "val/per_image_miou_mean": entry["per_image_miou"]["mean"],
                      **best_scalars(best)}, step)

    def scalars(self, values: dict[str, float | None], step: int) -> None:
        """Each value under its tag at ``step``; None (undefined) and NaN are left out."""
        for tag, value in values.items():
            if value is not None and not math.isnan(value):
                self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, img: torch.Tensor, step: int) -> None:
        """A uint8 (3, H, W) image under ``tag`` at ``step``, as add_image writes it but PNG-compressed at level 1
        (a third of the encoding time of add_image's default level, for files a few percent larger)."""
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary

        buffer = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buffer, format="PNG", compress_level=1)
        encoded = Summary.Image(height=img.shape[1], width=img.shape[2], colorspace=3,
                                encoded_image_string=buffer.getvalue())
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=encoded)]), step)

    def text(self, tag: str, text: str, step: int) -> None:
        """A text summary under ``tag`` at ``step``."""
        self.writer.add_text(tag, text, step)

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


# A dataclass, not a NamedTuple: under `python -m` a module is __main__, and launchers that cloudpickle the task
# (submitit) pickle its classes by value, which fails for NamedTuples on Python 3.11.
@dataclass(frozen=True)
class View:
    """One val image as saved and shown: id, uint8 (3, H, W) image, label map and the model's prediction."""

    id: str
    image: torch.Tensor
    target: torch.Tensor
    pred: torch.Tensor


class ImageViews:
    """The val images a run shows at each evaluated epoch, as PNGs under predictions/ and captioned strips in
    TensorBoard: the fixed ones (``fixed``: val indices), and at a new best epoch the image it segments best
    (``val/easiest_image``) and worst (``val/hardest_image``)."""

    def __init__(self, tb: TBLogger, run_dir: RunDir, val_ds, val_loader, data_cfg, num_classes: int,
                 fixed: list[int]) -> None:
        self.tb, self.run_dir, self.val_ds, self.val_loader = tb, run_dir, val_ds, val_loader
        self.data_cfg, self.num_classes, self.fixed = data_cfg, num_classes, fixed

    def kept(self) -> tuple[int, ...] | None:
        """The val images whose predictions evaluate should keep: all of them (no second forward for the best
        and worst image) when they take at most KEEP_ALL_BYTES, else only the fixed ones (None: all)."""
        d = self.data_cfg
        if d.val_crop == "center" and len(self.val_ds) * d.crop_size ** 2 <= KEEP_ALL_BYTES:
            return None
        return tuple(self.fixed)

    @torch.inference_mode()
    def predict(self, model: torch.nn.Module, runtime: Runtime, index: int, pred: torch.Tensor | None) -> View:
        """Val image ``index`` with its prediction ``pred`` (kept by evaluate), else through the model once
        (eval mode, evaluation's precision)."""
        if isinstance(self.val_loader, CachedValLoader):
            image, target = self.val_loader.item(index)  # already uint8: no decode, no de-normalising
            batch = self.val_loader.normalize(image[None])
            target = target.long()
        else:
            normalised, target = self.val_ds[index]
            image, batch = denormalize(normalised, self.data_cfg), normalised[None].to(runtime.device)
        if pred is None:
            model.eval()
            with runtime.eval_autocast():
                pred = labels(model(batch))[0]
        return View(self.val_ds.ids[index], image, target, pred.to("cpu", torch.int64))

    def show(self, tag: str, view: View, epoch: int, miou: float) -> None:
        """Save ``view``'s prediction at ``epoch`` under predictions/ and log its captioned strip as ``tag``."""
        self.run_dir.write_prediction(view.id, epoch, view.image, view.target, view.pred)
        titles = (view.id, "ground truth", f"prediction · mIoU {miou:.3f} · epoch {epoch}")
        self.tb.image(tag, strip(view.image, view.target, view.pred, titles=titles), epoch)

    def view_miou(self, view: View, index: int, ev: Evaluation) -> float:
        """The per-image mIoU of ``view``'s prediction of val image ``index`` (NaN without valid pixels):
        evaluate's own number when it kept that prediction, else scored here."""
        if index in ev.preds:
            return ev.image_miou[index]
        metrics = SegmentationMetrics(self.num_classes, self.data_cfg.ignore_index)
        metrics.update(view.pred, view.target)
        return metrics.image_miou[0].item()

    def record(self, model: torch.nn.Module, runtime: Runtime, epoch: int, ev: Evaluation, is_best: bool) -> None:
        """The fixed images' predictions at evaluated epoch ``epoch`` (1-based); at a new best epoch also the
        best and worst image's (``best``/``worst`` in predictions/index.json; in TensorBoard
        ``val/easiest_image``/``val/hardest_image``: the run's own extremes, which differ little between runs)."""
        fixed = {i: self.predict(model, runtime, i, ev.preds.get(i)) for i in self.fixed}
        for i, view in fixed.items():
            self.show(f"val_images/{view.id}", view, epoch, self.view_miou(view, i, ev))
        if not is_best:
            return
        index = {"fixed": [v.id for v in fixed.values()], "best_epoch": epoch}
        for name, tag, i in zip(("best", "worst"), ("easiest", "hardest"), best_and_worst(ev.image_miou), strict=True):
            view = fixed[i] if i in fixed else self.predict(model, runtime, i, ev.preds.get(i))  # one forward at most
            self.show(f"val/{tag}_image", view, epoch, ev.image_miou[i])
            self.tb.text(f"val/{tag}_image_id", f"{view.id} (mIoU {ev.image_miou[i]:.3f})", epoch)
            index[name] = {"id": view.id, "miou": ev.image_miou[i]}
        self.run_dir.write_prediction_index(index)


# ---- after the sweep: what the report knows and a run cannot ------------------------------------------------

def write_comparison(run_dir: Path, values: dict[str, float]) -> None:
    """``values`` ({scalar tag: value}) at step 0 in ``run_dir``'s comparison event file, replacing what an
    earlier report wrote there (a report run again adds no second point)."""
    write_events(Path(run_dir) / COMPARISON_FILE, [(0, Summary(value=[Summary.Value(tag=tag, simple_value=value)]))
                                                   for tag, value in values.items()])


def delta_by_run(root: Path, table: dict[str, list[dict]]) -> dict[Path, float]:
    """{run folder: ΔmIoU vs none} of every run a report ``table`` counts ({schedule: rows}, as
    ``report.summarize`` returns it): its row's Δ (its experiment's, as report.md shows it), 0 for `none`;
    runs without a Δ are left out."""
    deltas = {}
    for rows in table.values():
        for row in rows:
            vs = row["vs_none"]
            delta = 0.0 if row["cell"] == BASELINE else None if vs is None else vs["delta"]
            if delta is None:
                continue
            for run in row["runs"]:
                if run["status"] == "completed" and run["seed"] in row["seeds"]:
                    deltas[Path(root) / run["path"]] = delta
    return deltas


def write_sweep_columns(root: Path) -> None:
    """The HParams tab's columns for the runs under ``root``: only the hyper-parameters that vary (all when
    none does) and the metrics, ΔmIoU vs none first. The tab reads the columns of one run only (any one), so
    they go in one file, in the first run's folder (a file at ``root`` would be a run of its own, "."), and
    each run's own columns are taken out of its HParams file (its row stays)."""
    earlier = set(Path(root).rglob(EXPERIMENT_FILE))  # an earlier report's, wherever it put them
    rows = {}
    for path in sorted(Path(root).rglob(HPARAMS_FILE)):
        rows[path] = read_session_start(path)
        write_events(path, [(0, session_start(rows[path]))])
    target = min(rows).parent / EXPERIMENT_FILE if rows else None
    for path in earlier - {target}:
        path.unlink()
    if target is None:
        return
    names = sorted({name for row in rows.values() for name in row})
    missing = object()
    varying = [n for n in names if len({repr(row.get(n, missing)) for row in rows.values()}) > 1]
    columns = {n: [row[n] for row in rows.values() if n in row] for n in varying or names}
    write_events(target, [(0, experiment(columns, bool(varying), {DELTA_TAG: DELTA_NAME, **HPARAM_METRICS}))])


def show_comparison(root: Path, table: dict[str, list[dict]]) -> None:
    """After a report of the runs under ``root`` (``table`` its rows per schedule): each run's ΔmIoU vs none
    as the scalar DELTA_TAG in its folder, and the HParams columns of the sweep (``write_sweep_columns``)."""
    for run_dir, delta in delta_by_run(root, table).items():
        write_comparison(run_dir, {DELTA_TAG: delta})
    write_sweep_columns(root)
