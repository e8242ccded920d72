"""ROI geometry: every mapping between the captured frame, the camera view and the product box.

    frame (camera pixels) --camera roi crop + resize--> view (what the pipeline scores)
    view --product calibration roi--> product box (what the anomaly map covers)

Boxes are (x0, y0, x1, y1) with x1/y1 exclusive; ROIs are (x, y, width, height); sizes are (height, width).

Example:
    view = camera_view(frame, roi=(100, 40, 640, 480), resize=None)
    box_in_frame = view_to_frame_box((0, 0, 64, 64), view.shape[:2], (100, 40, 640, 480), frame.shape[:2])
"""

from __future__ import annotations

import cv2
import numpy as np

from ..records import Region
from .sources import SourceError


def camera_view(pixels: np.ndarray, roi: tuple[int, int, int, int] | None, resize: tuple[int, int] | None) -> np.ndarray:
    """Crop the camera ROI (x, y, w, h; clipped to the frame) and resize to (width, height)."""

    view = pixels
    if roi is not None:
        x, y, w, h = roi
        H, W = pixels.shape[:2]
        x0, y0, x1, y1 = min(max(0, x), W), min(max(0, y), H), min(W, x + w), min(H, y + h)
        if x1 <= x0 or y1 <= y0:
            raise SourceError(f"camera roi {roi} lies outside the {W}x{H} frame; fix cameras[].roi")
        view = pixels[y0:y1, x0:x1]
    if resize is not None and (view.shape[1], view.shape[0]) != tuple(resize):
        shrink = view.shape[1] > resize[0] or view.shape[0] > resize[1]
        view = cv2.resize(view, tuple(resize), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return np.ascontiguousarray(view)


def view_to_frame_box(
    box: tuple[int, int, int, int],
    view_size: tuple[int, int],
    roi: tuple[int, int, int, int] | None,
    frame_size: tuple[int, int],
) -> tuple[int, int, int, int]:
    """A box (x0, y0, x1, y1) in camera-view pixels -> the same box in frame pixels.

    view_size and frame_size are (height, width); the view is the roi (clipped) resized to view_size.
    """
    H, W = frame_size
    if roi is None:
        x0, y0, cw, ch = 0, 0, W, H
    else:
        x, y, w, h = roi
        x0, y0 = min(max(0, x), W), min(max(0, y), H)
        cw, ch = min(W, x + w) - x0, min(H, y + h) - y0
    sx, sy = cw / view_size[1], ch / view_size[0]
    bx0, by0, bx1, by1 = box
    return (
        x0 + int(bx0 * sx), y0 + int(by0 * sy),
        x0 + min(cw, int(round(bx1 * sx))), y0 + min(ch, int(round(by1 * sy))),
    )


def product_box_in_view(roi: tuple[int, int, int, int] | None, view_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """The part of the camera view the scorer's anomaly map covers (x0, y0, x1, y1): the product's
    calibration ROI (x, y, w, h) clipped to the view as the scorer crops it, or the whole view."""
    height, width = view_hw[:2]
    if roi is None:
        return 0, 0, width, height
    x, y, w, h = roi
    x0, y0 = min(max(0, x), width), min(max(0, y), height)
    return x0, y0, max(x0, min(width, x + w)), max(y0, min(height, y + h))


def product_box_in_frame(product_roi: tuple[int, int, int, int] | None, view_hw: tuple[int, int],
                         camera_roi: tuple[int, int, int, int] | None, frame_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """The frame box (x0, y0, x1, y1) the scorer's anomaly map covers."""
    return view_to_frame_box(product_box_in_view(product_roi, view_hw), view_hw, camera_roi, frame_hw)


def scale_regions(regions: tuple[Region, ...], from_size: tuple[int, int], to_size: tuple[int, int], offset: tuple[int, int] = (0, 0)) -> tuple[Region, ...]:
    """Map regions from the scorer's input resolution (H, W) back to frame pixels (+ ROI offset)."""
    sy, sx = to_size[0] / from_size[0], to_size[1] / from_size[1]
    ox, oy = offset
    out = []
    for r in regions:
        x0, y0, x1, y1 = r.box
        box = (int(x0 * sx) + ox, int(y0 * sy) + oy, int(round(x1 * sx)) + ox, int(round(y1 * sy)) + oy)
        out.append(Region(box=box, area_pct=r.area_pct, peak=r.peak, grid_words=r.grid_words, centroid=(r.centroid[0] * sx + ox, r.centroid[1] * sy + oy)))
    return tuple(out)


def regions_in_frame(found: tuple[Region, ...], map_hw: tuple[int, int], product_roi: tuple[int, int, int, int] | None,
                     view_hw: tuple[int, int], camera_roi: tuple[int, int, int, int] | None,
                     frame_hw: tuple[int, int]) -> tuple[Region, ...]:
    """Regions found on the anomaly map (map_hw pixels) as boxes in the captured frame's pixels."""
    if not found:
        return ()
    x0, y0, x1, y1 = product_box_in_view(product_roi, view_hw)
    in_view = scale_regions(found, map_hw, (y1 - y0, x1 - x0), (x0, y0))
    out = []
    for region in in_view:
        box = view_to_frame_box(region.box, view_hw, camera_roi, frame_hw)
        cx, cy = view_to_frame_box(
            (int(region.centroid[0]), int(region.centroid[1]), int(region.centroid[0]), int(region.centroid[1])),
            view_hw, camera_roi, frame_hw,
        )[:2]
        out.append(Region(box=box, area_pct=region.area_pct, peak=region.peak,
                          grid_words=region.grid_words, centroid=(float(cx), float(cy))))
    return tuple(out)
