"""Data layer: VOC 2012 / 2007 reader, generated VOC-format dataset, 10%-per-class split and Table 1 transforms."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from deeplab_dropout.data.split import class_presence, make_split, per_class_list
from deeplab_dropout.data.synth import generate
from deeplab_dropout.data.voc import (
    IGNORE_INDEX,
    VOC_CLASSES,
    VOC_PALETTE,
    DatasetError,
    VOCSegmentation,
    download_voc,
    read_image,
    read_mask,
    read_split_ids,
    split_file,
    voc_dir,
)

__all__ = [
    "IGNORE_INDEX", "VOC_CLASSES", "VOC_PALETTE", "DatasetError", "VOCSegmentation", "class_presence",
    "data_year", "denormalize", "download_voc", "generate", "get_datasets", "get_transform", "get_val_dataset",
    "prepare_root", "make_split", "read_image",
    "read_mask", "read_split_ids", "split_file", "voc_dir",
]


def __getattr__(name: str) -> Any:
    # torchvision costs seconds to import; the CLI never needs the transforms, so load them on first use.
    if name in ("get_transform", "denormalize"):
        from deeplab_dropout.data import transforms

        return getattr(transforms, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def data_year(data_cfg: Any) -> str:
    """data.year as the folder suffix ("2012", "2007"): Hydra parses `data.year=2007` as an int; configs saved
    before the key existed are VOC 2012."""
    return str(data_cfg.get("year", "2012"))


def prepare_root(data_cfg: Any) -> Path:
    """The dataset root of the `data` config node, generated (data.synth) or downloaded (data.download) if
    its VOC<year> split lists aren't there yet."""
    root, year = Path(str(data_cfg.root)).expanduser(), data_year(data_cfg)
    synth = data_cfg.get("synth")
    splits = {str(data_cfg.train_split), str(data_cfg.val_split)}
    if synth is not None:
        # generate() reuses a matching dataset and refuses to overwrite anything else.
        generate(root, n_train=int(synth.train), n_val=int(synth.val), seed=int(synth.seed),
                 min_side=int(synth.min_side), max_side=int(synth.max_side), year=year)
    elif data_cfg.get("download", False) and not all(split_file(root, s, year).is_file() for s in splits):
        # VOC 2007's test list and masks come in their own archive.
        download_voc(root, year, test="test" in splits)
    return root


def get_val_dataset(data_cfg: Any) -> VOCSegmentation:
    """The whole val list with the val transform (`data.val_crop`): each image once (`data.val_list=unique`), or
    once per object class in its mask (`per_class`, the authors' list: see split.per_class_list)."""
    from deeplab_dropout.data.transforms import get_transform

    root, year, split = prepare_root(data_cfg), data_year(data_cfg), str(data_cfg.val_split)
    presence = class_presence(root, split, data_cfg.get("cache_dir"), year) if data_cfg.val_list == "per_class" else None
    ids = per_class_list(presence) if presence is not None else None
    if ids == []:
        raise DatasetError(f"data.val_list=per_class: no image of {split_file(root, split, year)} holds an object "
                           "class (1..20); use data.val_list=unique")
    return VOCSegmentation(root, split, ids=ids, transforms=get_transform(False, data_cfg), year=year)


def get_datasets(data_cfg: Any, seed: int | None = None) -> tuple[VOCSegmentation, VOCSegmentation, dict]:
    """(train dataset on the split, whole val dataset, split record) from the `data` config node; with
    ``seed``, the train augmentation of each sample derives from (seed, epoch, index) (see VOCSegmentation)."""
    from deeplab_dropout.data.transforms import get_transform

    root, year = prepare_root(data_cfg), data_year(data_cfg)
    path, manifest = make_split(root, float(data_cfg.fraction), int(data_cfg.split_seed), str(data_cfg.train_split),
                                data_cfg.get("cache_dir"), method=str(data_cfg.split_method), year=year)
    # `authors` repeats ids on purpose: the dataset then yields such an image once per listing.
    # data.augment.repeats = k lists the split k times: each repeat is its own index, so its own augmentation
    # seed (seed, epoch, index); data.cache decodes a repeated id once.
    train = VOCSegmentation(root, str(data_cfg.train_split), ids=manifest["ids"] * int(data_cfg.augment.repeats),
                            transforms=get_transform(True, data_cfg), seed=seed, year=year)
    record = {"manifest": str(path), "year": year, "sha256": manifest["sha256"], "fraction": manifest["fraction"],
              "seed": manifest["seed"], "method": manifest["method"], "n_images": len(manifest["ids"]),
              "n_unique": manifest["n_unique"], "mean_classes": manifest["mean_classes"],
              "per_class": manifest["per_class"]}
    return train, get_val_dataset(data_cfg), record
