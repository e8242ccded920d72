"""Evidence store: files, JSON, map round trip, updates, retention, restart, full disk, back-pressure."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from edge_inspect.config.evidence import EvidenceConfig
from edge_inspect.evidence import EvidenceStore, decode_map_png, encode_map_png, evidence_files
from edge_inspect.records import Inspection, Region


def _photo_with_scratch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A real photo, the same photo with a drawn scratch, and their smoothed difference as the map."""
    good = cv2.cvtColor(skdata.coffee(), cv2.COLOR_RGB2BGR)
    bad = good.copy()
    cv2.line(bad, (250, 120), (330, 190), (20, 20, 20), 5)
    diff = np.abs(bad.astype(np.float32) - good.astype(np.float32)).mean(axis=2)
    anomaly_map = cv2.GaussianBlur(cv2.resize(diff, (128, 96)), (0, 0), 2.0) / 10.0
    return good, bad, anomaly_map.astype(np.float32)


def _overlay(bgr: np.ndarray, anomaly_map: np.ndarray) -> np.ndarray:
    heat = cv2.resize(anomaly_map, (bgr.shape[1], bgr.shape[0]))
    heat = cv2.applyColorMap(np.clip(heat / max(heat.max(), 1e-6) * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(bgr, 0.6, heat, 0.4, 0)


def _inspection(verdict: str = "NG", timestamp: float | None = None, **changes) -> Inspection:
    fields = dict(
        inspection_id=uuid.uuid4().hex, station="line1", camera="cam0", product="cup", frame_id=7,
        timestamp=time.time() if timestamp is None else timestamp, score=2.5 if verdict == "NG" else 0.4,
        threshold=1.0, verdict=verdict,
        regions=(Region(box=(250, 120, 331, 191), area_pct=2.1, peak=2.5, grid_words=("center",)),) if verdict == "NG" else (),
        latency_ms={"score": 31.0},
    )
    fields.update(changes)
    return Inspection(**fields)


def _store(tmp_path: Path, background: bool = False, **config) -> EvidenceStore:
    config.setdefault("min_free_mb", 0)
    return EvidenceStore(EvidenceConfig(dir=str(tmp_path / "evidence"), **config), background=background)


def test_save_writes_frame_overlay_map_and_payload(tmp_path):
    _, bad, anomaly_map = _photo_with_scratch()
    store = _store(tmp_path)
    inspection = _inspection(timestamp=1736812800.0)  # 2025-01-14 00:00 UTC
    path = store.save(inspection, bad, anomaly_map=anomaly_map, overlay=_overlay(bad, anomaly_map))
    assert path == f"20250114/{inspection.inspection_id}.jpg"
    files = evidence_files(store.root, path)
    frame = cv2.imread(str(files["frame"]))
    assert frame.shape == bad.shape
    assert np.abs(frame.astype(int) - bad.astype(int)).mean() < 4  # JPEG at quality 90
    assert cv2.imread(str(files["overlay"])).shape == bad.shape
    body = json.loads(files["json"].read_text())
    assert body["inspection_id"] == inspection.inspection_id
    assert body["verdict"] == "NG" and body["evidence_path"] == path
    assert body["evidence"]["overlay"] == files["overlay"].name
    restored = decode_map_png(files["map"], tuple(body["evidence"]["map_range"]))
    span = anomaly_map.max() - anomaly_map.min()
    assert restored.shape == anomaly_map.shape
    assert np.abs(restored - anomaly_map).max() <= span / 255 * 0.51 + 1e-6
    assert not list(store.root.rglob("*.tmp"))
    assert store.stats()["saved"] == 1 and store.stats()["count"] == 1


def test_ok_frames_only_when_sampled(tmp_path):
    good, _, anomaly_map = _photo_with_scratch()
    assert _store(tmp_path / "a").save(_inspection("OK"), good) is None
    store = _store(tmp_path / "b", save_ok_sample_every=3)
    saved = [store.save(_inspection("OK"), good) for _ in range(7)]
    assert [p is not None for p in saved] == [True, False, False, True, False, False, True]
    disabled = _store(tmp_path / "c", enabled=False)
    assert disabled.save(_inspection("NG"), good, anomaly_map=anomaly_map) is None
    assert not (tmp_path / "c" / "evidence").exists()


def test_update_merges_vlm_verdict(tmp_path):
    _, bad, anomaly_map = _photo_with_scratch()
    store = _store(tmp_path)
    inspection = _inspection()
    path = store.save(inspection, bad, anomaly_map=anomaly_map)
    verdict = {"defect": True, "defect_type": "scratch", "location": ["center"], "description": "dark line",
               "confidence": 0.8, "model": "test", "latency_ms": 900.0}
    store.update(inspection.inspection_id, {"vlm_status": "done", "vlm": verdict})
    store.update("0" * 32, {"vlm_status": "done"})  # unknown id: ignored, not an error
    body = json.loads(evidence_files(store.root, path)["json"].read_text())
    assert body["vlm_status"] == "done" and body["vlm"]["defect_type"] == "scratch"
    assert body["score"] == inspection.score
    assert store.stats()["updated"] == 1 and store.stats()["failed"] == 0


def test_retention_by_count_and_size_deletes_oldest_first(tmp_path):
    _, bad, anomaly_map = _photo_with_scratch()
    store = _store(tmp_path, max_count=3)
    paths = [store.save(_inspection(), bad, anomaly_map=anomaly_map) for _ in range(5)]
    present = [evidence_files(store.root, p)["json"].exists() for p in paths]
    assert present == [False, False, True, True, True]
    assert not evidence_files(store.root, paths[0])["frame"].exists()
    assert store.stats()["count"] == 3 and store.stats()["deleted"] == 2

    entry_bytes = sum(f.stat().st_size for f in evidence_files(store.root, paths[-1]).values())
    by_size = _store(tmp_path / "size", max_mb=entry_bytes * 2.5 / 1e6, max_count=0)
    sized = [by_size.save(_inspection(), bad, anomaly_map=anomaly_map) for _ in range(4)]
    assert by_size.stats()["count"] == 2
    assert [evidence_files(by_size.root, p)["json"].exists() for p in sized] == [False, False, True, True]
    on_disk = sum(f.stat().st_size for f in by_size.root.rglob("*") if f.is_file())
    assert on_disk <= entry_bytes * 2.5


def test_restart_indexes_old_entries_and_drops_cut_off_writes(tmp_path):
    good, bad, anomaly_map = _photo_with_scratch()
    first = _store(tmp_path, max_age_days=1)
    old = first.save(_inspection(timestamp=1736812800.0), bad, anomaly_map=anomaly_map)
    recent = first.save(_inspection(), bad, anomaly_map=anomaly_map)
    two_days_ago = time.time() - 2 * 86400
    for file in evidence_files(first.root, old).values():
        os.utime(file, (two_days_ago, two_days_ago))
    cut_off = first.root / "20250115"
    cut_off.mkdir()
    (cut_off / "deadbeef.jpg").write_bytes(cv2.imencode(".jpg", good)[1].tobytes())  # no JSON: crash mid-write
    (first.root / Path(recent).parent / ".x.jpg.tmp").write_bytes(b"partial")

    second = _store(tmp_path, max_age_days=1)
    assert second.stats()["count"] == 1
    assert not evidence_files(second.root, old)["json"].exists()
    assert not (second.root / "20250114").exists() and not cut_off.exists()  # empty day folders removed
    assert evidence_files(second.root, recent)["json"].exists()
    assert not list(second.root.rglob("*.tmp"))
    second.update(Path(recent).stem, {"vlm_status": "failed"})
    assert json.loads(evidence_files(second.root, recent)["json"].read_text())["vlm_status"] == "failed"


def test_background_writer_and_full_queue_drops_instead_of_blocking(tmp_path):
    _, bad, anomaly_map = _photo_with_scratch()
    store = _store(tmp_path, background=True, queue_size=1)
    assert store.flush(10)  # start-up scan done
    with store._lock:  # hold the writer at its bookkeeping step: the queue cannot drain
        paths = [store.save(_inspection(), bad, anomaly_map=anomaly_map) for _ in range(3)]
    assert store.flush(10)
    stats = store.stats()
    assert paths[2] is None and stats["dropped"] >= 1
    assert stats["saved"] + stats["dropped"] == 3
    for path in filter(None, paths):
        assert evidence_files(store.root, path)["json"].exists()
    store.update(Path(paths[0]).stem, {"vlm_status": "done"})  # queued after its save: applied in order
    store.close()
    assert json.loads(evidence_files(store.root, paths[0])["json"].read_text())["vlm_status"] == "done"
    assert store.save(_inspection(), bad) is None  # closed


def test_write_errors_and_low_disk_are_counted_not_raised(tmp_path):
    _, bad, _ = _photo_with_scratch()
    store = _store(tmp_path)
    inspection = _inspection(timestamp=1736812800.0)
    store.root.mkdir(parents=True)
    (store.root / "20250114").write_text("a file where the day folder should be")
    assert store.save(inspection, bad) is None
    assert store.stats()["failed"] == 1 and "20250114" in store.stats()["last_error"]

    low = EvidenceStore(EvidenceConfig(dir=str(tmp_path / "low"), min_free_mb=1e12), background=False)
    assert low.save(_inspection(), bad) is None
    assert low.stats()["skipped_low_disk"] == 1
    assert "min_free_mb" in low.stats()["last_error"]


@pytest.fixture
def tiny_disk(tmp_path):
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_full_disk_is_counted_and_leaves_no_partial_files(tiny_disk):
    _, bad, anomaly_map = _photo_with_scratch()
    store = EvidenceStore(EvidenceConfig(dir=str(tiny_disk / "evidence"), min_free_mb=0, max_mb=0, max_count=0),
                          background=False)
    results = [store.save(_inspection(), bad, anomaly_map=anomaly_map) for _ in range(12)]
    assert results[0] is not None and results[-1] is None
    stats = store.stats()
    assert stats["failed"] >= 1 and "disk full" in stats["last_error"]
    assert not list(tiny_disk.rglob("*.tmp"))
    for path in results:  # every entry the store reported as saved is complete
        if path is not None:
            assert evidence_files(store.root, path)["json"].exists()
    complete = {p.name.split(".")[0] for p in tiny_disk.rglob("*.json")}
    assert {p.name.split(".")[0] for p in tiny_disk.rglob("*.jpg")} == complete


def test_map_png_handles_flat_and_nan_maps():
    png, (lo, hi) = encode_map_png(np.full((8, 8), 0.5, np.float32))
    assert np.allclose(decode_map_png(png, (lo, hi)), 0.5)
    png, value_range = encode_map_png(np.array([[np.nan, 1.0], [2.0, 3.0]], np.float32))
    assert decode_map_png(png, value_range)[1, 1] == pytest.approx(3.0)


def test_overlay_is_drawn_from_the_map_inside_its_box(tmp_path):
    good, bad, _ = _photo_with_scratch()
    store = _store(tmp_path)
    inspection = _inspection(regions=())
    box = (200, 100, 400, 250)  # the product ROI the scorer saw, in frame pixels; the scratch is inside
    diff = np.abs(bad.astype(np.float32) - good.astype(np.float32)).mean(axis=2)[100:250, 200:400]
    roi_map = cv2.GaussianBlur(cv2.resize(diff, (64, 48)), (0, 0), 1.5) / 10.0
    path = store.save(inspection, bad, anomaly_map=roi_map, map_box=box)
    overlay = cv2.imread(str(evidence_files(store.root, path)["overlay"])).astype(int)
    assert overlay.shape == bad.shape
    hot = np.argwhere(overlay[..., 2] - overlay[..., 0] > 120)  # red: at or above the threshold
    assert len(hot) > 50
    assert hot[:, 1].min() >= 200 and hot[:, 1].max() < 400 and hot[:, 0].min() >= 100 and hot[:, 0].max() < 250


def test_the_overlay_of_a_huge_frame_is_made_at_a_bounded_size_with_the_map_in_its_box(tmp_path):
    """Issue 23: a full-size overlay of a 40 MP frame (float map, colour map, blend) took about 600 MB."""
    from edge_inspect.evidence import OVERLAY_MAX_SIDE

    good, bad, _ = _photo_with_scratch()
    scale = 10  # the 400x600 photo as a 4000x6000 (24 MP) frame
    big = cv2.resize(bad, (bad.shape[1] * scale, bad.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
    diff = np.abs(bad.astype(np.float32) - good.astype(np.float32)).mean(axis=2)[100:250, 200:400]
    roi_map = cv2.GaussianBlur(cv2.resize(diff, (64, 48)), (0, 0), 1.5) / 10.0
    box = (200 * scale, 100 * scale, 400 * scale, 250 * scale)
    region = Region(box=(250 * scale, 120 * scale, 331 * scale, 191 * scale), area_pct=2.1, peak=2.5, grid_words=("center",))
    store = _store(tmp_path)
    path = store.save(_inspection(regions=(region,)), big, anomaly_map=roi_map, map_box=box)
    files = evidence_files(store.root, path)
    overlay = cv2.imread(str(files["overlay"])).astype(int)
    assert max(overlay.shape[:2]) == OVERLAY_MAX_SIDE
    assert cv2.imread(str(files["frame"])).shape == big.shape  # the frame itself is kept at full size
    factor = OVERLAY_MAX_SIDE / max(big.shape[:2])
    hot = np.argwhere(overlay[..., 2] - overlay[..., 0] > 120)
    assert len(hot) > 50
    x0, y0, x1, y1 = (int(v * factor) for v in box)
    assert hot[:, 1].min() >= x0 - 2 and hot[:, 1].max() < x1 + 2 and hot[:, 0].min() >= y0 - 2 and hot[:, 0].max() < y1 + 2
