"""`edge-inspect feedback INSPECTION_ID ok|ng`: an operator's verdict on one inspection (docs/cli.md)."""

from __future__ import annotations

from typing import Any


def add_parser(subparsers) -> None:
    from ..mqtt.feedback import DEFAULT_TIMEOUT_S

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
    """Returns 0 for applied or duplicate; raises FeedbackFailed (exit code 2) for an error or no result in time."""
    import json
    import sys

    from ..config import load_config
    from ..errors import UserError
    from ..feedback.apply import apply_local
    from ..mqtt.feedback import (
        FeedbackFailed,
        feedback_result_payload,
        make_request,
        send_feedback,
    )

    if args.timeout <= 0:
        raise UserError(f"--timeout {args.timeout}: give a positive number of seconds")
    if args.defect_type and args.verdict != "ng":
        raise UserError("--defect-type goes with ng only (a good part has no defect type)")
    if args.evidence and not args.local:
        raise UserError("--evidence needs --local (the daemon reads its own evidence.dir)")
    config = load_config(args.config)
    request = make_request(args.inspection_id, args.verdict, args.defect_type, args.operator, args.note)
    if args.local:
        body = apply_local(config, request, args.evidence)
    else:
        body = send_feedback(config, request, args.timeout)
    payload = feedback_result_payload(config.station, body) if "schema_version" not in body else body
    if args.json:
        print(json.dumps(payload, ensure_ascii=False), flush=True)
    if payload["status"] == "error":
        raise FeedbackFailed(f"{payload['error_code']}: {payload['error']}")
    if not args.json:
        print(describe(payload), flush=True)
    if args.local and payload["status"] == "applied" and payload["calibration_version"] != payload["previous_version"]:
        print(f"a running daemon scores with version {payload['calibration_version']} after `systemctl reload "
              "edge-inspect` (SIGHUP) or its next product switch", file=sys.stderr)
    return 0


def describe(payload: dict[str, Any]) -> str:
    """One or more lines for a person: what happened, the versions, and the labelled-defect report."""
    product = payload.get("product", "?")
    head = {"applied": "applied", "duplicate": "already applied (duplicate)"}[payload["status"]]
    version, previous = payload.get("calibration_version"), payload.get("previous_version")
    if payload["verdict"] == "ok" and version != previous:
        what = f"product {product} calibration version {version} (was {previous}), threshold {payload['threshold']:.4g}"
    elif payload["verdict"] == "ok":
        what = f"product {product}: no new version (the scorer said OK already, or it was applied before)"
    else:
        what = f"product {product}: kept as a labelled defect (calibration version {version} unchanged)"
    lines = [f"{head}: {payload['verdict']} on inspection {payload['inspection_id']}; {what}"]
    report = payload.get("labelled_defects")
    if report:
        lines.append(f"labelled defects at threshold {report['threshold']:.4g} ({report['false_positives']} of "
                     f"{report['good_scores']} good scores above it):")
        for name, row in [*report["types"].items(), ("overall", report["overall"])]:
            recall = "-" if row["recall"] is None else f"{row['recall']:.0%}"
            precision = "-" if row["precision"] is None else f"{row['precision']:.0%}"
            lines.append(f"  {name:<16} n={row['n']:<4} detected={row['detected']:<4} recall={recall:<5} precision={precision}")
    return "\n".join(lines)
