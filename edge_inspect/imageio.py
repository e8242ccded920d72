"""Reading images and turning them into the scorer's input tensor."""

from __future__ import annotations

import os
import struct
from pathlib import Path

# The most pixels an image file may have before it is decoded: 25 MP (a 24 MP sensor passes, an 8K UHD
# frame of 33 MP does not). A frame costs about 10 bytes per pixel on its way through the daemon (the
# capture decoding the next one while the pipeline holds this one, the evidence JPEG): a 39.7 MP JPEG took
# RSS to 426 MB. The scorer itself works at a few hundred pixels.
MAX_DECODE_PIXELS = 25_000_000
# OpenCV's own check (read at its first decode) backs up image_dimensions() for formats it does not parse.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_DECODE_PIXELS))

import cv2  # noqa: E402 - after the variable above
import numpy as np  # noqa: E402

from .errors import UserError  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Smaller frames carry no part to inspect (a 1x1 image scaled to the scorer's input is one flat colour).
MIN_FRAME_SIDE = 16


def image_dimensions(head: bytes) -> tuple[int, int] | None:
    """(width, height) from the first bytes of a PNG, JPEG, BMP or WebP file, without decoding; None if unknown."""
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24:
        return struct.unpack(">II", head[16:24])
    if head[:2] == b"BM" and len(head) >= 26:
        width, height = struct.unpack("<ii", head[18:26])
        return abs(width), abs(height)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        kind = head[12:16]
        if kind == b"VP8X":
            return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
        if kind == b"VP8 ":
            w, h = struct.unpack("<HH", head[26:30])
            return w & 0x3FFF, h & 0x3FFF
        if kind == b"VP8L":
            bits = int.from_bytes(head[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        return None
    if head[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(head):
            if head[i] != 0xFF:
                i += 1
                continue
            marker = head[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                i += 1 if marker == 0xFF else 2
                continue
            length = struct.unpack(">H", head[i + 2:i + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", head[i + 5:i + 9])
                return width, height
            i += 2 + length
    return None


def check_decode_size(path: str | Path, head: bytes, limit: int = MAX_DECODE_PIXELS) -> None:
    """Raise UserError for an image larger than `limit` pixels, before any decode."""
    dims = image_dimensions(head)
    if dims is not None and dims[0] * dims[1] > limit:
        raise UserError(
            f"image {path} is {dims[0]}x{dims[1]} ({dims[0] * dims[1] / 1e6:.1f} MP), more than the "
            f"{limit / 1e6:.0f} MP edge-inspect decodes (a frame costs about 10 bytes a pixel in memory; the scorer "
            f"works at a few hundred pixels): scale it down, e.g. `convert IN -resize 50% OUT` or cv2.resize"
        )


def frame_note(image: np.ndarray) -> str | None:
    """What to_bgr changes about a decoded frame, in words (None for plain 8-bit BGR)."""
    notes = []
    if image.dtype != np.uint8:
        notes.append(f"{image.dtype} samples scaled to 8 bit")
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels == 1:
        notes.append("grey expanded to BGR")
    elif channels == 4:
        notes.append("alpha channel dropped")
    return ", ".join(notes) or None


def check_frame(image: np.ndarray, what: str) -> None:
    """Refuse a frame no conversion makes inspectable (too small, or not 1, 3 or 4 channels)."""
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise UserError(f"{what} has shape {image.shape}: not a grey, BGR or BGRA image")
    h, w = image.shape[:2]
    if min(h, w) < MIN_FRAME_SIDE:
        raise UserError(f"{what} is {w}x{h}: smaller than {MIN_FRAME_SIDE}x{MIN_FRAME_SIDE} px, nothing to inspect")


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of images")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_bgr(path: str | Path) -> np.ndarray:
    """Any image file as 3-channel BGR uint8 (gray is expanded, alpha dropped, 16-bit scaled)."""
    data = np.fromfile(str(path), dtype=np.uint8) if Path(path).is_file() else None
    if data is not None:
        check_decode_size(path, data[:65536].tobytes())
    try:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data is not None and data.size else None
    except cv2.error as exc:  # OpenCV's own size limit, or a decoder refusing the file
        raise UserError(f"cannot read image {path}: {str(exc).strip().splitlines()[-1]}") from None
    if image is None:
        raise UserError(f"cannot read image {path}: missing, empty or not an image file")
    check_frame(image, f"image {path}")
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
