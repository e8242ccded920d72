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


def operator_name() -> str:
    """Who made a change from the command line, for a calibration version's manifest."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no user name (a container without passwd entry)
        return "cli"


def add_dirs(parser) -> None:
    parser.add_argument("--calibration-dir", default="calibration", help="folder of calibrated products (default: ./calibration)")
    parser.add_argument("--engines-dir", default="engines", help="folder of ONNX graphs and TensorRT plans (default: ./engines)")


def add_threshold_options(parser) -> None:
    parser.add_argument(
        "--false-reject-rate", type=float, default=None, metavar="RATE",
        help="share of good parts the automatic threshold may reject (default 0.01 = 1 %%); lower rejects fewer and misses more",
    )
    parser.add_argument("--sensitivity", type=float, default=None, help="old name: S means --false-reject-rate S x 0.01")


def calibration_options(args):
    """CalibrationOptions from the options `calibrate` and `evaluate` share."""
    from ..calibration.fit import CalibrationOptions
    from ..calibration.threshold import (
        DEFAULT_FALSE_REJECT_RATE,
        MAX_FALSE_REJECT_RATE,
        MIN_FALSE_REJECT_RATE,
        rate_from_sensitivity,
    )
    from ..calibration.views import parse_augment
    from ..scorer.params import ScorerParams

    if args.size % 32 or not 64 <= args.size <= 1024:
        raise UserError(f"--size {args.size}: use a multiple of 32 between 64 and 1024 (256 is the default)")
    if not 64 <= args.bank_size <= 65536:
        raise UserError(f"--bank-size {args.bank_size}: use 64..65536")
    rate = args.false_reject_rate
    if args.sensitivity is not None:
        if rate is not None:
            raise UserError("--sensitivity is the old name of --false-reject-rate (S means S x 1 %): give one of them")
        if not 0.1 <= args.sensitivity <= 10:
            raise UserError(f"--sensitivity {args.sensitivity}: use a value between 0.1 and 10 (1 = 1 % false rejects)")
        rate = rate_from_sensitivity(args.sensitivity)
    rate = DEFAULT_FALSE_REJECT_RATE if rate is None else rate
    if not MIN_FALSE_REJECT_RATE <= rate <= MAX_FALSE_REJECT_RATE:
        raise UserError(
            f"--false-reject-rate {rate}: use {MIN_FALSE_REJECT_RATE} .. {MAX_FALSE_REJECT_RATE} (0.01 = 1 % of good parts rejected)"
        )
    return CalibrationOptions(
        params=ScorerParams(input_size=(args.size, args.size)),
        roi=parse_roi(args.roi),
        augment=parse_augment(args.augment),
        bank_size=args.bank_size,
        false_reject_rate=rate,
        seed=getattr(args, "seed", 0),
    )
