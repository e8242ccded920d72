"""The self-contained HTML page: summary cards, plots, flagged frames with overlays, the results table."""

from __future__ import annotations

import base64
import html
import math
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ... import __version__
from ...files import write_atomic
from .load import ResultRow, RunData
from .plot import latency_histogram_png, score_timeline_png
from .summary import LATENCY_STAGE, latencies, percentile, summarize

THUMB_WIDTH = 560  # px of embedded frame and overlay images (displayed at up to half of that per image)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _thumbnail(path: Path, width: int = THUMB_WIDTH, regions: list[dict[str, Any]] | None = None) -> str | None:
    """A JPEG data URI of an image file, downscaled to `width`; region boxes drawn when given."""

    try:
        raw = path.read_bytes()
    except OSError:
        return None
    image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        return None
    if regions:
        thickness = max(2, round(min(image.shape[:2]) / 200))
        for region in regions:
            box = region.get("box") or []
            if len(box) == 4:
                x0, y0, x1, y1 = (int(v) for v in box)
                cv2.rectangle(image, (x0, y0), (x1 - 1, y1 - 1), (0, 0, 255), thickness)
    elif image.shape[1] <= width and path.suffix.lower() in (".jpg", ".jpeg"):
        return data_uri(raw, "image/jpeg")
    if image.shape[1] > width:
        scale = width / image.shape[1]
        image = cv2.resize(image, (width, max(1, round(image.shape[0] * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 82])
    return data_uri(buf.tobytes(), "image/jpeg") if ok else None


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt_time(t: float | None, millis: bool = True, date: bool = True) -> str:
    """Local wall-clock time; milliseconds where frames are told apart."""
    if t is None:
        return "–"
    moment = datetime.fromtimestamp(t).astimezone()
    text = moment.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S")
    return text + f".{int(t % 1 * 1000):03d}" if millis else text


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count:,} {word if count == 1 else plural or word + 's'}"


def _fmt_num(value: Any, digits: int = 4) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return "–"


def _fmt_ms(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:,.1f}"
    return "–"


def _fmt_score(value: Any) -> str:
    """Scores and thresholds with three decimals: the precision a threshold is set to."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return "–"


def _grid_words(payload: dict[str, Any]) -> str:
    words: list[str] = []
    for region in payload.get("regions") or []:
        for word in region.get("grid") or []:
            if word not in words:
                words.append(word)
    return ", ".join(words)


def _vlm_cell(payload: dict[str, Any]) -> str:
    vlm = payload.get("vlm")
    status = payload.get("vlm_status") or ""
    if isinstance(vlm, dict):
        kind = vlm.get("defect_type") or ("defect" if vlm.get("defect") else "no defect")
        conf = vlm.get("confidence")
        return f"{kind}" + (f" ({conf:.0%})" if isinstance(conf, (int, float)) else "")
    return status if status not in ("", "skipped") else ""


_CSS = """
:root { --ink:#21293a; --muted:#6b7480; --line:#e4e7eb; --ok:#3c82b4; --ng:#d62828; --bg:#f6f7f9; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font:15px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Noto Sans", sans-serif; }
main { max-width:1180px; margin:0 auto; padding:28px 24px 60px; }
header h1 { font-size:26px; margin:0 0 4px; letter-spacing:-0.01em; }
header p { margin:0; color:var(--muted); }
header p.span { color:var(--ink); font-size:16px; margin-bottom:2px; }
header p.sources { font-size:13px; overflow-wrap:anywhere; }
h2 { font-size:19px; margin:36px 0 12px; }
section.card, .cards > div, figure { background:#fff; border:1px solid var(--line); border-radius:10px; }
.cards { display:grid; grid-template-columns:repeat(auto-fit, minmax(170px, 1fr)); gap:12px; margin-top:20px; }
.cards > div { padding:14px 16px; }
.cards .label { color:var(--muted); font-size:12.5px; text-transform:uppercase; letter-spacing:.05em; }
.cards .value { font-size:26px; font-weight:650; margin-top:2px; font-variant-numeric:tabular-nums; }
.cards .value.ng { color:var(--ng); }
.cards .sub { color:var(--muted); font-size:13px; }
figure { margin:0 0 14px; padding:12px; }
figure img { display:block; width:100%; height:auto; }
figcaption { color:var(--muted); font-size:13px; margin-top:6px; }
.plots { display:grid; grid-template-columns:1fr; gap:0; }
.notes { color:var(--muted); font-size:13.5px; margin:8px 0 0; padding-left:18px; }
article.flag { background:#fff; border:1px solid var(--line); border-left:4px solid var(--ng);
  border-radius:10px; padding:14px; margin-bottom:14px; }
article.flag h3 { margin:0 0 10px; font-size:16px; display:flex; gap:12px; flex-wrap:wrap; align-items:baseline; }
article.flag h3 .id { font-family:ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:12.5px;
  color:var(--muted); font-weight:400; }
.flagbody { display:grid; grid-template-columns:1fr 1fr 1.1fr; gap:12px; align-items:start; }
.flagbody figure { border:none; padding:0; margin:0; }
.flagbody img { border-radius:6px; border:1px solid var(--line); }
.flagbody figcaption { margin-top:3px; }
.noimg { background:var(--bg); border:1px dashed #cfd4da; border-radius:6px; color:var(--muted);
  padding:30px 16px; text-align:center; font-size:13.5px; }
.noimg.wide { grid-column:span 2; }
dl.facts { display:grid; grid-template-columns:max-content 1fr; gap:3px 12px; margin:0; font-size:13.5px; }
dl.facts dd { overflow-wrap:anywhere; }
dl.facts dt { color:var(--muted); }
dl.facts dd { margin:0; }
.verdict { background:#fff6e5; border:1px solid #f3dfb5; border-radius:8px; padding:9px 12px; margin-top:10px;
  font-size:14px; }
.verdict.none { background:var(--bg); border-color:var(--line); color:var(--muted); }
.chat { margin-top:10px; font-size:13.5px; border-top:1px solid var(--line); padding-top:8px; }
.chat h4 { margin:4px 0; font-size:12.5px; color:var(--muted); font-weight:600; text-transform:uppercase; letter-spacing:.04em; }
.chat .q { margin:6px 0 0; font-weight:600; }
.chat .a { margin:2px 0 0 14px; }
.chat small { color:var(--muted); font-weight:400; }
.badge { display:inline-block; padding:1px 8px; border-radius:999px; font-size:12px; font-weight:650;
  letter-spacing:.03em; }
.badge.ng { background:#fde2e2; color:#a61b1b; }
.badge.ok { background:#e3eef7; color:#22577a; }
table { width:100%; border-collapse:collapse; background:#fff; font-size:13.5px;
  border:1px solid var(--line); border-radius:10px; overflow:hidden; }
th, td { padding:6px 10px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top; }
th { background:#f0f2f5; font-weight:600; font-size:12.5px; color:#4a5260; position:sticky; top:0; }
td.num { text-align:right; font-variant-numeric:tabular-nums; }
tr.ng td { background:#fff8f8; }
td a { color:inherit; }
footer { color:var(--muted); font-size:12.5px; margin-top:40px; }
table.compact { width:auto; min-width:520px; }
@media (max-width: 900px) { .flagbody { grid-template-columns:1fr 1fr; } .details { grid-column:span 2; } }
"""


def render_report(
    run: RunData,
    title: str = "edge-inspect run report",
    max_images: int = 60,
    max_rows: int = 5000,
    now: float | None = None,
) -> str:
    """The report as one HTML string: no external resources, every image a data URI."""

    rows = run.rows
    summary = summarize(rows)
    generated = _fmt_time(time.time() if now is None else now, millis=False)
    parts: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<main>",
        "<header>",
        f"<h1>{_e(title)}</h1>",
        f"<p class=\"span\">{_e(_span_text(summary))}</p>",
        f"<p class=\"sources\">From {_e('; '.join(run.sources))} · generated {_e(generated)}</p>",
        "</header>",
    ]
    parts += _summary_cards(summary)
    parts += _notes(run, summary)
    if rows:
        parts.append("<h2>Scores and latency</h2>")
        parts.append('<div class="plots">')
        timeline = score_timeline_png(
            [r.time for r in rows],
            [float(r.payload.get("score", math.nan)) for r in rows],
            [float(r.payload.get("threshold", math.nan)) for r in rows],
            [r.flagged for r in rows],
        )
        parts.append(
            f'<figure><img src="{data_uri(timeline, "image/png")}" alt="Anomaly score of every frame over time">'
            "<figcaption>Every inspected frame: at or above the dashed threshold is NG (red). "
            "Scores beyond the top of the axis are drawn as triangles.</figcaption></figure>"
        )
        total = latencies(rows)
        if total:
            histogram = latency_histogram_png(total)
            parts.append(
                f'<figure><img src="{data_uri(histogram, "image/png")}" alt="Histogram of per-frame latency">'
                f"<figcaption>Time from frame grab to result ({_e(LATENCY_STAGE)}), per frame.</figcaption></figure>"
            )
        parts.append("</div>")
        parts += _stage_table(rows)
    parts += _flagged_section(rows, max_images)
    parts += _results_table(rows, max_rows)
    parts.append(f"<footer>edge-inspect {_e(__version__)} · times are local ({_e(_tz_name())}) · "
                 "this page is self-contained: it loads nothing from the network.</footer>")
    parts += ["</main>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"


def _tz_name() -> str:
    moment = datetime.now().astimezone()
    offset = moment.strftime("%z")
    return f"{moment.tzname()}, UTC{offset[:3]}:{offset[3:]}"


def _span_text(summary: dict[str, Any]) -> str:
    if summary["first"] is None:
        return "No results in the given sources and time range."
    first, last = summary["first"], summary["last"]
    minutes = (last - first) / 60
    length = f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"
    same_day = time.localtime(first)[:3] == time.localtime(last)[:3]
    where = ", ".join(f"station {s}" for s in summary["stations"][:3])
    span = f"{_fmt_time(first, millis=False)} → {_fmt_time(last, millis=False, date=not same_day)} ({length})"
    return f"{where} · {span}" if where else span


def _summary_cards(summary: dict[str, Any]) -> list[str]:
    products = summary["products"]
    if len(products) == 1:
        name, entry = next(iter(products.items()))
        thresholds = entry["thresholds"]
        product_value = name
        threshold_value = _fmt_score(thresholds[0]) if len(thresholds) == 1 else f"{len(thresholds)} values"
        threshold_sub = ", ".join(entry["calibrations"][:2]) or "calibration id not recorded"
    else:
        product_value = f"{len(products)} products" if products else "–"
        threshold_value = "per product"
        threshold_sub = "; ".join(
            f"{n}: {', '.join(_fmt_score(t) for t in e['thresholds'])}" for n, e in list(products.items())[:3]
        )
    latency = summary["latency_ms"]
    vlm = summary["vlm"]
    cards = [
        ("Frames", f"{summary['frames']:,}", f"{summary['ok']:,} OK", ""),
        ("NG", f"{summary['ng']:,}", f"{summary['ng_rate']:.1%} of frames" + (
            f"; {summary['vlm_downgraded']:,} downgraded to OK by the VLM, {summary['final_ng']:,} NG final"
            if summary.get("vlm_downgraded") else ""), "ng" if summary["ng"] else ""),
        ("Product", product_value, ", ".join(summary["cameras"][:4]) or "", ""),
        ("Threshold", threshold_value, threshold_sub, ""),
        ("Latency, median", f"{latency['p50']:.1f} ms" if latency["p50"] is not None else "–",
         f"p95 {latency['p95']:.1f} ms · max {latency['max']:.1f} ms" if latency["p50"] is not None else
         "not recorded", ""),
        ("VLM verdicts", f"{vlm.get('done', 0):,}",
         ", ".join(f"{v} {k}" for k, v in sorted(vlm.items()) if k != "done") or "of flagged frames", ""),
    ]
    out = ['<div class="cards">']
    for label, value, sub, css in cards:
        out.append(
            f'<div><div class="label">{_e(label)}</div><div class="value {css}">{_e(value)}</div>'
            f'<div class="sub">{_e(sub)}</div></div>'
        )
    out.append("</div>")
    return out


def _notes(run: RunData, summary: dict[str, Any]) -> list[str]:
    notes = []
    if summary["defect_types"]:
        notes.append("VLM defect types: " + ", ".join(f"{k} ×{v}" for k, v in summary["defect_types"].items()))
    if summary["replayed"]:
        notes.append(f"{_plural(summary['replayed'], 'result')} replayed from the spool after a broker outage "
                     "or restart.")
    if run.duplicates:
        notes.append(f"{_plural(run.duplicates, 'duplicate delivery', 'duplicate deliveries')} ignored "
                     "(MQTT QoS 1 is at-least-once).")
    if run.orphan_updates:
        notes.append(f"{_plural(run.orphan_updates, 'VLM update')} for results outside this report.")
    if run.skipped_lines:
        notes.append(f"{_plural(run.skipped_lines, 'line or file', 'lines or files')} skipped: not valid JSON, "
                     "or a result without a readable id or timestamp.")
    if run.stats and isinstance(run.stats.get("mqtt"), dict):
        mqtt = run.stats["mqtt"]
        if mqtt.get("dropped"):
            notes.append(f"The publisher reported {_plural(mqtt['dropped'], 'dropped result')} (spool full).")
    notes += _stream_notes(run.stats)
    if not notes:
        return []
    return ['<ul class="notes">'] + [f"<li>{_e(n)}</li>" for n in notes] + ["</ul>"]


def _stream_notes(stats: dict[str, Any] | None) -> list[str]:
    """Learning from the line, per product, as the last stats payload of the run saw it."""
    block = ((stats or {}).get("pipeline") or {}).get("stream")
    if not isinstance(block, dict) or not block.get("products"):
        return []
    notes = []
    for product, state in sorted(block["products"].items()):
        last = state.get("last_refit") or {}
        text = (f"Learning from the line, product {product}: {state.get('stored', 0)} candidate frames stored, "
                f"{state.get('committed', 0)} refits committed, {state.get('not_committed', 0)} not")
        if last:
            text += f"; last refit: {'version ' + str(last.get('version')) if last.get('committed') else 'not committed'} ({last.get('reason')})"
        notes.append(text + ".")
    return notes


def _stage_table(rows: list[ResultRow]) -> list[str]:
    stages: list[str] = []
    for row in rows:
        for stage in row.payload.get("latency_ms") or {}:
            if stage not in stages:
                stages.append(stage)
    if not stages:
        return []
    out = ['<table class="compact">', "<thead><tr><th>stage</th><th>median ms</th><th>p95 ms</th><th>max ms</th>"
           "<th>frames</th></tr></thead>", "<tbody>"]
    for stage in stages:
        values = latencies(rows, stage)
        out.append(
            f"<tr><td>{_e(stage)}</td><td class=\"num\">{_fmt_ms(percentile(values, 50))}</td>"
            f"<td class=\"num\">{_fmt_ms(percentile(values, 95))}</td>"
            f"<td class=\"num\">{_fmt_ms(max(values) if values else None)}</td>"
            f"<td class=\"num\">{len(values):,}</td></tr>"
        )
    out += ["</tbody>", "</table>"]
    return out


def _flagged_section(rows: list[ResultRow], max_images: int) -> list[str]:
    flagged = [row for row in rows if row.flagged]
    out = [f"<h2>Flagged frames ({len(flagged):,})</h2>"]
    if not flagged:
        out.append('<p class="notes">No frame reached its threshold.</p>')
        return out
    shown = flagged
    if len(flagged) > max_images:
        strongest = sorted(flagged, key=lambda r: float(r.payload.get("score") or 0) / max(
            float(r.payload.get("threshold") or 1e-9), 1e-9), reverse=True)[:max_images]
        keep = {id(r) for r in strongest}
        shown = [r for r in flagged if id(r) in keep]
        out.append(f'<p class="notes">Showing the {max_images} most anomalous of {len(flagged):,} flagged frames '
                   "(score relative to threshold); all are in the table below.</p>")
    for row in shown:
        out += _flag_card(row)
    return out


def _flag_card(row: ResultRow) -> list[str]:
    p = row.payload
    regions = p.get("regions") or []
    frame_uri = _thumbnail(row.files["frame"]) if "frame" in row.files else None
    if "overlay" in row.files:
        overlay_uri = _thumbnail(row.files["overlay"])
        overlay_caption = "heatmap overlay with regions"
    elif "frame" in row.files and regions:
        overlay_uri = _thumbnail(row.files["frame"], regions=regions)
        overlay_caption = "frame with region boxes (no overlay saved)"
    else:
        overlay_uri, overlay_caption = None, ""
    ratio = (float(p["score"]) / float(p["threshold"])) if p.get("threshold") else None
    out = [
        f'<article class="flag" id="i-{_e(row.inspection_id)}">',
        f'<h3><span class="badge ng">NG</span> <span>{_e(_fmt_time(row.time))}</span> '
        f"<span>{_e(p.get('camera', ''))} · {_e(p.get('product', ''))}</span>"
        f'<span class="id">{_e(row.inspection_id)}</span></h3>',
    ]
    out.append('<div class="flagbody">')
    if frame_uri or overlay_uri:
        for uri, caption in ((frame_uri, "frame"), (overlay_uri, overlay_caption or "overlay")):
            if uri:
                out.append(f'<figure><img src="{uri}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>')
            else:
                out.append(f'<div class="noimg">no {_e(caption)} saved</div>')
    else:
        out.append('<div class="noimg wide">No image saved for this inspection (evidence disabled, '
                   "deleted by retention, or only the stream log was given).</div>")
    out.append('<div class="details">')
    facts = [
        ("score", f"{_fmt_score(p.get('score'))} · threshold {_fmt_score(p.get('threshold'))}"
                  + (f" ({ratio:.2f}×)" if ratio else "")),
        ("where", _grid_words(p) or "–"),
        ("regions", "; ".join(
            f"box {tuple(r.get('box') or [])}, {_fmt_num(r.get('area_pct'), 3)}% of image, peak {_fmt_num(r.get('peak'))}"
            for r in regions[:4]) or "–"),
        ("part id", p.get("part_id") or "–"),
        ("frame", f"{p.get('frame_id', '–')} · seq {p.get('seq', '–')}" + (" · replayed" if p.get("replayed") else "")),
    ]
    if p.get("evidence_path"):
        facts.append(("evidence", f"folder {str(p['evidence_path']).split('/')[0]}/ (frame, overlay, map, json)"))
    out.append('<dl class="facts">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts) + "</dl>")
    vlm = p.get("vlm")
    if row.downgraded:
        out.append('<div class="verdict"><strong>Final verdict: OK</strong> — the VLM downgraded the scorer\'s NG '
                   '(decided_by vlm, vlm.allow_downgrade)</div>')
    elif p.get("final_verdict"):
        out.append(f'<div class="verdict none">Final verdict: {_e(p["final_verdict"])} (decided by '
                   f'{_e(p.get("decided_by", "scorer"))})</div>')
    if isinstance(vlm, dict):
        conf = vlm.get("confidence")
        head = (f"{'Defect' if vlm.get('defect') else 'No defect'}: {vlm.get('defect_type') or 'unspecified'}"
                + (f" · confidence {conf:.0%}" if isinstance(conf, (int, float)) else "")
                + (f" · at {', '.join(vlm.get('location') or [])}" if vlm.get("location") else ""))
        tail = " · ".join(x for x in (vlm.get("model"), f"{_fmt_ms(vlm.get('latency_ms'))} ms"
                                      if vlm.get("latency_ms") else "") if x)
        out.append(f'<div class="verdict"><strong>VLM</strong> — {_e(head)}<br>{_e(vlm.get("description", ""))}'
                   + (f'<br><small>{_e(tail)}</small>' if tail else "") + "</div>")
    else:
        status = p.get("vlm_status") or "skipped"
        reason = f": {p['error']}" if p.get("error") else ""
        out.append(f'<div class="verdict none">VLM verdict: {_e(status)}{_e(reason)}</div>')
    out += _conversation_block(row)
    out += ["</div>", "</div>", "</article>"]
    return out


def _conversation_block(row: ResultRow) -> list[str]:
    """The follow-up questions asked about this part (edge-inspect ask / the ask topic), under its card."""
    if not row.conversations:
        return []
    out = ['<div class="chat">']
    for conversation_id, turns in row.conversations.items():
        out.append(f"<h4>Questions · conversation {_e(conversation_id)} · {_e(_plural(len(turns), 'turn'))}</h4>")
        for turn in turns:
            answer = turn.get("answer") or {}
            typed = answer.get("yes_no") or ", ".join(answer.get("location") or [])
            when = _fmt_time(turn.get("answered_at"), millis=False) if turn.get("answered_at") else ""
            out.append(f'<p class="q">Q: {_e(turn.get("question", ""))} <small>{_e(when)}</small></p>')
            out.append(f'<p class="a">{f"<strong>{_e(typed)}</strong> — " if typed else ""}{_e(answer.get("answer", ""))}</p>')
    out.append("</div>")
    return out


def _results_table(rows: list[ResultRow], max_rows: int) -> list[str]:
    out = [f"<h2>All results ({len(rows):,})</h2>"]
    if not rows:
        out.append('<p class="notes">No results in the given sources and time range.</p>')
        return out
    shown = rows[-max_rows:] if len(rows) > max_rows else rows
    if len(shown) < len(rows):
        out.append(f'<p class="notes">The last {max_rows:,} of {len(rows):,} results.</p>')
    out += ["<table>", "<thead><tr><th>time</th><th>camera</th><th>product</th><th>part id</th><th>frame</th>"
            "<th>score</th><th>threshold</th><th>verdict</th><th>where</th><th>VLM</th><th>total ms</th></tr></thead>",
            "<tbody>"]
    for row in shown:
        p = row.payload
        ng = row.flagged
        verdict = f'<span class="badge {"ng" if ng else "ok"}">{_e(p.get("verdict", "?"))}</span>'
        if row.downgraded:
            verdict += ' → <span class="badge ok">OK</span> <small>(VLM)</small>'
        if ng:
            verdict = f'<a href="#i-{_e(row.inspection_id)}">{verdict}</a>'
        out.append(
            f'<tr class="{"ng" if ng else "ok"}"><td>{_e(_fmt_time(row.time))}</td><td>{_e(p.get("camera", ""))}</td>'
            f'<td>{_e(p.get("product", ""))}</td><td>{_e(p.get("part_id") or "")}</td>'
            f'<td class="num">{_e(p.get("frame_id", ""))}</td><td class="num">{_fmt_score(p.get("score"))}</td>'
            f'<td class="num">{_fmt_score(p.get("threshold"))}</td><td>{verdict}</td><td>{_e(_grid_words(p))}</td>'
            f'<td>{_e(_vlm_cell(p))}</td>'
            f'<td class="num">{_fmt_ms((p.get("latency_ms") or {}).get(LATENCY_STAGE))}</td></tr>'
        )
    out += ["</tbody>", "</table>"]
    return out


def write_report(run: RunData, out: str | Path, **options: Any) -> Path:
    """Render and write the report atomically; returns its path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, render_report(run, **options), durable=False)
    return path
