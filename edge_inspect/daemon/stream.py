"""The daemon's learning from the line: per product a StreamLearner (calibration/stream.py), one worker thread.

    scorer thread ──▶ StreamService.observe (bookkeeping; the candidates it confirms go into a bounded
        │             queue with their patch features, never blocking: a full queue drops and counts)
        ▼ the "stream" thread, at a lower CPU priority, one ONNX Runtime thread
    candidate store on disk ──▶ refit when due (under the product's lock) ──▶ a new version?
        ▼ swap(product): the daemon loads it on every camera of the product between two frames

Example:
    service = StreamService(config.stream, config.scoring, swap=daemon.reload_product, alarm=drift.alarm_on)
    service.start(); service.wants("bracket-a"); service.observe(camera, calibration, inspection_id, result)
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Any, Callable

from ..calibration import store
from ..calibration.stream import RefitStopped, StreamCadence, StreamLearner, StreamSettings
from ..config.stream import StreamConfig
from ..feedback.service import lower_thread_priority, release_free_heap
from ..log_limit import LogLimiter

log = logging.getLogger(__name__)

QUEUE_SIZE = 16  # confirmed candidates waiting to be written (each ~0.6 MB of float32 features)


def settings_from(config: StreamConfig) -> tuple[StreamSettings, StreamCadence]:
    return (StreamSettings(keep_fraction=config.keep_fraction, holdback=config.holdback),
            StreamCadence(refit_every=config.refit_every, refit_minutes=config.refit_minutes, max_frames=config.max_frames,
                          quiet_frames=config.quiet_frames, max_position=config.max_position, sample_every=config.sample_every))


class StreamService:
    """Every product's learner and the one thread that writes candidates and runs refits."""

    def __init__(self, config: StreamConfig, calibration_dir: str | Path, engines_dir: str | Path,
                 swap: Callable[[str], Any], alarm: Callable[[str], bool] = lambda product: False, keep: int = store.DEFAULT_KEEP):
        self.config = config
        self.calibration_dir, self.engines_dir = Path(calibration_dir), Path(engines_dir)
        self.keep = keep
        self._swap = swap
        self._alarm = alarm
        self._lock = threading.Lock()
        self._learners: dict[str, StreamLearner] = {}
        self._queue: queue.Queue = queue.Queue(QUEUE_SIZE)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._warned: set[str] = set()
        self.counts = {"queue_full": 0, "errors": 0}
        self._log = LogLimiter(log, interval_s=300.0)

    # --- the scorer threads --------------------------------------------------------------------

    def wants(self, product: str) -> bool:
        """Whether frames of `product` should be scored with their patch features."""
        return self.config.learns(product)

    def observe(self, camera: str, calibration: Any, inspection_id: str, result: Any) -> None:
        """One inspected frame (the scorer thread). Never raises: the result is already published."""
        try:
            if not self.config.learns(calibration.name):
                return
            if result.patch_features is None:
                if calibration.name not in self._warned:
                    self._warned.add(calibration.name)
                    log.warning("stream learning: product %s was calibrated with its bank inside the scorer graph (before "
                                "the bank was an input); it does not learn from the line until recalibrated "
                                "(`edge-inspect calibrate --product %s --images DIR --force`)", calibration.name, calibration.name)
                return
            learner = self._learner(calibration.name)
            with self._lock:
                confirmed = learner.observe(camera, calibration, inspection_id, result.score, result.flagged,
                                            result.patch_features, alarm=self._alarm(calibration.name))
            for _id, features, meta in confirmed:
                try:
                    self._queue.put_nowait(("candidate", calibration.name, features, meta, calibration.params))
                except queue.Full:
                    self.counts["queue_full"] += 1
        except Exception:  # noqa: BLE001 - learning must never cost an inspection
            self.counts["errors"] += 1
            self._log.exception("stream learning failed on a frame of product %s", getattr(calibration, "name", "?"))

    def forget(self, product: str, inspection_id: str) -> int:
        """An operator's ng: the frame leaves the product's candidates (if it was one)."""
        return self._learner(product).store.remove(inspection_id)

    def request_refit(self, product: str) -> None:
        """Another writer (operator feedback) made a version from the good set alone: refit from the stream soon,
        so what the line taught comes back."""
        if self.config.learns(product):
            self._learner(product).request_refit()
            try:
                self._queue.put_nowait(())
            except queue.Full:
                pass

    def configure(self, config: StreamConfig) -> None:
        """A SIGHUP's settings apply to new learners; running ones keep theirs until restart."""
        self.config = config

    # --- the worker ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="stream", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """A refit in progress gives up at its next step (nothing is written before its last); one being
        committed finishes. Waiting candidates are dropped (they were only candidates)."""
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        if self._thread is not None:
            self._thread.join(timeout)

    def _learner(self, product: str) -> StreamLearner:
        with self._lock:
            learner = self._learners.get(product)
            if learner is None:
                settings, cadence = settings_from(self.config)
                learner = self._learners[product] = StreamLearner(self.calibration_dir, self.engines_dir, product, settings,
                                                                  cadence, threads=1, keep=self.keep)
            return learner

    def _work(self) -> None:
        lower_thread_priority()
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=5.0)
            except queue.Empty:
                item = ()
            if item is None:
                return
            try:
                if item:
                    _, product, features, meta, params = item
                    self._learner(product).add_candidate(features, meta, params)
                for product, learner in list(self._learners.items()):
                    if not self._stop.is_set() and learner.due():
                        self.refit(product)
                        release_free_heap()
            except Exception:  # noqa: BLE001 - one failed refit must not end learning
                self.counts["errors"] += 1
                self._log.exception("stream learning: a candidate or refit failed; the active calibration is unchanged")

    def refit(self, product: str) -> Any:
        learner = self._learner(product)
        try:
            with store.product_lock(self.calibration_dir, product):
                outcome = learner.refit(checkpoint=self._checkpoint)
        except RefitStopped:
            log.info("stream learning: product %s: the refit in progress was stopped with the daemon; its candidates "
                     "stay on disk for the next start", product)
            return None
        if outcome.committed:
            log.info("stream learning: product %s version %s: %s", product, outcome.version, outcome.reason)
            try:
                self._swap(product)
            except Exception as exc:  # noqa: BLE001 - the version is written; a reload or restart loads it
                log.error("stream learning: product %s version %s is active on disk but did not load (%s: %s); the cameras "
                          "keep the previous calibration until a reload", product, outcome.version, type(exc).__name__, exc)
        else:
            log.info("stream learning: product %s not refitted: %s", product, outcome.reason)
        return outcome

    def _checkpoint(self) -> None:
        if self._stop.is_set():
            raise RefitStopped()

    def snapshot(self) -> dict[str, Any]:
        """The stats block (payloads: pipeline.stream): per product its learner's state."""
        with self._lock:
            learners = dict(self._learners)
        return {"enabled": self.config.enabled, **self.counts, "queued": self._queue.qsize(),
                "products": {name: learner.state() for name, learner in sorted(learners.items())}}
