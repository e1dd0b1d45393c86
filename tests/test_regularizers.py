"""Statistics and contracts of the three regularisers (tolerances are computed, not copied from a run)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import counting_backend
from torch import nn

from deeplab_dropout.regularizers import (
    ChannelDropout,
    DropBlock,
    Regularizer,
    UOut,
    block_mask,
    describe_sites,
    find_regularizers,
    in_group3,
    make_regularizer,
    place_regularizers,
    regularize,
)

FACTORIES = {
    "channel": lambda p: ChannelDropout(p),
    "dropblock": lambda p: DropBlock(p, block_size=3),
    "uout": lambda p: UOut(p),
}


def positive(*shape: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Strictly positive input, so that zeros in the output can only come from the mask."""
    g = torch.Generator().manual_seed(seed)
    return (0.5 + torch.rand(shape, generator=g)).to(dtype)


def f32(value: float) -> float:
    """value rounded to float32, as the p buffer holds it."""
    return float(np.float32(value))


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
    assert m.p == 0.05 and isinstance(m.p, float) and "p=0.05" in repr(m)
    assert not list(m.parameters())
    # p's tensor copy: one 0-dim float32 buffer, updated in place, never in the state dict
    buf = m.p_tensor
    assert dict(m.named_buffers()) == {"p_tensor": buf} and buf.shape == () and buf.dtype == torch.float32
    assert buf.item() == f32(0.05)
    m.p = 0.3
    assert m.p_tensor is buf and buf.item() == f32(0.3)
    assert m.state_dict() == {}


@pytest.mark.parametrize("kind", FACTORIES)
def test_p_buffer_stays_float32_through_half(kind):
    m = FACTORIES[kind](0.3).half()
    assert m.p_tensor.dtype == torch.float32 and m.p_tensor.item() == f32(0.3)
    x = positive(2, 8, 10, 12, dtype=torch.float16)
    assert m(x).dtype == torch.float16


@pytest.mark.parametrize("kind", FACTORIES)
def test_compiled_module_does_not_recompile_when_p_changes(kind):
    dynamo = pytest.importorskip("torch._dynamo")
    graphs = []

    backend = counting_backend(graphs)

    dynamo.reset()
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), FACTORIES[kind](0.1))
    compiled = torch.compile(net, backend=backend)
    x = torch.randn(2, 3, 16, 16)
    changes = []
    for p in (0.1, 0.5, 0.9):
        net[1].p = p
        torch.manual_seed(0)
        ref = net.eval()(x)  # eval: the regulariser is the identity, so out / ref is its factor
        net.train()
        torch.manual_seed(0)
        changes.append((compiled(x) - ref).abs().mean().item() / ref.abs().mean().item())
    assert len(graphs) == 1, f"recompiled {len(graphs) - 1} times when p changed"
    # ... and the compiled graph reads the new p: the perturbation grows with it (p not baked in)
    assert changes[0] < changes[1] < changes[2]
    dynamo.reset()


def test_eager_masks_are_bernoulli_draws_at_the_float_p():
    """Eagerly, ChannelDropout and DropBlock draw with bernoulli_ at the Python float rate: the masks (and so
    the numbers) of runs made before p became a tensor, recomputed here from the generator state."""
    x = positive(3, 16, 9, 11)
    torch.manual_seed(7)
    out = ChannelDropout(0.3).train()(x)
    torch.manual_seed(7)
    keep = torch.empty(3, 16, 1, 1).bernoulli_(1.0 - 0.3)
    assert torch.equal(out, x * (keep / (1.0 - 0.3)))

    bs, p = 5, 0.25
    gamma = p / bs**2 * (9 * 11) / ((9 - bs + 1) * (11 - bs + 1))  # Ghiasi et al. eq. (1), as a float
    torch.manual_seed(7)
    out = DropBlock(p, bs).train()(x)
    torch.manual_seed(7)
    seeds = torch.empty(3, 16, 9 - bs + 1, 11 - bs + 1).bernoulli_(gamma)
    kept = 1.0 - tf_reference_mask(seeds, bs, 9, 11)
    assert torch.allclose(out, x * kept * (kept.numel() / kept.sum()), rtol=1e-6, atol=0)


def test_rate_scale_scales_the_rate_not_p():
    p, scale, shape = 0.4, 0.25, (16, 256, 9, 9)
    x = positive(*shape)
    m = ChannelDropout(p, rate_scale=scale)
    assert m.p == p and "rate_scale=0.25" in repr(m)
    torch.manual_seed(9)
    out = m(x)
    zero = (out == 0).flatten(2).all(-1)
    q = p * scale  # the rate actually used
    torch.testing.assert_close(out[~zero], x[~zero] / (1 - q), rtol=1e-6, atol=0)
    assert abs(zero.float().mean().item() - q) < 5 * math.sqrt(q * (1 - q) / zero.numel())
    u = UOut(p, rate_scale=scale)
    f = (u(x).double() / x.double()).flatten()
    assert f.min() >= 1 - q - 1e-6 and f.max() <= 1 + q + 1e-6 and f.max() > 1 + q * 0.9
    db = DropBlock(p, 4, rate_scale=scale)
    assert db.gamma(20, 30) == pytest.approx(DropBlock(p, 4).gamma(20, 30) * scale)
    m.p = 0.2  # the ramp sets p; the scale stays
    assert m.rate_scale == scale and m.p == 0.2
    for bad in (0.0, 1.5, -1.0, True, "x"):
        with pytest.raises(ValueError, match="rate_scale must be a number in \\(0, 1\\]"):
            ChannelDropout(0.1, rate_scale=bad)


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

