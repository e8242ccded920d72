"""The capture thread that always holds the newest frame, and reconnects a failing source.

`Capture` runs one source on its own thread. It never waits for the pipeline: each new frame
replaces the previous one in a one-slot mailbox (`LatestFrame`), and a frame replaced before
anyone took it is counted as dropped. The one exception is a replay at fps 0, which is lossless:
it waits for the pipeline, because a file can wait and a test wants every frame.
A source that fails or stalls (no frame for `stall_timeout_s`) is reopened with exponential back-off
(capped lower where the source says so: a folder replay retries at least every second). Failures and
state changes that repeat are logged once per 30 s with their count (`log_limit`).

Example:
    capture = Capture("cam0", ReplaySourceConfig(type="replay", path="frames/"), ReconnectConfig())
    capture.start()
    grabbed = capture.frames.take(after_seq=0, timeout=1.0)   # Grabbed(seq, timestamp, pixels) or None
    capture.stop()
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..config.capture import ReconnectConfig
from ..daemon.runtime_stats import RateMeter
from ..log_limit import LogLimiter
from .sources import EndOfStream, FrameSource, SourceError, create_source

log = logging.getLogger(__name__)


# --- the newest-frame mailbox ------------------------------------------------------------------


@dataclass(frozen=True)
class Grabbed:
    """A frame as the capture thread got it."""

    seq: int  # frame id, increasing for the life of the Capture (across reconnects)
    timestamp: float  # UTC epoch seconds at grab
    monotonic: float  # time.monotonic() at grab, for latencies
    pixels: np.ndarray


class LatestFrame:
    """A one-slot mailbox: `put` replaces, `take` waits for something newer than what you had.

    A frame replaced before anyone took it is counted in `dropped`. With lossless=True, `put` waits
    until the previous frame was taken instead (for replays that must not drop).
    """

    def __init__(self, lossless: bool = False):
        self.lossless = lossless
        self._cond = threading.Condition()
        self._latest: Grabbed | None = None
        self._taken_seq = 0
        self._closed = False
        self.dropped = 0

    def put(self, grabbed: Grabbed, stop: threading.Event | None = None) -> bool:
        """Store a frame; False when the mailbox was closed (or `stop` set) while waiting."""
        with self._cond:
            if self.lossless:
                while self._latest is not None and self._latest.seq > self._taken_seq and not self._closed:
                    if stop is not None and stop.is_set():
                        return False
                    self._cond.wait(0.1)
            if self._closed:
                return False
            if self._latest is not None and self._latest.seq > self._taken_seq:
                self.dropped += 1
            self._latest = grabbed
            self._cond.notify_all()
            return True

    def take(self, after_seq: int = 0, timeout: float | None = None) -> Grabbed | None:
        """The newest frame with seq > after_seq, waiting up to `timeout`; None on timeout or close."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._latest is None or self._latest.seq <= after_seq:
                if self._closed:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            grabbed = self._latest
            self._taken_seq = max(self._taken_seq, grabbed.seq)
            self._cond.notify_all()
            return grabbed

    @property
    def newest_seq(self) -> int:
        with self._cond:
            return self._latest.seq if self._latest is not None else 0

    @property
    def pending(self) -> int:
        """1 when a frame waits to be taken, else 0 (the capture side's queue depth)."""
        with self._cond:
            return int(self._latest is not None and self._latest.seq > self._taken_seq)

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed and (self._latest is None or self._latest.seq <= self._taken_seq)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


# --- the capture thread ------------------------------------------------------------------------


class CaptureState(str, enum.Enum):
    STARTING = "starting"
    CONNECTING = "connecting"
    STREAMING = "streaming"
    STALLED = "stalled"
    RECONNECTING = "reconnecting"  # waiting out the back-off after a failure
    FINISHED = "finished"  # a finite replay reached its end
    STOPPED = "stopped"


