"""When a frame is inspected: free-run at a rate, on an external (MQTT) trigger, or every new frame.

A trigger turns the capture's stream of frames into inspection requests. `next_request()` waits
(at most `timeout`) and returns a `Request` naming the oldest frame that may answer it (`after_seq`)
and, for external triggers, the part id to echo. It never touches the capture thread.

Example:
    trigger = create_trigger(TriggerConfig(mode="free_run", fps=5))
    request = trigger.next_request(frames, timeout=0.5)   # Request(after_seq, part_id, ...) or None
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass

from ..config.capture import TriggerConfig
from ..daemon.runtime_stats import Counters
from ..log_limit import LogLimiter
from .reader import LatestFrame

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """Inspect the newest frame with seq > after_seq (waiting up to frame_timeout_s for one)."""

    after_seq: int
    frame_timeout_s: float
    part_id: str | None = None
    trigger_time: float | None = None  # UTC epoch seconds the external trigger arrived
    external: bool = False  # True: a missed frame is reported (a PLC waits for this result)


class Trigger:
    mode = "abstract"

    def __init__(self, config: TriggerConfig):
        self.config = config
        self.counters = Counters("triggers", "triggers_dropped")
        self.last_seq = 0  # seq of the last frame handed to the pipeline

    def next_request(self, frames: LatestFrame, timeout: float) -> Request | None:
        raise NotImplementedError

    def fire(self, part_id: str | None = None, received_at: float | None = None) -> bool:
        """An external trigger arrived; only the mqtt mode accepts them."""
        return False

    def pending(self) -> int:
        return 0


class EveryFrameTrigger(Trigger):
    """Each new frame, as soon as the pipeline is free (the capture counts the frames it replaced)."""

    mode = "every_frame"

    def next_request(self, frames: LatestFrame, timeout: float) -> Request | None:
        return Request(after_seq=self.last_seq, frame_timeout_s=timeout)


class FreeRunTrigger(Trigger):
    """The newest frame at a fixed rate; a tick whose frame is not new yet waits for the next frame."""

    mode = "free_run"

    def __init__(self, config: TriggerConfig, clock=time.monotonic, sleep: threading.Event | None = None):
        super().__init__(config)
        self._interval = 1.0 / config.fps
        self._clock = clock
        self._wake = sleep or threading.Event()
        self._next_due: float | None = None

    def next_request(self, frames: LatestFrame, timeout: float) -> Request | None:
        now = self._clock()
        if self._next_due is None:
            self._next_due = now
        wait = self._next_due - now
        if wait > timeout:
            self._wake.wait(timeout)
            return None
        if wait > 0:
            self._wake.wait(wait)
        now = self._clock()
        # Keep the phase; if the pipeline fell behind, start again from now instead of bursting.
        self._next_due = self._next_due + self._interval if now - self._next_due < self._interval else now + self._interval
        return Request(after_seq=self.last_seq, frame_timeout_s=max(self._interval, 0.05))

    def interrupt(self) -> None:
        self._wake.set()


class MqttTrigger(Trigger):
    """Inspect the first frame grabbed after each external trigger (from the MQTT trigger topic)."""

    mode = "mqtt"

    def __init__(self, config: TriggerConfig):
        super().__init__(config)
        self._queue: collections.deque[tuple[str | None, float, int]] = collections.deque()
        self._log = LogLimiter(log)  # a trigger flood: one line per 10 s with the count
        self._cond = threading.Condition()
        self._frames: LatestFrame | None = None

    def attach(self, frames: LatestFrame) -> None:
        """The mailbox whose newest seq marks 'frames grabbed before the trigger'."""
        self._frames = frames

    def fire(self, part_id: str | None = None, received_at: float | None = None) -> bool:
        seen = self._frames.newest_seq if self._frames is not None else 0
        with self._cond:
            if len(self._queue) >= self.config.queue_size:
                self.counters.add("triggers_dropped")
                self._log.log(
                    logging.WARNING, "dropped",
                    "trigger for part %s dropped: %d triggers already wait for the scorer (trigger.queue_size)",
                    part_id, len(self._queue),
                )
                return False
            self._queue.append((part_id, time.time() if received_at is None else received_at, seen))
            self.counters.add("triggers")
            self._cond.notify()
        return True

    def next_request(self, frames: LatestFrame, timeout: float) -> Request | None:
        with self._cond:
            if not self._queue and not self._cond.wait_for(lambda: bool(self._queue), timeout):
                return None
            part_id, received_at, seen = self._queue.popleft()
        return Request(
            after_seq=max(seen, self.last_seq), frame_timeout_s=self.config.frame_timeout_s,
            part_id=part_id, trigger_time=received_at, external=True,
        )

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)


def create_trigger(config: TriggerConfig) -> Trigger:
    if config.mode == "free_run":
        return FreeRunTrigger(config)
    if config.mode == "mqtt":
        return MqttTrigger(config)
    return EveryFrameTrigger(config)
