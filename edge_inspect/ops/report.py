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

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np

from .. import __version__
from ..errors import UserError

LATENCY_STAGE = "total"  # the stage the histogram shows; the table lists every stage
THUMB_WIDTH = 560  # px of embedded frame and overlay images (displayed at up to half of that per image)

# Plot colours (BGR) and geometry, drawn at 2x.
_INK = (51, 41, 33)
_MUTED = (128, 116, 107)
_GRID = (236, 231, 228)
_OK = (180, 130, 60)
_NG = (40, 40, 214)
_THRESHOLD = (0, 140, 255)
_BAR = (196, 143, 74)
_FONT = 0  # cv2.FONT_HERSHEY_SIMPLEX


# ------------------------------------------------------------------------------------------------
# Loading


@dataclass
class ResultRow:
    """One inspection: its result payload (with any update merged in) and its evidence files."""

    payload: dict[str, Any]
    time: float  # UTC seconds since the epoch
    files: dict[str, Path] = field(default_factory=dict)  # frame / overlay / map that exist on disk

    @property
    def inspection_id(self) -> str:
        return str(self.payload.get("inspection_id", ""))

    @property
    def flagged(self) -> bool:
        return self.payload.get("verdict") == "NG"


@dataclass
class RunData:
    """Everything a report shows, in time order."""

    rows: list[ResultRow]
    sources: list[str]
    skipped_lines: int = 0  # JSONL lines that were not a result or update payload
    duplicates: int = 0  # results received more than once (QoS 1 is at-least-once)
    orphan_updates: int = 0  # updates whose result is not in the sources
    stats: dict[str, Any] | None = None  # the last stats payload of the stream, when recorded


