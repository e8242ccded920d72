"""Frame sources behind one interface, and the capture thread that always holds the newest frame.

Sources (picked by the config's `source.type`): `v4l2` (USB/CSI camera), `url` (RTSP, HTTP MJPEG
through OpenCV's FFmpeg backend), `gstreamer` (a pipeline string ending in appsink) and `replay`
(a folder of images or a video file, paced or as fast as the pipeline takes them).

`Capture` runs one source on its own thread. It never waits for the pipeline: each new frame
replaces the previous one in a one-slot mailbox (`LatestFrame`), and a frame replaced before
anyone took it is counted as dropped. The one exception is a replay at fps 0, which is lossless:
it waits for the pipeline, because a file can wait and a test wants every frame.
A source that fails or stalls (no frame for `stall_timeout_s`) is reopened with exponential back-off.

Example:
    capture = Capture("cam0", ReplaySourceConfig(type="replay", path="frames/"), ReconnectConfig())
    capture.start()
    grabbed = capture.frames.take(after_seq=0, timeout=1.0)   # Grabbed(seq, timestamp, pixels) or None
    capture.stop()
"""

from __future__ import annotations

import enum
import logging
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config.capture import (
    GStreamerSourceConfig,
    ReconnectConfig,
    ReplaySourceConfig,
    UrlSourceConfig,
    V4l2SourceConfig,
)
from .errors import UserError
from .stats import RateMeter

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


class SourceError(Exception):
    """The source cannot deliver a frame right now (device lost, stream broken): reconnect."""


class EndOfStream(Exception):
    """A finite source (replay without loop) has no more frames."""


# --- sources ------------------------------------------------------------------------------------


class FrameSource(ABC):
    """One kind of frame source. `open` and `read` raise SourceError; they are called from one thread."""

    type_key: str = "abstract"
    lossless: bool = False  # True: the capture waits for the pipeline instead of dropping frames

    def __init__(self, config: Any):
        self.config = config
        self.stop_event = threading.Event()  # set by Capture on stop, so a pacing wait ends at once

    def check(self) -> None:
        """Static prerequisites, checked once at startup; raise UserError for what no retry can fix."""

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def read(self) -> np.ndarray:
        """The next frame as HxWx3 uint8 BGR."""

    def close(self) -> None:
        """Release the device or stream. Safe to call when not open."""

    def describe(self) -> str:
        return self.type_key

    @property
    def expected_interval_s(self) -> float:
        """Longest normal gap between frames (0 = unknown); stall detection never fires below 3x this."""
        return 0.0


def to_bgr(frame: np.ndarray) -> np.ndarray:
    """Grayscale or BGRA frames as 3-channel BGR uint8 (what the scorer takes)."""
    import cv2

    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    if frame.dtype != np.uint8:
        raise SourceError(f"frames of type {frame.dtype} are not supported; configure the source for 8-bit output")
    return frame


class _OpenCvSource(FrameSource):
    """Shared read/close for sources that OpenCV's VideoCapture opens."""

    def __init__(self, config: Any, reconnect: ReconnectConfig | None = None):
        super().__init__(config)
        self.reconnect = reconnect or ReconnectConfig()
        self._cap = None

    @abstractmethod
    def _create(self):
        """Return an opened-or-not cv2.VideoCapture."""

    def open(self) -> None:
        self.close()
        cap = self._create()
        if cap is None or not cap.isOpened():
            if cap is not None:
                cap.release()
            raise SourceError(f"cannot open {self.describe()}")
        self._cap = cap

    def read(self) -> np.ndarray:
        if self._cap is None:
            raise SourceError("source is not open")
        ok, frame = self._cap.read()
        if not ok or frame is None:
            raise SourceError(f"no frame from {self.describe()} (stream ended, timed out or device lost)")
        return to_bgr(frame)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def _timeouts(self) -> list[int]:
        import cv2

        return [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.reconnect.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.reconnect.stall_timeout_s * 1000),
        ]


class V4l2Source(_OpenCvSource):
    type_key = "v4l2"
    config: V4l2SourceConfig

    def _create(self):
        import cv2

        device = self.config.device
        if isinstance(device, str) and not os.path.exists(device):
            raise SourceError(f"{device} does not exist (camera unplugged? check `v4l2-ctl --list-devices`)")
        cap = cv2.VideoCapture(device, cv2.CAP_V4L2)
        if not cap.isOpened():
            return cap
        if self.config.fourcc:
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*self.config.fourcc))
        if self.config.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.config.width)
        if self.config.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.config.height)
        if self.config.fps:
            cap.set(cv2.CAP_PROP_FPS, self.config.fps)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # keep the driver queue short: newest frame, not a backlog
        got = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), cap.get(cv2.CAP_PROP_FPS))
        if (self.config.width and got[0] != self.config.width) or (self.config.height and got[1] != self.config.height):
            log.warning(
                "%s: asked for %dx%d, the driver gives %dx%d (list modes with `v4l2-ctl --list-formats-ext`)",
                self.describe(), self.config.width, self.config.height, got[0], got[1],
            )
        return cap

    def describe(self) -> str:
        device = self.config.device
        return f"v4l2 {device if isinstance(device, str) else f'/dev/video{device}'}"

    @property
    def expected_interval_s(self) -> float:
        return 1.0 / self.config.fps if self.config.fps else 0.0


