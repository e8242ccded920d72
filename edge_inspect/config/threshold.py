"""Config of the live stream as evidence: the drift alarm and the optional `threshold.adapt`.

Why a section of its own: the threshold is set at calibration from a handful of good parts; on the
line the stream of OK scores shows whether the line still looks like that calibration (lighting,
focus, camera position, batches). The algorithm is daemon/drift.py; docs/calibration.md explains it.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from .base import Section


class ThresholdConfig(Section):
    """Per product, the OK scores of the last `window` frames compared with the calibration: a drift
    alarm (stats, status, log) when they move toward the threshold, and with `adapt: true` a threshold
    that follows the stream within bounds set by the calibration, each change a new calibration version.
    Applied on SIGHUP."""

    window: int = Field(
        200, ge=10, le=100_000,
        description="OK scores (frames below the threshold) per product in the rolling window; the flag rate is over "
        "the last `window` frames of the product.",
    )
    min_frames: int = Field(
        50, ge=5, le=100_000,
        description="OK scores the window needs before it may raise a drift alarm or adapt the threshold "
        "(at most `window`).",
    )
    drift_alarm: float = Field(
        0.5, gt=0, le=10,
        description="Alarm when the window's median OK score has moved this far from the calibration's median toward "
        "the threshold (0 = like calibration, 1 = at the threshold); it clears below 0.8 x this value.",
    )
    drift_flag_rate: float = Field(
        0.5, gt=0, le=1,
        description="Also alarm when this share of the last `window` frames (at least `min_frames`) is NG: a moved "
        "camera or a light that went out makes every frame NG, and then no OK score moves; 1 = only when every "
        "frame is NG. Clears below 0.8 x this value.",
    )
    adapt: bool = Field(
        False,
        description="Let the threshold follow the stream: median + (the calibration's margin in spreads) x spread of "
        "the window, within [threshold x (1 - adapt_max_drop), threshold x (1 + adapt_max_rise)] of the last "
        "calibration that was not an adapt step. Every change is logged and is a new calibration version "
        "(change threshold_adapt); while the drift alarm is on the threshold is never raised, only lowered.",
    )
    adapt_every: int | None = Field(
        None, ge=1, le=1_000_000,
        description="New OK frames between two adapt steps; null = `window` (a step sees a whole new window).",
    )
    adapt_min_change: float = Field(
        0.02, ge=0, le=0.5,
        description="Adapt only when the new threshold differs from the active one by at least this share of it "
        "(fewer versions for noise).",
    )
    adapt_max_drop: float = Field(
        0.10, ge=0, lt=1,
        description="The adapted threshold never goes below the calibrated one by more than this share.",
    )
    adapt_max_rise: float = Field(
        0.25, ge=0, le=10,
        description="The adapted threshold never goes above the calibrated one by more than this share.",
    )

    @model_validator(mode="after")
    def _min_frames_fit_the_window(self) -> "ThresholdConfig":
        if self.min_frames > self.window:
            raise ValueError(
                f"min_frames ({self.min_frames}) must be <= window ({self.window}): the window never holds more; "
                "lower min_frames or raise window"
            )
        return self

    @property
    def adapt_interval(self) -> int:
        """OK frames between adapt steps (`adapt_every`, or `window` when null)."""
        return self.adapt_every if self.adapt_every is not None else self.window
