"""The daemon: wires capture -> trigger -> scorer -> localize -> evidence -> publish (+ the VLM stage).

Per camera three threads, connected by bounded hand-offs so nothing downstream can stall capture:

    capture thread ──LatestFrame (1 slot)──▶ dispatcher ──score slots (pipeline.score_queue_size)──▶ scorer
    (newest frame; replaced = dropped)       (trigger: free_run / mqtt / every_frame)               (ROI, score,
                                                                                                     localize, publish)
Every inspection the evidence store keeps (every NG) is queued for its background writer before the
result is published, so the result carries its `evidence_path`. Flagged inspections are offered to
an optional `FlaggedSink` through a bounded queue: when it is full the result says vlm_status
"skipped" and the miss is counted; the scorer never waits for it. With `vlm.enabled` the sink is a
`vlm.VlmStage`, whose verdicts are published as result updates and merged into the evidence. The main thread handles signals (SIGTERM/SIGINT drain and exit, SIGHUP
reloads config and calibrations keeping the MQTT session), feeds the systemd watchdog only while
every pipeline thread makes progress, and publishes stats and STATUS=.

Example:
    config = load_config("/etc/edge-inspect/line1.yaml")
    exit_code = Daemon(config, config_path="/etc/edge-inspect/line1.yaml").run()
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..capture.geometry import camera_view, product_box_in_frame, regions_in_frame
from ..capture.reader import Capture, CaptureState
from ..capture.sources import SourceError
from ..config import AppConfig, CameraConfig, load_config
from ..errors import ConfigError, UserError
from ..evidence import EvidenceStore
from ..localize import find_regions
from ..records import Frame, Inspection, Region, ScoreResult, new_inspection_id
from .sdnotify import Notifier
from .runtime_stats import CameraStats, Counters
from ..capture.triggers import MqttTrigger, Trigger, create_trigger

log = logging.getLogger(__name__)

_TICK_S = 0.25  # main loop period: signals, watchdog, stats
_STATUS_EVERY_S = 2.0
_HANG_LIMIT_S = 30.0  # a pipeline thread without progress this long is hung (without a systemd watchdog)
# Config sections a SIGHUP does not apply: they hold the MQTT session, the spool, the evidence store and
# the loaded VLM, which live as long as the process.
_RESTART_ONLY = ("station", "mqtt", "spool", "evidence", "vlm")


@dataclass(frozen=True)
class FlaggedFrame:
    """What the explanation stage gets for one flagged inspection (its result is already published)."""

    inspection: Inspection  # as published, vlm_status "pending"
    frame: Frame  # the full captured frame
    view: np.ndarray  # the camera view that was scored (ROI crop, resize), BGR
    score: ScoreResult  # anomaly map at the scorer's input resolution
    product: Any  # scoring.ProductCalibration of the scorer that flagged it
    publish_update: Callable[[dict], bool]  # publishes .../result/update for this id; only the first call counts


# The hook the VLM stage implements: called on the daemon's flagged-frame thread, one item at a time;
# it may take seconds; it calls item.publish_update(payloads.vlm_update(...)) once. If it raises, or the
# daemon stops first, the daemon publishes the update itself (failed / skipped), so every pending
# result gets exactly one update.
FlaggedSink = Callable[[FlaggedFrame], None]


class UpdateOnce:
    """publish_update for one inspection that lets only the first update through (later ones are logged).

    The update is also merged into the inspection's evidence JSON when `evidence` is given.
    """

    def __init__(self, publisher, inspection_id: str, evidence: EvidenceStore | None = None):
        self._publisher = publisher
        self.inspection_id = inspection_id
        self._evidence = evidence
        self._lock = threading.Lock()
        self.sent = False

    def __call__(self, update: dict) -> bool:
        with self._lock:
            if self.sent:
                log.warning("a second update for inspection %s was ignored: %s", self.inspection_id, update.get("vlm_status"))
                return False
            self.sent = True
        self._publisher.publish_update(self.inspection_id, update)
        if self._evidence is not None:
            try:
                self._evidence.update(self.inspection_id, update)
            except Exception:  # noqa: BLE001 - the update is published; its copy on disk is a convenience
                log.exception("could not merge the update of inspection %s into its evidence", self.inspection_id)
        return True


class FlaggedQueue:
    """A bounded queue in front of the FlaggedSink. `reserve()` never waits: full means skipped."""

    def __init__(self, capacity: int, sink: FlaggedSink):
        self.capacity = capacity
        self._sink = sink
        self._slots = threading.Semaphore(capacity)
        self._items: queue.Queue[FlaggedFrame | None] = queue.Queue()
        self.counters = Counters("offered", "skipped", "explained", "sink_errors", "abandoned")
        self._thread = threading.Thread(target=self._run, name="flagged-sink", daemon=True)
        self._busy = False
        self._current: FlaggedFrame | None = None
        self._reserved = 0  # slots taken and not yet released (reserved, queued or in the sink)
        self._reserved_lock = threading.Lock()
        self.last_beat = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def reserve(self) -> bool:
        if self._slots.acquire(blocking=False):
            with self._reserved_lock:
                self._reserved += 1
            self.counters.add("offered")
            return True
        self.counters.add("skipped")
        return False

    def release(self) -> None:
        with self._reserved_lock:
            self._reserved -= 1
        self._slots.release()

    def outstanding(self) -> int:
        """Items reserved and not yet handed to the sink (or still in it); 0 = idle."""
        with self._reserved_lock:
            return self._reserved

    def put(self, item: FlaggedFrame) -> None:
        self._items.put(item)

    def depth(self) -> int:
        return self._items.qsize() + int(self._busy)

    def _run(self) -> None:
        while True:
            self.last_beat = time.monotonic()
            try:
                item = self._items.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                return
            self._busy, self._current = True, item
            try:
                self._sink(item)
                self.counters.add("explained")
            except Exception:  # noqa: BLE001 - a sink bug must not stop the daemon
                self.counters.add("sink_errors")
                log.exception("the flagged-frame sink failed on inspection %s", item.inspection.inspection_id)
                _safe_update(item, {"vlm_status": "failed", "error": "the explanation stage raised an error (see the daemon log)"})
            finally:
                self._busy, self._current = False, None
                self.release()

    def close(self, deadline: float) -> None:
        """Let the item in progress finish until `deadline`; items not started get vlm_status skipped."""
        abandoned: list[FlaggedFrame] = []
        while True:
            try:
                item = self._items.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                abandoned.append(item)
        for item in abandoned:
            self.counters.add("abandoned")
            _safe_update(item, {"vlm_status": "skipped", "error": "the daemon stopped before the explanation stage ran"})
        self._items.put(None)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        current = self._current
        if self._thread.is_alive() and current is not None:
            self.counters.add("abandoned")
            log.warning("stopping while inspection %s is being explained; its update says skipped",
                        current.inspection.inspection_id)
            _safe_update(current, {"vlm_status": "skipped", "error": "the daemon stopped during the explanation"})


def _safe_update(item: FlaggedFrame, update: dict) -> None:
    try:
        item.publish_update(update)
    except Exception:  # noqa: BLE001
        log.exception("could not publish the update for inspection %s", item.inspection.inspection_id)


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
    ):
        self.station = station
        self.config = config
        self.name = config.name
        self.publisher = publisher
        self.flagged = flagged
        self.evidence = evidence
        self.capture = capture or Capture(config.name, config.source, config.reconnect)
        self.trigger = trigger or create_trigger(config.trigger)
        if isinstance(self.trigger, MqttTrigger):
            self.trigger.attach(self.capture.frames)
        self.stats = stats or CameraStats(pipeline_config.latency_window)
        self._scorer = scorer
        self._next_scorer = None
        self._scorer_lock = threading.Lock()
        self.stats.product = scorer.product.name
        self._roi = (config.roi.x, config.roi.y, config.roi.width, config.roi.height) if config.roi else None
        self._resize = tuple(config.resize) if config.resize else None
        self._slots_capacity = pipeline_config.score_queue_size
        self._slots = threading.Semaphore(self._slots_capacity)
        self._work: queue.Queue[_Work | None] = queue.Queue()
        self._stop_dispatch = threading.Event()
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name=f"dispatch-{self.name}", daemon=True)
        self._scorer_thread = threading.Thread(target=self._score_loop, name=f"score-{self.name}", daemon=True)
        self.beats = {"dispatch": time.monotonic(), "score": time.monotonic()}
        self._in_flight = 0
        self._error_logged: dict[str, float] = {}

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
                        log.warning(
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
        """Count every failed inspection; log the first of a kind at once, repeats once a minute."""
        self.stats.counters.add("errors")
        now = time.monotonic()
        kind = message.split(":")[0] if exc is None else type(exc).__name__
        last = self._error_logged.get(kind)
        if last is not None and now - last < 60.0:
            return
        self._error_logged[kind] = now
        total = self.stats.counters.get("errors")
        log.error("%s: %s (%d failed inspection(s) so far)", self.name, message, total, exc_info=exc)

    def _current_scorer(self):
        with self._scorer_lock:
            if self._next_scorer is not None:
                old, self._scorer, self._next_scorer = self._scorer, self._next_scorer, None
                self.stats.product = self._scorer.product.name
                log.info("%s: now scoring product %s (calibration %s)", self.name, self._scorer.product.name,
                         self._scorer.product.calibration_id)
                if old is not self._scorer:
                    old.close()
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
        result = scorer.score(view)
        latency["score"] = (time.monotonic() - mark) * 1000.0

        regions: tuple[Region, ...] = ()
        reserved = False
        if result.flagged:
            mark = time.monotonic()
            regions = self._regions_in_frame(result, product, view.shape[:2], frame.pixels.shape[:2])
            latency["localize"] = (time.monotonic() - mark) * 1000.0
            reserved = self.flagged is not None and self.flagged.reserve()
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
        log.debug(
            "inspection %s %s frame %d score %.4f %s total %.1f ms",
            inspection.inspection_id, self.name, frame.frame_id, inspection.score, inspection.verdict,
            (published - work.grabbed_monotonic) * 1000.0,
        )
        if reserved:
            self.flagged.put(
                FlaggedFrame(
                    inspection=inspection, frame=frame, view=view, score=result, product=product,
                    publish_update=UpdateOnce(self.publisher, inspection.inspection_id,
                                              self.evidence if inspection.evidence_path else None),
                )
            )

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


class Daemon:
    """The `edge-inspect run` process. `run()` blocks until stopped and returns the exit code.

    With `vlm.enabled` (and no `flagged_sink` given) it builds the VLM stage itself; the evidence
    store comes from `config.evidence`.
    """

    def __init__(
        self,
        config: AppConfig,
        config_path: str | Path | None = None,
        flagged_sink: FlaggedSink | None = None,
        notifier: Notifier | None = None,
    ):
        self.config = config
        self.config_path = Path(config_path) if config_path else None
        self.notifier = notifier or Notifier.from_environment()
        self._flagged_sink = flagged_sink
        self.flagged: FlaggedQueue | None = None
        self.vlm_stage = None  # vlm.VlmStage when vlm.enabled
        self.evidence: EvidenceStore | None = None
        self.publisher = None
        self.pipelines: dict[str, CameraPipeline] = {}
        self.counters = Counters("reloads", "reload_errors", "product_switches", "product_switch_errors", "triggers_unused")
        self._product_override: str | None = None
        self._product_lock = threading.Lock()
        self._pipelines_lock = threading.Lock()
        self._stop_requested = threading.Event()
        self._reload_requested = threading.Event()
        self._wake = threading.Event()
        self._started_at = time.monotonic()
        self._stopping = False
        self._hung_logged = False

    # --- entry point --------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        config = self.config
        log.info("edge-inspect daemon starting: station %s, %d camera(s)", config.station, len(config.cameras))
        scorers = {camera.name: self._load_scorer(camera.product) for camera in config.cameras}
        try:
            from ..mqtt.publisher import ResultPublisher

            captures = {camera.name: Capture(camera.name, camera.source, camera.reconnect, on_state=self._on_capture_state)
                        for camera in config.cameras}
            for capture in captures.values():
                capture.check()
            self.publisher = ResultPublisher(
                config.mqtt, config.spool, config.station,
                on_trigger=self._on_trigger, on_product_set=self._on_product_set,
            )
            if self._flagged_sink is None and config.vlm.enabled:
                from ..vlm import VlmStage

                # Checks the model files now: a wrong path fails the start, not every flagged frame.
                self.vlm_stage = VlmStage(config.vlm, self.publisher, config.scoring.calibration_dir)
                self._flagged_sink = self.vlm_stage
        except BaseException:
            for scorer in scorers.values():
                scorer.close()
            if self.publisher is not None:
                self.publisher.stop(timeout=0.0)  # never started: just closes the spool
            raise
        self.evidence = EvidenceStore(config.evidence)
        self.publisher.start()
        if self.vlm_stage is not None:
            self.vlm_stage.start()  # the model loads in its worker process meanwhile
            log.info("VLM stage started (%s mode, model %s)", config.vlm.mode, config.vlm.model)
        if self._flagged_sink is not None:
            self.flagged = FlaggedQueue(config.pipeline.flagged_queue_size, self._flagged_sink)
            self.flagged.start()
        with self._pipelines_lock:
            for camera in config.cameras:
                pipeline = CameraPipeline(
                    config.station, camera, config.pipeline, scorers[camera.name], self.publisher, self.flagged,
                    capture=captures[camera.name], evidence=self.evidence,
                )
                self.pipelines[camera.name] = pipeline
                pipeline.start()
        self.notifier.ready(status=f"running: {len(self.pipelines)} camera(s), models loaded")
        log.info("ready: %s", ", ".join(f"{p.name} <- {p.capture.description} [{p.product_name}]" for p in self.pipelines.values()))
        try:
            self._main_loop()
        finally:
            self._shutdown()
        return 0

    def request_stop(self) -> None:
        self._stop_requested.set()
        self._wake.set()

    def request_reload(self) -> None:
        self._reload_requested.set()
        self._wake.set()

    # --- main loop ----------------------------------------------------------------------------

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())

    def _main_loop(self) -> None:
        watchdog_every = self.notifier.watchdog_interval_s()
        hang_limit = 2 * watchdog_every if watchdog_every else _HANG_LIMIT_S
        last_watchdog = last_status = last_stats = 0.0
        stats_every = self.config.mqtt.stats_interval_s
        while not self._stop_requested.is_set():
            self._wake.wait(_TICK_S)
            self._wake.clear()
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                self._reload()
            now = time.monotonic()
            if watchdog_every and now - last_watchdog >= watchdog_every:
                hung = self._hung(now, hang_limit)
                if hung:
                    if not self._hung_logged:
                        log.error("pipeline thread(s) hung: %s; not feeding the systemd watchdog", ", ".join(hung))
                        self._hung_logged = True
                else:
                    self._hung_logged = False
                    self.notifier.watchdog()
                    last_watchdog = now
            if now - last_status >= _STATUS_EVERY_S:
                self.notifier.status(self.status_line())
                last_status = now
            if now - last_stats >= stats_every:
                self._publish_stats()
                last_stats = now
            with self._pipelines_lock:
                pipelines = list(self.pipelines.values())
            if pipelines and all(p.done for p in pipelines):
                log.info("every camera finished its replay and all frames are inspected: stopping")
                self._wait_until_idle(time.monotonic() + self.config.pipeline.drain_timeout_s)
                break

    def _wait_until_idle(self, deadline: float) -> None:
        """A finished replay: give the explanation stage until `deadline` to explain what is queued,
        and the publisher to deliver what is spooled."""
        while time.monotonic() < deadline and not self._stop_requested.is_set():
            # In the order the work flows, so an item moving on between two reads is never missed.
            busy = (
                (self.flagged is not None and self.flagged.outstanding() > 0)
                or (self.vlm_stage is not None and self.vlm_stage.outstanding() > 0)
                or bool(self.publisher.state().get("spool_depth"))
            )
            if not busy:
                return
            self._wake.wait(0.05)

    def _hung(self, now: float, limit: float) -> list[str]:
        with self._pipelines_lock:
            hung = [name for p in self.pipelines.values() for name in p.hung_threads(now, limit)]
        if self.flagged is not None and self.flagged._thread.is_alive() and not self.flagged._busy and now - self.flagged.last_beat > limit:
            hung.append("flagged-sink")
        return hung

    def _shutdown(self) -> None:
        self._stopping = True
        drain = self.config.pipeline.drain_timeout_s
        deadline = time.monotonic() + drain
        self.notifier.stopping(status=f"stopping: draining in-flight inspections (at most {drain:g}s)")
        log.info("stopping: draining in-flight inspections (at most %gs)", drain)
        with self._pipelines_lock:
            pipelines = list(self.pipelines.values())
        for pipeline in pipelines:
            pipeline.capture.stop(timeout=0.5)
            pipeline.stop_intake()
        left = 0
        for pipeline in pipelines:
            left += pipeline.drain(deadline)
        if left:
            log.warning("stopped with %d frame(s) not inspected (drain_timeout_s %g reached)", left, drain)
        if self.flagged is not None:
            self.flagged.close(deadline)
        if self.vlm_stage is not None:
            # Queued frames get "skipped"; the one being explained may finish until the deadline.
            self.vlm_stage.stop(timeout=max(1.0, deadline - time.monotonic()))
        if self.publisher is not None:
            self._publish_stats()
            self.publisher.stop(timeout=max(1.0, deadline - time.monotonic()))
        if self.evidence is not None:
            self.evidence.close(timeout=max(2.0, deadline - time.monotonic()))
        for pipeline in pipelines:
            pipeline.close_scorer()
        self.notifier.close()
        log.info("stopped")

    # --- stats and status ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._pipelines_lock:
            cameras = {name: p.snapshot() for name, p in self.pipelines.items()}
        stats: dict[str, Any] = {
            "uptime_s": round(time.monotonic() - self._started_at, 1),
            "rss_mb": rss_mb(),
            "cameras": cameras,
            **self.counters.snapshot(),
        }
        if self.flagged is not None:
            stats["flagged_queue"] = {"depth": self.flagged.depth(), "capacity": self.flagged.capacity,
                                      **self.flagged.counters.snapshot()}
        if self.evidence is not None:
            stats["evidence"] = {"enabled": self.evidence.config.enabled, **self.evidence.stats()}
        if self.vlm_stage is not None:
            stats["vlm"] = self.vlm_stage.state()
        return stats

    def _publish_stats(self) -> None:
        if self.publisher is None:
            return
        try:
            self.publisher.publish_stats(self.stats())
        except Exception:  # noqa: BLE001 - stats must never take the daemon down
            log.exception("could not publish stats")

    def status_line(self) -> str:
        with self._pipelines_lock:
            pipelines = list(self.pipelines.values())
        parts = []
        for p in pipelines:
            snap = p.stats.snapshot()
            last = "-" if snap["last_score"] is None else f"{snap['last_score']:.3f} {snap['last_verdict']}"
            parts.append(
                f"{p.name}: {p.capture.state.value} {p.capture.frames_in.rate():.1f} fps in, "
                f"{snap['fps_out']:.1f} out, last {last}, product {p.product_name}"
            )
        broker = "-"
        if self.publisher is not None:
            state = self.publisher.state()
            broker = f"{'connected' if state.get('connected') else 'disconnected'}, spool {state.get('spool_depth', '?')}"
        return "; ".join(parts) + f"; broker {broker}"

    def _on_capture_state(self, camera: str, state: CaptureState, detail: str) -> None:
        if state in (CaptureState.RECONNECTING, CaptureState.STALLED):
            self.notifier.status(f"{camera}: {state.value} ({detail})")

    # --- commands from MQTT (paho's network thread: never block here) --------------------------

    def _on_trigger(self, command) -> None:
        fired = False
        with self._pipelines_lock:
            pipelines = list(self.pipelines.values())
        for pipeline in pipelines:
            if pipeline.config.trigger.mode == "mqtt":
                pipeline.trigger.fire(command.part_id, command.received_at)
                fired = True
        if not fired:
            self.counters.add("triggers_unused")
            log.warning("trigger received (part %s) but no camera has trigger.mode mqtt", command.part_id)

    def _on_product_set(self, product: str) -> None:
        threading.Thread(target=self._switch_product, args=(product,), name="product-switch", daemon=True).start()

    def _switch_product(self, product: str) -> None:
        with self._product_lock:
            log.info("switching every camera to product %s (MQTT product/set)", product)
            try:
                scorers = {name: self._load_scorer(product) for name in list(self.pipelines)}
            except UserError as exc:
                self.counters.add("product_switch_errors")
                log.error("product switch to %r refused: %s", product, exc)
                return
            self._product_override = product
            with self._pipelines_lock:
                for name, scorer in scorers.items():
                    pipeline = self.pipelines.get(name)
                    if pipeline is None:
                        scorer.close()
                    else:
                        pipeline.swap_scorer(scorer)
            self.counters.add("product_switches")

    # --- models -------------------------------------------------------------------------------

    def _load_scorer(self, product_name: str):
        """Load a calibration and build its scorer, warmed up (the first run of a graph is slow)."""
        from ..scorer.product import Scorer, load_product

        scoring = self.config.scoring
        product = load_product(scoring.calibration_dir, product_name, scoring.engines_dir)
        scorer = Scorer(product, backend=scoring.backend, threads=scoring.threads, precision=scoring.precision, allow_build=scoring.allow_engine_build)
        h, w = product.input_size
        scorer.score(np.zeros((h, w, 3), np.uint8))
        log.info("loaded product %s (calibration %s, threshold %.4f, %s)", product.name, product.calibration_id,
                 product.threshold, scorer.backend.describe())
        return scorer

    # --- reload (SIGHUP) ----------------------------------------------------------------------

    def _reload(self) -> None:
        if self.config_path is None:
            log.warning("SIGHUP ignored: the daemon was not started from a config file")
            return
        self.notifier.reloading()
        log.info("reloading %s", self.config_path)
        try:
            new = load_config(self.config_path)
            changed = [key for key in _RESTART_ONLY if getattr(new, key) != getattr(self.config, key)]
            if changed:
                log.warning("%s changes take effect at the next restart; the MQTT session, the evidence store and "
                            "the VLM stage are kept", "/".join(changed))
            new = new.model_copy(update={key: getattr(self.config, key) for key in _RESTART_ONLY})
            with self._product_lock:
                scorers = {c.name: self._load_scorer(self._product_override or c.product) for c in new.cameras}
                for camera in new.cameras:
                    try:
                        Capture(camera.name, camera.source, camera.reconnect).check()
                    except UserError:
                        for scorer in scorers.values():
                            scorer.close()
                        raise
        except (ConfigError, UserError) as exc:
            self.counters.add("reload_errors")
            log.error("reload refused, still running the previous config: %s", exc)
            self.notifier.ready(status=f"reload failed: {str(exc).splitlines()[0]}")
            return
        deadline = time.monotonic() + new.pipeline.drain_timeout_s
        with self._pipelines_lock:
            old_pipelines = dict(self.pipelines)
        replaced: dict[str, CameraPipeline] = {}
        for camera in new.cameras:
            old = old_pipelines.pop(camera.name, None)
            keep_capture = old is not None and (old.config.source, old.config.reconnect) == (camera.source, camera.reconnect)
            # An mqtt trigger is handed over with the triggers still waiting in it.
            keep_trigger = (old is not None and keep_capture and old.config.trigger == camera.trigger
                            and camera.trigger.mode == "mqtt")
            if old is not None:
                old.drain(deadline)
                old.close_scorer()
                if not keep_capture:
                    old.capture.stop()
            pipeline = CameraPipeline(
                new.station, camera, new.pipeline, scorers[camera.name], self.publisher, self.flagged,
                capture=old.capture if keep_capture else Capture(camera.name, camera.source, camera.reconnect, on_state=self._on_capture_state),
                trigger=old.trigger if keep_trigger else None,
                stats=old.stats if old is not None else None,
                evidence=self.evidence,
            )
            if keep_trigger:
                pipeline.trigger.last_seq = old.trigger.last_seq
            pipeline.start(start_capture=not keep_capture)
            replaced[camera.name] = pipeline
        for gone in old_pipelines.values():
            log.info("camera %s is no longer in the config: stopping it", gone.name)
            gone.capture.stop()
            gone.drain(deadline)
            gone.close_scorer()
        with self._pipelines_lock:
            self.pipelines = replaced
        self.config = new
        self.counters.add("reloads")
        log.info("reloaded: %s", ", ".join(f"{p.name} [{p.product_name}]" for p in replaced.values()))
        self.notifier.ready(status=self.status_line())


def rss_mb() -> float:
    """Resident memory of this process in MiB (Linux /proc), 0 when unknown."""
    try:
        with open(f"/proc/{os.getpid()}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0
