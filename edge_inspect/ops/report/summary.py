"""The run's numbers: counts, rates, latency percentiles per stage (also what the demo prints)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterable

import numpy as np

from .load import ResultRow

LATENCY_STAGE = "total"  # the stage the histogram shows; the table lists every stage


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
        "vlm_downgraded": sum(row.downgraded for row in rows),  # scorer NG the VLM turned OK (decided_by vlm)
        "final_ng": sum(row.final_verdict == "NG" for row in rows),
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
