"""The lowest torch/torchvision that pyproject.toml admits have every API the package uses."""
from __future__ import annotations

import inspect
import re
from importlib.metadata import version
from pathlib import Path

import torch
from torchvision.transforms.v2 import functional as F

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
TRANSFORMS = Path(__file__).resolve().parents[1] / "deeplab_dropout" / "data" / "transforms.py"


def _release(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.match(r"\d+(\.\d+)*", text).group(0).split("."))


def floor(package: str) -> tuple[int, ...]:
    match = re.search(rf'"{package}>=([\d.]+)', PYPROJECT.read_text())
    assert match, f"no lower bound for {package} in pyproject.toml"
    return _release(match.group(1))


def test_floors_are_where_the_used_apis_became_public():
    # torchvision 0.21 (released with torch 2.6) has every kernel of KERNELS under these public names.
    assert floor("torchvision") >= (0, 21)
    assert floor("torch") >= (2, 6)


def test_installed_versions_satisfy_the_floors():
    assert _release(version("torch")) >= floor("torch")
    assert _release(version("torchvision")) >= floor("torchvision")


# The v2 kernels our transform steps call directly (data/transforms.py), by their public names.
KERNELS = ("resize_image", "resize_mask", "rotate_image", "rotate_mask", "pad_image", "pad_mask", "crop_image",
           "crop_mask", "center_crop_image", "center_crop_mask", "horizontal_flip_image", "horizontal_flip_mask",
           "gaussian_blur_image", "to_dtype_image", "normalize_image", "pil_to_tensor")


def test_v2_kernels_used_by_our_transforms():
    for name in KERNELS:
        assert callable(getattr(F, name, None)), f"torchvision.transforms.v2.functional.{name} is not public here"
    assert "scale" in inspect.signature(F.to_dtype_image).parameters
    assert "antialias" in inspect.signature(F.resize_image).parameters
    used = {m for m in re.findall(r"\bF\.(\w+)\(", TRANSFORMS.read_text())}
    assert used <= set(KERNELS), f"data/transforms.py calls kernels this test does not check: {used - set(KERNELS)}"


def test_torch_apis_used_by_the_runner():
    assert "weights_only" in inspect.signature(torch.load).parameters
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # device-generic GradScaler (torch >= 2.3)
    assert not scaler.is_enabled()
    assert hasattr(torch, "autocast")
