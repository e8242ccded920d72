"""One camera's pipeline: capture -> trigger -> dispatcher -> scorer -> localize -> evidence -> publish.

    capture thread ──LatestFrame (1 slot)──▶ dispatcher ──score slots (pipeline.score_queue_size)──▶ scorer
    (newest frame; replaced = dropped)       (trigger: free_run / mqtt / every_frame)               (ROI, score,
                                                                                                     localize, publish)
Flagged inspections are offered to the flagged-frame queue (daemon.flagged_queue) after their
result is published; the scorer never waits for it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..capture.geometry import camera_view, product_box_in_frame, regions_in_frame
from ..capture.reader import Capture
from ..capture.sources import SourceError
from ..capture.triggers import MqttTrigger, Trigger, create_trigger
from ..config import CameraConfig
from ..evidence import EvidenceStore
from ..localize import find_regions
from ..log_limit import LogLimiter
from ..records import Frame, Inspection, Region, ScoreResult, new_inspection_id
from .flagged_queue import FlaggedFrame, FlaggedQueue, UpdateOnce
from .runtime_stats import CameraStats, release_freed_memory

log = logging.getLogger(__name__)


@dataclass
class _Work:
    frame: Frame
    grabbed_monotonic: float


class CameraPipeline:
    """One camera: capture, trigger, dispatcher and scorer threads. The scorer can be swapped live."""

    def __init__(
        self,
        station: str,
        config: CameraConfig,
        pipeline_config,
        scorer,
        publisher,
        flagged: FlaggedQueue | None,
        capture: Capture | None = None,
        trigger: Trigger | None = None,
        stats: CameraStats | None = None,
        evidence: EvidenceStore | None = None,
        drift=None,
        stream=None,
    ):
        self.station = station
        self.config = config
        self.name = config.name
        self.publisher = publisher
        self.flagged = flagged
        self.evidence = evidence
        self.drift = drift  # daemon.drift.DriftMonitor: the product's OK-score window (never raises)
        self.stream = stream  # daemon.stream.StreamService: learning from the OK frames (never raises)
        self.capture = capture or Capture(config.name, config.source, config.reconnect)
        self.trigger = trigger or create_trigger(config.trigger)
        if isinstance(self.trigger, MqttTrigger):
            self.trigger.attach(self.capture.frames)
        self.stats = stats or CameraStats(pipeline_config.latency_window)
        self._scorer = scorer
        self._next_scorer = None
        self._scorer_lock = threading.Lock()
        self.stats.product = scorer.product.name
        self._roi = config.roi_box
        self._resize = config.resize_to
        self._slots_capacity = pipeline_config.score_queue_size
        self._slots = threading.Semaphore(self._slots_capacity)
        self._work: queue.Queue[_Work | None] = queue.Queue()
        self._stop_dispatch = threading.Event()
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name=f"dispatch-{self.name}", daemon=True)
        self._scorer_thread = threading.Thread(target=self._score_loop, name=f"score-{self.name}", daemon=True)
        self.beats = {"dispatch": time.monotonic(), "score": time.monotonic()}
        self._in_flight = 0
        self._log = LogLimiter(log, interval_s=60.0)  # failed inspections and missed triggers: first at once, then counted

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, start_capture: bool = True) -> None:
        if start_capture:
            self.capture.start()
        self._dispatcher.start()
        self._scorer_thread.start()

    def stop_intake(self) -> None:
        """Stop taking new frames; queued ones are still inspected."""
        self._stop_dispatch.set()
        interrupt = getattr(self.trigger, "interrupt", None)
        if interrupt is not None:
            interrupt()

    def drain(self, deadline: float) -> int:
        """Wait for the dispatcher and scorer to finish queued work; returns frames left uninspected."""
        self.stop_intake()
        self._dispatcher.join(max(0.0, deadline - time.monotonic()))
        self._scorer_thread.join(max(0.0, deadline - time.monotonic()))
        if not self._scorer_thread.is_alive():
            return 0
        return sum(1 for work in list(self._work.queue) if work is not None) + self._in_flight

    @property
    def done(self) -> bool:
        """The capture finished (end of replay) and every frame it gave was inspected."""
        return self.capture.finished and not self._dispatcher.is_alive() and not self._scorer_thread.is_alive()

    def swap_scorer(self, scorer) -> None:
        """Use `scorer` from the next frame on (the old one is closed by the scorer thread)."""
        with self._scorer_lock:
            old_pending, self._next_scorer = self._next_scorer, scorer
        if old_pending is not None:
            old_pending.close()

    @property
    def product_name(self) -> str:
        with self._scorer_lock:
            return (self._next_scorer or self._scorer).product.name

    def close_scorer(self) -> None:
        with self._scorer_lock:
            for scorer in {id(s): s for s in (self._scorer, self._next_scorer) if s is not None}.values():
                scorer.close()
            self._next_scorer = None

    def hung_threads(self, now: float, limit: float) -> list[str]:
        hung = []
        for name, thread in (("dispatch", self._dispatcher), ("score", self._scorer_thread)):
            if thread.is_alive() and now - self.beats[name] > limit:
                hung.append(f"{self.name}/{name} ({now - self.beats[name]:.0f}s)")
        return hung

    def snapshot(self) -> dict[str, Any]:
        snap = self.capture.stats()
        snap.update(self.stats.snapshot())
        counters = self.trigger.counters.snapshot()
        snap["trigger"] = self.config.trigger.mode
        snap["triggers"] = counters["triggers"]
        snap["triggers_dropped"] = counters["triggers_dropped"]
        snap["queue_depth"] = {
            "frame": self.capture.frames.pending,
            "triggers": self.trigger.pending(),
            "score": self._work.qsize() + self._in_flight,
        }
        return snap

    # --- dispatcher: trigger -> newest frame -> score slot ------------------------------------

    def _dispatch_loop(self) -> None:
        frames = self.capture.frames
        free_run = self.config.trigger.mode == "free_run"
        try:
            while not self._stop_dispatch.is_set():
                self.beats["dispatch"] = time.monotonic()
                request = self.trigger.next_request(frames, timeout=0.5)
                if request is None:
                    if frames.closed:
                        return
                    continue
                if not self._acquire_slot(wait=not free_run):
                    self.stats.counters.add("ticks_skipped")  # free-run tick while the scorer is busy
                    continue
                grabbed = self._take(request.after_seq, request.frame_timeout_s)
                if grabbed is None:
                    self._slots.release()
                    if request.external:
                        self.stats.counters.add("triggers_missed")
                        self._log.log(
                            logging.WARNING, "trigger missed",
                            "%s: no frame within %.1fs of the trigger (part %s); is the camera streaming? (%s)",
                            self.name, request.frame_timeout_s, request.part_id, self.capture.state.value,
                        )
                    if frames.closed:
                        return
                    continue
                self.trigger.last_seq = grabbed.seq
                frame = Frame(
                    frame_id=grabbed.seq, timestamp=grabbed.timestamp, source=self.name, pixels=grabbed.pixels,
                    part_id=request.part_id, trigger_time=request.trigger_time,
                )
                self._work.put(_Work(frame, grabbed.monotonic))
        finally:
            self.beats["dispatch"] = time.monotonic()
            self._work.put(None)  # the scorer finishes what is queued, then ends

    def _take(self, after_seq: int, timeout: float):
        """frames.take in short waits, so the heartbeat (watchdog) stays fresh during long trigger waits."""
        deadline = time.monotonic() + timeout
        while True:
            grabbed = self.capture.frames.take(after_seq, timeout=max(0.0, min(0.5, deadline - time.monotonic())))
            self.beats["dispatch"] = time.monotonic()
            if grabbed is not None or self.capture.frames.closed or time.monotonic() >= deadline or self._stop_dispatch.is_set():
                return grabbed

    def _acquire_slot(self, wait: bool) -> bool:
        if not wait:
            return self._slots.acquire(blocking=False)
        while not self._stop_dispatch.is_set():
            if self._slots.acquire(timeout=0.5):
                return True
            self.beats["dispatch"] = time.monotonic()
        return False

    # --- scorer: view -> score -> regions -> publish -> flagged hook ---------------------------

    def _score_loop(self) -> None:
        while True:
            self.beats["score"] = time.monotonic()
            try:
                work = self._work.get(timeout=0.5)
            except queue.Empty:
                continue
            if work is None:
                return
            self._in_flight = 1
            try:
                self._inspect(work)
            except Exception as exc:  # noqa: BLE001 - one bad frame must not stop the line
                self._error(f"inspection of frame {work.frame.frame_id} failed: {type(exc).__name__}: {exc}", exc)
            finally:
                self._in_flight = 0
                self._slots.release()

    def _error(self, message: str, exc: BaseException | None = None) -> None:
        """Count every failed inspection; log the first of a kind at once, repeats once a minute with their count."""
        self.stats.counters.add("errors")
        kind = message.split(":")[0] if exc is None else type(exc).__name__
        self._log.log(logging.ERROR, kind, "%s: %s (%d failed inspection(s) so far)", self.name, message,
                      self.stats.counters.get("errors"), exc_info=exc)

    def _current_scorer(self):
        with self._scorer_lock:
            if self._next_scorer is not None:
                old, self._scorer, self._next_scorer = self._scorer, self._next_scorer, None
                self.stats.product = self._scorer.product.name
                log.info("%s: now scoring product %s (calibration %s)", self.name, self._scorer.product.name,
                         self._scorer.product.calibration_id)
                if old is not self._scorer:
                    old.close()
                    release_freed_memory()
            return self._scorer

    def _inspect(self, work: _Work) -> None:
        frame = work.frame
        started = time.monotonic()
        latency = {"queue": (started - work.grabbed_monotonic) * 1000.0}
        scorer = self._current_scorer()
        product = scorer.product

        mark = time.monotonic()
        try:
            view = camera_view(frame.pixels, self._roi, self._resize)
        except SourceError as exc:
            self._error(str(exc))
            return
        latency["preprocess"] = (time.monotonic() - mark) * 1000.0

        mark = time.monotonic()
        result = scorer.score(view, features=self.stream is not None and self.stream.wants(product.name))
        latency["score"] = (time.monotonic() - mark) * 1000.0

        regions: tuple[Region, ...] = ()
        reserved = False
        if result.flagged:
            mark = time.monotonic()
            regions = self._regions_in_frame(result, product, view.shape[:2], frame.pixels.shape[:2])
            latency["localize"] = (time.monotonic() - mark) * 1000.0
            reserved = self.flagged is not None and self.flagged.reserve(float(result.score))
        latency["total"] = (time.monotonic() - work.grabbed_monotonic) * 1000.0

        inspection = Inspection(
            inspection_id=new_inspection_id(),
            station=self.station,
            camera=self.name,
            product=product.name,
            frame_id=frame.frame_id,
            timestamp=frame.timestamp,
            score=float(result.score),
            threshold=float(result.threshold),
            verdict=result.verdict,
            regions=regions,
            part_id=frame.part_id,
            latency_ms={k: round(v, 3) for k, v in latency.items()},
            calibration_id=product.calibration_id,
            calibration_version=product.version,
            model_id=Path(product.scorer_onnx).stem,
            vlm_status="pending" if reserved else "skipped",
        )
        inspection = self._save_evidence(inspection, frame, view, result, product)
        mark = time.monotonic()
        try:
            self.publisher.publish_result(inspection)
        except Exception:
            if reserved:
                self.flagged.release()
            raise
        published = time.monotonic()
        latency["publish"] = (published - mark) * 1000.0
        self.stats.record(latency, inspection.score, result.flagged)
        if self.drift is not None:
            self.drift.observe(product, inspection.score, result.flagged)
        if self.stream is not None:
            self.stream.observe(self.name, product, inspection.inspection_id, result)
        log.debug(
            "inspection %s %s frame %d score %.4f %s total %.1f ms",
            inspection.inspection_id, self.name, frame.frame_id, inspection.score, inspection.verdict,
            (published - work.grabbed_monotonic) * 1000.0,
        )
        if result.flagged:
            self._publish_image(inspection.inspection_id, frame.pixels)
        if reserved:
            self.flagged.put(
                FlaggedFrame(
                    inspection=inspection, frame=frame, view=view, score=result, product=product,
                    publish_update=UpdateOnce(self.publisher, inspection.inspection_id,
                                              self.evidence if inspection.evidence_path else None),
                )
            )

    def _publish_image(self, inspection_id: str, pixels: np.ndarray) -> None:
        """mqtt.publish_images: the flagged frame's JPEG on <prefix>/<station>/image/<id> (QoS 0, not spooled)."""
        config = getattr(self.publisher, "config", None)
        if not getattr(config, "publish_images", False):
            return
        try:
            import cv2

            ok, jpeg = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 85])
            if ok:
                self.publisher.publish_image(inspection_id, jpeg.tobytes())
        except Exception as exc:  # noqa: BLE001 - the image is a courtesy; the result is already spooled
            self._error(f"publishing the image of {inspection_id} failed: {type(exc).__name__}: {exc}", exc)

    def _save_evidence(self, inspection: Inspection, frame: Frame, view: np.ndarray, result: ScoreResult,
                       product) -> Inspection:
        """Queue the evidence (the store keeps every NG); the inspection with its `evidence_path`."""
        if self.evidence is None:
            return inspection
        try:
            map_box = product_box_in_frame(product.roi, view.shape[:2], self._roi, frame.pixels.shape[:2])
            path = self.evidence.save(inspection, frame.pixels, anomaly_map=result.anomaly_map, map_box=map_box)
        except Exception:  # noqa: BLE001 - losing a picture must not lose the result
            log.exception("%s: could not queue the evidence of inspection %s", self.name, inspection.inspection_id)
            return inspection
        return inspection.replace(evidence_path=path) if path is not None else inspection

    def _regions_in_frame(self, result: ScoreResult, product, view_hw, frame_hw) -> tuple[Region, ...]:
        """Regions of the anomaly map, as boxes in the captured frame's pixels."""
        found = find_regions(result.anomaly_map, result.threshold)
        return regions_in_frame(found, result.anomaly_map.shape[-2:], product.roi, view_hw, self._roi, frame_hw)
