"""The data loaders of a run: the shuffled training loader (reseeded every epoch by the engine) and the
validation loader, cached as uint8 tensors where data.val_cache allows."""
from __future__ import annotations

import logging
import random

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, RandomSampler

from deeplab_dropout.config import ConfigError
from deeplab_dropout.data.cache import CachedValLoader, cache_train, val_bytes, val_cache_target
from deeplab_dropout.runtime import Runtime, resolve_workers

log = logging.getLogger("deeplab_dropout")


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random in a loader worker from the seed torch gave it (from the loader's generator)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loaders(cfg: DictConfig, train_ds, val_ds, runtime: Runtime) -> tuple[DataLoader, DataLoader | CachedValLoader]:
    """The shuffled training loader (its generators are reseeded every epoch) and the val loader; the training
    images decoded into RAM first if data.cache says so (before any worker forks, so they share them).
    trainer.drop_last=false also trains the last partial batch: len(loader) (the LR and dropout schedules'
    steps per epoch) is then ceil(n / batch_size) instead of floor."""
    t = cfg.trainer
    if cache_train(train_ds, cfg.data.cache):
        log.info("data.cache: %d decoded training images in RAM", len(train_ds))
    workers = resolve_workers(t.num_workers)
    # Persistent workers read the epoch from the dataset's shared-memory counter (see VOCSegmentation.epoch).
    # The shuffle has its own generator, reseeded every epoch: a persistent loader draws no new worker seed
    # from its generator per epoch, so sharing one would make the order depend on the worker count.
    sampler = RandomSampler(train_ds, generator=torch.Generator())
    train_loader = DataLoader(train_ds, batch_size=t.batch_size, sampler=sampler, drop_last=bool(t.drop_last),
                              generator=torch.Generator(), num_workers=workers, persistent_workers=workers > 0,
                              pin_memory=runtime.device.type == "cuda", worker_init_fn=seed_worker)
    if len(train_loader) == 0:
        raise ConfigError(f"trainer.batch_size={t.batch_size} is invalid: larger than the "
                          f"{len(train_ds)} training images (trainer.drop_last=true would leave no step)")
    if not t.drop_last and len(train_ds) % t.batch_size == 1 and cfg.model.pool_norm == "bn":
        raise ConfigError(f"trainer.drop_last=false is invalid with model.pool_norm=bn here: the last batch holds one "
                          f"of the {len(train_ds)} training images and the image-pooling BatchNorm can't train on one; "
                          "use trainer.drop_last=true, another trainer.batch_size or model.pool_norm=none")
    return train_loader, make_val_loader(cfg, val_ds, runtime)


def make_val_loader(cfg: DictConfig, val_ds, runtime: Runtime) -> DataLoader | CachedValLoader:
    """The val set in order, cached as uint8 tensors where data.val_cache allows (else a DataLoader); one
    image per batch for data.val_crop=full."""
    # `full` keeps every image's own size, so those can't be stacked into a batch.
    val_bs = 1 if cfg.data.val_crop == "full" else cfg.trainer.val_batch_size
    target = val_cache_target(cfg.data.val_cache, val_bytes(val_ds, cfg.data), runtime.device)
    if target is not None:
        loader = CachedValLoader(val_ds, cfg.data, val_bs, target, compute_device=runtime.device)
        log.info("data.val_cache: %d val images on %s", len(val_ds), target)
        return loader
    workers = resolve_workers(cfg.trainer.num_workers)
    return DataLoader(val_ds, batch_size=val_bs, shuffle=False, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=runtime.device.type == "cuda",
                      worker_init_fn=seed_worker)
