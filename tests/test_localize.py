"""Localisation: 3x3 grid words, connected regions of the anomaly map, scaling to frame pixels, overlays."""

from __future__ import annotations

import numpy as np
import pytest

from edge_inspect.capture.geometry import scale_regions
from edge_inspect.localize import REGION_LEVEL, find_regions, grid_words_for, heatmap, overlay
from edge_inspect.records import GRID_WORDS, Region

SIZE = 90  # divisible by 3: cell (r, c) spans rows 30r..30r+29 and columns 30c..30c+29


def _mask(*boxes: tuple[int, int, int, int], shape=(SIZE, SIZE)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    return mask


@pytest.mark.parametrize("cell", range(9))
def test_a_blob_inside_one_cell_gets_that_cells_word(cell):
    r, c = divmod(cell, 3)
    x0, y0 = 30 * c + 8, 30 * r + 8
    assert grid_words_for(_mask((x0, y0, x0 + 12, y0 + 12))) == (GRID_WORDS[cell],)


@pytest.mark.parametrize("shape", [(90, 90), (100, 160), (31, 47)])
def test_every_cell_of_non_square_maps(shape):
    h, w = shape
    rows, cols = np.array_split(np.arange(h), 3), np.array_split(np.arange(w), 3)
    for cell in range(9):
        r, c = divmod(cell, 3)
        mask = np.zeros(shape, bool)
        mask[rows[r][0] : rows[r][-1] + 1, cols[c][0] : cols[c][-1] + 1] = True
        assert grid_words_for(mask) == (GRID_WORDS[cell],)


def test_a_blob_spanning_two_cells_names_both_strongest_first():
    # 20 px wide, 14 in "top left" (x 16..29) and 6 in "top" (x 30..35): 70% / 30%.
    assert grid_words_for(_mask((16, 10, 36, 20))) == ("top left", "top")
    # Mirrored: more of it in "top".
    assert grid_words_for(_mask((24, 10, 44, 20))) == ("top", "top left")


def test_a_band_and_a_blob_over_the_centre_cross():
    assert set(grid_words_for(_mask((0, 40, 90, 50)))) == {"left", "center", "right"}
    four = grid_words_for(_mask((20, 20, 40, 40)))  # 10x10 in each of four cells
    assert set(four) == {"top left", "top", "left", "center"}


def test_small_spill_is_dropped_unless_it_holds_the_peak():
    mask = _mask((5, 5, 32, 25))  # 25 px wide: 25x20 in "top left", a 2-px sliver (7%) in "top"
    assert grid_words_for(mask) == ("top left",)
    weights = np.ones(mask.shape, np.float32)
    weights[10, 31] = 50.0  # the strongest pixel lies in the sliver
    words = grid_words_for(mask, weights)
    assert "top" in words


def test_empty_mask_has_no_words():
    assert grid_words_for(np.zeros((30, 30), bool)) == ()


def _bump(shape, centre, sigma, height) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return height * np.exp(-((yy - centre[1]) ** 2 + (xx - centre[0]) ** 2) / (2 * sigma**2))


def test_find_regions_boxes_peaks_order_and_words():
    shape, threshold = (120, 180), 1.0
    amap = 0.2 + _bump(shape, (30, 25), 6, 2.0) + _bump(shape, (150, 95), 8, 1.5) + _bump(shape, (90, 60), 5, 0.7)
    regions = find_regions(amap.astype(np.float32), threshold)
    assert len(regions) == 2  # the third bump passes REGION_LEVEL but not the threshold: no region
    assert REGION_LEVEL * threshold < 0.2 + 0.7 < threshold
    strong, weak = regions
    assert strong.peak > weak.peak >= threshold
    assert strong.peak == pytest.approx(float(amap.max()), rel=1e-5)
    for region, centre in ((strong, (30, 25)), (weak, (150, 95))):
        x0, y0, x1, y1 = region.box
        assert x0 < centre[0] < x1 and y0 < centre[1] < y1
        assert region.centroid == pytest.approx(centre, abs=1.0)
        inside = np.zeros(shape, bool)
        inside[y0:y1, x0:x1] = True
        above = amap >= REGION_LEVEL * threshold
        near = np.hypot(*(np.mgrid[: shape[0], : shape[1]] - np.array(centre[::-1])[:, None, None])) < 30
        assert np.array_equal(inside & above & near, above & near)  # the box holds the whole blob
        assert region.area_pct == pytest.approx(100.0 * (above & near).sum() / amap.size)
    assert strong.grid_words == ("top left",)
    assert weak.grid_words == ("bottom right",)
    assert weak.to_json()["grid"] == ["bottom right"]


def test_find_regions_edge_cases():
    amap = np.zeros((64, 64), np.float32)
    amap[10:20, 10:20] = 5.0
    amap[40, 40] = 5.0  # one hot pixel: below min_area_px
    assert [r.box for r in find_regions(amap, 1.0)] == [(10, 10, 20, 20)]
    assert len(find_regions(amap, 1.0, min_area_px=1)) == 2
    assert find_regions(amap[None, None], 1.0)[0].box == (10, 10, 20, 20)  # [1,1,H,W] accepted
    assert find_regions(amap, 0.0) == () and find_regions(amap, float("nan")) == ()
    assert find_regions(amap, 6.0) == ()
    many = np.zeros((64, 64), np.float32)
    for i in range(6):
        many[2 + 10 * i : 7 + 10 * i, 5:10] = 2.0 + i
    top = find_regions(many, 1.0, max_regions=3)
    assert [r.peak for r in top] == [7.0, 6.0, 5.0]


def test_scale_regions_to_frame_pixels_with_roi_offset():
    region = Region(box=(64, 32, 128, 96), area_pct=6.25, peak=2.0, grid_words=("top", "center"), centroid=(96.0, 64.0))
    (scaled,) = scale_regions((region,), (256, 256), (512, 1024), offset=(10, 20))
    assert scaled.box == (64 * 4 + 10, 32 * 2 + 20, 128 * 4 + 10, 96 * 2 + 20)
    assert scaled.centroid == pytest.approx((96 * 4 + 10, 64 * 2 + 20))
    assert (scaled.grid_words, scaled.peak, scaled.area_pct) == (region.grid_words, region.peak, region.area_pct)
    assert scale_regions((region,), (256, 256), (256, 256)) == (region,)
    assert scale_regions((), (256, 256), (10, 10)) == ()


def test_heatmap_and_overlay():
    amap = _bump((64, 96), (70, 20), 8, 3.0).astype(np.float32)
    colours = heatmap(amap, 2.0)
    assert colours.shape == (64, 96, 3) and colours.dtype == np.uint8
    assert not np.array_equal(colours[20, 70], colours[60, 5])  # hot and cold differ
    frame = np.full((128, 192, 3), 128, np.uint8)
    regions = scale_regions(find_regions(amap, 2.0), amap.shape, frame.shape[:2])
    out = overlay(frame, amap, 2.0, regions)
    assert out.shape == frame.shape and out.dtype == np.uint8
    assert not np.array_equal(out, frame)
    x0, y0, x1, y1 = regions[0].box
    assert tuple(out[y0 + (y1 - y0) // 2, x0]) == (0, 0, 255)  # the red box edge
