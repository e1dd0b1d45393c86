"""The study's vocabulary, once: Table 2's dropout types, placement words and cells, their order, labels and
plot colours, and the name of the cell a composed config trains (``cell_name``).

Everything else (model, config validation, report, plots, TensorBoard) imports these names; no other module
spells a cell. The config files in ``conf/cell/`` are the same 16 cells as Hydra presets.
"""
from __future__ import annotations

# Dropout types as the `dropout` config group names them, and as the paper's cell names shorten them.
DROPOUT_TYPES = ("channel", "dropblock", "uout")
DROPOUT_NAMES = ("none", *DROPOUT_TYPES)  # the `dropout` group's options
SHORT = {"channel": "chandrop", "dropblock": "dropblock", "uout": "uout"}
FAMILIES = tuple(SHORT[t] for t in DROPOUT_TYPES)  # the paper's order: chandrop, dropblock, uout

# Where a regulariser goes: the three parts of DeepLabv3+ and Table 2's placement words over them.
PARTS = ("resnet", "spp", "decoder")
PLACEMENT_PARTS = {"none": (), "resnet": ("resnet",), "spp": ("spp",), "decoder": ("decoder",),
                   "upper": ("spp", "decoder"), "all": ("resnet", "spp", "decoder")}
PLACEMENTS = tuple(p for p in PLACEMENT_PARTS if p != "none")  # resnet, spp, decoder, upper, all

BASELINE = "none"  # the cell without a regulariser: every Δ is against it
PRETRAINED_BASE = "pretrained-base"  # the paper's row: torchvision's COCO-trained DeepLabv3, fine-tuned
PRETRAINED_BASE_EVAL_ONLY = f"{PRETRAINED_BASE} (no fine-tuning)"  # the same model evaluated as it comes
# Table 2's 16 cells in the paper's order (none, then each family over the five placements).
CELLS = (BASELINE, *(f"{where}-{family}" for family in FAMILIES for where in PLACEMENTS))
TABLE_ORDER = (PRETRAINED_BASE, *CELLS)  # the rows of the paper's Tables 3 and 4
# Their dropout, placement and schedule change nothing computed.
UNREGULARISED = (BASELINE, PRETRAINED_BASE, PRETRAINED_BASE_EVAL_ONLY)

SCHEDULES = ("constant", "linear")  # the `schedule` group: Table 3 (constant) and Table 4 (the ramp)
CONSTANT = "constant"

# Plot colours: `none` black, each family a matplotlib colormap, its five placements shades of it.
BASELINE_COLOUR = (0.0, 0.0, 0.0, 1.0)
FAMILY_COLORMAPS = {"chandrop": "Blues", "dropblock": "Greens", "uout": "Oranges"}


def placement_name(cfg) -> str:
    """Where a composed config regularises, in Table 2 words (``upper`` = spp + decoder), ``none`` if nowhere
    (other combinations join their parts with ``+``)."""
    on = tuple(part for part in PARTS if bool(cfg.placement[part]))
    if cfg.dropout.name == "none" or not on:
        return "none"
    return next((name for name, parts in PLACEMENT_PARTS.items() if parts == on), "+".join(on))


def cell_name(cfg) -> str:
    """The Table 2 name of what a composed config regularises (e.g. ``upper-dropblock``), from the values
    used; torchvision's COCO-trained DeepLabv3 is the paper's ``pretrained-base`` row."""
    if cfg.model.get("arch") == "torchvision_deeplabv3":
        return PRETRAINED_BASE
    where = placement_name(cfg)
    return BASELINE if where == "none" else f"{where}-{SHORT[cfg.dropout.name]}"


def family(cell: str) -> str:
    """A cell's dropout family (``all-uout`` -> ``uout``); other names are their own family."""
    suffix = cell.rsplit("-", 1)[-1]
    return suffix if suffix in FAMILIES else cell


def family_rank(kind: str) -> int:
    """Position of a dropout family (or type: ``channel`` = chandrop) in the paper's order; others after."""
    kind = SHORT.get(kind, kind)
    return FAMILIES.index(kind) if kind in FAMILIES else len(FAMILIES)


def cell_of(label: str) -> str | None:
    """The Table 2 cell a run label starts with (``all-uout [seed=1]`` -> ``all-uout``), None if none."""
    return next((c for c in sorted(CELLS, key=len, reverse=True) if label.startswith(c)), None)


def cell_shade(cell: str) -> tuple[str, float]:
    """A regularised cell's (colormap name, position in it): its family's colormap, darker further down."""
    where, kind = cell.split("-")
    return FAMILY_COLORMAPS[kind], 0.4 + 0.14 * PLACEMENTS.index(where)
