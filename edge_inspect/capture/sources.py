"""Frame sources behind one interface (Frigate's detector-plugin shape, picked by `source.type`).

`v4l2` (USB/CSI camera), `url` (RTSP, HTTP MJPEG through OpenCV's FFmpeg backend), `gstreamer` (a
pipeline string ending in appsink) and `replay` (a folder of images or a video file, paced or as
fast as the pipeline takes them). The thread that runs a source is `capture.reader.Capture`.

Example:
    source = create_source(ReplaySourceConfig(type="replay", path="frames/"))
    source.check(); source.open(); bgr = source.read(); source.close()
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..config.capture import (
    GStreamerSourceConfig,
    ReconnectConfig,
    ReplaySourceConfig,
    UrlSourceConfig,
    V4l2SourceConfig,
)
from .. import imageio
from ..errors import UserError
from ..imageio import check_decode_size, check_frame, frame_note
from ..log_limit import LogLimiter

log = logging.getLogger(__name__)

# A folder replay retries a failed pass (an emptied folder, nothing readable) at most this far apart: a local
# folder costs nothing to look at, and files that come back should play at once, not after a long back-off.
REPLAY_MAX_RETRY_S = 1.0
# Unreadable replay files named one by one (each the first time it is seen); beyond this, and for repeats on
# a loop, one line per interval with the count.
_NAMED_BAD_FILES = 20

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

    @property
    def max_retry_delay_s(self) -> float | None:
        """Cap on the reconnect back-off for this kind of source (None: reconnect.max_delay_s alone)."""
        return None

    @property
    def skipped(self) -> int:
        """Frames the source skipped without failing (a replay's unreadable files)."""
        return 0


def to_bgr(frame: np.ndarray) -> np.ndarray:
    """Grey, 16-bit or BGRA frames as 3-channel BGR uint8 (what the scorer takes); a frame too small or of
    an unknown layout is a SourceError saying so."""
    try:
        check_frame(frame, "the frame")
    except UserError as exc:
        raise SourceError(str(exc)) from None
    return imageio.to_bgr(frame)


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
        return [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.reconnect.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.reconnect.stall_timeout_s * 1000),
        ]


class V4l2Source(_OpenCvSource):
    type_key = "v4l2"
    config: V4l2SourceConfig

    def _create(self):
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


class _FfmpegOptions:
    """OPENCV_FFMPEG_CAPTURE_OPTIONS is process-wide and read while a capture opens. Opens that need the
    same value (or none) run side by side; only one needing a different value waits. No lock is held
    through an open, so one camera's 10 s timeout never serialises every other camera's reconnect."""

    VARIABLE = "OPENCV_FFMPEG_CAPTURE_OPTIONS"

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._value: str | None = None
        self._users = 0
        self._previous: str | None = None

    @contextlib.contextmanager
    def using(self, value: str | None):
        if value is None:  # needs no option: an http(s) open ignores an rtsp_transport set for another camera
            yield
            return
        with self._cond:
            while self._users and self._value != value:
                self._cond.wait()
            if self._users == 0:
                self._previous = os.environ.get(self.VARIABLE)
                os.environ[self.VARIABLE] = value
                self._value = value
            self._users += 1
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                if self._users == 0:
                    if self._previous is None:
                        os.environ.pop(self.VARIABLE, None)
                    else:
                        os.environ[self.VARIABLE] = self._previous
                    self._value = None
                    self._cond.notify_all()


_FFMPEG_OPTIONS = _FfmpegOptions()


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
        try:
            url = expand_env(self.config.url)
        except UserError as exc:
            raise SourceError(str(exc)) from None

        # OpenCV reads FFmpeg demuxer options from this variable when a capture opens.
        rtsp = self.config.url.startswith(("rtsp://", "rtsps://"))
        with _FFMPEG_OPTIONS.using(f"rtsp_transport;{self.config.rtsp_transport}" if rtsp else None):
            return cv2.VideoCapture(url, cv2.CAP_FFMPEG, self._timeouts())

    def describe(self) -> str:
        return f"url {redact_url(self.config.url)}"


