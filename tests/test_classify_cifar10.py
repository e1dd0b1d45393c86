"""scripts/classify_cifar10.py on a generated CIFAR-10 in torchvision's on-disk format (no download): it trains
and beats chance, places DropBlock exactly after the blocks of layer3 and layer4, follows the linear ramp per
iteration, and turns a missing or unverifiable dataset into a one-line error with exit status 2."""
from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from deeplab_dropout.regularizers import DropBlock, Regularizer
from deeplab_dropout.schedules import drop_p

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "classify_cifar10.py"
_spec = importlib.util.spec_from_file_location("classify_cifar10", SCRIPT)
cifar = importlib.util.module_from_spec(_spec)
sys.modules["classify_cifar10"] = cifar  # dataclasses look their module up there
_spec.loader.exec_module(cifar)

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# Ten well-separated colours (the RGB cube's corners, grey, orange): one per class, so that a from-scratch
# ResNet-18 learns them within one short epoch.
PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255],
                    [0, 255, 255], [255, 255, 255], [128, 128, 128], [255, 128, 0]], dtype=float)


def _images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 3072) uint8 rows as CIFAR stores them (1024 R, then G, then B values, each 32x32 row-major):
    the class's colour plus Gaussian noise (std 25) on every pixel."""
    pixels = PALETTE[labels][:, :, None] + rng.normal(0, 25, (len(labels), 3, 1024))
    return np.clip(pixels, 0, 255).astype(np.uint8).reshape(len(labels), 3072)


