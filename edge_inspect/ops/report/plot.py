"""Plots drawn with OpenCV (no matplotlib on an edge box): score timeline and latency histogram as PNG."""

from __future__ import annotations

import math
import time
from datetime import datetime, timedelta

import cv2
import numpy as np

from .summary import LATENCY_STAGE, percentile

# Plot colours (BGR) and geometry, drawn at 2x.
_INK = (51, 41, 33)


_MUTED = (128, 116, 107)


_GRID = (236, 231, 228)


_OK = (180, 130, 60)


_NG = (40, 40, 214)


_THRESHOLD = (0, 140, 255)


_BAR = (196, 143, 74)


_FONT = 0  # cv2.FONT_HERSHEY_SIMPLEX


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
