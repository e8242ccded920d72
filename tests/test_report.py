"""Run report: loading evidence and stream logs, summary numbers, plots, and an HTML page that is
well-formed, self-contained, and renders to something a person can read (headless Chromium)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from edge_inspect.capture.geometry import scale_regions
from edge_inspect.config.evidence import EvidenceConfig
from edge_inspect.evidence import EvidenceStore
from edge_inspect.localize import find_regions, overlay
from edge_inspect.mqtt.payloads import result_payload, stats_payload, update_payload, vlm_update
from edge_inspect.ops.report import (
    latency_histogram_png,
    load_run,
    nice_ticks,
    parse_since,
    render_report,
    score_timeline_png,
    summarize,
    time_ticks,
    write_report,
)
from edge_inspect.records import Inspection, Verdict

START = 1736841600.0  # 2025-01-14 08:00 UTC


def _defect_map(good: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """A stand-in anomaly map: the smoothed difference to the good part, at a scorer-like 128x96."""
    diff = np.abs(frame.astype(np.float32) - good.astype(np.float32)).mean(axis=2)
    return (cv2.GaussianBlur(cv2.resize(diff, (128, 96), interpolation=cv2.INTER_AREA), (0, 0), 1.5) / 12.0).astype(np.float32)


def make_run(folder: Path, frames: int = 48, with_evidence: bool = True, seed: int = 3) -> tuple[Path, Path, list[str]]:
    """A recorded run on a real photo: drawn scratches and spots are the defects, every result and
    update payload built by edge_inspect.mqtt.payloads, evidence written by EvidenceStore.

    Returns (evidence folder, results JSONL, inspection ids of the NG frames)."""
    rng = np.random.default_rng(seed)
    good = cv2.cvtColor(skdata.coffee(), cv2.COLOR_RGB2BGR)
    threshold = 1.0
    store = EvidenceStore(EvidenceConfig(dir=str(folder / "evidence"), min_free_mb=0), background=False)
    lines: list[str] = []
    flagged_ids: list[str] = []
    seq = update_seq = 0
    for i in range(frames):
        frame = np.clip(good.astype(np.int16) + rng.normal(0, 3, good.shape), 0, 255).astype(np.uint8)
        defect = i % 6 == 4
        if defect:
            x, y = int(rng.integers(120, 480)), int(rng.integers(60, 330))
            if i % 12 == 4:
                cv2.line(frame, (x, y), (x + int(rng.integers(40, 90)), y + int(rng.integers(-40, 40))), (25, 25, 30), 4)
            else:
                cv2.circle(frame, (x, y), int(rng.integers(8, 16)), (200, 210, 220), -1)
        anomaly_map = _defect_map(good, frame)
        score = float(anomaly_map.max())
        regions = scale_regions(find_regions(anomaly_map, threshold), anomaly_map.shape, frame.shape[:2])
        verdict = "NG" if score >= threshold else "OK"
        total = float(38 + rng.gamma(2.0, 4.0) + (25 if verdict == "NG" else 0))
        inspection = Inspection(
            inspection_id=uuid.uuid4().hex, station="line1", camera="cam-top", product="cup-a",
            frame_id=1000 + i, timestamp=START + i * 12.5 + rng.uniform(0, 2), score=score, threshold=threshold,
            verdict=verdict, regions=regions if verdict == "NG" else (), part_id=f"P-{2400 + i}",
            latency_ms={"queue": 1.2, "preprocess": 3.1, "score": total - 9, "total": total},
            calibration_id="cal-7f3a", model_id="cup-a-5d1c", vlm_status="pending" if verdict == "NG" else "skipped",
        )
        if verdict == "NG":
            flagged_ids.append(inspection.inspection_id)
            if with_evidence:
                heat = cv2.resize(anomaly_map, (frame.shape[1], frame.shape[0]))
                path = store.save(inspection, frame, anomaly_map=anomaly_map,
                                  overlay=overlay(frame, heat, threshold, inspection.regions))
                inspection = inspection.replace(evidence_path=path)
        seq += 1
        lines.append(json.dumps(result_payload(inspection, seq)))
        if verdict == "NG":
            if len(flagged_ids) % 4 == 3:
                update = vlm_update("failed", error="VLM queue full; frame skipped")
            else:
                scratch = i % 12 == 4
                update = vlm_update("done", Verdict(
                    defect=True, defect_type="scratch" if scratch else "contamination",
                    location=tuple(regions[0].grid_words) if regions else ("center",),
                    description="A dark linear mark across the rim <about 3 mm> & a 'burr'." if scratch
                    else "A pale round spot on the surface.",
                    confidence=0.82 if scratch else 0.64, model="qwen2-vl-2b-q4", latency_ms=1830.0))
            update_seq += 1
            lines.append(json.dumps(update_payload(inspection.inspection_id, "line1", update_seq, update,
                                                   timestamp=inspection.timestamp + 2)))
            if with_evidence:
                store.update(inspection.inspection_id, update)
    lines.insert(5, lines[3])  # a duplicate delivery (QoS 1)
    lines.append("not json at all")
    lines.append(json.dumps({"received": frames, "distinct": frames, "ok": True}))  # `listen --json` summary
    lines.append(json.dumps(stats_payload("line1", {"frames": frames, "stream": {
        "enabled": True, "products": {"coin": {"stored": 57, "committed": 2, "not_committed": 1, "last_refit": {
            "committed": True, "version": 4, "reason": "40 of 46 candidate frames joined the bank"}}}}},
        {"dropped": 0}, timestamp=START + 900)))
    results = folder / "results.jsonl"
    results.write_text("\n".join(lines) + "\n")
    return folder / "evidence", results, flagged_ids


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _StrictChecker(HTMLParser):
    """Fails on unclosed or mis-nested tags; collects img sources and every URL-bearing attribute."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, tuple[int, int]]] = []
        self.errors: list[str] = []
        self.images: list[dict[str, str]] = []
        self.urls: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        values = dict(attrs)
        if tag == "img":
            self.images.append(values)
        for name in ("src", "href", "action", "srcset", "poster", "data"):
            if values.get(name):
                self.urls.append(values[name])
        if values.get("style") and "url(" in values["style"]:
            self.urls.append(values["style"])
        if tag not in VOID:
            self.stack.append((tag, self.getpos()))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag in VOID:
            self.errors.append(f"end tag for void element </{tag}> at {self.getpos()}")
        elif not self.stack or self.stack[-1][0] != tag:
            self.errors.append(f"</{tag}> at {self.getpos()} does not close {self.stack[-1] if self.stack else 'anything'}")
        else:
            self.stack.pop()

    def close(self):
        super().close()
        self.errors += [f"<{tag}> opened at {pos} is never closed" for tag, pos in self.stack]