class Capture:
    """Runs one source on a thread, keeps the newest frame, reconnects with back-off, detects stalls."""

    def __init__(
        self,
        name: str,
        source_config: Any,
        reconnect: ReconnectConfig,
        source_factory: Callable[[Any, ReconnectConfig], FrameSource] = create_source,
        on_state: Callable[[str, CaptureState, str], None] | None = None,
    ):
        self.name = name
        self.source_config = source_config
        self.reconnect = reconnect
        self._factory = source_factory
        self._on_state = on_state
        probe = source_factory(source_config, reconnect)
        self.description = probe.describe()
        self.frames = LatestFrame(lossless=probe.lossless)
        self._probe: FrameSource | None = probe
        self._stall_after = max(reconnect.stall_timeout_s, 3 * probe.expected_interval_s)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._generation = 0
        self._state = CaptureState.STARTING
        self._last_progress = time.monotonic()
        self._waiting_for_pipeline = False
        self._seq = 0
        self._source: FrameSource | None = None
        self._reader: threading.Thread | None = None
        self._generation_of_reader = 0
        self._watcher: threading.Thread | None = None
        self.frames_in = RateMeter()
        self.frames_total = 0
        self.reconnects = 0
        self.last_error = ""
        self.retry_delay_s = 0.0  # the back-off of the last reconnect
        self._skipped_earlier = 0  # frames skipped by sources this capture replaced
        self._log = LogLimiter(log, interval_s=30.0)

    def check(self) -> None:
        """Raise UserError for a source no retry can fix (missing replay folder, no GStreamer)."""
        if self._probe is not None:
            self._probe.check()

    def start(self) -> None:
        self._start_reader()
        self._watcher = threading.Thread(target=self._watch, name=f"capture-watch-{self.name}", daemon=True)
        self._watcher.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop reading; the mailbox closes (takers get None once the last frame is taken)."""
        self._stop.set()
        with self._lock:
            self._generation += 1
            source = self._source
        if source is not None:
            source.stop_event.set()
        self.frames.close()
        for thread in (self._reader, self._watcher):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout)
        if self._state != CaptureState.FINISHED:
            self._set_state(CaptureState.STOPPED, "")
        self._log.flush()  # repeats a quiet interval hid

    def join(self, timeout: float) -> bool:
        """Wait until no reader thread of this capture runs native code any more (decoders, drivers):
        a thread inside OpenCV when the interpreter exits aborts the process ("terminate called without
        an active exception", exit 134). True when every thread ended."""
        deadline = time.monotonic() + timeout
        for thread in (self._reader, self._watcher):
            if thread is not None and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in (self._reader, self._watcher) if t is not None and t.is_alive()]
        if alive:
            log.warning("%s: capture thread(s) %s still busy after %gs", self.name, ", ".join(alive), timeout)
        return not alive

    @property
    def state(self) -> CaptureState:
        with self._lock:
            state = self._state
            limit = self._stall_after + (self.reconnect.open_timeout_s if state == CaptureState.CONNECTING else 0)
            stalled = (
                state in (CaptureState.STREAMING, CaptureState.CONNECTING)
                and not self._waiting_for_pipeline
                and time.monotonic() - self._last_progress > limit
            )
        return CaptureState.STALLED if stalled else state

    @property
    def finished(self) -> bool:
        return self.state == CaptureState.FINISHED

    def stats(self) -> dict[str, Any]:
        with self._lock:
            age = time.monotonic() - self._last_progress
        return {
            "source": self.description,
            "state": self.state.value,
            "fps_in": round(self.frames_in.rate(), 2),
            "frames": self.frames_total,
            "dropped": self.frames.dropped,
            "reconnects": self.reconnects,
            "retry_delay_s": round(self.retry_delay_s, 3),
            "skipped_unreadable": self.skipped,
            "last_frame_age_s": round(age, 2),
            "last_error": self.last_error,
        }

    @property
    def skipped(self) -> int:
        """Frames the source skipped without a reconnect (a replay's unreadable files), for the life of the capture."""
        source = self._source
        return self._skipped_earlier + (source.skipped if source is not None else 0)

    # the reader thread

    def _start_reader(self) -> None:
        with self._lock:
            generation = self._generation
            self._generation_of_reader = generation
            source = self._probe or self._factory(self.source_config, self.reconnect)
            self._probe = None
            if self._source is not None and self._source is not source:
                self._skipped_earlier += self._source.skipped
            self._source = source
            self._last_progress = time.monotonic()
        self._reader = threading.Thread(
            target=self._read_loop, args=(generation, source), name=f"capture-{self.name}", daemon=True
        )
        self._reader.start()

    def _current(self, generation: int) -> bool:
        return generation == self._generation and not self._stop.is_set()

    def _read_loop(self, generation: int, source: FrameSource) -> None:
        delay = self.reconnect.initial_delay_s
        max_delay = min(self.reconnect.max_delay_s, source.max_retry_delay_s or self.reconnect.max_delay_s)
        try:
            while self._current(generation):
                self._set_state(CaptureState.CONNECTING, source.describe(), generation)
                try:
                    source.open()
                    with self._lock:
                        self._last_progress = time.monotonic()
                    while self._current(generation):
                        pixels = source.read()
                        if not self._current(generation):
                            break
                        if self._deliver(pixels, generation):
                            delay = self.reconnect.initial_delay_s
                except EndOfStream:
                    log.info("%s: %s reached its end", self.name, source.describe())
                    self._set_state(CaptureState.FINISHED, "end of replay", generation)
                    self.frames.close()
                    return
                except SourceError as exc:
                    self._failed(str(exc), generation)
                except Exception as exc:  # a driver or decoder bug must not kill the capture thread
                    log.exception("%s: unexpected error from %s", self.name, source.describe())
                    self._failed(f"{type(exc).__name__}: {exc}", generation)
                finally:
                    source.close()
                if not self._current(generation):
                    return
                delay = min(delay, max_delay)
                self.retry_delay_s = delay
                self._set_state(CaptureState.RECONNECTING, f"retry in {delay:.3g}s: {self.last_error}", generation)
                if self._stop.wait(delay):
                    return
                delay = min(delay * self.reconnect.multiplier, max_delay)
        finally:
            source.close()

    def _deliver(self, pixels: np.ndarray, generation: int) -> bool:
        now_wall, now = time.time(), time.monotonic()
        with self._lock:
            self._seq += 1
            seq = self._seq
            self._last_progress = now
            self._waiting_for_pipeline = self.frames.lossless
        self.frames_total += 1
        self.frames_in.tick()
        if self._state != CaptureState.STREAMING:
            self._set_state(CaptureState.STREAMING, "", generation)
        delivered = self.frames.put(Grabbed(seq, now_wall, now, pixels), self._stop)
        with self._lock:
            self._waiting_for_pipeline = False
            self._last_progress = time.monotonic()
        return delivered

    def _failed(self, message: str, generation: int) -> None:
        if not self._current(generation):
            return
        self.last_error = message
        self.reconnects += 1
        self._log.log(logging.WARNING, "failed", "%s: %s (reconnect #%d)", self.name, message, self.reconnects)

    def _set_state(self, state: CaptureState, detail: str, generation: int | None = None) -> None:
        with self._lock:
            if generation is not None and generation != self._generation and state != CaptureState.STOPPED:
                return
            changed = state != self._state
            self._state = state
        if changed:
            self._log.log(logging.INFO, state.value, "%s: capture %s%s", self.name, state.value, f" ({detail})" if detail else "")
            if self._on_state is not None:
                try:
                    self._on_state(self.name, state, detail)
                except Exception:
                    log.exception("capture state callback failed")

    # the stall watcher

    def _watch(self) -> None:
        waiting_logged = False
        while not self._stop.wait(0.25):
            stuck = self._reader
            if stuck is not None and stuck.is_alive() and self._generation_of_reader != self._generation:
                # The previous reader was told to stop but is still inside a driver call: a second reader
                # would open the device again next to it (EBUSY on V4L2, one more thread and handle per stall).
                if not waiting_logged:
                    log.warning("%s: the stalled reader has not returned yet; reopening once it does", self.name)
                    waiting_logged = True
                continue
            if self._generation_of_reader != self._generation:
                waiting_logged = False
                self._start_reader()
                continue
            if self.state != CaptureState.STALLED:
                continue
            with self._lock:
                silent = time.monotonic() - self._last_progress
                self._generation += 1
                stale = self._source
            if stale is not None:
                stale.stop_event.set()
            self.last_error = f"no frame for {silent:.1f}s (stall timeout {self._stall_after:g}s)"
            self.reconnects += 1
            log.warning("%s: %s: reopening %s (reconnect #%d)", self.name, self.last_error, self.description, self.reconnects)
            self._set_state(CaptureState.STALLED, self.last_error)
            # The stalled reader exits when its call returns and sees it is outdated; the next tick starts
            # a fresh one on a fresh source object, only once it has.
