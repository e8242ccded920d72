"""Config of operator feedback: verdicts an operator sends back for an inspection (docs/mqtt.md#feedback)."""

from __future__ import annotations

from pydantic import Field

from .base import Section

# = calibration.store.DEFAULT_KEEP / MIN_KEEP (the config does not import the scorer)
DEFAULT_KEEP = 10
MIN_KEEP = 2


class FeedbackConfig(Section):
    """Operator feedback on `<prefix>/<station>/feedback` (and `edge-inspect feedback`): an NG overruled
    as ok joins the product's good set as a new calibration version (the scorers are swapped without
    losing a frame); a confirmed ng is kept as a labelled defect of the product. Every inspection id is
    applied at most once (calibration/<product>/feedback.jsonl). Feedback waits in a bounded queue with a
    per-station rate limit and is applied on a low-priority thread with one ONNX Runtime thread, so
    scoring goes on. Changes take effect at the next restart."""

    enabled: bool = Field(
        True,
        title="Apply operator feedback",
        description="Apply feedback received on the feedback topic; when false every message gets the error "
        "disabled (edge-inspect feedback --local still works on the folders).",
    )
    queue_size: int = Field(
        16, ge=1, le=1000, description="Feedback messages waiting to be applied; a new one beyond it gets the error queue_full."
    )
    rate_per_min: float = Field(
        30.0, gt=0, le=6000,
        description="Feedback messages per minute this station accepts (token bucket, refilled continuously); "
        "more get rate_limited.",
    )
    burst: int = Field(5, ge=1, le=1000, description="Feedback messages accepted at once before rate_per_min applies.")
    max_good_images: int = Field(
        24, ge=2, le=1000,
        description="Most good images a product's calibration holds after feedback; beyond it the oldest frames "
        "operators accepted leave the good set (the calibration shots always stay).",
    )
    keep_versions: int = Field(
        DEFAULT_KEEP, ge=MIN_KEEP, le=1000,
        description="Calibration versions kept per product when feedback writes a new one (older ones, and the "
        "good images and scorer graphs only they use, are deleted).",
    )
