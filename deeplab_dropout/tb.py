"""All TensorBoard output of a run, into the run directory itself (so ``tensorboard --logdir SWEEP`` names
runs by their sweep folder): HParams, each epoch's scalars, and the image views: captioned image | truth |
prediction strips in the VOC palette (fixed val images, and the best and worst one at each new best epoch),
saved as PNGs under predictions/ too."""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from deeplab_dropout.config import ConfigError
from deeplab_dropout.data.cache import CachedValLoader
from deeplab_dropout.data.split import class_presence
from deeplab_dropout.data.transforms import denormalize
from deeplab_dropout.data.voc import VOC_PALETTE
from deeplab_dropout.engine import Evaluation, labels
from deeplab_dropout.metrics import SegmentationMetrics
from deeplab_dropout.rundir import RunDir
from deeplab_dropout.runtime import Runtime
from deeplab_dropout.study import cell_name, placement_name

# The metrics the HParams tab compares (Table 3's columns at the best epoch), each also written as a scalar
# under the same tag. The tab shows only the first five by default: those are the paper's.
HPARAM_METRICS = ("hparams/best_miou", "hparams/best_per_image_miou_mean", "hparams/best_per_image_miou_min",
                  "hparams/best_per_image_miou_median", "hparams/best_per_image_miou_max",
                  "hparams/best_per_image_miou_std", "hparams/best_val_loss", "hparams/best_epoch")
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
    """The run's row in the HParams tab: its cell, the study's axes, seed and backbone (the tab shows the
    first five columns by default, so the paper's axes come first)."""
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
    presence = class_presence(cfg.data.root, cfg.data.val_split, year=val_ds.year)
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


class TBLogger:
    """A SummaryWriter in the run directory that declares the run's hyper-parameters once, at the start."""

    def __init__(self, log_dir: Path, hparam_dict: dict) -> None:
        self.writer = SummaryWriter(log_dir=str(log_dir))
        # Written at the start (not via add_hparams at the end) so running and failed runs show in the
        # HParams tab too, and into this run's own event file rather than a timestamped sub-run.
        exp, ssi, sei = hparams(hparam_dict, dict.fromkeys(HPARAM_METRICS, 0.0))
        for summary in (exp, ssi, sei):
            self.writer.file_writer.add_summary(summary)

    def log_scalars(self, entry: dict, best: dict | None) -> None:
        """One results.json history entry at step = its epoch; the val scalars (and the best so far, for the
        HParams tab) only if the epoch was evaluated."""
        step = entry["epoch"]
        self.scalars({"train/loss": entry["train_loss"], "lr": entry["lr"], "lr_head": entry["lr_head"],
                      "drop_p": entry["drop_p"]}, step)
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
    TensorBoard: the fixed ones (``fixed``: val indices), and at a new best epoch its best and worst image."""

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
        best and worst image's, and predictions/index.json."""
        fixed = {i: self.predict(model, runtime, i, ev.preds.get(i)) for i in self.fixed}
        for i, view in fixed.items():
            self.show(f"val_images/{view.id}", view, epoch, self.view_miou(view, i, ev))
        if not is_best:
            return
        index = {"fixed": [v.id for v in fixed.values()], "best_epoch": epoch}
        for name, i in zip(("best", "worst"), best_and_worst(ev.image_miou), strict=True):
            view = fixed[i] if i in fixed else self.predict(model, runtime, i, ev.preds.get(i))  # one forward at most
            self.show(f"val/{name}_image", view, epoch, ev.image_miou[i])
            self.tb.text(f"val/{name}_image_id", f"{view.id} (mIoU {ev.image_miou[i]:.3f})", epoch)
            index[name] = {"id": view.id, "miou": ev.image_miou[i]}
        self.run_dir.write_prediction_index(index)
