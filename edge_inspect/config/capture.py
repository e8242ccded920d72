"""Config of the capture side: one camera = a frame source, a trigger, an ROI and a product.

The `source` key is a tagged union picked by `type` (Frigate's one-interface-many-backends shape):
`v4l2`, `url`, `gstreamer` or `replay`. The daemon section (`pipeline`) sizes the queues that
connect the stages and says how fast a stop must drain.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from ..records import NAME_PATTERN, is_product_name
from .base import Section


class V4l2SourceConfig(Section):
    type: Literal["v4l2"] = Field(description="A USB/CSI camera through the Linux V4L2 driver.")
    device: Union[int, str] = Field(
        0,
        description="Device index (0 = /dev/video0) or a device path such as /dev/video2 or "
        "/dev/v4l/by-id/usb-...-video-index0 (stable across reboots).",
    )
    width: int = Field(0, ge=0, le=16384, description="Requested frame width in pixels; 0 = driver default.")
    height: int = Field(0, ge=0, le=16384, description="Requested frame height in pixels; 0 = driver default.")
    fps: float = Field(0.0, ge=0, le=1000, description="Requested camera frame rate; 0 = driver default.")
    fourcc: str = Field(
        "",
        description="Pixel format as a four-character code, e.g. MJPG (compressed, high resolutions over USB 2) "
        "or YUYV; empty = driver default.",
    )

    @field_validator("fourcc")
    @classmethod
    def _four_chars(cls, value: str) -> str:
        if value and len(value) != 4:
            raise ValueError(f"fourcc must be exactly four characters such as MJPG or YUYV, got {value!r}")
        return value

    @field_validator("device")
    @classmethod
    def _device_form(cls, value: int | str) -> int | str:
        if isinstance(value, int):
            if value < 0:
                raise ValueError("device index must be 0 or more (0 = /dev/video0)")
            return value
        if value.isdigit():
            return int(value)
        if not value.startswith("/dev/"):
            raise ValueError(f"device must be an index or a path under /dev/, got {value!r}")
        return value


class UrlSourceConfig(Section):
    type: Literal["url"] = Field(description="A network stream (RTSP, HTTP MJPEG, ...) read by OpenCV's FFmpeg backend.")
    url: str = Field(
        description="Stream address, e.g. rtsp://10.0.0.5:554/stream1 or http://10.0.0.6/video.mjpg. "
        "Keep a camera password out of the file: write ${NAME} (e.g. rtsp://admin:${CAMERA_PASSWORD}@10.0.0.5/s1) "
        "and set the environment variable NAME (systemd: EnvironmentFile= with mode 0600). Logs show it as ***."
    )
    rtsp_transport: Literal["tcp", "udp"] = Field(
        "tcp", description="RTSP transport; tcp survives packet loss on factory networks, udp has lower latency."
    )

    @field_validator("url")
    @classmethod
    def _has_scheme(cls, value: str) -> str:
        if not re.match(r"^(rtsp|rtsps|rtmp|http|https|udp|tcp|srt)://.+", value):
            raise ValueError(
                f"url must start with rtsp://, http://, https://, rtmp://, udp://, tcp:// or srt://, got {value!r}"
            )
        return value


class GStreamerSourceConfig(Section):
    type: Literal["gstreamer"] = Field(description="A GStreamer pipeline string ending in appsink (needs an OpenCV built with GStreamer).")
    pipeline: str = Field(
        description="Pipeline that ends in `appsink`, delivering BGR frames, e.g. for a Jetson CSI camera: "
        "nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width=1920,height=1080,framerate=30/1 ! "
        "nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! "
        "appsink drop=true max-buffers=1 sync=false"
    )

    @field_validator("pipeline")
    @classmethod
    def _ends_in_appsink(cls, value: str) -> str:
        if "appsink" not in value:
            raise ValueError("pipeline must end in an appsink element (e.g. `... ! appsink drop=true max-buffers=1`)")
        return value


class ReplaySourceConfig(Section):
    type: Literal["replay"] = Field(description="A folder of images (sorted by name) or a video file, for tests, demos and re-runs.")
    path: str = Field(min_length=1, description="Folder of .png/.jpg/.bmp/.tif images, or a video file.")
    fps: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="Replay pace in frames per second; 0 = as fast as the pipeline takes them (no frame is dropped).",
    )
    loop: bool = Field(False, description="Start again at the end; false = the camera finishes (the daemon exits once all cameras finished).")
    lossless: bool | None = Field(
        None,
        description="Wait for the pipeline instead of dropping a frame it has not taken yet. null = only at fps 0; "
        "true = at any fps (the pace is then at most fps: every frame is inspected, e.g. demos and tests on a busy "
        "machine); false = drop like a camera does, even at fps 0.",
    )


SourceConfig = Annotated[
    Union[V4l2SourceConfig, UrlSourceConfig, GStreamerSourceConfig, ReplaySourceConfig],
    Field(discriminator="type"),
]


class ReconnectConfig(Section):
    initial_delay_s: float = Field(0.5, gt=0, le=60, description="Wait before the first reconnect attempt.")
    max_delay_s: float = Field(30.0, gt=0, le=3600, description="Upper bound of the exponential back-off.")
    multiplier: float = Field(2.0, ge=1, le=10, description="Back-off growth per failed attempt.")
    stall_timeout_s: float = Field(
        5.0, gt=0, le=3600, description="No frame for this long = the source stalled: it is closed and reopened."
    )
    open_timeout_s: float = Field(10.0, gt=0, le=600, description="Give up opening a network source after this long.")

    @model_validator(mode="after")
    def _max_not_below_initial(self) -> "ReconnectConfig":
        if self.max_delay_s < self.initial_delay_s:
            raise ValueError(
                f"max_delay_s ({self.max_delay_s}) must be >= initial_delay_s ({self.initial_delay_s})"
            )
        return self


class TriggerConfig(Section):
    mode: Literal["free_run", "mqtt", "every_frame"] = Field(
        "free_run",
        description="free_run: inspect the newest frame at `fps`; mqtt: inspect the first frame grabbed after each "
        "message on the trigger topic (a PLC/MES publishes it; a part id in it is echoed in the result); "
        "every_frame: inspect each new frame as soon as the scorer is free.",
    )
    fps: float = Field(2.0, gt=0, le=1000, description="Inspection rate for free_run.")
    frame_timeout_s: float = Field(
        1.0, gt=0, le=60,
        description="mqtt: wait this long for a frame grabbed after the trigger; none = the trigger is logged and counted as missed.",
    )
    queue_size: int = Field(
        16, ge=1, le=1024, description="mqtt: triggers waiting for the scorer; more are logged and counted as dropped."
    )


class RoiConfig(Section):
    x: int = Field(0, ge=0, description="Left edge of the crop in source pixels.")
    y: int = Field(0, ge=0, description="Top edge of the crop in source pixels.")
    width: int = Field(gt=0, description="Crop width in pixels.")
    height: int = Field(gt=0, description="Crop height in pixels.")


class CameraConfig(Section):
    name: str = Field(
        pattern=NAME_PATTERN,
        description="Camera id used in MQTT topics, logs and results (letters, digits, _ . -).",
    )
    source: SourceConfig = Field(description="Where frames come from; `type` picks v4l2, url, gstreamer or replay.")
    product: str = Field(
        pattern=NAME_PATTERN,
        description="Calibrated product to score against (calibration/<product>/; letters, digits, _ . -); "
        "switchable at run time over MQTT.",
    )

    @field_validator("product")
    @classmethod
    def _product_name(cls, value: str) -> str:
        if not is_product_name(value):
            raise ValueError(f"{value!r} is not a product name: 1-64 letters, digits, _ . -, starting with a letter or digit, no '..'")
        return value
    trigger: TriggerConfig = Field(default_factory=TriggerConfig, description="When a frame is inspected.")
    roi: RoiConfig | None = Field(
        None,
        description="Crop applied to every frame before scoring (the camera's view of the part); "
        "null = the whole frame. The product calibration's own ROI, if any, applies inside this crop.",
    )
    resize: tuple[int, int] | None = Field(
        None,
        description="[width, height] to resize the cropped frame to before scoring (match what calibration "
        "images looked like); null = keep the size.",
    )
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig, description="Reconnect back-off and stall detection.")

    @field_validator("resize")
    @classmethod
    def _positive_size(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and (value[0] < 8 or value[1] < 8 or value[0] > 16384 or value[1] > 16384):
            raise ValueError(f"resize must be [width, height] with each between 8 and 16384, got {list(value)}")
        return value

    @property
    def roi_box(self) -> tuple[int, int, int, int] | None:
        """The crop as capture.geometry takes it, (x, y, width, height); the pipeline and feedback (which must
        crop a stored frame exactly as the scorer saw it) both read it here."""
        return (self.roi.x, self.roi.y, self.roi.width, self.roi.height) if self.roi else None

    @property
    def resize_to(self) -> tuple[int, int] | None:
        """(width, height) for capture.geometry.camera_view, or None."""
        return tuple(self.resize) if self.resize else None  # type: ignore[return-value]


class PipelineConfig(Section):
    score_queue_size: int = Field(
        2, ge=1, le=64,
        description="Frames waiting for the scorer per camera. Small on purpose: the pipeline works on the newest frame, never a backlog.",
    )
    flagged_queue_size: int = Field(
        5, ge=1, le=1024,
        description="Flagged frames held for the explanation stage (VLM), the one being explained included. When "
        "full, the highest-scoring frames are kept: a new flagged frame takes the place of a lower-scoring queued one "
        "(that one's update says skipped) or is published with vlm_status=skipped and counted; the scorer never waits. "
        "Replaces vlm.queue_size (still read: N there means N + 1 here).",
    )
    drain_timeout_s: float = Field(
        10.0, gt=0, le=600,
        description="On stop (SIGTERM), finish queued inspections for at most this long; keep below systemd TimeoutStopSec.",
    )
    latency_window: int = Field(
        1024, ge=16, le=1_000_000, description="Recent inspections the latency percentiles are computed over."
    )
