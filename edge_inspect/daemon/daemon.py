"""The daemon: wires capture -> trigger -> scorer -> localize -> evidence -> publish (+ the VLM stage).

Per camera a `pipeline.CameraPipeline` (capture, dispatcher and scorer threads, connected by bounded
hand-offs so nothing downstream can stall capture). Reload and product switch are `reload.py`;
stats, status and the watchdog checks `health.py`; the flagged-frame queue `flagged_queue.py`.
Every inspection the evidence store keeps (every NG) is queued for its background writer before the
result is published, so the result carries its `evidence_path`. Flagged inspections are offered to
an optional `FlaggedSink` through a bounded queue: when it is full the result says vlm_status
"skipped" and the miss is counted; the scorer never waits for it. With `vlm.enabled` the sink is a
`vlm.VlmStage`, whose verdicts are published as result updates and merged into the evidence. Operator
feedback (`feedback/`) is applied on its own low-priority thread; a new calibration version it writes is
swapped into the pipelines scoring that product (`reload_product`). The main thread handles signals (SIGTERM/SIGINT drain and exit, SIGHUP
reloads config and calibrations keeping the MQTT session), feeds the systemd watchdog only while
every pipeline thread makes progress, and publishes stats and STATUS=.

Example:
    config = load_config("/etc/edge-inspect/line1.yaml")
    exit_code = Daemon(config, config_path="/etc/edge-inspect/line1.yaml").run()
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from ..capture.reader import Capture
from ..config import AppConfig
from ..evidence import EvidenceStore
from ..feedback.apply import error_body as feedback_error
from ..feedback.service import daemon_feedback_service
from ..log_limit import LogLimiter
from ..mqtt.publisher import ResultPublisher
from ..vlm import VlmStage
from ..vlm.ask import daemon_ask_service, error_body
from .drift import DriftMonitor, keep_versions
from .stream import StreamService
from .flagged_queue import FlaggedQueue, FlaggedSink
from .health import HealthMixin
from .pipeline import CameraPipeline
from .reload import ReloadMixin
from .runtime_stats import Counters
from .sdnotify import Notifier

log = logging.getLogger(__name__)

_TICK_S = 0.25  # main loop period: signals, watchdog, stats
_STATUS_EVERY_S = 2.0
_HANG_LIMIT_S = 30.0  # a pipeline thread without progress this long is hung (without a systemd watchdog)


def limit_background_blas() -> Any:
    """numpy's BLAS pool to one thread in the daemon. The daemon's heavy numpy work (stream and feedback
    refits) runs on niced background threads; BLAS worker threads are not niced, and at its default of one
    per core they took both cores from the scorer (frame p99 90 ms during refits, bench_daemon --stream).
    The scorer itself is ONNX Runtime with its own threads."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a dependency of the package; a broken install keeps BLAS's own pool
        log.warning("threadpoolctl is not installed: refits may slow the scorer (pip install threadpoolctl)")
        return None
    return threadpool_limits(limits=1, user_api="blas")


