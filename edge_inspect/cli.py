"""`edge-inspect` command line. Each subcommand lives in `edge_inspect/commands/<name>.py`.

A command module defines `add_parser(subparsers)` which registers its parser and sets
`func=run` (a function taking the parsed args and returning an exit code). Heavy imports
(onnxruntime, paho, llama) happen inside `run`, so `edge-inspect --help` stays fast.

Exit codes (documented in docs/cli.md): 0 success, 1 the job ran and found a failure
(e.g. NG parts with --fail-on-ng, doctor checks failed), 2 usage/config/input error,
3 internal error (a bug: traceback printed).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
import traceback

from . import __version__
from .errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-inspect",
        description="Few-shot camera inspection: calibrate from good parts, score frames, publish over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"edge-inspect {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    from . import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2) + (10 if args.verbose == 0 else 0)
    logging.basicConfig(
        level=max(level, logging.DEBUG) if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not as "Exception ignored" at interpreter exit
        return code
    except BrokenPipeError:
        _silence_stdout()  # `edge-inspect ... | head -1`: the reader has what it wanted
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - a bug: say so, with the traceback, and exit 3 (not 1, "found a failure")
        traceback.print_exc()
        print(f"internal error in edge-inspect {__version__} (exit code 3): please report it with the traceback above",
              file=sys.stderr)
        return 3


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush of a closed pipe does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
