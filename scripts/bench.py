"""Cost of the regularisers, as ratios measured in one run (never as timed tests).

    python scripts/bench.py                       # ResNet-18, 65x65, batch 8, CPU
    python scripts/bench.py --backbone resnet101 --size 513 --device cuda

Prints, for each `all-*` cell, the training-step time relative to the `none` cell, and our DropBlock
against torchvision's `drop_block2d` on one activation tensor.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torchvision.ops import drop_block2d

from deeplab_dropout.model import build_model
from deeplab_dropout.regularizers import DropBlock

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def timed(fn, device: torch.device) -> float:
    """Seconds of one ``fn()`` call (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def median_times(fns: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds per function, calls interleaved round by round so that drift hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def train_step(cell: str, args, device: torch.device):
    """A closure running one SGD step of the model of ``cell`` on a fixed random batch."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"cell={cell}", "model.pretrained=none",
                                                      f"model.backbone={args.backbone}"])
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 21, (args.batch, args.size, args.size), device=device)

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=65)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    cells = ("none", "all-chandrop", "all-dropblock", "all-uout")
    t = median_times({c: train_step(c, args, device) for c in cells}, device, args.repeats)
    print(f"{args.backbone} {args.size}x{args.size} batch {args.batch} on {device}, median of {args.repeats}:")
    for cell in cells:
        print(f"  {cell:14s} {t[cell] * 1e3:8.1f} ms/step   ratio to none {t[cell] / t['none']:5.2f}")

    x = torch.randn(args.batch, 256, 33, 33, device=device)
    ours = DropBlock(0.2, 7).train()
    t = median_times({"ours": lambda: ours(x), "torchvision": lambda: drop_block2d(x, 0.2, 7)}, device, 20)
    print(f"DropBlock(p=0.2, block_size=7) on {tuple(x.shape)}: ours {t['ours'] * 1e3:.2f} ms, torchvision "
          f"{t['torchvision'] * 1e3:.2f} ms, ratio {t['ours'] / t['torchvision']:.2f}")


if __name__ == "__main__":
    main()
