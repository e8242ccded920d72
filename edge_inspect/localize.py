"""Anomaly map -> regions (box, area, peak) with 3x3 grid words, and heatmap overlays.

Example:
    regions = find_regions(result.anomaly_map, result.threshold)
    cv2.imwrite("overlay.png", overlay(frame_bgr, result.anomaly_map, result.threshold, regions))
"""

from __future__ import annotations

import cv2
import numpy as np

from .records import GRID_WORDS, Region

# A region is the connected area where the map exceeds this fraction of the threshold. Below 1.0 so a
# region shows the whole defect, not just its peak.
REGION_LEVEL = 0.75


def grid_words_for(mask: np.ndarray, weights: np.ndarray | None = None) -> tuple[str, ...]:
    """The 3x3 grid cells a region covers, strongest first. A cell counts if it holds >= 15% of the
    region's mass or >= 35% of the strongest cell's mass (so a region spread evenly over many cells
    names all of them), or holds its peak."""
    h, w = mask.shape
    weight = mask.astype(np.float32) if weights is None else np.where(mask, weights, 0).astype(np.float32)
    total = float(weight.sum())
    if total <= 0:
        return ()
    rows = np.array_split(np.arange(h), 3)
    cols = np.array_split(np.arange(w), 3)
    mass = np.array([[weight[r[0] : r[-1] + 1, c[0] : c[-1] + 1].sum() for c in cols] for r in rows]).ravel()
    peak_y, peak_x = np.unravel_index(int(np.argmax(weight)), weight.shape)
    peak_cell = min(2, peak_y * 3 // h) * 3 + min(2, peak_x * 3 // w)
    strongest = float(mass.max())
    cells = [i for i in np.argsort(-mass) if mass[i] > 0 and (mass[i] / total >= 0.15 or mass[i] >= 0.35 * strongest or i == peak_cell)]
    return tuple(GRID_WORDS[i] for i in cells)


def grid_cells_touched(mask: np.ndarray) -> frozenset[str]:
    """Every 3x3 grid cell holding at least one pixel of `mask`: the ground truth side of MMAD's
    localisation accuracy (a flagged part counts as localised when its reported cells overlap these)."""
    h, w = mask.shape
    rows = np.array_split(np.arange(h), 3)
    cols = np.array_split(np.arange(w), 3)
    return frozenset(
        GRID_WORDS[i * 3 + j] for i, r in enumerate(rows) for j, c in enumerate(cols) if mask[r[0] : r[-1] + 1, c[0] : c[-1] + 1].any()
    )


def find_regions(anomaly_map: np.ndarray, threshold: float, min_area_px: int = 16, max_regions: int = 8) -> tuple[Region, ...]:
    """Connected components of the map above REGION_LEVEL x threshold that reach the threshold."""
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if amap.ndim == 4:
        amap = amap[0, 0]
    if threshold <= 0 or not np.isfinite(threshold):
        return ()
    h, w = amap.shape
    binary = (amap >= REGION_LEVEL * threshold).astype(np.uint8)
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(binary, connectivity=8)
    regions = []
    for label in range(1, count):
        x, y, bw, bh, area = (int(v) for v in stats[label])
        if area < min_area_px:
            continue
        mask = labels == label
        peak = float(amap[mask].max())
        if peak < threshold:
            continue
        words = grid_words_for(mask, amap)
        regions.append(
            Region(
                box=(x, y, x + bw, y + bh),
                area_pct=100.0 * area / (h * w),
                peak=peak,
                grid_words=words,
                centroid=(float(centroids[label][0]), float(centroids[label][1])),
            )
        )
    regions.sort(key=lambda r: -r.peak)
    return tuple(regions[:max_regions])


def heatmap(anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """Colour map (BGR) where the threshold sits at 2/3 of the colour scale: OK areas stay blue-green."""
    scale = max(float(threshold) * 1.5, 1e-6)
    norm = np.clip(np.asarray(anomaly_map, np.float32) / scale, 0, 1)
    return cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)


def overlay(bgr: np.ndarray, anomaly_map: np.ndarray, threshold: float, regions: tuple[Region, ...] = (), alpha: float = 0.45) -> np.ndarray:
    """Heatmap blended over the image with region boxes and grid words. Regions in `bgr` pixels."""
    h, w = bgr.shape[:2]
    amap = np.asarray(anomaly_map, np.float32)
    if amap.shape != (h, w):
        amap = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
    out = cv2.addWeighted(bgr, 1 - alpha, heatmap(amap, threshold), alpha, 0)
    thickness = max(1, round(min(h, w) / 200))
    for r in regions:
        x0, y0, x1, y1 = r.box
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), (255, 255, 255), thickness + 1)
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), (0, 0, 255), thickness)
        label = f"{r.peak:.2f} {', '.join(r.grid_words[:2])}"
        scale = max(0.35, min(h, w) / 700)
        ty = y0 - 4 if y0 > 14 else y1 + 14
        cv2.putText(out, label, (x0, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
        cv2.putText(out, label, (x0, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return out