# --- placement into any model's empty slots ---------------------------------------------------------------

class SlottedCNN(nn.Module):
    """A tiny model with the study's slot layout: ``backbone.layerN.drop`` (N = 2, 3) and ``decoder.drop``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.ModuleDict({f"layer{i}": nn.Sequential(nn.Conv2d(4, 4, 3, padding=1)) for i in (2, 3)})
        for layer in self.backbone.values():
            layer.drop = nn.Identity()
        self.decoder = nn.Sequential(nn.Conv2d(4, 4, 1))
        self.decoder.drop = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.backbone.layer3(self.backbone.layer2(x)))


SLOTS = ["backbone.layer2.drop", "backbone.layer3.drop", "decoder.drop"]


def test_regularize_fills_the_given_sites_with_group3_scaled(compose_config):
    dropout = compose_config(["dropout=dropblock", "dropout.group3_gamma_scale=0.25"]).dropout
    net = SlottedCNN()
    regularize(net, dropout, SLOTS[1:])
    regs = find_regularizers(net)
    assert list(regs) == SLOTS[1:] and all(type(m) is DropBlock and m.p == dropout.p for m in regs.values())
    assert {n: m.rate_scale for n, m in regs.items()} == {"backbone.layer3.drop": 0.25, "decoder.drop": 1.0}
    assert regs["backbone.layer3.drop"] is not regs["decoder.drop"]  # a fresh module per site
    assert type(net.backbone.layer2.drop) is nn.Identity
    regularize(net, compose_config(["dropout=uout"]).dropout, [])  # no sites: nothing changes
    assert find_regularizers(net) == regs


@pytest.mark.parametrize("site,expected", [("backbone.layer3.5.drop", True), ("backbone.layer3_drop", True),
                                           ("backbone.layer3.0.skip_drop", True), ("backbone.layer4.0.drop", False),
                                           ("backbone.layer30.drop", False), ("decoder.drop1", False)])
def test_in_group3(site, expected):
    assert in_group3(site) is expected


def test_place_regularizers_refuses_anything_but_an_empty_slot():
    net = SlottedCNN()
    place_regularizers(net, ["decoder.drop"], lambda: UOut(0.1))
    for site in ("decoder.drop", "decoder.0", "decoder.nodrop", "decoder.training"):  # filled, a layer, absent, no module
        with pytest.raises(ValueError, match=f"^{site} is not an empty regulariser slot of SlottedCNN$"):
            place_regularizers(net, [site], lambda: UOut(0.1))


def test_describe_sites_per_part():
    net = SlottedCNN()
    assert describe_sites(net) == "none placed"
    place_regularizers(net, SLOTS[:2], lambda: ChannelDropout(0.2))
    place_regularizers(net, SLOTS[2:], lambda: UOut(0.1))
    assert describe_sites(net) == ("backbone: 2 x ChannelDropout(p=0.2) [backbone.layer2.drop, backbone.layer3.drop]; "
                                   "decoder: 1 x UOut(p=0.1, shared=False) [decoder.drop]")


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

def analytic_dropped_fraction(p: float, bs: int, h: int, w: int, scale: float = 1.0) -> float:
    """E[dropped fraction], counting overlaps exactly: a position survives iff none of the k valid seeds whose
    bs x bs block covers it fires (seeds are independent), so E = 1 - mean((1 - gamma)^k)."""
    gamma = min(1.0, scale * p / bs**2 * h * w / ((h - bs + 1) * (w - bs + 1)))

    def covering(n: int) -> np.ndarray:
        # a block starts at u in 0..n-bs (wherever it fits) and covers u..u+bs-1
        starts = np.arange(n - bs + 1)
        return np.array([((starts <= i) & (i < starts + bs)).sum() for i in range(n)])

    k = np.outer(covering(h), covering(w))
    return float(1.0 - np.mean((1.0 - gamma) ** k))


def tf_reference_mask(seeds: torch.Tensor, bs: int, h: int, w: int) -> torch.Tensor:
    """The paper's TF code on given seeds: seeds placed on the valid centres bs//2 <= i < n - (bs-1)//2 of an
    H x W map, then -max_pool(-keep, bs, 'SAME'), whose padding is (bs-1)//2 before and bs//2 after."""
    full = torch.zeros(seeds.shape[:2] + (h, w))
    full[..., bs // 2: h - (bs - 1) // 2, bs // 2: w - (bs - 1) // 2] = seeds
    before, after = (bs - 1) // 2, bs // 2
    return F.max_pool2d(F.pad(full, [before, after, before, after]), bs, stride=1)


def force_one_seed(monkeypatch, u: int, v: int) -> None:
    """Make DropBlock draw exactly one seed, at valid-region index (u, v) of every (sample, channel) map."""
    def seeds(self, shape, gamma, device):
        out = torch.zeros(shape)
        out[..., u, v] = 1.0
        return out
    monkeypatch.setattr(DropBlock, "_seeds", seeds)


def test_dropblock_gamma_and_block_size():
    db = DropBlock(0.2, 7)
    assert db.gamma(33, 45) == pytest.approx(0.2 / 49 * 33 * 45 / (27 * 39))
    assert DropBlock(0.2, 4).gamma(20, 30) == pytest.approx(0.2 / 16 * 20 * 30 / (17 * 27))
    assert db.effective_block_size(33, 45) == 7
    assert db.effective_block_size(6, 10) == 6  # larger than the map: clipped to min(H, W), even kept
    assert db.effective_block_size(3, 40) == 3
    assert db.effective_block_size(1, 1) == 1
    assert DropBlock(0.2, 6).effective_block_size(50, 50) == 6  # even sizes are exact
    assert "block_size=7" in repr(db)
    with pytest.raises(ValueError, match="block_size"):
        DropBlock(0.2, 0)


@pytest.mark.parametrize("bs,h,w,u,v", [(4, 12, 15, 3, 5), (4, 12, 15, 0, 0), (4, 12, 15, 8, 11),
                                        (16, 40, 37, 7, 20), (16, 40, 37, 24, 21), (5, 9, 9, 2, 4)])
def test_dropblock_one_forced_seed_drops_one_block(monkeypatch, bs, h, w, u, v):
    force_one_seed(monkeypatch, u, v)
    x = positive(2, 3, h, w)
    out = DropBlock(0.3, bs)(x)
    expected = torch.zeros(h, w, dtype=torch.bool)
    expected[u:u + bs, v:v + bs] = True  # exactly bs x bs, inside the map
    assert u + bs <= h and v + bs <= w
    assert torch.equal(out == 0, expected.expand_as(out))
    # TF anchoring: the seed sits at map position i = u + bs//2, its block spans i - bs//2 .. i + (bs-1)//2
    i = u + bs // 2
    rows = torch.nonzero(expected.any(1)).flatten()
    assert (rows.min().item(), rows.max().item()) == (i - bs // 2, i + (bs - 1) // 2)
    torch.testing.assert_close(out[out != 0], x[out != 0] * (h * w / (h * w - bs * bs)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("density", [0.05, 0.6])  # sparse seeds, and overlapping blocks
@pytest.mark.parametrize("bs", [1, 2, 3, 4, 7, 16])
def test_block_mask_equals_the_tf_reference(bs, density):
    h, w = 21, 30
    g = torch.Generator().manual_seed(bs)
    seeds = (torch.rand(2, 3, h - bs + 1, w - bs + 1, generator=g) < density).float()
    assert torch.equal(block_mask(seeds, bs), tf_reference_mask(seeds, bs, h, w))


@pytest.mark.parametrize("bs,h,w,scale,n", [(3, 33, 33, 1.0, 4096), (4, 33, 33, 1.0, 4096), (5, 33, 33, 1.0, 4096),
                                            (7, 21, 45, 1.0, 4096), (16, 64, 64, 1.0, 4096),
                                            (4, 40, 24, 0.25, 4096)])
def test_dropblock_dropped_fraction_matches_analytic(bs, h, w, scale, n):
    p = 0.2
    torch.manual_seed(bs)
    out = DropBlock(p, bs, rate_scale=scale)(torch.ones(n, 1, h, w))
    # Maps are iid, so the mean of the per-map fractions is within a few standard errors of E (CLT);
    # the standard error is estimated from the maps themselves.
    per_map = (out == 0).float().mean((2, 3)).flatten()
    sem = per_map.std().item() / math.sqrt(per_map.numel())
    expected = analytic_dropped_fraction(p, bs, h, w, scale)
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


@pytest.mark.parametrize("bs,shape", [(3, (4, 16, 40, 40)), (4, (4, 16, 40, 40)), (7, (4, 16, 24, 40)),
                                      (16, (2, 8, 40, 40)), (7, (4, 16, 6, 10))])
def test_dropblock_dropped_set_is_union_of_full_blocks(bs, shape):
    x = positive(*shape)
    db = DropBlock(0.3, bs)
    eff = db.effective_block_size(*shape[2:])
    torch.manual_seed(2)
    out = db(x)
    dropped = (out == 0).float()
    assert 0 < dropped.mean() < 1
    # top-left corners (inside the map) whose whole eff x eff square is dropped ...
    full = F.avg_pool2d(dropped, eff, stride=1) > 1 - 1e-6
    # ... and the union of those squares (shifted copies, no pooling) must be the whole dropped set
    union = torch.zeros_like(dropped, dtype=torch.bool)
    fh, fw = full.shape[-2:]
    for a in range(eff):
        for b in range(eff):
            union[..., a:a + fh, b:b + fw] |= full
    assert torch.equal(union, dropped.bool())
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
