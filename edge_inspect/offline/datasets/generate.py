"""Generated datasets for the demo, the benches and the tests: "good" frames cut from photos shipped with
scikit-image, with defects painted in (calibration/defects.py) and their masks, in the MVTec AD layout.

Never used to choose an algorithm (that is done on real images, docs/scorer.md): these sets test the
plumbing and show the demo.

    root = generate_dataset("/tmp/ds", "coin", n_train=8, n_test_good=4, n_test_defect=3, seed=0)
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from tqdm import tqdm

from ...calibration.defects import DEFECT_KINDS, inject_defect, is_grey, soft_alpha
from ...errors import UserError
from .mvtec import prepare_output


@dataclass(frozen=True)
class SceneSpec:
    """How a category's good images are cut from its source photo."""

    photo: str  # scikit-image data function (shipped with the wheel, no download)
    kind: str  # "texture": random crops anywhere; "object": the same part, aligned, small jitter
    crop: float  # crop side as a fraction of the photo's short side (objects: of the part's size)
    max_rotation_deg: float
    max_shift: float  # objects: fraction of the crop side
    centre: tuple[float, float] | None = None  # objects: part centre in the photo (x, y)
    part_size: float = 0.0  # objects: the part's diameter in photo pixels (0: the photo's short side)


CATEGORIES: dict[str, SceneSpec] = {
    "brick": SceneSpec("brick", "texture", 0.5, 2.0, 0.0),
    "gravel": SceneSpec("gravel", "texture", 0.5, 3.0, 0.0),
    "grass": SceneSpec("grass", "texture", 0.5, 3.0, 0.0),
    "tissue": SceneSpec("immunohistochemistry", "texture", 0.5, 3.0, 0.0),
    "coin": SceneSpec("coins", "object", 1.7, 4.0, 0.03, (270.5, 119.5), 51.0),
    "cup": SceneSpec("coffee", "object", 0.85, 2.5, 0.025, (300.0, 200.0)),
}


DEFAULT_CATEGORIES: tuple[str, ...] = ("brick", "gravel", "grass", "tissue", "coin", "cup")


