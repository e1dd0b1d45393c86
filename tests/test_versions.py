"""The lowest torch/torchvision that pyproject.toml admits have every API the package uses."""
from __future__ import annotations

import inspect
import re
from importlib.metadata import version
from pathlib import Path

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from deeplab_dropout.data.transforms import PadTo, RandomGaussianBlur

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _release(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.match(r"\d+(\.\d+)*", text).group(0).split("."))


def floor(package: str) -> tuple[int, ...]:
    match = re.search(rf'"{package}>=([\d.]+)', PYPROJECT.read_text())
    assert match, f"no lower bound for {package} in pyproject.toml"
    return _release(match.group(1))


def test_floors_are_where_the_used_apis_became_public():
    # make_params/transform replaced _get_params/_transform as the public v2 API in torchvision 0.21,
    # which was released with torch 2.6.
    assert floor("torchvision") >= (0, 21)
    assert floor("torch") >= (2, 6)


def test_installed_versions_satisfy_the_floors():
    assert _release(version("torch")) >= floor("torch")
    assert _release(version("torchvision")) >= floor("torchvision")


def test_v2_transform_api_used_by_our_transforms():
    for name in ("make_params", "transform"):
        assert name in vars(v2.Transform), f"torchvision.transforms.v2.Transform.{name} is not public here"
        for cls in (PadTo, RandomGaussianBlur):
            assert name in vars(cls), f"{cls.__name__} must override {name}"
    for name in ("query_size", "RandomResize", "RandomCrop", "CenterCrop", "ToDtype", "Normalize", "Compose"):
        assert hasattr(v2, name), name
    assert "scale" in inspect.signature(v2.ToDtype).parameters
    assert issubclass(tv_tensors.Mask, torch.Tensor) and issubclass(tv_tensors.Image, torch.Tensor)


def test_torch_apis_used_by_the_runner():
    assert "weights_only" in inspect.signature(torch.load).parameters
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # device-generic GradScaler (torch >= 2.3)
    assert not scaler.is_enabled()
    assert hasattr(torch, "autocast")
