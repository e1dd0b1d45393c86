"""PASCAL VOC segmentation reader (VOC 2012, or VOC 2007 with ``year="2007"``) with one-line, file-naming
errors for every data problem."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from deeplab_dropout.config import one_line

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
NUM_CLASSES = len(VOC_CLASSES)
IGNORE_INDEX = 255


def _voc_palette() -> list[int]:
    """The standard VOC colour map: the bits of the label index are interleaved into R, G, B."""
    palette: list[int] = []
    for label in range(256):
        r = g = b = 0
        c = label
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


VOC_PALETTE: list[int] = _voc_palette()
_VALID_LABELS = np.zeros(256, dtype=bool)
_VALID_LABELS[:NUM_CLASSES] = True
_VALID_LABELS[IGNORE_INDEX] = True


class DatasetError(ValueError):
    """A problem with the data on disk; the message is one line naming the file and what is wrong."""


def voc_dir(root: str | os.PathLike, year: str | int = "2012") -> Path:
    """The VOC folder of ``year`` under a data root: `root/VOCdevkit/VOC<year>` (e.g. VOC2012)."""
    return Path(root).expanduser() / "VOCdevkit" / f"VOC{year}"


def _check_root(root: str | os.PathLike, year: str | int = "2012") -> Path:
    root_p = Path(root).expanduser()
    fix = ("data.root must be the folder holding VOCdevkit/; `deeplab-dropout-data synth --out DIR` "
           "or data.download=true produce one")
    if root_p.exists() and not root_p.is_dir():
        raise DatasetError(f"data root is not a folder: {root_p.resolve()} ({fix})")
    if not root_p.is_dir():
        raise DatasetError(f"data root not found: {root_p.resolve()} ({fix})")
    vdir = voc_dir(root_p, year)
    if not vdir.is_dir():
        raise DatasetError(f"no VOCdevkit/VOC{year} folder in data root: {vdir.resolve()} is missing ({fix}; "
                           f"data.year={year})")
    return vdir


def split_file(root: str | os.PathLike, split: str, year: str | int = "2012") -> Path:
    """The list of a split: `root/VOCdevkit/VOC<year>/ImageSets/Segmentation/<split>.txt`."""
    return voc_dir(root, year) / "ImageSets" / "Segmentation" / f"{split}.txt"


def read_split_ids(root: str | os.PathLike, split: str, year: str | int = "2012") -> list[str]:
    """Image ids listed in `ImageSets/Segmentation/<split>.txt` of VOC<year> (the root and its structure are
    checked)."""
    _check_root(root, year)
    path = split_file(root, split, year)
    if not path.is_file():
        raise DatasetError(f"split file not found: {path} (expected ImageSets/Segmentation/{split}.txt)")
    try:
        ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"unreadable split file: {path} ({one_line(e)})") from None
    if not ids:
        raise DatasetError(f"split file lists no images: {path}")
    return ids


def _open(path: Path, kind: str, decode: bool = True) -> Image.Image:
    """Open and fully decode an image file, so truncated or corrupt files fail here in one line
    (``decode=False``: the header only, e.g. for the size)."""
    if not path.is_file():
        raise DatasetError(f"{kind} not found: {path}")
    try:
        with Image.open(path) as im:
            if not decode:
                return im
            im.load()
            return im.copy()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DatasetError(f"corrupt or unreadable {kind}: {path} ({one_line(e)})") from None


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(W, H) of an image from its header, without decoding it (a bad file fails as in ``read_image``)."""
    return _open(Path(path), "image", decode=False).size


