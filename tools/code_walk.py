#!/usr/bin/env python3
"""How far a reader walks through the tree to follow one command: the files a run enters, in order.

Why: a layout reads well when following one job (calibrate a product, inspect a frame) stays in a few
files and does not go back and forth. This runs an `edge-inspect` command in-process under a profiler
hook and records every call into a function of the package (all threads). Two walks are reported:

- reading walk: each project function counted once, at its first call, in call order; consecutive
  functions of one file are one *stay*. This is what a person reading the code along the run meets.
- call walk: every call, consecutive calls into one file one stay (loops repeat it; for scale only).

    tools/code_walk.py -- calibrate --product p --images good/ --calibration-dir /tmp/c --engines-dir /tmp/e
    tools/code_walk.py --after Pipeline._inspect -- run --config demo.yaml      # from the first frame on

Module bodies (imports), what runs while a project module is being imported, comprehensions and
lambdas are not counted.

Prints the stays per file and totals (`--json` for the raw walk).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
from collections import Counter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "edge_inspect"


def _stays(files: list[str]) -> list[str]:
    out: list[str] = []
    for f in files:
        if not out or out[-1] != f:
            out.append(f)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--after", metavar="[FILE:]QUALNAME", help="start recording at the first call of this "
                        "function (e.g. Pipeline._inspect or edge_inspect/commands/calibrate.py:run); default: the "
                        "command's run(); 'start' = from the start (argument parsing included)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the edge-inspect arguments")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the edge-inspect command after --")
    root = str(PACKAGE)
    lock = threading.Lock()
    first_seen: dict[tuple[str, str], int] = {}
    calls: list[str] = []
    if args.after is None:
        args.after = f"edge_inspect/commands/{command[0].replace('-', '_')}.py:run"
    recording = {"on": args.after == "start"}

    def hook(frame, event, _arg):
        if event != "call":
            return
        code = frame.f_code
        filename = code.co_filename
        if not filename.startswith(root):
            return
        name = getattr(code, "co_qualname", code.co_name)
        if name.startswith("<"):  # module bodies (imports), comprehensions, lambdas: part of their file's stay
            return
        caller = frame.f_back
        while caller is not None:  # work done while a module is being imported is not the command's path
            if caller.f_code.co_name == "<module>" and caller.f_code.co_filename.startswith(root):
                return
            caller = caller.f_back
        rel = str(Path(filename).relative_to(PACKAGE.parent))
        if not recording["on"]:
            if f"{rel}:{name}" != args.after and not (":" not in args.after and name == args.after):
                return
            recording["on"] = True
        with lock:
            calls.append(rel)
            first_seen.setdefault((rel, name), len(first_seen))

    from edge_inspect import cli

    threading.setprofile(hook)
    sys.setprofile(hook)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the walk only
            code = cli.main(command)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    reading = _stays([f for (f, _n), _i in sorted(first_seen.items(), key=lambda kv: kv[1])])
    call_walk = _stays(calls)
    per_file = Counter(reading)
    report = {
        "command": command,
        "exit_code": code,
        "functions": len(first_seen),
        "reading_walk": {"stays": len(reading), "files": len(per_file), "per_file": dict(per_file.most_common()),
                         "sequence": reading},
        "call_walk": {"stays": len(call_walk), "files": len(set(call_walk)), "calls": len(calls)},
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"edge-inspect {' '.join(command)}  (exit {code})", file=sys.stderr)
    print(f"reading walk: {len(first_seen)} functions, {len(reading)} stays in {len(per_file)} files")
    for f, n in per_file.most_common():
        print(f"  {n:4d}  {f}")
    print(f"call walk: {len(calls)} calls, {len(call_walk)} stays in {len(set(call_walk))} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