def parse_time(value: Any) -> float | None:
    """An ISO-8601 timestamp ('...Z', offset, or naive = UTC) or epoch seconds -> epoch seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def parse_since(text: str, now: float | None = None) -> float:
    """`--since`: a duration back from now ('90s', '30m', '2h', '7d') or a date/time (local time
    when it has no offset: '2025-01-14', '2025-01-14 06:00', '2025-01-14T06:00:00Z')."""
    now = time.time() if now is None else now
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if match:
        seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
        return now - float(match.group(1)) * seconds
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UserError(
            f"--since {text!r}: expected a duration like 30m, 2h, 7d or a date/time like 2025-01-14 06:00"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # a person types local wall-clock time
    return moment.timestamp()


def load_run(
    evidence_dir: str | Path | None = None,
    results_file: str | Path | None = None,
    since: float | None = None,
    until: float | None = None,
) -> RunData:
    """Read results from an evidence folder and/or a JSONL stream log, joined by inspection id."""
    if evidence_dir is None and results_file is None:
        raise UserError("nothing to report on: give --evidence DIR and/or --results FILE")
    rows: dict[str, ResultRow] = {}
    run = RunData(rows=[], sources=[])
    if results_file is not None:
        _read_stream(Path(results_file), rows, run)
    if evidence_dir is not None:
        _read_evidence(Path(evidence_dir), rows, run, since)
    selected = [
        row for row in rows.values()
        if (since is None or row.time >= since) and (until is None or row.time <= until)
    ]
    run.rows = sorted(selected, key=lambda row: (row.time, row.payload.get("seq") or 0))
    return run


def _read_stream(path: Path, rows: dict[str, ResultRow], run: RunData) -> None:
    try:
        handle = open(path, encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UserError(f"--results {path}: cannot read it ({exc.strerror or exc})") from None
    run.sources.append(f"stream log {path}")
    updates: list[dict[str, Any]] = []
    with handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                payload = json.loads(line)
            except json.JSONDecodeError:
                run.skipped_lines += 1
                continue
            kind = payload.get("type") if isinstance(payload, dict) else None
            if kind == "result":
                inspection_id = payload.get("inspection_id")
                moment = parse_time(payload.get("timestamp"))
                if not isinstance(inspection_id, str) or moment is None:
                    run.skipped_lines += 1
                elif inspection_id in rows:
                    run.duplicates += 1
                else:
                    rows[inspection_id] = ResultRow(dict(payload), moment)
            elif kind == "result_update":
                updates.append(payload)
            elif kind == "stats":
                run.stats = payload
            elif not isinstance(payload, dict) or "inspection_id" in payload:
                run.skipped_lines += 1  # meant to be a result, but is not one
            # other JSON objects (e.g. the summary line of `edge-inspect listen --json`) are not results
    for update in updates:  # after the whole log: an update may arrive before a replayed result
        row = rows.get(update.get("inspection_id"))
        if row is None:
            run.orphan_updates += 1
            continue
        _merge_update(row.payload, update)


def _merge_update(payload: dict[str, Any], update: dict[str, Any]) -> None:
    for key in ("vlm_status", "vlm", "error"):
        if key in update:
            payload[key] = update[key]


def _read_evidence(root: Path, rows: dict[str, ResultRow], run: RunData, since: float | None) -> None:
    if not root.is_dir():
        raise UserError(f"--evidence {root}: no such folder (evidence.dir in the config)")
    run.sources.append(f"evidence folder {root}")
    first_day = time.strftime("%Y%m%d", time.gmtime(since - 86400)) if since is not None else ""
    for day in sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"\d{8}", p.name)):
        if day.name < first_day:
            continue  # whole days before --since are not read at all
        for json_path in sorted(day.glob("*.json")):
            try:
                body = json.loads(json_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                run.skipped_lines += 1
                continue
            if not isinstance(body, dict):
                run.skipped_lines += 1
                continue
            inspection_id = body.get("inspection_id") or json_path.name.split(".", 1)[0]
            block = body.pop("evidence", None) or {}
            files = {
                kind: day / name
                for kind in ("frame", "overlay", "map")
                if isinstance(name := block.get(kind), str) and (day / name).is_file()
            }
            row = rows.get(inspection_id)
            if row is None:
                moment = parse_time(body.get("timestamp"))
                if moment is None:
                    run.skipped_lines += 1
                    continue
                row = rows[inspection_id] = ResultRow(body, moment)
            else:  # the stream has the result; the evidence adds pictures and a verdict it may lack
                if row.payload.get("vlm_status") in (None, "pending") and body.get("vlm_status") not in (None, "pending"):
                    _merge_update(row.payload, body)
                row.payload.setdefault("evidence_path", body.get("evidence_path"))
            row.files = files


# ------------------------------------------------------------------------------------------------
# Numbers


def percentile(values: Iterable[float], q: float) -> float | None:
    data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    return float(np.percentile(data, q)) if data.size else None


def latencies(rows: Iterable[ResultRow], stage: str = LATENCY_STAGE) -> list[float]:
    out = []
    for row in rows:
        value = (row.payload.get("latency_ms") or {}).get(stage)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out.append(float(value))
    return out


def summarize(rows: list[ResultRow]) -> dict[str, Any]:
    """The run in numbers: frames, NG, thresholds per product, latency, VLM outcomes."""
    frames = len(rows)
    flagged = sum(row.flagged for row in rows)
    products: dict[str, dict[str, Any]] = {}
    for row in rows:
        name = str(row.payload.get("product", "?"))
        entry = products.setdefault(name, {"frames": 0, "ng": 0, "thresholds": set(), "calibrations": set()})
        entry["frames"] += 1
        entry["ng"] += int(row.flagged)
        if isinstance(row.payload.get("threshold"), (int, float)):
            entry["thresholds"].add(round(float(row.payload["threshold"]), 6))
        if row.payload.get("calibration_id"):
            entry["calibrations"].add(str(row.payload["calibration_id"]))
    for entry in products.values():
        entry["thresholds"] = sorted(entry["thresholds"])
        entry["calibrations"] = sorted(entry["calibrations"])
    total = latencies(rows)
    vlm = Counter(str(row.payload.get("vlm_status") or "skipped") for row in rows if row.flagged)
    defects = Counter(
        str(row.payload["vlm"].get("defect_type") or "unspecified")
        for row in rows
        if isinstance(row.payload.get("vlm"), dict) and row.payload["vlm"].get("defect")
    )
    return {
        "frames": frames,
        "ng": flagged,
        "ok": frames - flagged,
        "ng_rate": flagged / frames if frames else 0.0,
        "first": rows[0].time if rows else None,
        "last": rows[-1].time if rows else None,
        "products": products,
        "stations": sorted({str(row.payload.get("station", "")) for row in rows} - {""}),
        "cameras": sorted({str(row.payload.get("camera", "")) for row in rows} - {""}),
        "latency_ms": {
            "p50": percentile(total, 50), "p95": percentile(total, 95), "max": max(total) if total else None,
        },
        "vlm": dict(vlm),
        "defect_types": dict(defects.most_common()),
        "replayed": sum(bool(row.payload.get("replayed")) for row in rows),
        "with_images": sum(bool(row.files) for row in rows),
    }


# ------------------------------------------------------------------------------------------------
# Plots (OpenCV, drawn at 2x)


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering lo..hi."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1.0
    magnitude = 10 ** math.floor(math.log10((hi - lo) / max(1, count - 1)))
    candidates = [m * magnitude * scale for scale in (0.1, 1, 10) for m in (1, 2, 2.5, 5)]

    def ticks_with(step: float) -> int:
        return math.floor(hi / step + 1e-9) - math.ceil(lo / step - 1e-9) + 1

    step = min(candidates, key=lambda s: (abs(ticks_with(s) - count), -s))
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def covering_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """`nice_ticks` extended by one step when needed, so the last tick is at or above `hi` (axis end)."""
    ticks = nice_ticks(lo, hi, count)
    if len(ticks) > 1 and ticks[-1] < hi - 1e-12:
        ticks.append(round(ticks[-1] + (ticks[1] - ticks[0]), 12))
    return ticks


def _tick_label(value: float, ticks: list[float]) -> str:
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(value) or 1.0
    decimals = max(0, min(6, -math.floor(math.log10(step) + 1e-9)))
    if step * 10 ** decimals % 1 > 1e-6:
        decimals += 1
    return f"{value:.{decimals}f}"


_TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200,
               86400, 172800, 604800]


def time_ticks(t0: float, t1: float, count: int = 7) -> tuple[list[float], str]:
    """Tick times at round local wall-clock steps, and the strftime format to label them."""
    span = max(t1 - t0, 1.0)
    step = next((s for s in _TIME_STEPS if span / s <= count), _TIME_STEPS[-1])
    offset = datetime.fromtimestamp(t0).astimezone().utcoffset() or timedelta(0)
    shift = offset.total_seconds()
    first = math.ceil((t0 + shift) / step) * step - shift
    ticks = [first + i * step for i in range(int((t1 - first) // step) + 1)]
    fmt = "%H:%M:%S" if step < 60 else "%H:%M" if step < 86400 else "%b %d"
    return ticks, fmt


class _Plot:
    """A white canvas with a plot area, axes, grid lines and labels; data -> pixels."""

    def __init__(self, width: int = 1600, height: int = 560, left: int = 140, right: int = 40,
                 top: int = 70, bottom: int = 110) -> None:
        self.image = np.full((height, width, 3), 255, np.uint8)
        self.x0, self.x1 = left, width - right
        self.y0, self.y1 = top, height - bottom
        self.limits = (0.0, 1.0, 0.0, 1.0)

    def set_limits(self, xmin: float, xmax: float, ymin: float, ymax: float) -> None:
        if xmax <= xmin:
            xmin, xmax = xmin - 0.5, xmax + 0.5
        if ymax <= ymin:
            ymin, ymax = ymin - 0.5, ymax + 0.5
        self.limits = (xmin, xmax, ymin, ymax)

    def px(self, x: float) -> int:
        xmin, xmax, _, _ = self.limits
        return int(round(self.x0 + (x - xmin) / (xmax - xmin) * (self.x1 - self.x0)))

    def py(self, y: float) -> int:
        _, _, ymin, ymax = self.limits
        return int(round(self.y1 - (y - ymin) / (ymax - ymin) * (self.y1 - self.y0)))

    def text(self, label: str, x: int, y: int, scale: float = 0.9, color=_INK, align: str = "left",
             valign: str = "baseline", thickness: int = 2) -> None:

        (w, h), _ = cv2.getTextSize(label, _FONT, scale, thickness)
        x -= {"left": 0, "center": w // 2, "right": w}[align]
        y += {"baseline": 0, "center": h // 2, "top": h}[valign]
        cv2.putText(self.image, label, (x, y), _FONT, scale, color, thickness, cv2.LINE_AA)

    def vertical_text(self, label: str, x: int, y: int, scale: float = 0.9, color=_INK) -> None:
        """Text rotated 90 degrees (reads bottom to top), centred on (x, y)."""

        (w, h), base = cv2.getTextSize(label, _FONT, scale, 2)
        patch = np.full((h + base + 8, w + 8, 3), 255, np.uint8)
        cv2.putText(patch, label, (4, h + 4), _FONT, scale, color, 2, cv2.LINE_AA)
        patch = cv2.rotate(patch, cv2.ROTATE_90_COUNTERCLOCKWISE)
        ph, pw = patch.shape[:2]
        top, left = max(0, y - ph // 2), max(0, x - pw // 2)
        region = self.image[top : top + ph, left : left + pw]
        region[...] = np.minimum(region, patch[: region.shape[0], : region.shape[1]])

    def axes(self, xticks: list[tuple[float, str]], yticks: list[tuple[float, str]], xlabel: str,
             ylabel: str, title: str) -> None:

        for value, label in yticks:
            y = self.py(value)
            if self.y0 - 1 <= y <= self.y1 + 1:
                cv2.line(self.image, (self.x0, y), (self.x1, y), _GRID, 2)
                cv2.line(self.image, (self.x0 - 10, y), (self.x0, y), _MUTED, 2)
                self.text(label, self.x0 - 18, y, 0.8, _MUTED, align="right", valign="center")
        for value, label in xticks:
            x = self.px(value)
            if self.x0 - 1 <= x <= self.x1 + 1:
                cv2.line(self.image, (x, self.y0), (x, self.y1), _GRID, 2)
                cv2.line(self.image, (x, self.y1), (x, self.y1 + 10), _MUTED, 2)
                self.text(label, x, self.y1 + 22, 0.8, _MUTED, align="center", valign="top")
        cv2.line(self.image, (self.x0, self.y1), (self.x1, self.y1), _MUTED, 2)
        cv2.line(self.image, (self.x0, self.y0), (self.x0, self.y1), _MUTED, 2)
        self.text(xlabel, (self.x0 + self.x1) // 2, self.image.shape[0] - 18, 0.85, _INK, align="center")
        self.vertical_text(ylabel, 30, (self.y0 + self.y1) // 2, 0.85, _INK)
        self.text(title, self.x0, 44, 1.0, _INK, thickness=2)

    def dashed_line(self, p0: tuple[int, int], p1: tuple[int, int], color, thickness: int = 3,
                    dash: int = 18, gap: int = 12) -> None:

        length = math.hypot(p1[0] - p0[0], p1[1] - p0[1])
        if length < 1:
            return
        steps = np.arange(0, length, dash + gap)
        for start in steps:
            end = min(start + dash, length)
            a = (int(p0[0] + (p1[0] - p0[0]) * start / length), int(p0[1] + (p1[1] - p0[1]) * start / length))
            b = (int(p0[0] + (p1[0] - p0[0]) * end / length), int(p0[1] + (p1[1] - p0[1]) * end / length))
            cv2.line(self.image, a, b, color, thickness, cv2.LINE_AA)

    def legend(self, items: list[tuple[str, str, tuple[int, int, int]]]) -> None:
        """Legend entries (kind 'dot' | 'dash' | 'bar' | 'text', label, colour), right-aligned above the plot."""

        x = self.x1
        y = 40
        for kind, label, color in reversed(items):
            (w, _), _ = cv2.getTextSize(label, _FONT, 0.8, 2)
            x -= w
            self.text(label, x, y, 0.8, _INK if kind != "text" else color, valign="center")
            x -= 16
            if kind == "text":
                x += 16
            elif kind == "dot":
                cv2.circle(self.image, (x - 10, y), 9, color, -1, cv2.LINE_AA)
                x -= 20
            elif kind == "bar":
                cv2.rectangle(self.image, (x - 24, y - 9), (x, y + 9), color, -1)
                x -= 24
            else:
                self.dashed_line((x - 44, y), (x, y), color, 4, dash=14, gap=8)
                x -= 44
            x -= 36

    def png(self) -> bytes:
        ok, buf = cv2.imencode(".png", self.image, [cv2.IMWRITE_PNG_COMPRESSION, 6])
        if not ok:
            raise RuntimeError("PNG encoding failed")
        return buf.tobytes()


def score_timeline_png(times: list[float], scores: list[float], thresholds: list[float],
                       flagged: list[bool]) -> bytes:
    """Score of every frame over time, threshold dashed, NG in red; outliers pinned to the top."""

    plot = _Plot()
    t0, t1 = (min(times), max(times)) if times else (time.time() - 60, time.time())
    if t1 - t0 < 10:
        t0, t1 = t0 - 5, t1 + 5
    pad = (t1 - t0) * 0.02
    finite = [s for s in scores if math.isfinite(s)]
    top = max([percentile(finite, 99.5) or 0.0] + [t for t in thresholds if math.isfinite(t)] + [1e-6])
    yt = covering_ticks(0.0, top * 1.08)
    ymax = yt[-1]
    plot.set_limits(t0 - pad, t1 + pad, 0.0, ymax)
    tt, fmt = time_ticks(t0 - pad, t1 + pad)
    day = datetime.fromtimestamp(t0).astimezone()
    plot.axes(
        [(t, datetime.fromtimestamp(t).astimezone().strftime(fmt)) for t in tt],
        [(v, _tick_label(v, yt)) for v in yt],
        f"time ({day.strftime('%Y-%m-%d')}, {day.tzname() or 'local'})", "anomaly score",
        "Score per frame",
    )
    # Threshold: one dashed segment per stretch of constant threshold.
    start = 0
    for i in range(1, len(times) + 1):
        if i == len(times) or thresholds[i] != thresholds[start]:
            left = plot.px(times[start]) if start else plot.x0
            right = plot.px(times[i - 1]) if i < len(times) else plot.x1
            y = plot.py(min(thresholds[start], ymax))
            plot.dashed_line((left, y), (max(right, left + 1), y), _THRESHOLD, 4)
            start = i
    radius = 6 if len(times) < 400 else 4 if len(times) < 4000 else 3
    for draw_flagged in (False, True):  # NG on top
        for t, s, ng in zip(times, scores, flagged):
            if ng != draw_flagged or not math.isfinite(s):
                continue
            x, color = plot.px(t), _NG if ng else _OK
            if s > ymax:  # beyond the axis: a triangle at the top edge
                y = plot.y0
                pts = np.array([[x, y - 2], [x - 8, y + 12], [x + 8, y + 12]], np.int32)
                cv2.fillPoly(plot.image, [pts], color, cv2.LINE_AA)
            else:
                cv2.circle(plot.image, (x, plot.py(s)), radius + (2 if ng else 0), color, -1, cv2.LINE_AA)
    plot.legend([("dot", "OK", _OK), ("dot", "NG", _NG), ("dash", "threshold", _THRESHOLD)])
    return plot.png()


def latency_histogram_png(values_ms: list[float], stage: str = LATENCY_STAGE) -> bytes:
    """Histogram of per-frame latency with the median and 95th percentile marked."""

    plot = _Plot()
    data = np.asarray(values_ms, np.float64)
    p50, p95 = float(np.percentile(data, 50)), float(np.percentile(data, 95))
    hi_data = max(float(np.percentile(data, 99.5)) * 1.05, float(data.min()) + 1e-3)
    lo_data = float(data.min())
    # Start at 0 unless that leaves most of the axis empty (then at a round value below the fastest frame).
    lo_axis = 0.0 if lo_data < 0.4 * hi_data else max(0.0, lo_data - 0.08 * (hi_data - lo_data))
    xt = nice_ticks(lo_axis, hi_data, 7)
    step = xt[1] - xt[0] if len(xt) > 1 else 1.0
    lo = min(xt[0], math.floor(lo_axis / step) * step)
    hi = xt[-1] if xt[-1] >= hi_data else xt[-1] + step
    xt = [v for v in nice_ticks(lo, hi, 7)]
    bins = 40
    counts, edges = np.histogram(np.clip(data, lo, hi - (hi - lo) * 1e-9), bins=bins, range=(lo, hi))
    overflow = int((data > hi).sum())
    yt = [v for v in covering_ticks(0.0, max(1, int(counts.max())) * 1.05, 5) if float(v).is_integer()]
    if len(yt) < 2:
        yt = [0.0, float(max(1, counts.max()))]
    plot.set_limits(lo, hi, 0.0, yt[-1])
    plot.axes([(v, _tick_label(v, xt)) for v in xt], [(v, f"{int(v)}") for v in yt],
              f"{stage} latency per frame (ms)", "frames", "Latency")
    for count, left, right in zip(counts, edges[:-1], edges[1:]):
        if count:
            cv2.rectangle(plot.image, (plot.px(left) + 2, plot.py(count)), (plot.px(right) - 2, plot.y1 - 1),
                          _BAR, -1)
    for value, label, color in ((p50, "median", _INK), (p95, "p95", _NG)):
        x = plot.px(min(value, hi))
        plot.dashed_line((x, plot.y0), (x, plot.y1), color, 3, dash=12, gap=8)
        plot.text(f"{label} {value:.1f} ms", x + 10, plot.y0 + 28 + (34 if label == "p95" else 0), 0.8, color)
    legend = [("bar", "frames per bin", _BAR)]
    if overflow:
        legend.append(("text", f"({overflow} slower than {hi:g} ms counted in the last bar)", _MUTED))
    plot.legend(legend)
    return plot.png()


# ------------------------------------------------------------------------------------------------
# HTML


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
        ("NG", f"{summary['ng']:,}", f"{summary['ng_rate']:.1%} of frames", "ng" if summary["ng"] else ""),
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
    if not notes:
        return []
    return ['<ul class="notes">'] + [f"<li>{_e(n)}</li>" for n in notes] + ["</ul>"]


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
    out += ["</div>", "</div>", "</article>"]
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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_report(run, **options), encoding="utf-8")
    os.replace(tmp, path)
    return path
