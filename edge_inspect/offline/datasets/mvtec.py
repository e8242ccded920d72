"""Datasets in the MVTec AD layout: reading them (converters from other layouts: convert.py).

Why: calibration reads good images from `train/good`, evaluation reads `test/<defect>` with pixel
masks from `ground_truth/<defect>/<stem>_mask.png`. One reader with clear errors serves both, and
the converter makes a real industrial dataset (magnetic tile) usable the same way.

    >>> ds = load_dataset("/tmp/ds/gen/brick")
    >>> ds.train_good[:2], ds.test[0].defect_type, read_mask(ds.test[0], (256, 256)).sum()

Layout (one category per folder):

    <root>/train/good/*.png
    <root>/test/good/*.png
    <root>/test/<defect>/*.png
    <root>/ground_truth/<defect>/<stem>_mask.png      (0 = normal, 255 = defect)

Missing masks: a defect image without a mask is kept (its image-level label is still known),
logged as a warning, and gets `mask_path=None`; `has_pixel_truth` is False for it so pixel
metrics can skip it. `load_dataset(root, require_masks=True)` turns that into an error instead.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from ...errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
GOOD = "good"
LAYOUT_DIRS: tuple[str, ...] = ("train", "test", "ground_truth")


@dataclass(frozen=True)
class TestItem:
    """One test image: its defect type ('good' for good parts) and its mask file, if any."""

    path: Path
    defect_type: str
    mask_path: Path | None = None

    @property
    def is_good(self) -> bool:
        return self.defect_type == GOOD

    @property
    def has_pixel_truth(self) -> bool:
        """True when the pixel labels are known: good images (all normal) or a mask on disk."""
        return self.is_good or self.mask_path is not None


@dataclass(frozen=True)
class MvtecDataset:
    """One category folder: its good training images and its labelled test images."""

    root: Path
    train_good: list[Path]
    test: list[TestItem]

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def defect_types(self) -> list[str]:
        return sorted({t.defect_type for t in self.test if not t.is_good})


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name (suffix case ignored, hidden files skipped)."""
    if not folder.is_dir():
        return []
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.name,
    )


def _find_mask(root: Path, defect: str, image: Path) -> Path | None:
    folder = root / "ground_truth" / defect
    for candidate in list_images(folder):
        if candidate.stem == f"{image.stem}_mask":
            return candidate
    return None


def load_dataset(root: str | Path, require_masks: bool = False) -> MvtecDataset:
    """Index an MVTec AD-layout category folder (the one holding train/ and test/).

    Raises UserError when the folder, train/good or its images are missing, and (with
    `require_masks`) when a defect image has no mask. A missing test/ folder gives no test items.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(
            f"dataset folder {root} does not exist; make one with "
            f"`python tools/make_dataset.py generate --out DIR` or point to an MVTec AD category folder "
            f"(the one holding train/ and test/)"
        )
    train_dir = root / "train" / GOOD
    if not train_dir.is_dir():
        categories = sorted(p.name for p in root.iterdir() if (p / "train" / GOOD).is_dir())
        hint = (
            f" It holds categories ({', '.join(categories[:8])}): pass one of them, e.g. {root / categories[0]}."
            if categories
            else " Expected the MVTec AD layout: train/good/, test/<defect>/, ground_truth/<defect>/<stem>_mask.png."
        )
        raise UserError(f"dataset folder {root} has no train/good folder.{hint}")
    train_good = list_images(train_dir)
    if not train_good:
        raise UserError(
            f"{train_dir} holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); "
            f"put a few good-part images there"
        )
    test: list[TestItem] = []
    missing: list[Path] = []
    test_dir = root / "test"
    if test_dir.is_dir():
        defect_dirs = sorted((d for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: (d.name != GOOD, d.name))
        for defect_dir in defect_dirs:
            defect = defect_dir.name
            for image in list_images(defect_dir):
                mask = None if defect == GOOD else _find_mask(root, defect, image)
                if defect != GOOD and mask is None:
                    missing.append(image)
                test.append(TestItem(image, defect, mask))
    if missing:
        example = missing[0]
        where = root / "ground_truth" / example.parent.name / f"{example.stem}_mask.png"
        message = f"{len(missing)} defect image(s) in {test_dir} have no mask, e.g. {example} (expected {where})"
        if require_masks:
            raise UserError(message + "; add the masks or drop require_masks to score them at image level only")
        log.warning("%s; they count for image-level metrics only", message)
    return MvtecDataset(root=root, train_good=train_good, test=test)


def read_image(path: str | Path) -> np.ndarray:
    """An image file as HxWx3 BGR uint8 (grey files are expanded); UserError when unreadable."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise UserError(f"cannot read image {path}: missing, empty or not an image OpenCV can decode")
    return image


def read_mask(item: TestItem, shape: Sequence[int]) -> np.ndarray:
    """The item's defect mask as a bool HxW array of `shape[:2]`, all False for good or unmasked items.

    Masks of another size are resized with nearest neighbour; values >= 128 count as defect.
    """
    h, w = int(shape[0]), int(shape[1])
    if item.mask_path is None:
        return np.zeros((h, w), bool)
    mask = cv2.imread(str(item.mask_path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise UserError(f"cannot read mask {item.mask_path}: missing, empty or not an image OpenCV can decode")
    if mask.shape != (h, w):
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    return mask >= 128


def prepare_output(root: Path, overwrite: bool = True) -> Path:
    """Make `root` ready to receive a dataset: its train/, test/, ground_truth/ folders are removed
    (only those) when `overwrite`, else an existing dataset there is an error."""
    existing = [root / d for d in LAYOUT_DIRS if (root / d).exists()]
    if existing and not overwrite:
        raise UserError(f"{root} already holds a dataset ({existing[0].name}/ exists); pass --overwrite to replace it")
    for folder in existing:
        shutil.rmtree(folder)
    root.mkdir(parents=True, exist_ok=True)
    return root