_FFMPEG_OPTIONS_LOCK = threading.Lock()


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(text: str) -> str:
    """Replace ${NAME} with the environment variable NAME (camera passwords stay out of the config)."""

    def value(match: re.Match) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise UserError(f"source.url refers to ${{{name}}} but the environment variable {name} is not set")
        return os.environ[name]

    return _ENV_REFERENCE.sub(value, text)


class UrlSource(_OpenCvSource):
    type_key = "url"
    config: UrlSourceConfig

    def check(self) -> None:
        expand_env(self.config.url)

    def _create(self):
        import cv2

        try:
            url = expand_env(self.config.url)
        except UserError as exc:
            raise SourceError(str(exc)) from None

        # OpenCV reads FFmpeg demuxer options from this variable when a capture opens.
        with _FFMPEG_OPTIONS_LOCK:
            previous = os.environ.get("OPENCV_FFMPEG_CAPTURE_OPTIONS")
            if self.config.url.startswith(("rtsp://", "rtsps://")):
                os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = f"rtsp_transport;{self.config.rtsp_transport}"
            try:
                return cv2.VideoCapture(url, cv2.CAP_FFMPEG, self._timeouts())
            finally:
                if previous is None:
                    os.environ.pop("OPENCV_FFMPEG_CAPTURE_OPTIONS", None)
                else:
                    os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = previous

    def describe(self) -> str:
        return f"url {redact_url(self.config.url)}"


def opencv_has_gstreamer() -> bool:
    import cv2

    return re.search(r"GStreamer:\s+YES", cv2.getBuildInformation()) is not None


class GStreamerSource(_OpenCvSource):
    type_key = "gstreamer"
    config: GStreamerSourceConfig

    def check(self) -> None:
        if not opencv_has_gstreamer():
            raise UserError(
                "source.type gstreamer: this OpenCV build has no GStreamer support (opencv-python wheels never "
                "have it). Use the distribution's OpenCV (apt install python3-opencv; on Jetson the JetPack one) "
                "in a venv created with --system-site-packages, or use a v4l2/url source."
            )

    def _create(self):
        import cv2

        return cv2.VideoCapture(self.config.pipeline, cv2.CAP_GSTREAMER)

    def describe(self) -> str:
        head = self.config.pipeline.split("!")[0].strip()
        return f"gstreamer {head} ! ..."


