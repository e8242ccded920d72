"""The daemon's feedback queue: MQTT feedback in, applied on one low-priority thread, results out.

    MQTT <prefix>/<station>/feedback ──▶ FeedbackService.submit (paho's thread: checks only, never blocks)
        │ token-bucket rate limit (feedback.rate_per_min, burst), bounded queue (feedback.queue_size)
        ▼ its own thread at a lower CPU priority, one ONNX Runtime thread: scoring is not stalled
    FeedbackApplier.apply (apply.py) ──▶ a new version? on_refit(product): the daemon swaps the scorers
        ▼
    <prefix>/<station>/feedback/result (same inspection_id and request_id), errors too

Example:
    service = FeedbackService(config.feedback, applier, publisher.publish_feedback_result, on_refit=daemon.reload_product)
    service.start(); service.submit(parse_feedback(payload)); service.state()["applied"]
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from typing import Any, Callable

from ..config.feedback import FeedbackConfig
from ..mqtt.dispatch import TokenBucket
from ..mqtt.feedback import FeedbackRequest
from ..mqtt.request_queue import RequestQueue
from .apply import FeedbackApplier, FeedbackError, error_body

log = logging.getLogger(__name__)

STOPPING = "the daemon is stopping; send the feedback again when it is back"
NICE_INCREMENT = 10  # the worker thread's niceness above the daemon's: refits yield to scoring


def lower_thread_priority(increment: int = NICE_INCREMENT) -> bool:
    """Make the calling thread nicer (Linux: a thread is a schedulable task of its own). Best effort:
    False where the platform or the sandbox does not allow it."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
        return True
    except (AttributeError, OSError) as exc:
        log.debug("feedback worker keeps its priority (%s)", exc)
        return False


def release_free_heap() -> bool:
    """Hand the C heap's free pages back to the system after a refit (glibc's malloc_trim). A refit
    frees ~100 MB of numpy temporaries that glibc otherwise keeps mapped for the process's lifetime:
    RSS then stays at a refit's peak, which on an edge box is memory the next frame may need. Best
    effort: False where the C library has no malloc_trim (musl, macOS)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
            _malloc_trim.argtypes, _malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (AttributeError, OSError):
            _malloc_trim = False
    return bool(_malloc_trim and _malloc_trim(0))


_malloc_trim: Any = None


class FeedbackService:
    """Feedback queue in front of a FeedbackApplier. `submit()` is called on paho's network thread and
    never blocks; every message gets exactly one result through `publish` (applied, duplicate or error)."""

    def __init__(
        self,
        config: FeedbackConfig,
        applier: FeedbackApplier | None,
        publish: Callable[[dict[str, Any]], Any],
        on_refit: Callable[[str], Any] | None = None,
        unavailable: str = "",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        self.applier = applier
        self._publish = publish
        self._on_refit = on_refit
        self._unavailable = unavailable or ("" if applier is not None else "feedback.enabled is false on this station")
        self._counts = dict.fromkeys(
            ("received", "applied", "duplicates", "errors", "rate_limited", "queue_full", "refits", "swap_errors"), 0)
        self._requests: RequestQueue[FeedbackRequest] = RequestQueue(
            config.queue_size, TokenBucket(config.rate_per_min / 60.0, config.burst, clock), FeedbackError,
            self._counts, stopping=STOPPING,
            rate_limited=f"more than feedback.rate_per_min={config.rate_per_min:g} feedback messages per minute "
                         f"(burst {config.burst}) for this station; send it again in a minute",
            queue_full=f"feedback.queue_size={config.queue_size} feedback messages are already waiting; "
                       "send it again later",
        )
        self._last_error = ""
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.applier is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="feedback", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Feedback still queued gets the error 'stopping'; the one being applied may finish until timeout
        (a refit cut off by the exit leaves the previous version active: versions are committed atomically)."""
        for request in self._requests.drain():
            self._reply(error_body(request, "stopping", STOPPING))
        if self._thread is not None:
            self._thread.join(timeout)

    def state(self) -> dict[str, Any]:
        """Counters for the daemon's stats (pipeline.feedback)."""
        with self._requests.cond:
            return {**self._counts, "enabled": self.applier is not None, "queued": len(self._requests),
                    "capacity": self.config.queue_size, "busy": self._requests.busy, "last_error": self._last_error}

    def submit(self, request: FeedbackRequest) -> None:
        self._requests.count("received")
        try:
            self._requests.admit(request, check=lambda: self._check(request))
        except FeedbackError as exc:
            self._reply(error_body(request, exc.code, str(exc)))

    def _check(self, request: FeedbackRequest) -> None:
        if self.applier is None:
            raise FeedbackError("disabled", f"feedback is not applied: {self._unavailable}")
        self.applier.check(request)

    def _run(self) -> None:
        lower_thread_priority()
        while (request := self._requests.take()) is not None:
            try:
                outcome = self.applier.apply(request)
                if outcome.refitted is not None:
                    self._requests.count("refits")
                    self._swap(outcome.refitted)
                    release_free_heap()
            finally:
                self._requests.done()
            self._reply(outcome.body)

    def _swap(self, product: str) -> None:
        """The new version goes live before the result says so: later results carry its calibration_version."""
        if self._on_refit is None:
            return
        try:
            self._on_refit(product)
        except Exception as exc:  # noqa: BLE001 - the version is written; a SIGHUP or a restart loads it
            self._requests.count("swap_errors")
            log.exception("feedback: the new calibration of %s is written but could not be loaded (%s); the previous "
                          "one keeps scoring until a reload (SIGHUP) or restart", product, exc)

    def _reply(self, body: dict[str, Any]) -> None:
        status = body.get("status")
        with self._requests.cond:
            self._counts[{"applied": "applied", "duplicate": "duplicates"}.get(status, "errors")] += 1
            if status == "error":
                self._last_error = f"{body.get('error_code')}: {body.get('error')}"
        try:
            self._publish(body)
        except Exception:  # noqa: BLE001 - the publisher logs; feedback goes on
            log.exception("feedback: could not publish the result for inspection %s", body.get("inspection_id"))


def daemon_feedback_service(daemon: Any) -> FeedbackService:
    """The daemon's FeedbackService (daemon: daemon.Daemon, after its publisher and evidence store exist).
    With feedback.enabled false, or without an evidence store to read frames from, every message gets the
    error 'disabled' and the reason."""
    config = daemon.config
    reason = ""
    if not config.feedback.enabled:
        reason = "feedback.enabled is false on this station"
    elif daemon.evidence is None or not config.evidence.enabled:
        reason = "evidence.enabled is false: there are no stored frames to learn from"
    applier = None
    if not reason:
        applier = FeedbackApplier(
            config.scoring.calibration_dir, config.scoring.engines_dir, daemon.evidence.root, config.feedback,
            camera=lambda name: next((c for c in daemon.config.cameras if c.name == name), None),
            running_product=daemon.running_product, flush=daemon.evidence.flush,
        )
    def on_refit(product: str) -> None:
        daemon.reload_product(product)
        if daemon.stream is not None:  # an ok refit fits the good set alone: the stream's learning comes back soon
            daemon.stream.request_refit(product)

    return FeedbackService(config.feedback, applier, daemon.publisher.publish_feedback_result,
                           on_refit=on_refit, unavailable=reason)
