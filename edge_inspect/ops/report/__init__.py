"""Run report: one self-contained HTML page a plant engineer can open, mail or archive.

It reads the evidence folder (`EvidenceStore`: frames, overlays, result JSON with the VLM verdict
merged in) and/or a JSON-lines log of the MQTT stream (one result or result_update payload per
line), and draws: a summary, a score timeline, a latency histogram, every flagged frame with its
heatmap overlay, region boxes, grid words and VLM verdict, and a table of all results. Images and
plots are inline data URIs, so the page needs no server, no network and no other file.

Example::

    run = load_run(evidence_dir="evidence", results_file="results.jsonl", since=parse_since("2h"))
    write_report(run, "report.html")
    print(summarize(run.rows))      # the numbers the demo prints at the end

Plots are drawn with OpenCV at twice their display size (crisp on high-DPI screens), not with
matplotlib, to keep the runtime dependencies of an edge box small.
"""

from .html import render_report, write_report
from .load import ResultRow, RunData, load_run, parse_since, parse_time
from .plot import latency_histogram_png, nice_ticks, score_timeline_png, time_ticks
from .summary import LATENCY_STAGE, latencies, percentile, summarize

__all__ = [
    "LATENCY_STAGE", "ResultRow", "RunData", "latencies", "latency_histogram_png", "load_run", "nice_ticks",
    "parse_since", "parse_time", "percentile", "render_report", "score_timeline_png", "summarize", "time_ticks",
    "write_report",
]
