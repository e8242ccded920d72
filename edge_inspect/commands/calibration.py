"""`edge-inspect calibration history|diff|rollback --product NAME`: a product's calibration versions."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    from ._common import add_dirs

    p = subparsers.add_parser(
        "calibration",
        help="list, compare or roll back a product's calibration versions",
        description="Every calibration, refit from operator feedback and threshold.adapt step is a version in "
        "calibration/<product>/versions/N. A rollback is a new version whose bank and threshold are copies of the "
        "old one; a running daemon picks it up on SIGHUP (or a product switch).",
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    history = sub.add_parser("history", help="the kept versions, oldest first (* = active)")
    diff = sub.add_parser("diff", help="what changed between two versions (default: the active one and its parent)")
    diff.add_argument("a", nargs="?", type=int, help="from version (default: the active version's parent)")
    diff.add_argument("b", nargs="?", type=int, help="to version (default: the active version)")
    rollback = sub.add_parser("rollback", help="make an earlier version's bank and threshold active again, as a new version")
    rollback.add_argument("--to", type=int, help="version to restore (default: the active version's parent)")
    rollback.add_argument("--why", default="", help="note kept in the new version's manifest")
    rollback.add_argument("--keep", type=int, default=None, help="versions kept (default 10; older ones are deleted)")
    for q in (history, diff, rollback):
        q.add_argument("--product", required=True, help="product name")
        add_dirs(q)
        q.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..calibration import store
    from ..calibration.calibrate import rollback_product, validate_product_name
    from ..errors import UserError
    from ..scorer import layout
    from ._common import operator_name

    validate_product_name(args.product)
    if args.action == "history":
        rows = store.history(args.calibration_dir, args.product)
        if args.json:
            print(json.dumps(rows))
            return 0
        print(f"{'':1s} {'ver':>4s} {'parent':>6s}  {'change':15s} {'threshold':>10s} {'bank':>6s} {'good':>4s}  "
              f"{'created (UTC)':25s} by: why")
        for r in rows:
            change = r["change"] + (f" {r['restored_from']}" if r.get("restored_from") else "")
            print(f"{'*' if r['active'] else ' '} {r['number']:>4d} {str(r['parent'] or '-'):>6s}  {change:15s} "
                  f"{r['threshold']:>10.4f} {r['bank_patches']:>6d} {r['good_images']:>4d}  {r['created_utc']:25s} "
                  f"{r['by']}: {r['why']}")
        return 0
    if args.action == "diff":
        active = layout.current_version(args.calibration_dir, args.product)
        if active is None:
            store.history(args.calibration_dir, args.product)  # raises the reason (legacy or not calibrated)
        b = args.b if args.b is not None else (active if args.a is None else active)
        a = args.a
        if a is None:
            a = layout.read_manifest(args.calibration_dir, args.product, b).get("version", {}).get("parent")
            if a is None:
                raise UserError(f"version {b} of {args.product!r} has no parent: give two versions (calibration diff A B)")
        result = store.diff(args.calibration_dir, args.product, int(a), int(b))
        if args.json:
            print(json.dumps(result))
            return 0
        _print_diff(result)
        return 0
    keep = store.DEFAULT_KEEP if args.keep is None else args.keep
    if keep < store.MIN_KEEP:
        raise UserError(f"--keep {keep}: keep at least {store.MIN_KEEP} versions (the active one and its parent)")
    number = rollback_product(args.calibration_dir, args.product, args.engines_dir, to=args.to, by=operator_name(),
                              why=args.why, keep=keep)
    row = store.history(args.calibration_dir, args.product)[-1]
    if args.json:
        print(json.dumps(row))
    else:
        print(f"{args.product}: version {number} is active, a copy of version {row['restored_from']} "
              f"(threshold {row['threshold']:.4f}, bank {row['bank_patches']} patches); "
              "send SIGHUP to a running daemon (systemctl reload edge-inspect) to use it")
    return 0


def _print_diff(d: dict) -> None:
    a, b = d["from"], d["to"]
    print(f"{d['product']}: version {a['number']} ({a['change']}, {a['created_utc']}) -> version {b['number']} "
          f"({b['change']} by {b['by']}, {b['created_utc']}: {b['why']})")
    t = d["threshold"]
    print(f"  threshold   {t['from']:.5f} -> {t['to']:.5f} ({t['delta']:+.5f})")
    bank = d["bank"]
    print(f"  bank        {'same' if bank['same'] else 'changed'}: {bank['patches'][0]} -> {bank['patches'][1]} patches")
    for row in d["good_images_added"]:
        print(f"  good image  + {row.get('source')} ({row.get('added_by')})")
    for row in d["good_images_removed"]:
        print(f"  good image  - {row.get('source')} ({row.get('added_by')})")
    for key, (x, y) in d["params_changed"].items():
        print(f"  param       {key}: {x} -> {y}")
    for key, (x, y) in d["evidence"].items():
        print(f"  evidence    {key}: {x} -> {y}")
