"""`edge-inspect report`: one self-contained HTML page about a run (docs/report.md)."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="write a self-contained HTML run report from the evidence folder and/or a results log",
        description="Summary, score timeline, latency histogram, flagged frames with heatmaps and VLM "
        "verdicts, and a table of all results, in one HTML file with every image inline.",
    )
    p.add_argument("--evidence", metavar="DIR", help="evidence folder (evidence.dir of the daemon config)")
    p.add_argument("--results", metavar="FILE",
                   help="JSON-lines log of the MQTT stream: one result or result/update payload per line")
    p.add_argument("--since", metavar="WHEN",
                   help="only results from then on: a duration (30m, 2h, 7d) or a local date/time (2025-01-14 06:00)")
    p.add_argument("--until", metavar="WHEN", help="only results up to then (same forms as --since)")
    p.add_argument("--out", metavar="FILE", default="report.html", help="HTML file to write (default: report.html)")
    p.add_argument("--title", default="edge-inspect run report", help="page title")
    p.add_argument("--max-images", type=int, default=60, metavar="N",
                   help="flagged frames shown with images (the most anomalous; default 60)")
    p.add_argument("--max-rows", type=int, default=5000, metavar="N",
                   help="rows in the results table (the latest; default 5000)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import UserError
    from ..ops.report import load_run, parse_since, summarize, write_report

    if args.max_images < 0 or args.max_rows < 1:
        raise UserError("--max-images must be >= 0 and --max-rows >= 1")
    since = parse_since(args.since) if args.since else None
    until = parse_since(args.until) if args.until else None
    data = load_run(evidence_dir=args.evidence, results_file=args.results, since=since, until=until)
    path = write_report(data, args.out, title=args.title, max_images=args.max_images, max_rows=args.max_rows)
    summary = summarize(data.rows)
    print(f"{summary['frames']} results, {summary['ng']} NG ({summary['ng_rate']:.1%}), "
          f"{summary['with_images']} with images")
    print(f"report: {path.resolve()}")
    return 0
