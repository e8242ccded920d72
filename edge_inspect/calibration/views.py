"""Views of a good image: augmentations that join the bank, nuisance views that only give threshold
evidence, and the stored form every good image is fitted on.

Why apart from the fit: they are image operations (OpenCV), chosen per product, and the stored form
decides what a refit sees; the fit itself only sees feature arrays.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import cv2
import numpy as np

from ..errors import UserError

# jitter: +-6 degree rotations, for products whose pose varies; the others for products that appear
# flipped, turned or shifted on the line.
AUGMENTATIONS = ("jitter", "hflip", "vflip", "rot90", "shift")
AUTO = ("auto",)  # calibrate chooses per product from its good parts (calibration/choose.py)


# Mirrored views of the shots in the bank (thinned by the coreset to the same bank size, so the same cost
# per frame): on the real sets 0.818 mean image AUROC against 0.811 without, and at or above anomalib's
# PatchCore on every set (docs/scorer.md). A part whose mirror image is a defect (a handed thread, an
# asymmetric part that can be mounted flipped) must be calibrated with --augment none.
DEFAULT_AUGMENT: tuple[str, ...] = ("hflip", "vflip")


def parse_augment(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """--augment: default (hflip,vflip), none, auto (chosen per product), or a comma list of views."""
    if text is None:
        return DEFAULT_AUGMENT
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not items or items == ["none"]:
        return ()
    if items == ["default"]:
        return DEFAULT_AUGMENT
    if items == ["auto"]:
        return AUTO
    bad = [t for t in items if t not in AUGMENTATIONS]
    if bad:
        raise UserError(f"--augment: unknown {', '.join(bad)}; choose default, none, auto or from {', '.join(AUGMENTATIONS)}")
    return tuple(dict.fromkeys(items))


def augmented(bgr: np.ndarray, kinds: Sequence[str], rng: np.random.Generator) -> list[np.ndarray]:
    """Extra views of a good image for products that appear flipped, rotated or shifted on the line."""
    out = []
    h, w = bgr.shape[:2]
    if "jitter" in kinds:
        for angle in (-6.0, 6.0):
            m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
            out.append(cv2.warpAffine(bgr, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101))
    if "hflip" in kinds:
        out.append(cv2.flip(bgr, 1))
    if "vflip" in kinds:
        out.append(cv2.flip(bgr, 0))
    if "rot90" in kinds:
        out += [cv2.rotate(bgr, c) for c in (cv2.ROTATE_90_CLOCKWISE, cv2.ROTATE_180, cv2.ROTATE_90_COUNTERCLOCKWISE)]
    if "shift" in kinds:
        for _ in range(2):
            dx, dy = (rng.uniform(-0.05, 0.05, 2) * (w, h)).astype(int)
            m = np.float32([[1, 0, dx], [0, 1, dy]])
            out.append(cv2.warpAffine(bgr, m, (w, h), borderMode=cv2.BORDER_REFLECT_101))
    return out


NUISANCE = (("shift", 0.02), ("gain", 0.95), ("shift", -0.02), ("gain", 1.05))


NUISANCE_SAMPLES = 16  # views in all: 4 per image at 4 shots, fewer per image with more shots


def nuisance_views(bgr: np.ndarray, index: int = 0, count: int = len(NUISANCE)) -> list[np.ndarray]:
    """Threshold evidence, never bank content: the part-to-part variation of a fixtured line (a 2 %
    shift either way, gain 0.95 and 1.05). Scored leave-one-out, they sample the good parts' score
    tail more densely than the shots alone. `count` views, starting at `index` in NUISANCE, so that
    with fewer views per image the kinds still alternate across images."""
    h, w = bgr.shape[:2]
    out = []
    for k in range(count):
        kind, value = NUISANCE[(index + k) % len(NUISANCE)]
        if kind == "shift":
            m = np.float32([[1, 0, round(value * w)], [0, 1, round(value * h)]])
            out.append(cv2.warpAffine(bgr, m, (w, h), borderMode=cv2.BORDER_REFLECT_101))
        else:
            out.append(np.clip(bgr.astype(np.float32) * value, 0, 255).astype(np.uint8))
    return out


STORED_SIDE_FACTOR = 2  # good images are kept at most this many times the scorer's input side


def stored_good_image(bgr: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    """The form a good image is fitted on and kept in (ROI-cropped already): at most twice the scorer's
    input side, so a refit from the stored copy sees what calibration saw, at a fraction of the disk."""
    limit = STORED_SIDE_FACTOR * max(input_size)
    scale = limit / max(bgr.shape[:2])
    if scale >= 1:
        return bgr
    return cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