def check_html(text: str) -> _StrictChecker:
    checker = _StrictChecker()
    checker.feed(text)
    checker.close()
    assert not checker.errors, checker.errors[:5]
    assert text.startswith("<!DOCTYPE html>")
    for image in checker.images:
        assert image.get("src", "").startswith(("data:image/png;base64,", "data:image/jpeg;base64,")), image.get("src", "")[:60]
        assert image.get("alt"), "every image needs alt text"
    for url in checker.urls:
        assert url.startswith(("data:", "#")), f"not self-contained: {url[:80]}"
    assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", re.sub(r'src="data:[^"]*"', "", text)), \
        "an external URL in the page"
    assert "script" not in checker.tags and "link" not in checker.tags and "iframe" not in checker.tags
    return checker


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"))


def test_stream_and_evidence_are_joined_by_inspection_id(recorded):
    evidence, results, flagged_ids = recorded
    run = load_run(evidence_dir=evidence, results_file=results)
    assert len(run.rows) == 48 and run.duplicates == 1 and run.skipped_lines == 1
    assert run.stats is not None and run.stats["type"] == "stats"
    ng = [row for row in run.rows if row.flagged]
    assert [row.inspection_id for row in ng] == flagged_ids
    assert all({"frame", "overlay", "map"} <= set(row.files) for row in ng)
    assert [row.time for row in run.rows] == sorted(row.time for row in run.rows)
    statuses = {row.payload["vlm_status"] for row in ng}
    assert statuses == {"done", "failed"}
    summary = summarize(run.rows)
    assert summary["frames"] == 48 and summary["ng"] == len(flagged_ids) and summary["ok"] == 48 - len(flagged_ids)
    assert summary["products"]["cup-a"]["thresholds"] == [1.0]
    assert set(summary["defect_types"]) <= {"scratch", "contamination"} and summary["defect_types"]
    assert summary["latency_ms"]["p50"] <= summary["latency_ms"]["p95"] <= summary["latency_ms"]["max"]

    only_evidence = load_run(evidence_dir=evidence)
    assert [row.inspection_id for row in only_evidence.rows] == flagged_ids  # NG only: OK frames are not kept
    assert {row.payload["vlm_status"] for row in only_evidence.rows} == {"done", "failed"}
    only_stream = load_run(results_file=results)
    assert len(only_stream.rows) == 48 and not any(row.files for row in only_stream.rows)


def test_since_and_until_select_a_time_window(recorded):
    evidence, results, _ = recorded
    window = load_run(evidence_dir=evidence, results_file=results, since=START + 100, until=START + 300)
    assert window.rows and all(START + 100 <= row.time <= START + 300 for row in window.rows)
    assert len(window.rows) < 48
    assert parse_since("2h", now=10000.0) == 10000.0 - 7200
    assert parse_since("2025-01-14T08:00:00Z") == START
    with pytest.raises(Exception, match="--since"):
        parse_since("yesterday-ish")


def test_html_is_well_formed_and_self_contained(recorded, tmp_path):
    evidence, results, flagged_ids = recorded
    run = load_run(evidence_dir=evidence, results_file=results)
    text = write_report(run, tmp_path / "r" / "report.html").read_text()
    checker = check_html(text)
    # 2 plots + frame and overlay for every flagged frame
    assert len(checker.images) == 2 + 2 * len(flagged_ids)
    for inspection_id in flagged_ids:
        assert f'id="i-{inspection_id}"' in text and f'href="#i-{inspection_id}"' in text
    assert "contamination" in text and "VLM queue full" in text and "cal-7f3a" in text
    assert "&lt;about 3 mm&gt; &amp; a &#x27;burr&#x27;" in text  # model text is escaped, never markup
    assert "product coin: 57 candidate frames stored, 2 refits committed, 1 not; last refit: version 4" in text
    assert text.count("<tr class=") == 48

    limited = render_report(run, max_images=2, max_rows=10)
    checker = check_html(limited)
    assert len(checker.images) == 2 + 2 * 2 and limited.count("<tr class=") == 10
    assert f"the 2 most anomalous of {len(flagged_ids)}" in limited


def test_empty_and_stream_only_reports_are_valid(recorded, tmp_path):
    _, results, _ = recorded
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    check_html(render_report(load_run(results_file=empty)))
    text = render_report(load_run(results_file=results))
    checker = check_html(text)
    assert len(checker.images) == 2 and "No image saved" in text


def test_missing_inputs_are_user_errors(tmp_path):
    from edge_inspect.errors import UserError

    with pytest.raises(UserError, match="--evidence"):
        load_run(evidence_dir=tmp_path / "nope")
    with pytest.raises(UserError, match="--results"):
        load_run(results_file=tmp_path / "nope.jsonl")
    with pytest.raises(UserError):
        load_run()


def test_plots_have_ink_in_the_plot_area_and_axes():
    times = [START + i * 10 for i in range(50)]
    scores = [0.5 + 0.1 * np.sin(i) for i in range(50)]
    scores[20] = 1.6
    scores[30] = 40.0  # outlier: pinned to the top edge, does not squash the rest
    png = score_timeline_png(times, scores, [1.0] * 50, [s >= 1.0 for s in scores])
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (560, 1600, 3)
    red = (image[..., 2] > 180) & (image[..., 1] < 80) & (image[..., 0] < 80)
    assert red.sum() > 100  # NG dots
    orange = (image[..., 2] > 230) & (image[..., 1] > 110) & (image[..., 1] < 170) & (image[..., 0] < 40)
    assert orange.sum() > 200  # threshold line
    rows = np.nonzero(red.any(axis=1))[0]
    assert rows.min() < 120  # the outlier triangle sits at the top of the plot area

    png = latency_histogram_png(list(np.random.default_rng(0).gamma(3.0, 8.0, 500)))
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    bars = (np.abs(image.astype(int) - (196, 143, 74)).sum(axis=2) < 10)
    assert bars.sum() > 20000


def test_tick_helpers():
    assert nice_ticks(0, 1.37) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]
    assert nice_ticks(0, 97, 6) == [0, 20, 40, 60, 80]
    ticks, fmt = time_ticks(START, START + 600)
    assert fmt == "%H:%M" and len(ticks) >= 4 and all(START <= t <= START + 600 for t in ticks)
    assert all(round(t) % 60 == 0 for t in ticks)
    ticks, fmt = time_ticks(START, START + 30)
    assert fmt == "%H:%M:%S"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (apt-get install chromium) to render the page")
def test_report_renders_in_headless_chromium(recorded, tmp_path):
    evidence, results, _ = recorded
    page = write_report(load_run(evidence_dir=evidence, results_file=results), tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1280,2000",
             "--hide-scrollbars", page.resolve().as_uri()],
            capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": profile},
        )
    assert shot.exists(), result.stderr[-2000:]
    image = cv2.imread(str(shot))
    assert image.shape[:2] == (2000, 1280)
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    assert gray.std() > 20, "screenshot is blank"
    ink_rows = (gray < 200).any(axis=1)
    assert ink_rows[:200].any() and ink_rows[1000:].any(), "content missing at the top or further down"
    red = (image[..., 2] > 180) & (image[..., 1] < 80) & (image[..., 0] < 80)
    assert red.sum() > 50, "no NG marks visible (plot dots, badges)"
