"""The typed, immutable records that flow between the pipeline stages.

capture -> Frame -> scoring -> ScoreResult -> localize -> Region[] -> Inspection
-> publish (result payload) ... vlm -> Verdict -> publish (result update payload)

Records hold plain numpy arrays and Python values; they never hold sockets, sessions or models,
so every stage can be tested alone.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

# AnomalyGPT's nine location words for a 3x3 grid, row-major from the top left.
GRID_WORDS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)

Verdict_OK_NG = Literal["OK", "NG"]
VlmStatus = Literal["pending", "done", "failed", "skipped"]


# Stations, cameras and products: a plain name, safe as an MQTT topic level and as a folder name.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# Inspection ids: a topic level (.../image/<id>) and the stem of the evidence files.
INSPECTION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_NAME = re.compile(NAME_PATTERN)
_INSPECTION_ID = re.compile(INSPECTION_ID_PATTERN)


def is_plain_name(text: object) -> bool:
    """A station, camera or product name: 1-64 letters, digits, _ . -, starting with a letter or digit."""
    return isinstance(text, str) and _NAME.fullmatch(text) is not None


def is_product_name(text: object) -> bool:
    """The one product-name rule (config, calibrate, product/set): a plain name without '..'.

    Example: is_product_name("bracket-a") is True; is_product_name("abc\n") is False.
    """
    return is_plain_name(text) and ".." not in text  # type: ignore[operator]


def is_inspection_id(text: object) -> bool:
    """An inspection id as new_inspection_id() makes them (letters, digits, _ and -, at most 64)."""
    return isinstance(text, str) and _INSPECTION_ID.fullmatch(text) is not None


def new_inspection_id() -> str:
    """A globally unique, sortable-enough id for one inspection (uuid4 hex)."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Frame:
    """One captured image, as BGR uint8 pixels (OpenCV's order)."""

    frame_id: int
    timestamp: float  # UTC seconds since the epoch, taken when the frame was grabbed
    source: str  # camera name or source description
    pixels: np.ndarray  # HxWx3 uint8 BGR
    part_id: str | None = None  # from an external trigger, echoed in the result
    trigger_time: float | None = None


@dataclass(frozen=True)
class ScoreResult:
    """The scorer's output for one frame."""

    score: float  # image anomaly score (max of the smoothed anomaly map)
    threshold: float
    anomaly_map: np.ndarray  # HxW float32 at the scorer's input resolution
    latency_ms: float = 0.0
    # [D, h, w] patch features the map was scored from; only when asked for (stream learning) and the
    # scorer graph takes the bank as an input.
    patch_features: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def flagged(self) -> bool:
        return self.score >= self.threshold

    @property
    def verdict(self) -> Verdict_OK_NG:
        return "NG" if self.flagged else "OK"


@dataclass(frozen=True)
class Region:
    """One connected anomalous area of a frame, in the coordinates of the image given to localize."""

    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (pixels, x1/y1 exclusive)
    area_pct: float  # region area as % of the image
    peak: float  # highest anomaly score inside the region
    grid_words: tuple[str, ...]  # 3x3 grid cells the region covers, strongest first
    centroid: tuple[float, float] = (0.0, 0.0)  # x, y in pixels

    def to_json(self) -> dict[str, Any]:
        return {
            "box": list(self.box),
            "area_pct": round(float(self.area_pct), 3),
            "peak": round(float(self.peak), 4),
            "grid": list(self.grid_words),
        }


@dataclass(frozen=True)
class Verdict:
    """The VLM's explanation of a flagged frame (schema-constrained JSON, parsed)."""

    defect: bool
    defect_type: str
    location: tuple[str, ...]
    description: str
    confidence: float
    model: str = ""
    latency_ms: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "defect": self.defect,
            "defect_type": self.defect_type,
            "location": list(self.location),
            "description": self.description,
            "confidence": round(float(self.confidence), 3),
            "model": self.model,
            "latency_ms": round(float(self.latency_ms), 1),
        }


@dataclass(frozen=True)
class Inspection:
    """Everything known about one inspected frame when its result is published."""

    inspection_id: str
    station: str
    camera: str
    product: str
    frame_id: int
    timestamp: float
    score: float
    threshold: float
    verdict: Verdict_OK_NG
    regions: tuple[Region, ...] = ()
    part_id: str | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    calibration_id: str = ""
    calibration_version: int | None = None  # scorer/versions.py; None: calibrated before versioning
    model_id: str = ""
    vlm_status: VlmStatus = "skipped"
    evidence_path: str | None = None

    def replace(self, **changes: Any) -> "Inspection":
        return dataclasses.replace(self, **changes)
