"""Datasets in the MVTec AD layout: reading them, and converting the magnetic-tile set into one.

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
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from tqdm import tqdm

from ..errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
GOOD = "good"
LAYOUT_DIRS: tuple[str, ...] = ("train", "test", "ground_truth")

# Source folder in the magnetic-tile set -> defect name in the MVTec layout.
MAGNETIC_TILE_DEFECTS: dict[str, str] = {
    "MT_Blowhole": "blowhole",
    "MT_Break": "break",
    "MT_Crack": "crack",
    "MT_Fray": "fray",
    "MT_Uneven": "uneven",
}
MAGNETIC_TILE_GOOD = "MT_Free"
MAGNETIC_TILE_LIGHTING = re.compile(r"exp[1-6]")
# ELPV (Deitsch et al.): defect probability per cell as rated by experts; 0 = good, 1 = defective. The
# uncertain 1/3 and 2/3 ratings are left out of both sides.
ELPV_KINDS = ("mono", "poly")


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


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise UserError(f"could not write {path}: check the folder is writable and the disk not full")


def _fit(image: np.ndarray, resize: tuple[int, int] | None, interpolation: int) -> np.ndarray:
    if resize is None or (image.shape[1], image.shape[0]) == resize:
        return image
    return cv2.resize(image, resize, interpolation=interpolation)


def convert_magnetic_tile(
    source: str | Path,
    out: str | Path,
    n_train: int = 20,
    n_test_good: int | None = 200,
    resize: tuple[int, int] | None = None,
    seed: int = 0,
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    lighting: str | None = None,
) -> Path:
    """Convert the magnetic-tile set (MT_Free, MT_Blowhole, ...; `Imgs/*.jpg` with same-named
    `.png` masks) into the MVTec layout at `out` and return `out`.

    MT_Free is shuffled with `seed`, its first `n_train` images go to train/good and the next
    `n_test_good` (None: all the rest) to test/good. Each MT_<Defect> goes to test/<defect> with
    its mask binarised (>= 128 -> 255) as ground_truth/<defect>/<stem>_mask.png. `limit` caps the
    images per test folder (for quick checks). `resize` is (width, height): images area/linear
    interpolated, masks nearest. Everything is written as single-channel (grey) PNG.

    `lighting` ("exp1".."exp6") keeps the images taken under that one lighting. Each tile was
    photographed under six lightings, so a split over all of them puts the same tile in train and
    test (under another light) and flatters the scorer; one lighting per set does not leak.
    """
    source, out = Path(source).expanduser(), Path(out).expanduser()
    if not (source / MAGNETIC_TILE_GOOD / "Imgs").is_dir():
        raise UserError(
            f"magnetic-tile folder {source} not found or incomplete (no {MAGNETIC_TILE_GOOD}/Imgs); "
            f"pass --source pointing at the folder holding MT_Free, MT_Blowhole, ... (see docs/datasets.md)"
        )
    if lighting is not None and not MAGNETIC_TILE_LIGHTING.fullmatch(lighting):
        raise UserError(f"--lighting {lighting!r}: use exp1 .. exp6 (the prefix of the magnetic-tile file names)")

    def wanted(p: Path) -> bool:
        return p.suffix.lower() == ".jpg" and (lighting is None or p.name.startswith(f"{lighting}_"))

    good = [p for p in list_images(source / MAGNETIC_TILE_GOOD / "Imgs") if wanted(p)]
    if len(good) < n_train + 1:
        raise UserError(f"{source / MAGNETIC_TILE_GOOD} has {len(good)} images; --train {n_train} needs at least {n_train + 1}")
    order = np.random.default_rng(seed).permutation(len(good))
    shuffled = [good[i] for i in order]
    train, rest = shuffled[:n_train], shuffled[n_train:]
    test_good = rest if n_test_good is None else rest[:n_test_good]
    if limit is not None:
        test_good = test_good[:limit]

    jobs: list[tuple[Path, str, str]] = [(p, "train", GOOD) for p in train] + [(p, "test", GOOD) for p in test_good]
    for folder, defect in MAGNETIC_TILE_DEFECTS.items():
        images = [p for p in list_images(source / folder / "Imgs") if wanted(p)]
        if not images:
            log.warning("no images in %s; skipping defect %r", source / folder / "Imgs", defect)
        jobs += [(p, "test", defect) for p in images[:limit]]

    unmasked = [p for p, _, defect in jobs if defect != GOOD and not p.with_suffix(".png").is_file()]
    if unmasked:  # checked before anything is written
        raise UserError(
            f"mask {unmasked[0].with_suffix('.png')} for {unmasked[0].name} is missing "
            f"({len(unmasked)} defect image(s) without a mask); every defect image needs one"
        )
    root = prepare_output(out, overwrite)

    empty_masks: list[Path] = []
    for image_path, split, defect in tqdm(jobs, desc="magnetic-tile", unit="img", disable=not progress, leave=False):
        image = cv2.imread(str(image_path), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise UserError(f"cannot read {image_path}: the magnetic-tile copy looks damaged")
        h, w = image.shape
        shrinking = resize is not None and resize[0] * resize[1] < w * h
        _write(root / split / defect / f"{image_path.stem}.png", _fit(image, resize, cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR))
        if defect == GOOD:
            continue
        mask_path = image_path.with_suffix(".png")
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise UserError(f"mask {mask_path} for {image_path.name} is missing or unreadable; every defect image needs one")
        if mask.shape != image.shape:
            log.warning("mask %s is %s, image is %s; resizing the mask", mask_path, mask.shape, image.shape)
            mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
        binary = np.where(mask >= 128, 255, 0).astype(np.uint8)
        fitted = _fit(binary, resize, cv2.INTER_NEAREST)
        if binary.any() and not fitted.any():  # a defect of a few pixels fell between the samples
            fitted = np.where(_fit(binary, resize, cv2.INTER_AREA) > 0, 255, 0).astype(np.uint8)
        if not fitted.any():
            empty_masks.append(mask_path)
        _write(root / "ground_truth" / defect / f"{image_path.stem}_mask.png", fitted)
    if empty_masks:
        log.warning(
            "%d defect mask(s) in the source are empty (kept as they are: image-level label only), e.g. %s",
            len(empty_masks), empty_masks[0],
        )
    return root


def convert_elpv(
    out: str | Path,
    kind: str,
    n_train: int = 20,
    n_test_good: int | None = 150,
    n_test_defect: int | None = 150,
    seed: int = 0,
    overwrite: bool = False,
    labels_csv: str | Path | None = None,
) -> Path:
    """Convert the ELPV solar-cell set (PyPI `elpv-dataset`) into one MVTec-layout category.

    `kind` is "mono" or "poly" (monocrystalline cells look nothing like polycrystalline ones, so each
    is its own product). Good = probability 0, defective = probability 1; cells are shuffled with
    `seed`. The set has image-level labels only: test/defective gets no masks, so evaluation reports
    image metrics for it. `labels_csv` points at another copy of the package's labels.csv.
    """
    if kind not in ELPV_KINDS:
        raise UserError(f"--kind {kind!r}: choose mono or poly")
    if labels_csv is None:
        try:
            import elpv_dataset
        except ImportError as exc:
            raise UserError("the ELPV images come from the PyPI package elpv-dataset: `.venv/bin/pip install elpv-dataset`") from exc
        labels_csv = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    labels_csv = Path(labels_csv)
    if not labels_csv.is_file():
        raise UserError(f"{labels_csv} not found: reinstall elpv-dataset or pass the folder holding labels.csv")
    good, defective = [], []
    for line_no, line in enumerate(labels_csv.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3:
            raise UserError(f"{labels_csv}:{line_no}: expected 'path probability type', got {line!r}")
        name, probability, cell_type = fields[0], float(fields[1]), fields[2]
        if cell_type != kind:
            continue
        if probability == 0.0:
            good.append(labels_csv.parent / name)
        elif probability == 1.0:
            defective.append(labels_csv.parent / name)
    if len(good) < n_train + 1:
        raise UserError(f"ELPV {kind}: {len(good)} good cells; --train {n_train} needs at least {n_train + 1}")
    rng = np.random.default_rng(seed)
    good = [good[i] for i in rng.permutation(len(good))]
    defective = [defective[i] for i in rng.permutation(len(defective))]
    train, rest = good[:n_train], good[n_train:]
    test_good = rest if n_test_good is None else rest[:n_test_good]
    test_defect = defective if n_test_defect is None else defective[:n_test_defect]
    root = prepare_output(Path(out).expanduser(), overwrite)
    for paths, split, label in ((train, "train", GOOD), (test_good, "test", GOOD), (test_defect, "test", "defective")):
        for path in paths:
            image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            if image is None:
                raise UserError(f"cannot read {path}: the elpv-dataset install looks damaged")
            _write(root / split / label / f"{path.stem}.png", image)
    return root