def read_image(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB, fully decoded so truncated or corrupt files fail here."""
    return _open(Path(path), "image").convert("RGB")


def read_mask(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a palette/L PNG mask as uint8 H×W labels, checking values (0..20, 255) and (W, H) `size` if given."""
    path = Path(path)
    im = _open(path, "mask")
    # Converting RGB masks would silently turn colours into wrong labels, so refuse them.
    if im.mode not in ("P", "L"):
        raise DatasetError(f"mask is not a palette or L PNG: {path} has mode {im.mode}")
    if size is not None and im.size != tuple(size):
        raise DatasetError(f"mask size differs from its image: {path} is {im.size[0]}x{im.size[1]}, "
                           f"the image is {size[0]}x{size[1]}")
    mask = np.array(im, dtype=np.uint8)
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    bad = [int(v) for v in present if not _VALID_LABELS[v]]
    if bad:
        shown = bad[:10] + (["..."] if len(bad) > 10 else [])
        raise DatasetError(f"mask outside {{0..20, 255}}: {path} has values [{', '.join(map(str, shown))}]")
    return mask


def download_voc(root: str | os.PathLike, year: str | int = "2012", test: bool = False) -> Path:
    """Fetch VOC<year> trainval into `root` with torchvision's downloader (needs internet): 2012 is
    VOCtrainval_11-May-2012 (2 GB), 2007 VOCtrainval_06-Nov-2007 (0.45 GB, segmentation train/val/trainval);
    ``test`` (2007 only) also fetches VOCtest_06-Nov-2007 (0.45 GB), which holds the 2007 test list and masks."""
    from torchvision.datasets import VOCSegmentation as _TVVOC

    year = str(year)
    root_p = Path(root).expanduser()
    root_p.mkdir(parents=True, exist_ok=True)
    if test and year != "2007":
        raise DatasetError(f"VOC {year} has no public test masks (only VOC 2007 does); use another split")
    try:
        # torchvision skips an archive already in root with the right md5, so a second call re-extracts only.
        for image_set in ("trainval", "test") if test else ("trainval",):
            _TVVOC(str(root_p), year=year, image_set=image_set, download=True)
    except Exception as e:  # network / checksum failures: keep the one-line contract
        raise DatasetError(f"VOC {year} download into {root_p} failed: {one_line(e)}") from None
    return voc_dir(root_p, year)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample ``index`` in ``epoch`` of a run seeded ``seed`` (64 bits of a hash)."""
    digest = hashlib.blake2b(f"{seed},{epoch},{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch.manual_seed takes up to 2**63 - 1


class VOCSegmentation(torch.utils.data.Dataset):
    """VOC-layout segmentation dataset (real VOC 2012 / 2007, or the generated one) yielding (image, mask);
    the data is `root/VOCdevkit/VOC<year>`."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        ids: Sequence[str] | None = None,
        transforms: Callable[[Image.Image, np.ndarray], Any] | None = None,
        seed: int | None = None,
        year: str | int = "2012",
    ) -> None:
        self.root = Path(root).expanduser()
        self.split = split
        self.year = str(year)
        self.transforms = transforms
        # With a seed, sample i's random augmentation in epoch e is a function of (seed, e, i) alone:
        # the same whichever loader worker (or the main process) draws it. The runner sets ``epoch``.
        self.seed = seed
        # In shared memory: persistent loader workers (copies of this object) see the epoch the runner sets.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._decoded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # preload(): i -> uint8 image, mask
        listed = read_split_ids(self.root, split, self.year)
        if ids is None:
            self.ids = listed
        else:
            self.ids = [str(i) for i in ids]
            unknown = sorted(set(self.ids) - set(listed))
            if unknown:
                raise DatasetError(
                    f"{len(unknown)} requested ids are not in {split_file(self.root, split, self.year)} "
                    f"(first: {unknown[0]}); "
                    "the split manifest was made for other data"
                )
        vdir = voc_dir(self.root, self.year)
        self._img_dir = vdir / "JPEGImages"
        self._mask_dir = vdir / "SegmentationClass"
        for folder in (self._img_dir, self._mask_dir):
            if not folder.is_dir():
                raise DatasetError(f"folder not found: {folder}")
        # One listdir per folder instead of a stat per file: VOC has ~17k JPEGs.
        have_img = set(os.listdir(self._img_dir))
        have_mask = set(os.listdir(self._mask_dir))
        for i in self.ids:
            if f"{i}.jpg" not in have_img:
                raise DatasetError(f"image not found: {self.image_path(i)} (listed in {split}.txt)")
            if f"{i}.png" not in have_mask:
                raise DatasetError(f"mask not found: {self.mask_path(i)} (listed in {split}.txt)")

    @property
    def epoch(self) -> int:
        """The epoch the random augmentation derives from (set by the runner before each epoch)."""
        return int(self._epoch)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.fill_(int(value))

    def image_path(self, image_id: str) -> Path:
        """Path of an id's JPEG."""
        return self._img_dir / f"{image_id}.jpg"

    def mask_path(self, image_id: str) -> Path:
        """Path of an id's PNG mask."""
        return self._mask_dir / f"{image_id}.png"

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int) -> tuple[Image.Image, np.ndarray]:
        """The i-th (RGB image, uint8 mask) pair, validated, without transforms."""
        image_id = self.ids[i]
        image = read_image(self.image_path(image_id))
        mask = read_mask(self.mask_path(image_id), size=image.size)
        return image, mask

    def load_tensors(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The i-th pair as uint8 tensors, (3, H, W) image and (H, W) mask: from RAM after ``preload``."""
        if i in self._decoded:
            return self._decoded[i]
        image, mask = self.load(i)
        return torch.from_numpy(np.array(image).transpose(2, 0, 1).copy()), torch.from_numpy(mask)

    def preload(self) -> None:
        """Decode every image and mask once into RAM (validated as ``load`` does); later reads come from there."""
        first: dict[str, int] = {}
        for i, image_id in enumerate(self.ids):
            # `authors` lists an image more than once: decode it once.
            j = first.setdefault(image_id, i)
            self._decoded[i] = self._decoded[j] if j != i else self.load_tensors(i)

    def __getitem__(self, i: int) -> Any:
        if self.transforms is None:
            return self.load(i)
        image, mask = self.load_tensors(i) if self._decoded else self.load(i)
        if self.seed is None:
            return self.transforms(image, mask)
        # The transforms draw from torch's global RNG: seed it for this sample, then give back its state,
        # so that in the main process (num_workers=0) the model's dropout draws are untouched.
        # The CPU generator only: torch.manual_seed also queues a CUDA seed with a formatted stack trace,
        # a millisecond per sample on a CPU-only machine.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, i))
            return self.transforms(image, mask)

    def __repr__(self) -> str:
        return (f"VOCSegmentation(root={str(self.root)!r}, year={self.year!r}, split={self.split!r}, "
                f"n={len(self.ids)})")