def write_cifar10(root: Path, per_batch: int = 100, n_test: int = 200, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py/`` with data_batch_1..5, test_batch and batches.meta as torchvision's CIFAR10
    reads them: pickled dicts with ``data`` (uint8, N x 3072) and ``labels`` (list of int). Keys are str, not
    bytes: the originals are Python 2 pickles whose str keys torchvision's ``encoding="latin1"`` load reads as
    str (``entry["data"]``); only ``encoding="bytes"`` would show them as b"data"."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    files = [(f"data_batch_{i}", per_batch, f"training batch {i} of 5") for i in range(1, 6)]
    for name, n, label in [*files, ("test_batch", n_test, "testing batch 1 of 1")]:
        labels = rng.integers(0, 10, n)
        batch = {"batch_label": label, "labels": labels.tolist(), "data": _images(labels, rng),
                 "filenames": [f"{name}_{i}.png" for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": NAMES, "num_cases_per_batch": per_batch, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_generated_set_reads_as_torchvision_cifar10(tmp_path):
    """The generated files load through torchvision's own reader (only the md5s differ): HWC images whose
    first pixel is the first byte of each colour plane, and the labels in order."""
    root = write_cifar10(tmp_path, per_batch=4, n_test=3)
    ds = cifar.UnverifiedCIFAR10(root=str(root), train=True)
    batch = pickle.loads((root / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    assert ds.data.shape == (20, 32, 32, 3) and ds.classes == NAMES
    assert ds.targets[:4] == batch["labels"]
    np.testing.assert_array_equal(ds.data[0, 0, 0], batch["data"][0, [0, 1024, 2048]])
    assert len(cifar.UnverifiedCIFAR10(root=str(root), train=False)) == 3


@pytest.mark.slow
def test_one_epoch_end_to_end_beats_chance(tmp_path):
    """--epochs 1 on the first 500 of 550 generated training images (--limit-train) and 200 of 220 test
    images: exit 0, one line per epoch, test accuracy well above 1/10, and the recorded p is the ramp's value
    at the epoch's last step (25 steps of 20: the limit is applied)."""
    root = write_cifar10(tmp_path / "data", per_batch=110, n_test=220)
    out = tmp_path / "run.json"
    proc = run_script("--root", str(root), "--no-verify", "--epochs", "1", "--batch-size", "20", "--lr", "0.01",
                      "--workers", "1", "--device", "cpu", "--limit-train", "500", "--limit-test", "200",
                      "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[:2] for line in proc.stdout.splitlines()] == [["epoch", "1/1"]]
    (entry,) = json.loads(out.read_text())["history"]
    assert entry["test_acc"] > 0.3
    assert entry["p"] == pytest.approx(drop_p(0.1, 24, 25, 1.0), abs=1e-12)  # the ramp spans the one epoch


def test_dropblock_exactly_after_the_blocks_of_layer3_and_layer4():
    """One DropBlock after each BasicBlock of layer3 (gamma x 0.25) and of layer4, none elsewhere; the CIFAR
    stem keeps 32x32 through layer1, so layer3 and layer4 see 8x8 and 4x4 maps; no regulariser without it."""
    model = cifar.build_model(True, block_size=3, group3_gamma_scale=0.25)
    found = {name: m for name, m in model.named_modules() if isinstance(m, Regularizer)}
    assert list(found) == ["layer3.0.1", "layer3.1.1", "layer4.0.1", "layer4.1.1"]
    assert all(type(m) is DropBlock and m.block_size == 3 for m in found.values())
    assert [m.rate_scale for m in found.values()] == [0.25, 0.25, 1.0, 1.0]
    assert all(type(model.get_submodule(name[:-1] + "0")).__name__ == "BasicBlock" for name in found)
    sizes = {}
    for name in ("layer1", "layer3", "layer4"):
        # __setitem__ returns None: a hook that returned a value would replace the module's output
        model.get_submodule(name).register_forward_hook(lambda m, i, o, n=name: sizes.__setitem__(n, o.shape[-2:]))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert sizes == {"layer1": (32, 32), "layer3": (8, 8), "layer4": (4, 4)}
    assert not any(isinstance(m, Regularizer) for m in cifar.build_model(False).modules())


def test_p_follows_the_linear_ramp_per_iteration():
    """Every DropBlock sees drop_p(target, step, ...) at each step of two epochs (the ramp ends mid-run, at
    1.5 epochs), train_one_epoch returns the last step's p, and the LR follows the cosine closed form."""
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])), batch_size=2)
    model = cifar.build_model(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2 * len(loader))
    t = cifar.Trainer(model, opt, sched, torch.device("cpu"), 0.2, 1.5, len(loader))
    seen = {name: [] for name, m in model.named_modules() if isinstance(m, DropBlock)}
    for name in seen:
        model.get_submodule(name).register_forward_pre_hook(lambda m, a, n=name: seen[n].append(m.p))
    returned, lrs = [], []
    for _ in range(2):
        returned.append(cifar.train_one_epoch(t, loader)[1])
        lrs.append(opt.param_groups[0]["lr"])
    expected = [0.2 * min(1.0, s / 3) for s in range(4)]  # T = 1.5 epochs x 2 steps: full p from step 3
    assert expected == pytest.approx([drop_p(0.2, s, 2, 1.5) for s in range(4)], abs=1e-12)
    assert len(seen) == 4
    for name, ps in seen.items():
        assert ps == pytest.approx(expected, abs=1e-12), name
    assert returned == pytest.approx([expected[1], expected[3]], abs=1e-12)
    # 0.1 * (1 + cos(pi t / 4)) / 2 after t = 2 and t = 4 steps
    assert lrs == pytest.approx([0.05, 0.0], abs=1e-12)


@pytest.mark.slow
def test_missing_root_is_one_line_exit_2(tmp_path):
    """A root without CIFAR-10: exit 2, one stderr line naming the folder and suggesting --download."""
    missing = tmp_path / "nowhere"
    proc = run_script("--root", str(missing), "--epochs", "1", "--workers", "0")
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert str(missing / "cifar-10-batches-py") in line and "--download" in line


@pytest.mark.slow
@pytest.mark.parametrize("case", ["md5", "corrupt"])
def test_unverifiable_or_corrupt_files_are_one_line_exit_2(tmp_path, case):
    """Generated files without --no-verify fail torchvision's md5 check; a truncated batch file fails to load
    even with it. Both: exit 2 and one stderr line naming the folder, no traceback."""
    root = write_cifar10(tmp_path, per_batch=2, n_test=2)
    extra = []
    if case == "corrupt":
        path = root / "cifar-10-batches-py" / "data_batch_3"
        path.write_bytes(path.read_bytes()[:50])
        extra = ["--no-verify"]
    proc = run_script("--root", str(root), "--epochs", "1", "--workers", "0", *extra)
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert str(root / "cifar-10-batches-py") in line and "Traceback" not in proc.stderr
    assert ("md5" in line) == ("--no-verify" in line) == (case == "md5") and "--download" in line