class ReplaySource(FrameSource):
    """A folder of images (name order) or a video file. Reopening resumes where it stopped."""

    type_key = "replay"
    config: ReplaySourceConfig

    def __init__(self, config: ReplaySourceConfig, reconnect: ReconnectConfig | None = None):
        super().__init__(config)
        self.lossless = config.fps == 0
        self.path = Path(config.path)
        self._files: list[Path] | None = None
        self._cap = None
        self._position = 0
        self._next_due: float | None = None

    def check(self) -> None:
        if not self.path.exists():
            raise UserError(f"source.path {str(self.path)!r} does not exist; give a folder of images or a video file")
        if self.path.is_dir() and not self._list_images():
            raise UserError(
                f"source.path {str(self.path)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )

    def _list_images(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())

    def open(self) -> None:
        import cv2

        self._next_due = None
        if self.path.is_dir():
            if self._files is None:
                self._files = self._list_images()
            if not self._files:
                raise SourceError(f"no images in {self.path}")
            return
        if not self.path.is_file():
            raise SourceError(f"{self.path} does not exist")
        self.close()
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open video {self.path}")
        if self._position:
            cap.set(cv2.CAP_PROP_POS_FRAMES, self._position)
        self._cap = cap

    def read(self) -> np.ndarray:
        self._pace()
        if self._files is not None:
            return self._read_image()
        return self._read_video()

    def _read_image(self) -> np.ndarray:
        import cv2

        assert self._files is not None
        if self._position >= len(self._files):
            if not self.config.loop:
                raise EndOfStream(str(self.path))
            self._position = 0
        file = self._files[self._position]
        self._position += 1  # a broken file is skipped after the reconnect, not retried forever
        image = cv2.imread(str(file), cv2.IMREAD_COLOR)
        if image is None:
            raise SourceError(f"cannot read image {file}")
        return image

    def _read_video(self) -> np.ndarray:
        import cv2

        if self._cap is None:
            raise SourceError("video is not open")
        ok, frame = self._cap.read()
        if not ok:
            if not self.config.loop:
                raise EndOfStream(str(self.path))
            if self._position == 0:
                raise SourceError(f"video {self.path} has no readable frames")
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            self._position = 0
            ok, frame = self._cap.read()
            if not ok:
                raise SourceError(f"video {self.path} cannot be read from the start")
        self._position += 1
        return to_bgr(frame)

    def _pace(self) -> None:
        if self.config.fps <= 0:
            return
        interval = 1.0 / self.config.fps
        now = time.monotonic()
        if self._next_due is None or now - self._next_due > interval:
            self._next_due = now  # first frame, or fell behind: do not burst to catch up
        wait = self._next_due - now
        if wait > 0:
            self.stop_event.wait(wait)
        self._next_due += interval

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def describe(self) -> str:
        pace = f"{self.config.fps:g} fps" if self.config.fps else "lossless"
        return f"replay {self.path} ({pace}{', loop' if self.config.loop else ''})"

    @property
    def expected_interval_s(self) -> float:
        return 1.0 / self.config.fps if self.config.fps else 0.0


SOURCE_TYPES: dict[str, type[FrameSource]] = {
    cls.type_key: cls for cls in (V4l2Source, UrlSource, GStreamerSource, ReplaySource)
}


def create_source(config: Any, reconnect: ReconnectConfig | None = None) -> FrameSource:
    """Build the source class registered under `config.type`."""
    try:
        cls = SOURCE_TYPES[config.type]
    except KeyError:
        raise UserError(f"source.type {config.type!r} is not known; use one of {', '.join(SOURCE_TYPES)}") from None
    return cls(config, reconnect)  # type: ignore[call-arg]


def redact_url(url: str) -> str:
    """rtsp://user:secret@host/... -> rtsp://user:***@host/... (for logs and status)."""
    return re.sub(r"(//[^/:@]+):[^@/]*@", r"\1:***@", url)


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
        self._watcher: threading.Thread | None = None
        self.frames_in = RateMeter()
        self.frames_total = 0
        self.reconnects = 0
        self.last_error = ""

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
            "last_frame_age_s": round(age, 2),
            "last_error": self.last_error,
        }

    # the reader thread

    def _start_reader(self) -> None:
        with self._lock:
            generation = self._generation
            source = self._probe or self._factory(self.source_config, self.reconnect)
            self._probe = None
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
                self._set_state(CaptureState.RECONNECTING, f"retry in {delay:.3g}s: {self.last_error}", generation)
                if self._stop.wait(delay):
                    return
                delay = min(delay * self.reconnect.multiplier, self.reconnect.max_delay_s)
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
        log.warning("%s: %s (reconnect #%d)", self.name, message, self.reconnects)

    def _set_state(self, state: CaptureState, detail: str, generation: int | None = None) -> None:
        with self._lock:
            if generation is not None and generation != self._generation and state != CaptureState.STOPPED:
                return
            changed = state != self._state
            self._state = state
        if changed:
            log.info("%s: capture %s%s", self.name, state.value, f" ({detail})" if detail else "")
            if self._on_state is not None:
                try:
                    self._on_state(self.name, state, detail)
                except Exception:
                    log.exception("capture state callback failed")

    # the stall watcher

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
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
            # The stalled reader may be stuck inside a driver call: leave it (it exits when the call
            # returns and sees it is outdated) and read on a fresh source object.
            self._start_reader()


# --- the camera's view: ROI crop and resize before scoring --------------------------------------


def camera_view(pixels: np.ndarray, roi: tuple[int, int, int, int] | None, resize: tuple[int, int] | None) -> np.ndarray:
    """Crop the camera ROI (x, y, w, h; clipped to the frame) and resize to (width, height)."""
    import cv2

    view = pixels
    if roi is not None:
        x, y, w, h = roi
        H, W = pixels.shape[:2]
        x0, y0, x1, y1 = min(max(0, x), W), min(max(0, y), H), min(W, x + w), min(H, y + h)
        if x1 <= x0 or y1 <= y0:
            raise SourceError(f"camera roi {roi} lies outside the {W}x{H} frame; fix cameras[].roi")
        view = pixels[y0:y1, x0:x1]
    if resize is not None and (view.shape[1], view.shape[0]) != tuple(resize):
        shrink = view.shape[1] > resize[0] or view.shape[0] > resize[1]
        view = cv2.resize(view, tuple(resize), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return np.ascontiguousarray(view)


def view_to_frame_box(
    box: tuple[int, int, int, int],
    view_size: tuple[int, int],
    roi: tuple[int, int, int, int] | None,
    frame_size: tuple[int, int],
) -> tuple[int, int, int, int]:
    """A box (x0, y0, x1, y1) in camera-view pixels -> the same box in frame pixels.

    view_size and frame_size are (height, width); the view is the roi (clipped) resized to view_size.
    """
    H, W = frame_size
    if roi is None:
        x0, y0, cw, ch = 0, 0, W, H
    else:
        x, y, w, h = roi
        x0, y0 = min(max(0, x), W), min(max(0, y), H)
        cw, ch = min(W, x + w) - x0, min(H, y + h) - y0
    sx, sy = cw / view_size[1], ch / view_size[0]
    bx0, by0, bx1, by1 = box
    return (
        x0 + int(bx0 * sx), y0 + int(by0 * sy),
        x0 + min(cw, int(round(bx1 * sx))), y0 + min(ch, int(round(by1 * sy))),
    )
