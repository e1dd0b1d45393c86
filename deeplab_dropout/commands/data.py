"""`deeplab-dropout-data`: generate the VOC-format dataset (`synth`) and compute the class split (`split`); the
data code is imported once the arguments parse."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from deeplab_dropout.cli import command
from deeplab_dropout.config import SPLIT_METHODS, YEARS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deeplab-dropout-data", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="write a generated dataset as DIR/VOCdevkit/VOC<year> (use data.root=DIR)")
    s.add_argument("--out", required=True, help="folder to hold VOCdevkit/ (the data.root)")
    s.add_argument("--year", choices=YEARS, default="2012",
                   help="data.year: the folder VOCdevkit/VOC<year> to write (default 2012; same images either way)")
    s.add_argument("--train", type=int, default=200, help="train images (default 200)")
    s.add_argument("--val", type=int, default=50, help="val images (default 50)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--min-side", type=int, default=300, help="smallest short side in px (default 300)")
    s.add_argument("--max-side", type=int, default=500, help="largest short side in px (default 500)")
    t = sub.add_parser(
        "split", help="compute (or reuse) the class split, compare the split methods, print the manifest path",
        description="Keep a fraction of the images of every object class of <split>.txt (masks decide which "
        "classes an image holds). Prints the per-class table of --method, a comparison of all methods "
        "(entries, unique images, mean object classes per entry; pool = the whole list, its mean over "
        "images with an object class) and, last, the manifest path.")
    t.add_argument("--root", required=True, help="the folder holding VOCdevkit/ (data.root)")
    t.add_argument("--year", choices=YEARS, default="2012", help="data.year: split VOCdevkit/VOC<year> (default 2012)")
    t.add_argument("--fraction", type=float, default=0.1, help="share of each class's images (default 0.1)")
    t.add_argument("--seed", type=int, default=0, help="split seed, >= 0 (data.split_seed; default 0)")
    t.add_argument("--split", default="train", help="ImageSets/Segmentation/<split>.txt (default train)")
    t.add_argument("--cache-dir", default=None,
                   help="data.cache_dir: where the manifest and the class-presence cache go (default: ROOT/splits "
                   "where it can be written, else a per-user cache folder)")
    t.add_argument("--method", choices=SPLIT_METHODS, default="per_class",
                   help="data.split_method: per_class = seeded ceil(fraction·n_c) per class, union (default); "
                   "authors = floor per class, an image listed once per class that picked it; "
                   "min_cover = smallest greedy multicover")
    return p


def _print_split(path, manifest: dict, comparison: list[dict]) -> None:
    from deeplab_dropout.data.voc import VOC_CLASSES

    print(f"{'id':>3}  {'class':<12} {'n':>6} {'selected':>9}")
    for c, row in manifest["per_class"].items():
        print(f"{int(c):>3}  {VOC_CLASSES[int(c)]:<12} {row['n']:>6} {row['selected']:>9}")
    print(f"total: {len(manifest['ids'])} images ({manifest['n_unique']} unique; method {manifest['method']}, "
          f"fraction {manifest['fraction']}, seed {manifest['seed']}, sha256 {manifest['sha256'][:12]})")
    print()
    print(f"{'method':<10} {'images':>7} {'unique':>7} {'classes/img':>12}")
    for row in comparison:
        print(f"{row['method']:<10} {row['images']:>7} {row['unique']:>7} {row['mean_classes']:>12.3f}")
    print(path)  # last line: scripts read the manifest path from here


@command
def run(argv: Sequence[str] | None = None) -> int:
    """The command on parsed arguments; bad data is a DatasetError (one line, exit 2 through ``command``)."""
    args = _parser().parse_args(argv)
    # The data code (numpy, torch's Dataset) only once the arguments parse: --help is instant.
    from deeplab_dropout.data.split import class_presence, compare_methods, make_split
    from deeplab_dropout.data.synth import generate

    if args.command == "synth":
        root = generate(args.out, n_train=args.train, n_val=args.val, seed=args.seed,
                        min_side=args.min_side, max_side=args.max_side, year=args.year)
        print(f"generated dataset ready; use data.root={root} data.year={args.year}", file=sys.stderr)
        print(root)
    else:
        path, manifest = make_split(args.root, fraction=args.fraction, seed=args.seed, split=args.split,
                                    cache_dir=args.cache_dir, method=args.method, year=args.year)
        # The presence index is cached next to the manifest, so the comparison reads no masks again.
        presence = class_presence(args.root, args.split, args.cache_dir, args.year)
        _print_split(path, manifest, compare_methods(presence, args.fraction, args.seed))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`deeplab-dropout-data`: exits 2 with a one-line `error:` message on bad data."""
    status = run(argv)
    if status:
        sys.exit(status)
    return status
