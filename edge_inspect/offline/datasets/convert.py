"""Real datasets converted into the MVTec AD layout: the magnetic-tile set (by lighting) and the ELPV
solar cells (PyPI `elpv-dataset`). `tools/make_dataset.py` is the command line; docs/datasets.md has
the recipes.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ...errors import UserError
from .mvtec import GOOD, list_images, prepare_output

log = logging.getLogger(__name__)


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
