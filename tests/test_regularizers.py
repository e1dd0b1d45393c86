"""Statistics and contracts of the three regularisers (tolerances are computed, not copied from a run)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deeplab_dropout.regularizers import ChannelDropout, DropBlock, Regularizer, UOut, make_regularizer

FACTORIES = {
    "channel": lambda p: ChannelDropout(p),
    "dropblock": lambda p: DropBlock(p, block_size=3),
    "uout": lambda p: UOut(p),
}


def positive(*shape: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Strictly positive input, so that zeros in the output can only come from the mask."""
    g = torch.Generator().manual_seed(seed)
    return (0.5 + torch.rand(shape, generator=g)).to(dtype)


# --- common contract --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", FACTORIES)
def test_eval_and_p0_are_exact_identities(kind):
    x = torch.randn(2, 8, 9, 11)
    m = FACTORIES[kind](0.5)
    assert isinstance(m, Regularizer)
    m.eval()
    assert m(x) is x
    m.train()
    assert not torch.equal(m(x), x)  # the same module does act in training
    m.p = 0.0
    assert m(x) is x


@pytest.mark.parametrize("kind", FACTORIES)
def test_same_seed_same_output(kind):
    x = torch.randn(4, 8, 12, 12)
    m = FACTORIES[kind](0.3)
    torch.manual_seed(123)
    a = m(x)
    torch.manual_seed(123)
    b = m(x)
    c = m(x)  # RNG advanced: a different draw
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("kind", FACTORIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_dtype_and_channels_last_preserved(kind, dtype):
    m = FACTORIES[kind](0.3)
    x = torch.randn(2, 8, 10, 12).to(dtype)
    xcl = x.to(memory_format=torch.channels_last)
    out, outcl = m(x), m(xcl)
    assert out.dtype == dtype and outcl.dtype == dtype
    assert out.is_contiguous()
    assert outcl.is_contiguous(memory_format=torch.channels_last) and not outcl.is_contiguous()


@pytest.mark.parametrize("kind", FACTORIES)
@pytest.mark.parametrize("bad", [1.0, 1.2, -0.1, float("nan")])
def test_p_is_validated(kind, bad):
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got"):
        FACTORIES[kind](bad)
    m = FACTORIES[kind](0.2)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        m.p = bad
    assert m.p == 0.2  # a rejected value leaves p unchanged


@pytest.mark.parametrize("kind", FACTORIES)
def test_p_settable_and_shown(kind):
    m = FACTORIES[kind](0.2)
    m.p = 0.05
    assert m.p == 0.05 and "p=0.05" in repr(m)
    assert not list(m.parameters()) and not list(m.buffers())


@pytest.mark.parametrize("kind", FACTORIES)
def test_usable_in_any_cnn(kind):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), FACTORIES[kind](0.3),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    loss = F.cross_entropy(net(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_make_regularizer_from_config(compose_config):
    assert make_regularizer(compose_config(["dropout=none"]).dropout) is None
    db = make_regularizer(compose_config(["dropout=dropblock", "dropout.block_size=5"]).dropout)
    assert isinstance(db, DropBlock) and db.block_size == 5 and db.p == 0.2
    uo = make_regularizer(compose_config(["dropout=uout", "dropout.uout_shared=true"]).dropout)
    assert isinstance(uo, UOut) and uo.shared
    assert isinstance(make_regularizer(compose_config(["dropout=channel"]).dropout), ChannelDropout)


# --- ChannelDropout ---------------------------------------------------------------------------------------

def test_channel_dropout_maps_and_rate():
    p, shape = 0.2, (8, 256, 33, 33)
    x = positive(*shape)
    torch.manual_seed(0)
    out = ChannelDropout(p)(x)
    zero = (out == 0).flatten(2).all(-1)
    kept = (out != 0).flatten(2).all(-1)
    assert torch.all(zero | kept), "a (sample, channel) map was partly dropped"
    torch.testing.assert_close(out[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)
    n = shape[0] * shape[1]
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(zero.float().mean().item() - p) < 5 * sigma


# --- DropBlock --------------------------------------------------------------------------------------------

def analytic_dropped_fraction(p: float, bs: int, h: int, w: int) -> float:
    """E[dropped fraction]: a position survives iff none of the k valid seeds covering it fires."""
    gamma = p / bs**2 * h * w / ((h - bs + 1) * (w - bs + 1))
    r = bs // 2

    def covering(n: int) -> np.ndarray:
        centres = np.arange(r, n - r)
        return np.array([(np.abs(centres - i) <= r).sum() for i in range(n)])

    k = np.outer(covering(h), covering(w))
    return float(1.0 - np.mean((1.0 - gamma) ** k))


def test_dropblock_gamma_and_block_size():
    db = DropBlock(0.2, 7)
    assert db.gamma(33, 45) == pytest.approx(0.2 / 49 * 33 * 45 / (27 * 39))
    assert db.effective_block_size(33, 45) == 7
    assert db.effective_block_size(6, 10) == 5  # clipped to 6, then odd
    assert db.effective_block_size(3, 40) == 3
    assert db.effective_block_size(1, 1) == 1
    assert DropBlock(0.2, 6).effective_block_size(50, 50) == 5
    assert "block_size=7" in repr(db)
    with pytest.raises(ValueError, match="block_size"):
        DropBlock(0.2, 0)


@pytest.mark.parametrize("bs,h,w", [(3, 33, 33), (5, 33, 33), (7, 33, 33), (7, 21, 45)])
def test_dropblock_dropped_fraction_matches_analytic(bs, h, w):
    p = 0.2
    torch.manual_seed(bs)
    out = DropBlock(p, bs)(torch.ones(32, 128, h, w))
    per_map = (out == 0).float().mean((2, 3)).flatten()
    sem = per_map.std().item() / math.sqrt(per_map.numel())
    expected = analytic_dropped_fraction(p, bs, h, w)
    assert 5 * sem < 0.01, "tensor too small for the 0.01 tolerance"
    assert abs(per_map.mean().item() - expected) < 5 * sem


def _mean_ratio_check(x: torch.Tensor, out: torch.Tensor) -> None:
    xd, od = x.double(), out.double()
    ratio = od.mean().item() / xd.mean().item()
    kept = (out != 0).sum().item()
    # mean over kept positions of iid x: std = cv * sqrt(1/K - 1/n)
    sigma = (xd.std() / xd.mean()).item() * math.sqrt(1 / kept - 1 / x.numel())
    assert 5 * sigma < 1e-3, "tensor too small for the 1e-3 tolerance"
    assert abs(ratio - 1) < 1e-3


def test_dropblock_preserves_mean():
    x = positive(8, 64, 64, 64)
    torch.manual_seed(1)
    _mean_ratio_check(x, DropBlock(0.2, 7)(x))


@pytest.mark.parametrize("bs,shape", [(3, (4, 16, 40, 40)), (7, (4, 16, 40, 40)), (7, (4, 16, 24, 40)),
                                      (7, (4, 16, 6, 10))])
def test_dropblock_dropped_set_is_union_of_full_blocks(bs, shape):
    x = positive(*shape)
    db = DropBlock(0.3, bs)
    eff = db.effective_block_size(*shape[2:])
    torch.manual_seed(2)
    out = db(x)
    dropped = (out == 0).float()
    assert 0 < dropped.mean() < 1
    # centres (inside the valid region) whose whole eff x eff square is dropped ...
    full = F.avg_pool2d(dropped, eff, stride=1) > 1 - 1e-6
    # ... and the union of those squares must be the whole dropped set
    half = eff // 2
    union = F.max_pool2d(F.pad(full.float(), [half] * 4), eff, stride=1, padding=half)
    assert torch.equal(union, dropped)
    # kept values share one scale = numel / count_kept
    kept = out != 0
    scale = x.numel() / kept.sum().item()
    torch.testing.assert_close(out[kept], x[kept] * scale, rtol=1e-5, atol=0)


def test_dropblock_masks_differ_across_channels_and_samples():
    torch.manual_seed(3)
    masks = DropBlock(0.3, 5)(torch.ones(2, 8, 32, 32)) == 0
    for n in range(2):
        assert any(not torch.equal(masks[n, 0], masks[n, c]) for c in range(1, 8))
    assert not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("shape", [(2, 3, 5, 3), (2, 3, 4, 6), (2, 3, 1, 1), (1, 2, 7, 7)])
def test_dropblock_small_and_nonsquare_maps(shape):
    x = positive(*shape)
    torch.manual_seed(4)
    out = DropBlock(0.5, 7)(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    kept = out != 0
    if kept.any():
        torch.testing.assert_close(out[kept], x[kept] * (x.numel() / kept.sum().item()), rtol=1e-5, atol=0)


def test_dropblock_all_dropped_gives_zeros_not_nan():
    db = DropBlock(0.99, 7)
    torch.manual_seed(5)
    for _ in range(50):  # on 1x1 maps each seed fires with prob 0.99: all 4 dropped is the likely case
        out = db(torch.ones(2, 2, 1, 1))
        if (out == 0).all():
            break
    assert (out == 0).all() and not torch.isnan(out).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dropblock_half_precision_keeps_mean(dtype):
    x = positive(8, 64, 64, 64, dtype=dtype)
    torch.manual_seed(6)
    out = DropBlock(0.2, 7)(x)
    assert out.dtype == dtype and (out != 0).any()
    _mean_ratio_check(x, out)
    if dtype is torch.float16:
        # The premise: float16 cannot hold this count of kept ones, so counting in the input's dtype (as
        # torchvision's drop_block2d does) gives scale 0 and all zeros.
        assert torch.isinf((out != 0).to(dtype).sum())


# --- UOut -------------------------------------------------------------------------------------------------

def test_uout_factor_per_map_range_and_moments():
    p, shape = 0.2, (64, 512, 3, 3)
    x = positive(*shape)
    torch.manual_seed(7)
    out = UOut(p)(x)
    factor = (out.double() / x.double()).flatten(2)
    spread = factor.max(-1).values - factor.min(-1).values
    assert spread.max() < 1e-6, "factor not constant within a (sample, channel) map"
    f = factor[..., 0].flatten()
    assert f.min() >= 1 - p - 1e-6 and f.max() <= 1 + p + 1e-6
    n = f.numel()
    var = p**2 / 3  # U[-p, p]
    assert abs(f.mean().item() - 1) < 5 * math.sqrt(var / n)
    var_sigma = math.sqrt((p**4 / 5 - var**2) / n)  # sd of the sample variance: (mu4 - sigma^4) / n
    assert abs(f.var().item() - var) < 5 * var_sigma
    # differs per sample when not shared
    assert not torch.allclose(factor[0, :, 0], factor[1, :, 0])


def test_uout_shared_factor_across_batch():
    p = 0.3
    x = positive(16, 32, 4, 4)
    torch.manual_seed(8)
    m = UOut(p, shared=True)
    assert "shared=True" in repr(m)
    factor = (m(x).double() / x.double())[:, :, 0, 0]
    torch.testing.assert_close(factor, factor[:1].expand_as(factor), rtol=1e-6, atol=0)
    assert factor[0].std() > 0  # still one factor per channel
