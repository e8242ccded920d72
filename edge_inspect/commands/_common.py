"""Small helpers shared by command modules."""

from __future__ import annotations

import sys

from ..errors import UserError


def parse_roi(text: str | None) -> tuple[int, int, int, int] | None:
    if not text:
        return None
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--roi {text!r}: expected x,y,width,height in pixels, e.g. --roi 100,40,640,480") from None
    if w <= 0 or h <= 0 or x < 0 or y < 0:
        raise UserError(f"--roi {text!r}: x and y must be >= 0, width and height > 0")
    return x, y, w, h


def show_progress(args) -> bool:
    return not getattr(args, "json", False) and not getattr(args, "no_progress", False) and sys.stderr.isatty() or getattr(args, "progress", False)


def add_dirs(parser) -> None:
    parser.add_argument("--calibration-dir", default="calibration", help="folder of calibrated products (default: ./calibration)")
    parser.add_argument("--engines-dir", default="engines", help="folder of ONNX graphs and TensorRT plans (default: ./engines)")
