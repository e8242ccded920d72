"""`edge-inspect doctor --config FILE`: check config, camera, broker, calibration, engine, VLM and disk."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="check everything the daemon needs (config, camera, broker, calibration, engine, VLM, disk) "
        "and say how to fix what is wrong",
        description="Runs every check and prints ok / WARN / FAIL with a fix for each problem. Exit code 0 "
        "when nothing failed (warnings allowed), 1 when a check failed. Run it as the daemon's user "
        "(sudo -u edge-inspect ...) so permissions are checked for that user; stop the daemon first if "
        "the camera is a V4L2 device (it can be opened by one program at a time).",
    )
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="the daemon's YAML config")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="seconds to wait for the broker's answer and for a camera frame (default 10)")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from ..errors import UserError
    from ..ops.doctor import exit_code, format_table, run_checks, to_json, use_colour

    if not 0 < args.timeout <= 600:
        raise UserError("--timeout must be between 0 and 600 seconds")
    results = run_checks(args.config, timeout_s=args.timeout)
    if args.json:
        print(json.dumps(to_json(results), indent=2))
    else:
        print(format_table(results, colour=use_colour()))
    return exit_code(results)
