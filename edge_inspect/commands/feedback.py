"""`edge-inspect feedback INSPECTION_ID ok|ng`: an operator's verdict on one inspection (docs/cli.md)."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    from ..feedback.command import DEFAULT_TIMEOUT_S

    p = subparsers.add_parser(
        "feedback",
        help="tell the station an inspection's true verdict: ok refits the product, ng keeps a labelled defect",
        description="ok on an NG result adds the frame (from the evidence store) to the product's good set as a new "
        "calibration version, and the daemon swaps its scorer without losing a frame; ng keeps the frame as a "
        "labelled defect of the product (no new version) for the per-defect-type recall/precision report. Each "
        "inspection is applied once: a repeat says duplicate, the other verdict is the error conflict. By default "
        "the feedback goes to the running daemon over MQTT (the config's broker and station) and the command waits "
        "for its result. --local applies it to the config's calibration and evidence folders without a daemon (for "
        "when it is stopped); a running daemon picks the new version up on SIGHUP (systemctl reload edge-inspect) "
        "or its next product switch. Exit code 2: error (unknown or expired inspection, product changed, conflict, "
        "...) or no result before --timeout.",
    )
    p.add_argument("inspection_id", metavar="INSPECTION_ID", help="inspection_id of a result whose evidence is still kept")
    p.add_argument("verdict", choices=["ok", "ng"], help="ok: the part is good (an NG was a false reject); ng: it is defective")
    p.add_argument("--config", "-c", required=True, metavar="FILE",
                   help="the station's daemon config (broker and station; with --local: scoring and evidence folders)")
    p.add_argument("--defect-type", metavar="T", help="with ng: the kind of defect (e.g. scratch), reported per type")
    p.add_argument("--operator", metavar="NAME", help="who decided (kept in the ledger and the version's manifest)")
    p.add_argument("--note", metavar="TEXT", help="why (kept in the ledger and the version's manifest)")
    p.add_argument("--local", action="store_true",
                   help="apply to the folders directly, without the daemon (a running one uses the new version after "
                   "SIGHUP or its next product switch)")
    p.add_argument("--evidence", metavar="DIR", help="with --local: evidence folder (default: evidence.dir of the config)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=f"seconds to wait for the daemon's result (default {DEFAULT_TIMEOUT_S:g}; a refit takes a while)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line (the feedback/result payload)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config
    from ..errors import UserError
    from ..feedback.command import run_cli

    if args.timeout <= 0:
        raise UserError(f"--timeout {args.timeout}: give a positive number of seconds")
    if args.defect_type and args.verdict != "ng":
        raise UserError("--defect-type goes with ng only (a good part has no defect type)")
    if args.evidence and not args.local:
        raise UserError("--evidence needs --local (the daemon reads its own evidence.dir)")
    config = load_config(args.config)
    return run_cli(config, args.inspection_id, args.verdict, defect_type=args.defect_type, operator=args.operator,
                   note=args.note, local=args.local, evidence_dir=args.evidence, timeout_s=args.timeout, as_json=args.json)
