"""Make MVTec AD-layout datasets: synthetic defects on real photos, or the magnetic-tile set converted.

    .venv/bin/python tools/make_dataset.py generate --out /tmp/ds/gen                 # all default categories
    .venv/bin/python tools/make_dataset.py generate --out /tmp/ds/gen --categories brick,coin --train 10
    .venv/bin/python tools/make_dataset.py magnetic-tile --out /tmp/ds/mt               # from ../shared/data/magnetic-tile
    .venv/bin/python tools/make_dataset.py magnetic-tile --out /tmp/ds/mt256 --resize 256x256
    .venv/bin/python tools/make_dataset.py magnetic-tile --out /tmp/ds/mt_exp1 --lighting exp1 --test-good all
    .venv/bin/python tools/make_dataset.py elpv --out /tmp/ds/elpv_mono --kind mono     # PyPI elpv-dataset

Both write only under --out (required: datasets never land in the repository by accident) and
refuse to replace an existing dataset there without --overwrite. See docs/datasets.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from edge_inspect.calibration import defects  # noqa: E402
from edge_inspect.errors import UserError  # noqa: E402
from edge_inspect.offline.datasets import convert, generate, mvtec  # noqa: E402

DEFAULT_MAGNETIC_TILE = REPO.parent / "shared" / "data" / "magnetic-tile"


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--resize {text!r}: expected WIDTHxHEIGHT, e.g. 256x256") from None
    if not (16 <= width <= 8192 and 16 <= height <= 8192):
        raise argparse.ArgumentTypeError(f"--resize {text!r}: each side must be between 16 and 8192")
    return width, height


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: expected a count >= 0")
    return value


def _count_or_all(text: str) -> int | None:
    return None if text.lower() == "all" else _count(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="make_dataset.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="good images from scikit-image photos, with injected defects")
    gen.add_argument("--out", type=Path, required=True, help="parent folder; each category goes to OUT/<category>")
    gen.add_argument(
        "--categories", default=",".join(generate.DEFAULT_CATEGORIES),
        help=f"comma-separated, from: {', '.join(generate.CATEGORIES)} (default: all)",
    )
    gen.add_argument(
        "--kinds", default=",".join(defects.DEFECT_KINDS),
        help=f"defect kinds for test/, comma-separated (default: {','.join(defects.DEFECT_KINDS)})",
    )
    gen.add_argument("--train", type=_count, default=20, help="good training images per category (default 20)")
    gen.add_argument("--test-good", type=_count, default=20, help="good test images per category (default 20)")
    gen.add_argument("--test-defect", type=_count, default=8, help="test images per defect kind (default 8)")
    gen.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    gen.add_argument("--seed", type=int, default=0, help="same seed, same dataset (default 0)")
    gen.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT/<category>")
    gen.set_defaults(func=run_generate)

    mt = sub.add_parser("magnetic-tile", help="convert the magnetic-tile defect set to the MVTec layout")
    mt.add_argument("--out", type=Path, required=True, help="folder for the converted dataset (one category)")
    mt.add_argument(
        "--source", type=Path, default=DEFAULT_MAGNETIC_TILE,
        help=f"folder holding MT_Free, MT_Blowhole, ... (default {DEFAULT_MAGNETIC_TILE})",
    )
    mt.add_argument("--train", type=_count, default=20, help="MT_Free images for train/good (default 20)")
    mt.add_argument("--test-good", type=_count_or_all, default=200, help="MT_Free images for test/good, or 'all' (default 200)")
    mt.add_argument("--resize", type=_size, default=None, help="WIDTHxHEIGHT for every image (default: keep sizes)")
    mt.add_argument("--limit", type=_count, default=None, help="at most this many images per test folder (quick checks)")
    mt.add_argument("--seed", type=int, default=0, help="seed of the MT_Free shuffle (default 0)")
    mt.add_argument(
        "--lighting", default=None,
        help="keep one lighting (exp1..exp6): each tile was shot under six, so mixing them leaks tiles from train into test",
    )
    mt.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT")
    mt.set_defaults(func=run_magnetic_tile)

    el = sub.add_parser("elpv", help="convert the ELPV solar cells (PyPI elpv-dataset) to the MVTec layout")
    el.add_argument("--out", type=Path, required=True, help="folder for the converted dataset (one category)")
    el.add_argument("--kind", choices=convert.ELPV_KINDS, required=True, help="mono- or polycrystalline cells")
    el.add_argument("--train", type=_count, default=20, help="good cells for train/good (default 20)")
    el.add_argument("--test-good", type=_count_or_all, default=150, help="good cells for test/good, or 'all' (default 150)")
    el.add_argument("--test-defect", type=_count_or_all, default=150, help="defective cells for test/, or 'all' (default 150)")
    el.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default 0)")
    el.add_argument("--labels", type=Path, default=None, help="labels.csv of another ELPV copy (default: the installed package)")
    el.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT")
    el.set_defaults(func=run_elpv)
    return parser


def _summary(root: Path) -> str:
    dataset = mvtec.load_dataset(root)
    counts: dict[str, int] = {}
    for item in dataset.test:
        counts[item.defect_type] = counts.get(item.defect_type, 0) + 1
    tests = ", ".join(f"{k} {v}" for k, v in counts.items())
    return f"{root}: train/good {len(dataset.train_good)}; test: {tests}"


def _split(text: str, allowed: dict | tuple, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise UserError(f"--{what} {text!r}: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(allowed)}")
    return names


def run_generate(args: argparse.Namespace) -> int:
    categories = _split(args.categories, generate.CATEGORIES, "categories")
    kinds = _split(args.kinds, defects.DEFECT_KINDS, "kinds")
    if args.size < 64:
        raise UserError(f"--size {args.size}: use at least 64")
    if args.train < 1:
        raise UserError("--train must be at least 1 (train/good cannot be empty)")
    for category in categories:  # check first, so nothing is half-written
        if not args.overwrite:
            mvtec.prepare_output(args.out / category, overwrite=False)
    for category in categories:
        started = time.perf_counter()
        root = generate.generate_dataset(
            args.out, category, args.train, args.test_good, args.test_defect, args.size, args.seed,
            kinds=kinds, progress=True,
        )
        print(f"{_summary(root)} ({time.perf_counter() - started:.1f} s)")
    return 0


def _need_train(args: argparse.Namespace) -> None:
    if args.train < 1:
        raise UserError("--train must be at least 1 (train/good cannot be empty)")


def run_magnetic_tile(args: argparse.Namespace) -> int:
    _need_train(args)
    root = convert.convert_magnetic_tile(
        args.source, args.out, n_train=args.train, n_test_good=args.test_good, resize=args.resize,
        seed=args.seed, limit=args.limit, overwrite=args.overwrite, progress=True, lighting=args.lighting,
    )
    print(_summary(root))
    return 0


def run_elpv(args: argparse.Namespace) -> int:
    _need_train(args)
    root = convert.convert_elpv(
        args.out, args.kind, n_train=args.train, n_test_good=args.test_good, n_test_defect=args.test_defect,
        seed=args.seed, overwrite=args.overwrite, labels_csv=args.labels,
    )
    print(_summary(root))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
