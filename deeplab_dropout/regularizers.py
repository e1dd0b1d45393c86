"""The three regularisers of the study as standalone modules: SpatialDropout, DropBlock and UOut.

Each works on (N, C, H, W) activations of any CNN, is the identity in eval mode and at p = 0, keeps the
input's dtype and memory format, and draws from torch's global RNG (so ``torch.manual_seed`` fixes it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Regularizer", "ChannelDropout", "DropBlock", "UOut", "make_regularizer"]


class Regularizer(nn.Module):
    """Base of the regularisers: a validated, settable drop probability ``p`` (the ramp changes it per step)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    @property
    def p(self) -> float:
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

    def active(self) -> bool:
        """Whether forward changes its input (training and p > 0)."""
        return self.training and self._p > 0.0

    def extra_repr(self) -> str:
        return f"p={self._p:g}"


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
        keep = torch.empty(shape, dtype=torch.float32, device=x.device).bernoulli_(1.0 - self._p)
        return _apply_factor(x, keep / (1.0 - self._p))


class DropBlock(Regularizer):
    """DropBlock (Ghiasi et al. 2018, Algorithm 1): drop bs x bs blocks centred on Bernoulli(gamma) seeds.

    Seeds are drawn only where a whole block fits, one mask per (sample, channel); the block size is clipped
    to an odd size <= min(H, W) (an even ``block_size`` is used as block_size - 1); kept activations are
    rescaled by numel / count_kept with the count in float32.
    """

    def __init__(self, p: float, block_size: int = 7) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"DropBlock: block_size must be an integer >= 1, got {block_size!r}")
        super().__init__(p)
        self.block_size = block_size

    def effective_block_size(self, height: int, width: int) -> int:
        """The odd block size actually used on an H x W map."""
        bs = min(self.block_size, height, width)
        if bs % 2 == 0:
            bs -= 1  # odd, so that the block is centred on its seed
        return max(bs, 1)

    def gamma(self, height: int, width: int) -> float:
        """Seed probability: p / bs^2 * H*W / ((H-bs+1)(W-bs+1)), Ghiasi et al. eq. (1) with separate H and W."""
        bs = self.effective_block_size(height, width)
        return self._p / bs**2 * (height * width) / ((height - bs + 1) * (width - bs + 1))

    def forward(self, x: Tensor) -> Tensor:
        if not self.active():
            return x
        if x.dim() != 4:
            raise ValueError(f"DropBlock expects (N, C, H, W) input, got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        bs = self.effective_block_size(h, w)
        gamma = min(1.0, self.gamma(h, w))
        # Mask maths in float32: counts of ones in float16 overflow (torchvision's drop_block2d bug).
        seeds = torch.empty((n, c, h - bs + 1, w - bs + 1), dtype=torch.float32, device=x.device)
        seeds.bernoulli_(gamma)
        half = bs // 2
        # Padding the valid-region seeds back to H x W centres every block inside the map.
        dropped = F.max_pool2d(F.pad(seeds, [half] * 4), kernel_size=bs, stride=1, padding=half)
        keep = 1.0 - dropped
        # clamp: an all-dropped mask gives zeros (0 * numel), not NaN.
        scale = keep.numel() / keep.sum().clamp_min(1.0)
        return _apply_factor(x, keep * scale)

    def extra_repr(self) -> str:
        return f"p={self._p:g}, block_size={self.block_size}"


class UOut(Regularizer):
    """UOut (Li et al. 2019): out = x + x*r with r ~ U[-p, p] per (sample, channel), no rescaling.

    ``shared=True`` draws one r per channel for the whole batch (the study authors' code).
    """

    def __init__(self, p: float, shared: bool = False) -> None:
        super().__init__(p)
        self.shared = bool(shared)

    def forward(self, x: Tensor) -> Tensor:
        if not self.active():
            return x
        _check_input(self, x, 2)
        shape = (1 if self.shared else x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
        r = torch.rand(shape, dtype=torch.float32, device=x.device).mul_(2.0 * self._p).sub_(self._p)
        return _apply_factor(x, 1.0 + r)  # x + x*r as one multiply

    def extra_repr(self) -> str:
        return f"p={self._p:g}, shared={self.shared}"


def make_regularizer(dropout_cfg) -> Regularizer | None:
    """One regulariser from the validated ``dropout`` config group (name, p, block_size, uout_shared); None
    for 'none'."""
    name = dropout_cfg.name
    if name == "none":
        return None
    p = float(dropout_cfg.p)
    if name == "channel":
        return ChannelDropout(p)
    if name == "dropblock":
        return DropBlock(p, block_size=int(dropout_cfg.block_size))
    return UOut(p, shared=bool(dropout_cfg.get("uout_shared", False)))