def opencv_has_gstreamer() -> bool:
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
        return cv2.VideoCapture(self.config.pipeline, cv2.CAP_GSTREAMER)

    def describe(self) -> str:
        head = self.config.pipeline.split("!")[0].strip()
        return f"gstreamer {head} ! ..."


class ReplaySource(FrameSource):
    """A folder of images (name order) or a video file. Reopening resumes where it stopped.

    An unreadable image is skipped at once (logged and counted in `skipped`), never a reconnect; only a
    whole pass with nothing readable (or an emptied folder) is a SourceError, retried at most
    REPLAY_MAX_RETRY_S apart. The folder is listed again at every pass and every reopen, so files added
    or put back play without a restart.
    """

    type_key = "replay"
    config: ReplaySourceConfig

    def __init__(self, config: ReplaySourceConfig, reconnect: ReconnectConfig | None = None):
        super().__init__(config)
        self.lossless = config.fps == 0 if config.lossless is None else config.lossless
        self.path = Path(config.path)
        self._files: list[Path] | None = None
        self._cap = None
        self._position = 0
        self._next_due: float | None = None
        self._noted: set[str] = set()
        self._named: set[str] = set()  # unreadable files already named in the log
        self.last_skip = ""  # why the last unreadable file was skipped
        self._skipped = 0
        self._log = LogLimiter(log, interval_s=30.0)

    def check(self) -> None:
        if not self.path.exists():
            raise UserError(f"source.path {str(self.path)!r} does not exist; give a folder of images or a video file")
        if self.path.is_dir() and not self._list_images():
            raise UserError(
                f"source.path {str(self.path)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )

    def _list_images(self) -> list[Path]:
        try:
            return sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        except OSError:
            return []  # the folder itself is gone: open() says so

    @property
    def skipped(self) -> int:
        return self._skipped

    @property
    def max_retry_delay_s(self) -> float | None:
        return REPLAY_MAX_RETRY_S

    def open(self) -> None:
        self._next_due = None
        if self.path.is_dir():
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
        assert self._files is not None
        tried, last_reason = 0, ""
        while True:
            if self._position >= len(self._files):
                if not self.config.loop:
                    raise EndOfStream(str(self.path))
                self._position = 0
                self._files = self._list_images()  # a new pass sees files added or removed meanwhile
            if not self._files:
                raise SourceError(f"no images in {self.path}")
            if tried >= len(self._files):
                raise SourceError(f"no readable image in {self.path} ({tried} skipped in a row; last: {last_reason})")
            file = self._files[self._position]
            self._position += 1
            tried += 1
            try:
                image = self._decode(file)
            except SourceError as exc:
                last_reason = str(exc)
                self._skip(file, last_reason)
                continue
            note = frame_note(image)
            if note is not None and note not in self._noted:
                self._noted.add(note)
                log.warning("replay %s: %s (%s); calibrate with frames of the same kind", self.path, note, file.name)
            return to_bgr(image)

    def _decode(self, file: Path) -> np.ndarray:
        try:
            with open(file, "rb") as f:
                data = f.read()
            check_decode_size(file, data[:65536])  # never decode a 64 MP file just to find out
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
            if image is not None:
                check_frame(image, f"image {file}")
        except (OSError, UserError, cv2.error) as exc:
            raise SourceError(f"cannot read image {file} (skipped): {str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}") from None
        if image is None:
            raise SourceError(f"cannot read image {file} (skipped): empty, truncated or not an image file")
        return image

    def _skip(self, file: Path, reason: str) -> None:
        """Count an unreadable file; name it the first time, later ones (and repeats on a loop) limited."""
        self._skipped += 1
        self.last_skip = reason
        if file.name not in self._named and len(self._named) < _NAMED_BAD_FILES:
            self._named.add(file.name)
            log.warning("replay: %s", reason)
        else:
            self._log.log(logging.WARNING, "unreadable", "replay %s: %d unreadable image(s) skipped so far (last: %s)",
                          self.path, self._skipped, reason)

    def _read_video(self) -> np.ndarray:
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
        if self.config.fps and self.lossless:
            pace += ", lossless"
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
