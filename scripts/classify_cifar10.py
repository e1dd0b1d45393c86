"""The study's regularisers in a plain classifier: a CIFAR-10 ResNet-18 with DropBlock after every block of
groups 3 and 4 (layer3, layer4) and the linear keep-prob ramp, using only ``deeplab_dropout.regularizers``
and ``deeplab_dropout.schedules`` -- ``build_model`` and ``train_one_epoch`` show the few lines it takes.

    python scripts/classify_cifar10.py --root /data/cifar --download      # torchvision fetches CIFAR-10 once
    python scripts/classify_cifar10.py --root /data/cifar --out cifar.json
    python scripts/classify_cifar10.py --root /data/cifar --dropblock-p 0  # the baseline without DropBlock

Defaults follow the DropBlock paper (Ghiasi et al. 2018) and its CIFAR-10 replication: target keep_prob 0.9
(--dropblock-p 0.1) reached by a linear ramp from keep_prob 1 over the run, DropBlock in groups 3 and 4 with
gamma 4x smaller in group 3 (--group3-gamma-scale 0.25), and block size 3, the CIFAR runs' best at
keep_prob 0.9 (ImageNet's 7 would cover the whole 4x4 map of group 4 at 32x32 input, i.e. act as
SpatialDropout there). Training: SGD (momentum 0.9, weight decay 5e-4), the learning rate cosine-annealed per
iteration from --lr to 0 over the run; random crop 32 with padding 4, horizontal flip, normalisation.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T
from torchvision.datasets import CIFAR10

from deeplab_dropout.regularizers import DropBlock, set_drop_p
from deeplab_dropout.schedules import drop_p

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10 training-set channel statistics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see --help)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="torchvision's CIFAR10 root: the folder holding cifar-10-batches-py/")
    ap.add_argument("--download", action="store_true", help="fetch CIFAR-10 into --root with torchvision's downloader")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip torchvision's md5 check of the batch files (for a generated copy in CIFAR's format)")
    ap.add_argument("--epochs", type=_number(int, 1), default=30, help="training epochs (default 30)")
    ap.add_argument("--batch-size", type=_number(int, 1), default=128, help="default 128")
    ap.add_argument("--lr", type=_number(float, 0, low_open=True), default=0.1, help="peak learning rate (0.1)")
    ap.add_argument("--dropblock-p", type=_number(float, 0, 1, high_open=True), default=0.1,
                    help="target drop probability 1 - keep_prob in [0, 1); 0 = no DropBlock (default 0.1)")
    ap.add_argument("--block-size", type=_number(int, 1), default=3, help="DropBlock block size (default 3)")
    ap.add_argument("--group3-gamma-scale", type=_number(float, 0, 1, low_open=True), default=0.25,
                    help="gamma multiplier of the group-3 DropBlocks, in (0, 1] (default 0.25, the paper's)")
    ap.add_argument("--ramp-epochs", type=_number(float, 0), default=None,
                    help="epochs over which p grows linearly (per iteration) from 0 to --dropblock-p; "
                         "0 = constant p (default: the whole run)")
    ap.add_argument("--seed", type=int, default=0, help="seeds weights, shuffling, augmentation and masks")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda if available")
    ap.add_argument("--workers", type=_number(int, 0), default=2, help="data-loading processes (default 2)")
    ap.add_argument("--limit-train", type=_number(int, 1), default=None, help="use the first N training images")
    ap.add_argument("--limit-test", type=_number(int, 1), default=None, help="use the first N test images")
    ap.add_argument("--out", default=None, help="JSON file for the per-epoch train loss, test accuracy and p")
    args = ap.parse_args(argv)
    args.ramp_epochs = args.epochs if args.ramp_epochs is None else args.ramp_epochs
    return args


def _number(kind: type, low: float, high: float = float("inf"), low_open: bool = False,
            high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: ``kind`` within [low, high] (ends open as asked), else a one-line usage error."""
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        inside = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
        if not inside:
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"{text} is outside {bounds}")
        return value
    return convert


class UnverifiedCIFAR10(CIFAR10):
    """torchvision's CIFAR10 checking only that its files exist (md5 None): for --no-verify."""

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


def get_dataset(args: argparse.Namespace, train: bool) -> Dataset:
    """The CIFAR-10 train or test split with the standard augmentation (train) or normalisation only."""
    norm = [T.ToTensor(), T.Normalize(MEAN, STD)]
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *norm] if train else norm)
    cls = UnverifiedCIFAR10 if args.no_verify else CIFAR10
    ds = cls(root=args.root, train=train, transform=tf, download=args.download)
    limit = args.limit_train if train else args.limit_test
    return Subset(ds, range(min(limit, len(ds)))) if limit else ds