class Daemon(ReloadMixin, HealthMixin):
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
        self.ask = None  # vlm.ask.AskService: follow-up questions on .../ask
        self.feedback = None  # feedback.service.FeedbackService: operator feedback on .../feedback
        self.drift: DriftMonitor | None = None  # per product: the OK scores against the calibration (drift.py)
        self.stream: StreamService | None = None  # per product: learning from its OK frames (stream.py)
        self.evidence: EvidenceStore | None = None
        self.publisher = None
        self.pipelines: dict[str, CameraPipeline] = {}
        self.counters = Counters("reloads", "reload_errors", "product_switches", "product_switch_errors", "triggers_unused")
        self._product_override: str | None = None
        self._product_lock = threading.Lock()
        self._switch_cond = threading.Condition()  # the one product-switch worker (reload.py) waits on it
        self._switch_wanted: str | None = None
        self._switch_thread: threading.Thread | None = None
        self._pipelines_lock = threading.Lock()
        self._stop_requested = threading.Event()
        self._reload_requested = threading.Event()
        self._wake = threading.Event()
        self._started_at = time.monotonic()
        self._stopping = False
        self._hung_logged = False
        self._exit_code = 0  # 1 when a part failed for good (the MQTT network thread): systemd restarts us
        self._log = LogLimiter(log)  # per-command warnings: one line per 10 s with the count

    # --- entry point --------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        self._blas_limits = limit_background_blas()
        config = self.config
        log.info("edge-inspect daemon starting: station %s, %d camera(s)", config.station, len(config.cameras))
        scorers = {}
        try:
            for camera in config.cameras:
                scorers[camera.name] = self._load_scorer(camera.product)

            captures = {camera.name: Capture(camera.name, camera.source, camera.reconnect, on_state=self._on_capture_state)
                        for camera in config.cameras}
            for capture in captures.values():
                capture.check()
            self.publisher = ResultPublisher(
                config.mqtt, config.spool, config.station,
                on_trigger=self._on_trigger, on_product_set=self._on_product_set, on_ask=self._on_ask,
                on_feedback=self._on_feedback,
            )
            if self._flagged_sink is None and config.vlm.enabled:
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
        self.ask = daemon_ask_service(config, self.vlm_stage, self.evidence, self.publisher, self.flagged)
        # threshold.adapt steps swap scorers on the monitor's own thread, like feedback does.
        self.drift = DriftMonitor(config.threshold, config.scoring.calibration_dir, swap=self.reload_product,
                                  keep=keep_versions(config))
        # learning from the line: candidates and refits on its own thread; refits swap scorers like feedback does
        self.stream = StreamService(config.stream, config.scoring.calibration_dir, config.scoring.engines_dir,
                                    swap=self.reload_product, alarm=self.drift.alarm_on, keep=keep_versions(config))
        self.stream.start()
        self.ask.start()
        with self._pipelines_lock:
            for camera in config.cameras:
                pipeline = CameraPipeline(
                    config.station, camera, config.pipeline, scorers[camera.name], self.publisher, self.flagged,
                    capture=captures[camera.name], evidence=self.evidence, drift=self.drift, stream=self.stream,
                )
                self.pipelines[camera.name] = pipeline
                pipeline.start()
        self.feedback = daemon_feedback_service(self)  # after the pipelines: it asks them which product runs
        self.feedback.start()
        self.notifier.ready(status=f"running: {len(self.pipelines)} camera(s), models loaded")
        log.info("ready: %s", ", ".join(f"{p.name} <- {p.capture.description} [{p.product_name}]" for p in self.pipelines.values()))
        try:
            self._main_loop()
        finally:
            self._shutdown()
        return self._exit_code

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
            if self.publisher.fatal_error is not None:
                log.error("stopping with exit code 1 (systemd restarts the service): %s", self.publisher.fatal_error)
                self._exit_code = 1
                break
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

    def _shutdown(self) -> None:
        self._stopping = True
        with self._switch_cond:
            self._switch_cond.notify_all()
        if self._switch_thread is not None:
            self._switch_thread.join(timeout=30.0)  # a switch loading a scorer finishes before the pipelines close
        if self.drift is not None:
            self.drift.stop(timeout=30.0)  # so does a threshold.adapt step
        if self.stream is not None:
            self.stream.stop(timeout=60.0)  # and a stream refit being committed
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
            # Queued frames get "skipped"; the one being explained may finish until the deadline (the
            # VLM stage's own answer when it is the sink: stopping its worker fails that frame).
            self.flagged.close(deadline, abandon_current=self.vlm_stage is None)
        if self.vlm_stage is not None:
            self.vlm_stage.stop(timeout=max(1.0, deadline - time.monotonic()))
            if self.flagged is not None:
                self.flagged.join(time.monotonic() + 5.0)  # its last update goes out before the publisher stops
        if self.ask is not None:
            self.ask.stop(timeout=max(1.0, deadline - time.monotonic()))  # queued questions: error "stopping"
        if self.feedback is not None:
            self.feedback.stop(timeout=max(1.0, deadline - time.monotonic()))  # queued feedback: error "stopping"
        if self.publisher is not None:
            self._publish_stats()
            self.publisher.stop(timeout=max(1.0, deadline - time.monotonic()))
        if self.evidence is not None:
            self.evidence.close(timeout=max(2.0, deadline - time.monotonic()))
        for pipeline in pipelines:
            pipeline.close_scorer()
        for pipeline in pipelines:
            pipeline.capture.join(timeout=10.0)  # no capture thread may still be decoding when the process exits
        self.notifier.close()
        log.info("stopped")

    # --- commands from MQTT (paho's network thread: never block here) --------------------------

    def _on_ask(self, request) -> None:
        """A follow-up question (vlm/ask.py): checked and queued, never waited on."""
        if self.ask is None:
            self.publisher.publish_answer(error_body(request, "vlm_unavailable", "the daemon is starting; ask again"))
            return
        self.ask.submit(request)

    def _on_feedback(self, request) -> None:
        """Operator feedback (feedback/service.py): checked and queued, never waited on."""
        if self.feedback is None:
            self.publisher.publish_feedback_result(feedback_error(request, "unavailable", "the daemon is starting; send it again"))
            return
        self.feedback.submit(request)

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
            self._log.log(logging.WARNING, "trigger unused", "trigger received (part %s) but no camera has trigger.mode "
                          "mqtt", command.part_id)
