"""The `loss` group: per-pixel CE over valid pixels, ÷ batch size with loss.batch_average (the authors' code)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_cfg
from omegaconf import OmegaConf

from deeplab_dropout import train as train_mod
from deeplab_dropout.loss import pixel_loss_sum, reduce_loss


def batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 21, 9, 11, generator=g)
    target = torch.randint(0, 21, (n, 9, 11), generator=g)
    target[torch.rand(n, 9, 11, generator=g) < 0.3] = 255  # void pixels, unevenly spread over the batch
    return logits, target


@pytest.mark.parametrize("batch_average", [True, False])
def test_training_loss_is_pixel_mean_divided_by_batch_size(batch_average):
    logits, target = batch(4)
    loss = reduce_loss(*pixel_loss_sum(logits, target), 4, OmegaConf.create({"batch_average": batch_average}))
    expected = F.cross_entropy(logits, target, ignore_index=255)
    assert float(loss) == pytest.approx(float(expected / 4 if batch_average else expected), rel=1e-5)


def test_half_precision_logits_are_scored_in_fp32():
    logits, target = batch(2)
    s16, n16 = pixel_loss_sum(logits.to(torch.bfloat16), target)
    assert s16.dtype == torch.float32 and n16 == int((target != 255).sum())


def test_recorded_losses_are_on_the_configured_scale(voc_root, tmp_path):
    # One step per epoch: the epoch's training loss is measured before the only update, on the same batch
    # (same seed), so the two reductions differ exactly by the batch size.
    # The val loss is on the training scale whatever the val batch size (BN is in eval mode there).
    losses = {}
    for name, flag, val_bs in (("a", True, 4), ("b", False, 4), ("c", True, 1)):
        cfg = tiny_cfg(voc_root, "trainer.epochs=1", "trainer.max_train_steps=1", "trainer.batch_size=4",
                       "trainer.max_val_images=4", f"trainer.val_batch_size={val_bs}", f"loss.batch_average={flag}")
        train_mod.run(cfg, tmp_path / name)
        losses[name] = json.loads((tmp_path / name / "results.json").read_text())["history"][0]
    assert losses["a"]["train_loss"] == pytest.approx(losses["b"]["train_loss"] / 4, rel=1e-6)
    assert losses["c"]["val_loss"] == pytest.approx(losses["a"]["val_loss"], rel=1e-5)