def build_model(dropblock: bool, block_size: int = 3, group3_gamma_scale: float = 0.25) -> nn.Module:
    """torchvision's ResNet-18 with the CIFAR stem (3x3 stride-1 conv1, no max-pool) and 10 classes; with
    ``dropblock``, a DropBlock (p = 0 until the ramp sets it) after every block of layer3 and layer4."""
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's stem
    model.maxpool = nn.Identity()  # 32x32 input: groups 3 and 4 work on 8x8 and 4x4 maps
    if dropblock:
        for name, scale in (("layer3", group3_gamma_scale), ("layer4", 1.0)):
            blocks = [nn.Sequential(block, DropBlock(0.0, block_size=block_size, rate_scale=scale))
                      for block in getattr(model, name)]
            setattr(model, name, nn.Sequential(*blocks))
    return model


@dataclass
class Trainer:
    """What the loop carries from step to step; ``step`` is the global iteration the ramp reads."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    target_p: float
    ramp_epochs: float
    steps_per_epoch: int
    step: int = 0


def train_one_epoch(t: Trainer, loader: DataLoader) -> tuple[float, float]:
    """One pass over ``loader``; returns the mean training loss and the p of the epoch's last step."""
    t.model.train()
    total, count, p = torch.zeros((), device=t.device), 0, 0.0
    for images, labels in loader:
        p = drop_p(t.target_p, t.step, t.steps_per_epoch, t.ramp_epochs)  # linear ramp, per iteration
        set_drop_p(t.model, p)
        images, labels = images.to(t.device, non_blocking=True), labels.to(t.device, non_blocking=True)
        loss = F.cross_entropy(t.model(images), labels)
        t.opt.zero_grad(set_to_none=True)
        loss.backward()
        t.opt.step()
        t.sched.step()
        t.step += 1
        total += loss.detach() * len(labels)  # summed on the device: no sync per step
        count += len(labels)
    return total.item() / count, p


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Top-1 accuracy on ``loader`` (eval mode: DropBlock is the identity)."""
    model.eval()
    correct, count = torch.zeros((), device=device, dtype=torch.long), 0
    for images, labels in loader:
        labels = labels.to(device, non_blocking=True)
        correct += (model(images.to(device, non_blocking=True)).argmax(1) == labels).sum()
        count += len(labels)
    return correct.item() / count


def make_trainer(args: argparse.Namespace, device: torch.device, steps_per_epoch: int) -> Trainer:
    """Model, SGD and the per-iteration cosine schedule from the command line."""
    model = build_model(args.dropblock_p > 0, args.block_size, args.group3_gamma_scale).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)
    return Trainer(model, opt, sched, device, args.dropblock_p, args.ramp_epochs, steps_per_epoch)


def pick_device(name: str) -> torch.device:
    """auto -> cuda when available; asking for cuda without one is a one-line error."""
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def fail(message: str) -> NoReturn:
    """Print one line to stderr and exit with status 2 (a usage or data error, no traceback)."""
    print(f"classify_cifar10.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_data(args: argparse.Namespace, device: torch.device) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders; a missing or unreadable dataset is a one-line error naming the folder."""
    try:
        train_set, test_set = get_dataset(args, train=True), get_dataset(args, train=False)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError) as err:
        where = os.path.join(os.path.abspath(args.root), CIFAR10.base_folder)
        # torchvision says only "not found or corrupted" (RuntimeError); a broken file's own error says more.
        checked = "missing" if args.no_verify else "missing or failing torchvision's md5 check"
        why = f"files {checked}" if isinstance(err, RuntimeError) else repr(err)
        hint = "--download could not fetch it" if args.download else "pass --download to fetch it"
        if not args.no_verify and os.path.isdir(where):
            hint += " (--no-verify skips the md5 check)"
        fail(f"no usable CIFAR-10 in {where} ({why}); {hint}")
    gen = torch.Generator().manual_seed(args.seed)
    kw = dict(num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    return (DataLoader(train_set, args.batch_size, shuffle=True, generator=gen, **kw),
            DataLoader(test_set, 256, **kw))


def main(argv: list[str] | None = None) -> int:
    """Train, print one line per epoch, and write --out after every epoch."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    train_loader, test_loader = load_data(args, device)
    t = make_trainer(args, device, len(train_loader))
    history = []
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        loss, p = train_one_epoch(t, train_loader)
        acc = evaluate(t.model, test_loader, device)
        history.append({"epoch": epoch, "train_loss": loss, "test_acc": acc, "p": p})
        print(f"epoch {epoch}/{args.epochs}  loss {loss:.4f}  test acc {acc:.4f}  p {p:.4f}  "
              f"lr {t.sched.get_last_lr()[0]:.4g}  {time.perf_counter() - start:.1f}s", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"args": vars(args), "history": history}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
