"""The three regularisers of the study as standalone modules (SpatialDropout, DropBlock and UOut), and their
placement into a model's empty ``nn.Identity`` slots (the model package names the sites).

Each works on (N, C, H, W) activations of any CNN, is the identity in eval mode and at p = 0, keeps the
input's dtype and memory format, and draws from torch's global RNG (so ``torch.manual_seed`` fixes it).
Compiled, forward reads p from a 0-dim buffer, so a ``torch.compile``d model follows the ramp without
recompiling; eager, it draws with ``bernoulli_`` at the Python float p.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Regularizer", "ChannelDropout", "DropBlock", "UOut", "block_mask", "make_regularizer", "set_drop_p",
           "find_regularizers", "place_regularizers", "in_group3", "regularize", "describe_sites"]


class Regularizer(nn.Module):
    """Base of the regularisers: a validated, settable drop probability ``p`` (the ramp changes it per step).

    p lives in ``p_tensor``, a 0-dim float32 buffer (not persistent: state dicts are unchanged) that the
    setter updates in place and a compiled forward reads as a tensor, so a ``torch.compile``d model neither
    bakes p in nor recompiles when it changes; the only Python value it branches on is whether p > 0. Eager
    forward draws at the Python float p with ``bernoulli_`` (the masks drawn before p became a tensor).
    ``rate_scale`` (0 < s <= 1, default 1) multiplies the rate forward uses -- for DropBlock the seed rate
    gamma, for the others p -- while ``p`` stays the scheduled value (the paper's gamma/4 in group 3).
    """

    p_tensor: Tensor

    def __init__(self, p: float, rate_scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("p_tensor", torch.zeros((), dtype=torch.float32), persistent=False)
        self.rate_scale = rate_scale
        self.p = p

    @property
    def p(self) -> float:
        """The drop probability (UOut: noise range) as set, a Python float in [0, 1)."""
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{type(self).__name__}: p must be a number in [0, 1), got {value!r}") from None
        if not 0.0 <= value < 1.0:  # also rejects NaN
            raise ValueError(f"{type(self).__name__}: p must be in [0, 1), got {value}")
        self._p = value
        self._on = value > 0.0  # the one Python value forward branches on (a guard flips only at p = 0)
        if self.p_tensor.is_inference() and not torch.is_inference_mode_enabled():
            # built under inference_mode: its tensors can't be updated in place outside it
            self.p_tensor = self.p_tensor.clone()
        with torch.no_grad():
            self.p_tensor.fill_(value)

    @property
    def rate_scale(self) -> float:
        """Multiplier of the rate forward uses, in (0, 1] (dropout.group3_gamma_scale in ResNet group 3)."""
        return self._rate_scale

    @rate_scale.setter
    def rate_scale(self, value: float) -> None:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and 0.0 < value <= 1.0
        if not ok:
            raise ValueError(f"{type(self).__name__}: rate_scale must be a number in (0, 1], got {value!r}")
        self._rate_scale = float(value)

    def active(self) -> bool:
        """Whether forward changes its input (training and p > 0)."""
        return self.training and self._on

    def rate(self, x: Tensor) -> Tensor:
        """p x rate_scale as a float32 0-dim tensor on x's device (read from the buffer, not from Python)."""
        r = self.p_tensor.to(device=x.device, dtype=torch.float32)
        return r * self._rate_scale if self._rate_scale != 1.0 else r

    def draw_rate(self, x: Tensor) -> float | Tensor:
        """The rate masks are drawn at, p x rate_scale: compiled, the buffer's tensor (``rate``: the ramp does not
        recompile); eager, the Python float (``bernoulli_`` draws the masks drawn before p became a tensor)."""
        return self.rate(x) if torch.compiler.is_compiling() else self._p * self._rate_scale

    def _apply(self, fn, *args, **kwargs):
        # .half() / .to(bfloat16) convert float buffers; p must stay exact float32.
        super()._apply(fn, *args, **kwargs)
        if self.p_tensor.dtype != torch.float32:
            self.p_tensor = torch.tensor(self._p, dtype=torch.float32, device=self.p_tensor.device)
        return self

    def extra_repr(self) -> str:
        scale = f", rate_scale={self._rate_scale:g}" if self._rate_scale != 1.0 else ""
        return f"p={self._p:g}{scale}"


def bernoulli(shape: tuple[int, ...], prob: float | Tensor, device: torch.device) -> Tensor:
    """A float32 0/1 mask of ``shape``, each entry 1 with probability ``prob``: ``bernoulli_`` for a Python
    float, ``rand < prob`` for a 0-dim tensor (no Python float of p in a compiled graph)."""
    if isinstance(prob, Tensor):
        return (torch.rand(shape, dtype=torch.float32, device=device) < prob).float()
    return torch.empty(shape, dtype=torch.float32, device=device).bernoulli_(prob)


def _apply_factor(x: Tensor, factor: Tensor) -> Tensor:
    """x * factor (float32) computed in at least float32, returned in x's dtype and memory format.

    Multiplying in half precision would round the 1/(1-p)-style scale once for the whole tensor, a
    systematic bias of up to 0.2 % in bfloat16; rounding each product instead is unbiased.
    """
    out = (x * factor).to(x.dtype)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _check_input(module: nn.Module, x: Tensor, min_dim: int) -> None:
    if x.dim() < min_dim:
        raise ValueError(f"{type(module).__name__} expects (N, C, H, W) input, got shape {tuple(x.shape)}")


class ChannelDropout(Regularizer):
    """SpatialDropout (Tompson et al.): zero whole (sample, channel) maps with probability p, scale kept ones
    by 1/(1-p). Accepts (N, C, *) inputs."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.active():
            return x
        _check_input(self, x, 2)
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        keep_prob = 1.0 - self.draw_rate(x)
        keep = bernoulli(shape, keep_prob, x.device)
        return _apply_factor(x, keep / keep_prob)


def block_mask(seeds: Tensor, block_size: int) -> Tensor:
    """The dropped set (1 = dropped) of DropBlock from its seeds: (N, C, H-bs+1, W-bs+1) -> (N, C, H, W).

    The seed at valid-region index (u, v) drops rows u..u+bs-1 and columns v..v+bs-1: in map coordinates
    the seed sits at (u + bs//2, v + bs//2) and its block covers [i - bs//2, i + (bs-1)//2], the anchoring
    of the paper's TF code (seeds where bs//2 <= i < H - (bs-1)//2, then -max_pool(-mask, 'SAME')), so an
    even block has one more row/column before its seed than after. Every block is bs x bs and in the map.
    """
    # Output position o is dropped when a seed u lies in [o - bs + 1, o] (o in block(u)): a box count over
    # the seeds padded by bs-1, from their integral image (summed-area table). Counts of 0/1 values are
    # exact in float32 up to 2**24 per map, and this is 3-7x faster on CPU than the padded max-pool it equals.
    bs = block_size
    table = F.pad(seeds, [bs, bs - 1, bs, bs - 1]).cumsum(2).cumsum(3)
    count = table[..., bs:, bs:] - table[..., :-bs, bs:] - table[..., bs:, :-bs] + table[..., :-bs, :-bs]
    return (count > 0.5).to(seeds.dtype)


class DropBlock(Regularizer):
    """DropBlock (Ghiasi et al. 2018, Algorithm 1): drop bs x bs blocks around Bernoulli(gamma) seeds.

    Any block_size >= 1, even sizes exact (anchoring: see ``block_mask``); a block larger than the map is
    clipped to min(H, W). Seeds are drawn only where a whole block fits, one mask per (sample, channel);
    kept activations are rescaled by numel / count_kept with the count in float32.
    """

    def __init__(self, p: float, block_size: int = 7, rate_scale: float = 1.0) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"DropBlock: block_size must be an integer >= 1, got {block_size!r}")
        super().__init__(p, rate_scale)
        self.block_size = block_size

    def effective_block_size(self, height: int, width: int) -> int:
        """The block size used on an H x W map: block_size, clipped to min(H, W)."""
        return max(1, min(self.block_size, height, width))

    def gamma(self, height: int, width: int, rate: float | Tensor | None = None) -> float | Tensor:
        """Seed probability rate / bs^2 * H*W / ((H-bs+1)(W-bs+1)), Ghiasi et al. eq. (1) with separate H and W,
        before clipping to 1; ``rate`` is p x rate_scale (a float by default; a tensor when compiled)."""
        bs = self.effective_block_size(height, width)
        rate = self._p * self._rate_scale if rate is None else rate
        return rate / bs**2 * (height * width) / ((height - bs + 1) * (width - bs + 1))

    def _seeds(self, shape: tuple[int, ...], gamma: float | Tensor, device: torch.device) -> Tensor:
        """Bernoulli(gamma) seeds in float32 (a separate method so tests can force a seed)."""
        return bernoulli(shape, gamma, device)

    def forward(self, x: Tensor) -> Tensor:
        if not self.active():
            return x
        if x.dim() != 4:
            raise ValueError(f"DropBlock expects (N, C, H, W) input, got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        bs = self.effective_block_size(h, w)
        gamma = self.gamma(h, w, self.draw_rate(x))
        gamma = gamma.clamp(max=1.0) if isinstance(gamma, Tensor) else min(1.0, gamma)
        # Mask maths in float32: counts of ones in float16 overflow (torchvision's drop_block2d bug).
        keep = 1.0 - block_mask(self._seeds((n, c, h - bs + 1, w - bs + 1), gamma, x.device), bs)
        # clamp: an all-dropped mask gives zeros (0 * numel), not NaN.
        scale = keep.numel() / keep.sum().clamp_min(1.0)
        return _apply_factor(x, keep * scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block_size={self.block_size}"


class UOut(Regularizer):
    """UOut (Li et al. 2019): out = x + x*r with r ~ U[-p, p] per (sample, channel), no rescaling.

    ``shared=True`` draws one r per channel for the whole batch (the study authors' code).
    """

    def __init__(self, p: float, shared: bool = False, rate_scale: float = 1.0) -> None:
        super().__init__(p, rate_scale)
        self.shared = bool(shared)

    def forward(self, x: Tensor) -> Tensor:
        if not self.active():
            return x
        _check_input(self, x, 2)
        shape = (1 if self.shared else x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        r = (torch.rand(shape, dtype=torch.float32, device=x.device) * 2.0 - 1.0) * self.rate(x)
        return _apply_factor(x, 1.0 + r)  # x + x*r as one multiply

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared={self.shared}"


def set_drop_p(model: nn.Module, p: float) -> None:
    """Set p on every Regularizer inside ``model`` (the dropout ramp calls this before each step)."""
    for m in model.modules():
        if isinstance(m, Regularizer):
            m.p = p


def make_regularizer(dropout_cfg, rate_scale: float = 1.0) -> Regularizer | None:
    """One regulariser from the validated ``dropout`` config group (name, p, block_size, uout_shared); None
    for 'none'. ``rate_scale``: see Regularizer (``regularize`` passes dropout.group3_gamma_scale in layer3)."""
    name = dropout_cfg.name
    if name == "none":
        return None
    p = float(dropout_cfg.p)
    if name == "channel":
        return ChannelDropout(p, rate_scale)
    if name == "dropblock":
        return DropBlock(p, block_size=int(dropout_cfg.block_size), rate_scale=rate_scale)
    return UOut(p, shared=bool(dropout_cfg.get("uout_shared", False)), rate_scale=rate_scale)


# --- placement --------------------------------------------------------------------------------------------

def find_regularizers(model: nn.Module) -> dict[str, Regularizer]:
    """The regularisers inside ``model`` by qualified module name, in forward (registration) order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Regularizer)}


def place_regularizers(model: nn.Module, sites: list[str], factory: Callable[[], nn.Module]) -> None:
    """Fill each named slot with a fresh regulariser from ``factory``; the slot must exist and be empty."""
    for site in sites:
        parent_name, _, leaf = site.rpartition(".")
        parent = model.get_submodule(parent_name)
        if not isinstance(dict(parent.named_children()).get(leaf), nn.Identity):
            raise ValueError(f"{site} is not an empty regulariser slot of {type(model).__name__}")
        setattr(parent, leaf, factory())


def in_group3(site: str) -> bool:
    """Whether a site lies in ResNet group 3 (torchvision's layer3, or right after it): the sites the
    DropBlock paper gave a 4x smaller gamma."""
    return any(part in ("layer3", "layer3_drop") for part in site.split("."))


def regularize(model: nn.Module, dropout_cfg, sites: list[str]) -> None:
    """Place the ``dropout`` config group's regulariser at every site (deeplab_dropout.model.regularizer_sites),
    those in ResNet group 3 with dropout.group3_gamma_scale as their ``rate_scale`` (the DropBlock paper's
    smaller gamma there)."""
    # .get: configs saved before the key existed (resumed runs, eval of old checkpoints) mean 1.0
    scale = float(dropout_cfg.get("group3_gamma_scale", 1.0))
    for site in sites:
        place_regularizers(model, [site], partial(make_regularizer, dropout_cfg, scale if in_group3(site) else 1.0))


def describe_sites(model: nn.Module) -> str:
    """One-line summary of the placed regularisers per part (backbone, aspp, decoder), for start-up logging."""
    regs = find_regularizers(model)
    if not regs:
        return "none placed"
    parts = []
    for part in ("backbone", "aspp", "decoder"):
        names = [n for n in regs if n.startswith(part + ".")]
        if not names:
            continue
        kinds = sorted({repr(regs[n]) for n in names})
        kind = kinds[0] if len(kinds) == 1 else "(" + ", ".join(kinds) + ")"
        shown = ", ".join(names) if len(names) <= 3 else f"{names[0]} ... {names[-1]}"
        skips = sum(n.endswith(".skip_drop") for n in names)
        shown += f"; {skips} on skip paths" if skips else ""
        parts.append(f"{part}: {len(names)} x {kind} [{shown}]")
    return "; ".join(parts)