@lru_cache(maxsize=None)
def load_photo(category: str) -> np.ndarray:
    """The category's source photo as BGR uint8 (read-only). Objects come cleaned up for cropping."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; choose from {', '.join(CATEGORIES)}")
    try:
        from skimage import (
            data as skdata,  # only the dataset generator needs scikit-image
        )
    except ImportError as exc:  # pragma: no cover - exercised only without the extra installed

        raise UserError("generating datasets needs scikit-image: pip install 'edge-inspect[demo]'") from exc
    photo = np.asarray(getattr(skdata, CATEGORIES[category].photo)())
    bgr = cv2.cvtColor(photo, cv2.COLOR_GRAY2BGR) if photo.ndim == 2 else cv2.cvtColor(photo[..., :3], cv2.COLOR_RGB2BGR)
    if category == "coin":
        bgr = _isolate_coin(bgr, CATEGORIES["coin"].centre)
    bgr.setflags(write=False)
    return bgr


def _isolate_coin(bgr: np.ndarray, centre: tuple[float, float]) -> np.ndarray:
    """Keep one coin and paint the others out, so a crop around it shows only the bare tray."""
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    blurred = cv2.GaussianBlur(grey, (5, 5), 0)
    coins = cv2.adaptiveThreshold(blurred, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C, cv2.THRESH_BINARY, 51, -5)
    coins = cv2.morphologyEx(coins, cv2.MORPH_CLOSE, np.ones((7, 7), np.uint8))
    coins = cv2.dilate(coins, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9)))
    keep = np.zeros_like(coins)
    cv2.circle(keep, (int(centre[0]), int(centre[1])), int(CATEGORIES["coin"].part_size * 0.62), 255, -1)
    others = cv2.bitwise_and(coins, cv2.bitwise_not(keep))
    # Inpaint from a downscaled copy (fast), then add back the tray's own grain.
    small = cv2.resize(bgr, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    small_mask = cv2.resize(others, (small.shape[1], small.shape[0]), interpolation=cv2.INTER_NEAREST)
    plate = cv2.resize(cv2.inpaint(small, small_mask, 7, cv2.INPAINT_TELEA), (bgr.shape[1], bgr.shape[0]))
    plate = cv2.GaussianBlur(plate, (0, 0), 3.0)
    grain = np.random.default_rng(7).normal(0, 2.0, grey.shape).astype(np.float32)[..., None]
    plate = np.clip(plate.astype(np.float32) + grain, 0, 255).astype(np.uint8)
    alpha = soft_alpha(others, 2.0)[..., None]
    return np.clip(bgr * (1 - alpha) + plate * alpha, 0, 255).astype(np.uint8)


def render_good(photo: np.ndarray, spec: SceneSpec, rng: np.random.Generator, size: int) -> np.ndarray:
    """One "good" camera frame of `size`x`size` from `photo`, as a production line would show it.

    Position, a small rotation and scale, lighting (gain, offset, a gentle gradient), optical blur
    and sensor noise all vary from frame to frame; the material or part stays the same.
    """
    ph, pw = photo.shape[:2]
    rotation = rng.uniform(-spec.max_rotation_deg, spec.max_rotation_deg)
    scale = rng.uniform(0.97, 1.03)
    if spec.kind == "texture":
        side = spec.crop * min(ph, pw)
        margin = side * 0.5 * 1.1 + 2
        cx, cy = rng.uniform(margin, pw - margin), rng.uniform(margin, ph - margin)
    else:
        side = spec.crop * (spec.part_size or min(ph, pw))
        cx = spec.centre[0] + rng.uniform(-1, 1) * spec.max_shift * side
        cy = spec.centre[1] + rng.uniform(-1, 1) * spec.max_shift * side
    zoom = size / (side * scale)
    matrix = cv2.getRotationMatrix2D((cx, cy), rotation, zoom)
    matrix[:, 2] += [size / 2.0 - cx, size / 2.0 - cy]
    interpolation = cv2.INTER_AREA if zoom < 1 else cv2.INTER_CUBIC
    frame = cv2.warpAffine(photo, matrix, (size, size), flags=interpolation, borderMode=cv2.BORDER_REFLECT101)
    frame = frame.astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    direction = rng.uniform(0, 2 * np.pi)
    lighting = 1.0 + rng.uniform(0.0, 0.06) * (xx * math.cos(direction) + yy * math.sin(direction))
    frame = frame * rng.uniform(0.93, 1.07) * lighting[..., None] + rng.uniform(-6, 6)
    if rng.random() < 0.6:
        frame = cv2.GaussianBlur(frame, (0, 0), rng.uniform(0.3, 0.8))
    frame = frame + rng.normal(0.0, rng.uniform(1.0, 2.5), frame.shape[:2]).astype(np.float32)[..., None]
    if is_grey(photo):
        frame = np.repeat(frame.mean(axis=2, keepdims=True), 3, axis=2)
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8)


def _image_rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
    """One generator per image: changing --train does not change the test images."""
    return np.random.default_rng([seed, zlib.crc32(category.encode()), zlib.crc32(split.encode()), index])


def generate_dataset(
    out: str | Path,
    category: str,
    n_train: int = 20,
    n_test_good: int = 20,
    n_test_defect: int = 8,
    size: int = 256,
    seed: int = 0,
    kinds: Sequence[str] = DEFECT_KINDS,
    progress: bool = False,
) -> Path:
    """Write an MVTec AD-layout dataset for `category` to `out/<category>` and return that folder.

    train/good/000.png, test/good/, test/<kind>/, ground_truth/<kind>/<stem>_mask.png. Existing
    train/, test/ and ground_truth/ folders there are replaced. Deterministic given `seed`.
    """

    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; choose from {', '.join(CATEGORIES)}")
    unknown = [k for k in kinds if k not in DEFECT_KINDS]
    if unknown:
        raise ValueError(f"unknown defect kinds {unknown}; choose from {', '.join(DEFECT_KINDS)}")
    if size < 64:
        raise ValueError(f"size {size} is too small; use at least 64")
    root = prepare_output(Path(out) / category)
    spec, photo = CATEGORIES[category], load_photo(category)
    others = [c for c in CATEGORIES if c != category]
    jobs: list[tuple[str, int]] = [("train", i) for i in range(n_train)] + [("good", i) for i in range(n_test_good)]
    jobs += [(kind, i) for kind in kinds for i in range(n_test_defect)]

    for split, index in tqdm(jobs, desc=category, unit="img", disable=not progress, leave=False):
        rng = _image_rng(seed, category, split, index)
        frame = render_good(photo, spec, rng, size)
        name = f"{index:03d}.png"
        if split == "train":
            _write(root / "train" / "good" / name, frame)
            continue
        if split == "good":
            _write(root / "test" / "good" / name, frame)
            continue
        donor = None
        if split == "foreign_patch":
            other = others[int(rng.integers(len(others)))]
            donor = render_good(load_photo(other), CATEGORIES[other], rng, size)
        defective, mask, _ = inject_defect(frame, rng, split, donor)
        _write(root / "test" / split / name, defective)
        _write(root / "ground_truth" / split / f"{index:03d}_mask.png", mask)
    return root


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")
