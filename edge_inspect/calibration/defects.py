"""Realistic defects painted into real images, with honest pixel ground truth.

Why: a few-shot inspector is calibrated from good parts only, yet its threshold, its tests and
its demo need anomalous images whose defective pixels are known. This module paints them:
scratches, cracks, holes, stains, foreign material, missing material and discolouration, each
returned with the mask of exactly the pixels it changed.

    >>> rng = np.random.default_rng(0)
    >>> defective, mask, kind = inject_defect(good_bgr, rng)          # any kind
    >>> defective, mask = synthetic_anomaly(good_bgr, rng, donors=[other_good_bgr])

Only numpy and OpenCV: the calibration step runs this on an edge box. Everything is
deterministic given the `numpy.random.Generator`. The honesty contract: the returned image equals
the input outside the mask, and every mask pixel belongs to a region that changed visibly (a
defect whose change is too faint to see is redrawn, never returned with a mask).

Calibration uses `synthetic_anomaly` (threshold evidence); the demo's dataset generator
(offline/datasets/generate.py) paints its test defects with `inject_defect`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import cv2
import numpy as np

DEFECT_KINDS: tuple[str, ...] = ("scratch", "crack", "hole", "stain", "foreign_patch", "missing", "color")

# A pixel counts as changed when one of its channels moved by at least this many grey levels;
# fainter changes (soft edges) outside the mask are reverted so the image equals the original there.
CHANGE_LEVEL = 6
# A defect is visible when its mask pixels moved by this many grey levels on average.
VISIBLE_LEVEL = 12.0
# Synthetic anomalies for the automatic threshold are allowed to be fainter.
SUBTLE_LEVEL = 9.0
# Defect sizes as fractions of the image area (each kind draws from its own part of this range).
MIN_AREA_FRACTION = 0.003
MAX_AREA_FRACTION = 0.05
MIN_SIDE = 32
_ATTEMPTS = 12

# Per-kind target area range (fraction of the image): thin lines sit at the low end.
_AREA_RANGE: dict[str, tuple[float, float]] = {
    "scratch": (0.003, 0.010),
    "crack": (0.003, 0.010),
    "hole": (0.003, 0.020),
    "stain": (0.006, 0.040),
    "foreign_patch": (0.005, 0.040),
    "missing": (0.004, 0.040),
    "color": (0.008, 0.035),
}


# --------------------------------------------------------------------------- public API


def inject_defect(
    image: np.ndarray,
    rng: np.random.Generator,
    kind: str | None = None,
    donor: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Paint one defect of `kind` (random when None) into a copy of `image`.

    `image`: HxWx3 BGR or HxW grey uint8 (the output has the same shape). `donor`: another image
    whose material a `foreign_patch` is cut from (default: another spot of `image`, rotated).
    Returns (defective image, mask uint8 0/255 HxW, kind). Raises ValueError when the image is too
    small or offers no contrast for the kind (e.g. a flat black frame).
    """
    bgr, was_grey = _as_bgr(image)
    if kind is None:
        kind = str(rng.choice(DEFECT_KINDS))
    if kind not in _PAINTERS:
        raise ValueError(f"unknown defect kind {kind!r}; choose one of {', '.join(DEFECT_KINDS)}")
    donor_bgr = _as_bgr(donor)[0] if donor is not None else None
    if donor_bgr is not None and is_grey(bgr):  # a grey camera sees foreign matter in grey too
        donor_bgr = cv2.cvtColor(cv2.cvtColor(donor_bgr, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    painter = _PAINTERS[kind]
    lo, hi = _AREA_RANGE[kind]
    for _ in range(_ATTEMPTS):
        area = _log_uniform(rng, lo, hi) * bgr.shape[0] * bgr.shape[1]
        painted = painter(bgr, rng, area, donor_bgr)
        result = honest_change(bgr, painted)
        if result is not None:
            out, mask = result
            return (_restore_shape(out, was_grey), mask, kind)
    raise ValueError(
        f"could not paint a visible {kind!r} defect into this {bgr.shape[1]}x{bgr.shape[0]} image "
        f"after {_ATTEMPTS} attempts (too little contrast?)"
    )


def synthetic_anomaly(
    image: np.ndarray,
    rng: np.random.Generator,
    donors: Sequence[np.ndarray] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """A subtle but real anomaly for the automatic threshold: a cut-paste patch, Poisson-blended.

    The patch is cut from one of `donors` (other good images of the same product) or, when there
    are none (or by chance), from elsewhere in `image`; it is rotated and rescaled a little, then
    blended with `cv2.seamlessClone` so only its structure, not its brightness, is out of place.
    Returns (image, mask uint8 0/255).
    """
    bgr, was_grey = _as_bgr(image)
    pool = [_as_bgr(d)[0] for d in donors]
    for _ in range(_ATTEMPTS):
        donor = pool[int(rng.integers(len(pool)))] if pool and rng.random() < 0.7 else bgr
        area = _log_uniform(rng, MIN_AREA_FRACTION, 0.02) * bgr.shape[0] * bgr.shape[1]
        painted = _paste_patch(bgr, rng, area, donor, scale_range=(0.7, 1.4), free_rotation=True)
        result = honest_change(bgr, painted, visible_level=SUBTLE_LEVEL)
        if result is not None:
            out, mask = result
            return _restore_shape(out, was_grey), mask
    raise ValueError("could not make a visible synthetic anomaly in this image (too little texture?)")


def honest_change(
    original: np.ndarray,
    painted: np.ndarray,
    change_level: int = CHANGE_LEVEL,
    visible_level: float = VISIBLE_LEVEL,
) -> tuple[np.ndarray, np.ndarray] | None:
    """The mask of what `painted` changed in `original`, and `painted` reverted outside it.

    Pixels moved by >= `change_level` form the defect; small gaps inside it are closed and holes
    filled (an annotator outlines a region, not its pixels), specks under 8 px are dropped, and
    the region grows by one pixel to take in the soft rim. Outside the final mask the original is
    restored exactly. None when the result would be too small or too faint to see.
    """
    painted_u8 = np.clip(np.rint(painted), 0, 255).astype(np.uint8) if painted.dtype != np.uint8 else painted
    diff = np.abs(painted_u8.astype(np.int16) - original.astype(np.int16)).max(axis=2)
    changed = (diff >= change_level).astype(np.uint8)
    changed = cv2.morphologyEx(changed, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(changed, connectivity=8)
    keep = np.zeros(count, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= 8
    region = keep[labels].astype(np.uint8)
    filled = _fill_small_holes(region)
    mask = cv2.dilate(filled, np.ones((3, 3), np.uint8)) > 0
    h, w = diff.shape
    if mask.sum() < max(16, 0.0008 * h * w) or float(diff[mask].mean()) < visible_level:
        return None
    out = original.copy()
    out[mask] = painted_u8[mask]
    return out, mask.astype(np.uint8) * 255


# --------------------------------------------------------------------------- shapes and helpers


def _fill_small_holes(region: np.ndarray) -> np.ndarray:
    """Fill gaps enclosed by a region when small next to it (a stain's faint spots), not the
    large areas a branching crack happens to enclose."""
    contours, hierarchy = cv2.findContours(region, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    filled = region.copy()
    if hierarchy is None:
        return filled
    for index, (_, _, _, parent) in enumerate(hierarchy[0]):
        if parent < 0:
            continue
        hole_area = cv2.contourArea(contours[index])
        if hole_area <= max(16.0, 0.1 * cv2.contourArea(contours[parent])):
            cv2.drawContours(filled, contours, index, 1, thickness=cv2.FILLED)
    return filled



def _as_bgr(image: np.ndarray) -> tuple[np.ndarray, bool]:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError("expected a uint8 numpy image (HxW grey or HxWx3 BGR)")
    if image.ndim == 2:
        image, grey = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR), True
    elif image.ndim == 3 and image.shape[2] == 3:
        grey = False
    else:
        raise ValueError(f"expected HxW or HxWx3 uint8 image, got shape {image.shape}")
    if min(image.shape[:2]) < MIN_SIDE:
        raise ValueError(f"image {image.shape[1]}x{image.shape[0]} is too small (min side {MIN_SIDE} px)")
    return np.ascontiguousarray(image), grey


def _restore_shape(image: np.ndarray, was_grey: bool) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if was_grey else image


def is_grey(bgr: np.ndarray) -> bool:
    sample = bgr[::4, ::4].astype(np.int16)
    return int(np.abs(sample - sample[..., :1]).max()) <= 2


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _noise_sigma(bgr: np.ndarray) -> float:
    """Sensor noise level (Immerkaer's estimator, capped): painted areas get the same grain."""
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).astype(np.float32)
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
    response = np.abs(cv2.filter2D(grey, -1, kernel))[1:-1, 1:-1]
    sigma = math.sqrt(math.pi / 2) * float(np.median(response)) / 6.0 * 1.25
    return float(np.clip(sigma, 0.8, 4.0))


def _grain(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    return rng.normal(0.0, sigma, size=shape).astype(np.float32)[..., None]


def _fit_inside(points: np.ndarray, h: int, w: int, rng: np.random.Generator, margin: int = 3) -> np.ndarray:
    """Shrink `points` if needed, then move them to a random place fully inside the image."""
    pts = points.astype(np.float64)
    span = pts.max(axis=0) - pts.min(axis=0)
    room = np.array([w - 1 - 2 * margin, h - 1 - 2 * margin], np.float64)
    scale = min(1.0, float(np.min(room / np.maximum(span, 1e-6))))
    if scale < 1.0:
        pts = (pts - pts.mean(axis=0)) * scale
        span = span * scale
    lo = pts.min(axis=0)
    offset = np.array(
        [rng.uniform(margin, w - 1 - margin - span[0]), rng.uniform(margin, h - 1 - margin - span[1])]
    )
    return pts - lo + offset


def _blob_outline(rng: np.random.Generator, area: float, elongation: float, roughness: float) -> np.ndarray:
    """An irregular closed outline (N x 2, centred at 0) of roughly `area` square pixels."""
    theta = np.linspace(0.0, 2 * np.pi, 72, endpoint=False)
    radius = np.ones_like(theta)
    for k in range(2, 7):
        radius += roughness / k * rng.uniform(0.3, 1.0) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    radius = np.clip(radius, 0.35, None)
    pts = np.stack([radius * np.cos(theta) * elongation, radius * np.sin(theta)], axis=1)
    angle = rng.uniform(0, np.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    pts = pts @ rot.T
    current = abs(cv2.contourArea(pts.astype(np.float32)))
    return pts * math.sqrt(area / max(current, 1e-6))


def _fill(h: int, w: int, outline: np.ndarray) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.rint(outline * 16).astype(np.int32)], 255, lineType=cv2.LINE_AA, shift=4)
    return mask


def soft_alpha(mask: np.ndarray, sigma: float) -> np.ndarray:
    alpha = mask.astype(np.float32) / 255.0
    if sigma > 0.05:
        alpha = cv2.GaussianBlur(alpha, (0, 0), sigma)
    return alpha


def _walk(
    rng: np.random.Generator, length: float, step: float, turn_sd: float, curvature: float, start_angle: float
) -> np.ndarray:
    """A path of points: constant `curvature` (rad/px) plus random turns of `turn_sd` per step."""
    n = max(3, int(length / step))
    turns = curvature * step + rng.normal(0.0, turn_sd, n)
    angles = start_angle + np.cumsum(turns)
    steps = np.stack([np.cos(angles), np.sin(angles)], axis=1) * step
    return np.vstack([[0.0, 0.0], np.cumsum(steps, axis=0)])


def _draw_path(canvas: np.ndarray, path: np.ndarray, widths: np.ndarray, values: np.ndarray) -> None:
    """Draw a path segment by segment with per-segment width and intensity (anti-aliased, subpixel)."""
    pts = np.rint(path * 16).astype(np.int32)
    for i in range(len(pts) - 1):
        cv2.line(
            canvas, tuple(int(v) for v in pts[i]), tuple(int(v) for v in pts[i + 1]),
            float(values[i]), thickness=max(1, int(round(widths[i]))), lineType=cv2.LINE_AA, shift=4,
        )


def _taper(n: int, rng: np.random.Generator) -> np.ndarray:
    """Intensity along a line: fades in and out at the ends, wavers a little in between."""
    t = np.linspace(0.0, 1.0, n)
    ends = np.clip(np.minimum(t, 1 - t) / rng.uniform(0.08, 0.25), 0.0, 1.0)
    waver = 1.0 + 0.25 * np.sin(2 * np.pi * (rng.uniform(1, 3) * t + rng.uniform(0, 1)))
    return np.clip(ends * waver, 0.0, 1.0)


# --------------------------------------------------------------------------- painters
# Each painter returns the painted image as float32 (values may lie outside 0..255); the mask is
# derived afterwards from what actually changed (honest_change).


def _paint_scratch(img: np.ndarray, rng: np.random.Generator, area: float, donor: np.ndarray | None) -> np.ndarray:
    h, w = img.shape[:2]
    width = rng.uniform(1.0, 2.6)
    length = float(np.clip(area / (width + 3.0), 0.12 * min(h, w), 1.1 * min(h, w)))  # mask ~ width + 3
    strokes = int(rng.choice([1, 1, 1, 2, 3]))
    canvas = np.zeros((h, w), np.float32)
    main = _walk(rng, length, 2.0, 0.01, rng.normal(0, 0.004), rng.uniform(0, 2 * np.pi))
    paths = [main]
    for _ in range(strokes - 1):  # parallel companions, as from one abrasive grain cluster
        normal = rng.normal(size=2)
        normal = normal / np.linalg.norm(normal) * rng.uniform(3, 8)
        cut = int(rng.uniform(0.0, 0.4) * len(main))
        paths.append(main[cut : cut + max(4, int(len(main) * rng.uniform(0.3, 0.8)))] + normal)
    everything = np.vstack(paths)
    placed = _fit_inside(everything, h, w, rng)
    shift = placed[0] - everything[0]
    for p in paths:
        q = p + shift
        n = len(q) - 1
        _draw_path(canvas, q, np.full(n, width) * rng.uniform(0.7, 1.0), _taper(n, rng))
    alpha = np.clip(cv2.GaussianBlur(canvas, (0, 0), 0.6), 0.0, 1.0)[..., None]
    strength = rng.uniform(0.35, 0.7)
    out = img.astype(np.float32)
    if rng.random() < 0.5:  # a bright (specular) scratch
        out = out + (255.0 - out) * strength * alpha
    else:
        out = out * (1.0 - strength * alpha)
    return out + _grain(rng, (h, w), _noise_sigma(img)) * alpha


def _paint_crack(img: np.ndarray, rng: np.random.Generator, area: float, donor: np.ndarray | None) -> np.ndarray:
    h, w = img.shape[:2]
    width = rng.uniform(1.2, 2.4)
    length = float(np.clip(area / (width + 3.0) / 1.4, 0.12 * min(h, w), 0.9 * min(h, w)))  # + branches
    main = _walk(rng, length, 3.0, 0.22, 0.0, rng.uniform(0, 2 * np.pi))
    branches = []
    for _ in range(int(rng.integers(1, 4))):
        at = int(rng.uniform(0.2, 0.8) * (len(main) - 1))
        heading = math.atan2(*(main[at + 1] - main[at])[::-1]) + rng.choice([-1, 1]) * rng.uniform(0.4, 1.1)
        branch = _walk(rng, length * rng.uniform(0.15, 0.45), 3.0, 0.25, 0.0, heading) + main[at]
        branches.append(branch)
    everything = np.vstack([main, *branches])
    shift = _fit_inside(everything, h, w, rng)[0] - everything[0]
    canvas = np.zeros((h, w), np.float32)
    n = len(main) - 1
    _draw_path(canvas, main + shift, width * (1.0 - 0.5 * np.linspace(0, 1, n)), np.ones(n))
    for branch in branches:
        m = len(branch) - 1
        _draw_path(canvas, branch + shift, np.maximum(1.0, width * 0.6 * (1.0 - np.linspace(0, 0.6, m))), np.ones(m))
    alpha = np.clip(cv2.GaussianBlur(canvas, (0, 0), 0.5), 0.0, 1.0)[..., None]
    out = img.astype(np.float32) * (1.0 - rng.uniform(0.55, 0.85) * alpha)
    return out + _grain(rng, (h, w), _noise_sigma(img)) * alpha


def _paint_hole(img: np.ndarray, rng: np.random.Generator, area: float, donor: np.ndarray | None) -> np.ndarray:
    h, w = img.shape[:2]
    outline = _fit_inside(_blob_outline(rng, area, rng.uniform(1.0, 1.6), rng.uniform(0.05, 0.25)), h, w, rng, 6)
    mask = _fill(h, w, outline)
    radius = math.sqrt(area / math.pi)
    centre = outline.mean(axis=0)
    inner = soft_alpha(mask, max(0.8, radius * 0.12))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    light = rng.uniform(0, 2 * np.pi)
    lx, ly = math.cos(light), math.sin(light)
    # A pit is darker on the side the light comes from (its wall shades it) and lit on the far wall.
    gradient = np.clip(((xx - centre[0]) * lx + (yy - centre[1]) * ly) / max(radius, 1.0), -1, 1)
    depth = rng.uniform(0.55, 0.85) * (1.0 - 0.25 * gradient)
    out = img.astype(np.float32) * (1.0 - (depth * inner)[..., None])
    rim_width = max(2, int(round(radius * 0.25)))
    ring = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * rim_width + 1,) * 2))
    ring = soft_alpha(cv2.subtract(ring, mask), rim_width * 0.5) * np.clip(-gradient, 0, 1) * 1.5
    out = out + (255.0 - out) * (rng.uniform(0.15, 0.35) * np.clip(ring, 0, 1))[..., None]
    return out + _grain(rng, (h, w), _noise_sigma(img)) * inner[..., None]


_STAIN_TINTS_BGR = (
    (0.55, 0.75, 1.00),  # rust / tea
    (0.75, 0.85, 0.95),  # oil film
    (0.95, 0.80, 0.70),  # bluish coolant residue
    (0.70, 0.95, 0.85),  # greenish
)


def _paint_stain(img: np.ndarray, rng: np.random.Generator, area: float, donor: np.ndarray | None) -> np.ndarray:
    h, w = img.shape[:2]
    outline = _fit_inside(_blob_outline(rng, area, rng.uniform(1.0, 2.5), rng.uniform(0.3, 0.7)), h, w, rng, 4)
    mask = _fill(h, w, outline)
    radius = math.sqrt(area / math.pi)
    # Patchy density: low-frequency noise inside the blob, soft edge.
    noise = cv2.resize(rng.random((8, 8)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    alpha = soft_alpha(mask, max(1.0, radius * 0.2)) * (0.7 + 0.3 * np.clip(noise, 0, 1))
    alpha = alpha * rng.uniform(0.35, 0.65)
    if is_grey(img):
        tint = np.full(3, rng.choice([rng.uniform(0.45, 0.7), rng.uniform(1.3, 1.6)]), np.float32)
    else:
        base = np.array(_STAIN_TINTS_BGR[int(rng.integers(len(_STAIN_TINTS_BGR)))], np.float32)
        tint = base * rng.uniform(0.55, 0.85)
    src = img.astype(np.float32)
    stained = src * tint  # multiplicative: the surface texture stays visible through the stain
    return src * (1.0 - alpha[..., None]) + stained * alpha[..., None]


def _paste_patch(
    img: np.ndarray,
    rng: np.random.Generator,
    area: float,
    donor: np.ndarray,
    scale_range: tuple[float, float],
    free_rotation: bool,
) -> np.ndarray:
    """Cut an irregular patch from `donor`, rotate/scale it, Poisson-blend it at a random place."""
    h, w = img.shape[:2]
    outline = _blob_outline(rng, area, rng.uniform(1.0, 2.0), rng.uniform(0.2, 0.5))
    outline = _fit_inside(outline, h, w, rng, 4)
    x0, y0 = np.floor(outline.min(axis=0)).astype(int) - 2
    x1, y1 = np.ceil(outline.max(axis=0)).astype(int) + 3
    x0, y0, x1, y1 = max(x0, 1), max(y0, 1), min(x1, w - 1), min(y1, h - 1)
    ph, pw = y1 - y0, x1 - x0
    patch_mask = _fill(ph, pw, outline - [x0, y0])
    patch_mask[patch_mask < 128] = 0
    patch_mask[[0, -1], :] = 0
    patch_mask[:, [0, -1]] = 0
    # Take the donor region with margin so rotation does not reach outside it.
    scale = rng.uniform(*scale_range)
    angle = rng.uniform(0, 360) if free_rotation else float(rng.choice([90, 180, 270])) + rng.normal(0, 8)
    side = int(math.ceil(math.hypot(ph, pw) / scale)) + 4
    dh, dw = donor.shape[:2]
    if dh < side + 2 or dw < side + 2:
        factor = (side + 2) / min(dh, dw)
        donor = cv2.resize(donor, (int(math.ceil(dw * factor)) + 1, int(math.ceil(dh * factor)) + 1))
        dh, dw = donor.shape[:2]
    sx = int(rng.integers(0, dw - side + 1))
    sy = int(rng.integers(0, dh - side + 1))
    source = donor[sy : sy + side, sx : sx + side]
    rot = cv2.getRotationMatrix2D((side / 2.0, side / 2.0), angle, scale)
    rot[:, 2] += [pw / 2.0 - side / 2.0, ph / 2.0 - side / 2.0]
    patch = cv2.warpAffine(source, rot, (pw, ph), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
    ys, xs = np.nonzero(patch_mask)
    if len(xs) == 0:
        return img.astype(np.float32)
    bx0, bx1, by0, by1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    # seamlessClone places the centre of the mask's bounding box at `centre`.
    centre = (int(x0 + (bx0 + bx1) // 2), int(y0 + (by0 + by1) // 2))
    blended = cv2.seamlessClone(patch, img, patch_mask, centre, cv2.NORMAL_CLONE)
    return blended.astype(np.float32)


def _paint_foreign(img: np.ndarray, rng: np.random.Generator, area: float, donor: np.ndarray | None) -> np.ndarray:
    if donor is None:  # material from elsewhere in the same image, turned the wrong way
        return _paste_patch(img, rng, area, img, scale_range=(0.6, 1.5), free_rotation=False)
    return _paste_patch(img, rng, area, donor, scale_range=(0.7, 1.4), free_rotation=True)


def _paint_missing(img: np.ndarray, rng: np.random.Generator, area: float, donor: np.ndarray | None) -> np.ndarray:
    h, w = img.shape[:2]
    if rng.random() < 0.5:  # chipped: few straight edges
        outline = _blob_outline(rng, area, rng.uniform(1.0, 2.0), 0.0)
        keep = np.sort(rng.choice(len(outline), size=int(rng.integers(5, 9)), replace=False))
        outline = outline[keep] * math.sqrt(area / max(abs(cv2.contourArea(outline[keep].astype(np.float32))), 1e-6))
    else:  # worn: rounded
        outline = _blob_outline(rng, area, rng.uniform(1.0, 2.0), rng.uniform(0.2, 0.5))
    outline = _fit_inside(outline, h, w, rng, 4)
    mask = _fill(h, w, outline)
    alpha = soft_alpha(mask, 0.8)[..., None]
    src = img.astype(np.float32)
    if rng.random() < 0.5:  # surface worn away: smooth fill from the surroundings, no texture
        hole = (mask > 0).astype(np.uint8) * 255
        fill = cv2.inpaint(img, cv2.dilate(hole, np.ones((5, 5), np.uint8)), 5, cv2.INPAINT_TELEA)
        fill = cv2.GaussianBlur(fill.astype(np.float32), (0, 0), 2.0)
        fill = fill * rng.uniform(0.8, 1.15)
    else:  # material gone: flat colour (what lies behind, or a bare substrate)
        level = np.median(src.reshape(-1, 3), axis=0)
        flat = level * rng.uniform(0.15, 0.4) if rng.random() < 0.6 else level * rng.uniform(1.2, 1.5)
        fill = np.broadcast_to(flat.astype(np.float32), src.shape).copy()
    fill = fill + _grain(rng, (h, w), _noise_sigma(img))
    return src * (1.0 - alpha) + fill * alpha


def _paint_color(img: np.ndarray, rng: np.random.Generator, area: float, donor: np.ndarray | None) -> np.ndarray:
    h, w = img.shape[:2]
    outline = _fit_inside(_blob_outline(rng, area, rng.uniform(1.0, 2.5), rng.uniform(0.2, 0.6)), h, w, rng, 4)
    mask = _fill(h, w, outline)
    alpha = soft_alpha(mask, max(1.0, math.sqrt(area / math.pi) * 0.15))[..., None]
    src = img.astype(np.float32)
    if is_grey(img):  # a grey camera sees discolouration as a tone change
        changed = src * float(rng.choice([rng.uniform(0.6, 0.8), rng.uniform(1.25, 1.5)]))
    else:
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV).astype(np.float32)
        hsv[..., 0] = np.mod(hsv[..., 0] + rng.choice([-1, 1]) * rng.uniform(10, 30), 180)
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1.2, 1.6) + rng.uniform(10, 35), 0, 255)
        hsv[..., 2] = np.clip(hsv[..., 2] * rng.uniform(0.85, 1.1), 0, 255)
        changed = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2BGR).astype(np.float32)
    return src * (1.0 - alpha) + changed * alpha


_PAINTERS: dict[str, Callable[[np.ndarray, np.random.Generator, float, np.ndarray | None], np.ndarray]] = {
    "scratch": _paint_scratch,
    "crack": _paint_crack,
    "hole": _paint_hole,
    "stain": _paint_stain,
    "foreign_patch": _paint_foreign,
    "missing": _paint_missing,
    "color": _paint_color,
}
