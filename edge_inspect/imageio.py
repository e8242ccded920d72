"""Reading images and turning them into the scorer's input tensor."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of images")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_bgr(path: str | Path) -> np.ndarray:
    """Any image file as 3-channel BGR uint8 (gray is expanded, alpha dropped, 16-bit scaled)."""
    data = np.fromfile(str(path), dtype=np.uint8) if Path(path).is_file() else None
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data is not None and data.size else None
    if image is None:
        raise UserError(f"cannot read image {path}: missing, empty or not an image file")
    return to_bgr(image)


def to_bgr(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint16:
        image = (image / 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.shape[2] == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2BGR)
    return image


def crop_roi(bgr: np.ndarray, roi: tuple[int, int, int, int] | None) -> np.ndarray:
    """Crop x, y, w, h (clipped to the image); None keeps the whole frame."""
    if roi is None:
        return bgr
    x, y, w, h = roi
    H, W = bgr.shape[:2]
    x0, y0, x1, y1 = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
    if x1 <= x0 or y1 <= y0:
        raise UserError(f"ROI {roi} lies outside the {W}x{H} image")
    return bgr[y0:y1, x0:x1]


def to_input(bgr: np.ndarray, size: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
    """BGR uint8 -> float32 [1,3,H,W] RGB 0..255 at the scorer's input size."""
    H, W = size
    if bgr.shape[:2] != (H, W):
        shrink = bgr.shape[0] > H or bgr.shape[1] > W
        bgr = cv2.resize(bgr, (W, H), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if out is None:
        out = np.empty((1, 3, H, W), dtype=np.float32)
    out[0] = bgr[:, :, ::-1].transpose(2, 0, 1)
    return out
