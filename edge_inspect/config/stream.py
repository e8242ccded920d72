"""Config of learning from the line: a product's bank and threshold grow from its own unlabeled OK frames.

The algorithm is calibration/stream.py; docs/calibration.md#learning-from-the-line says what the line
learns, how to see it and how to stop or undo it.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from ..records import is_product_name
from .base import Section


class StreamConfig(Section):
    """Per product: OK frames well below the threshold are kept as candidates (their patch features, at most
    `max_frames` on disk), and every `refit_every` candidates or `refit_minutes` the product is refitted on
    its good set plus the candidates that pass the guards (frames scored against each other, outliers and
    their patches dropped), checked on held-back candidates and committed as a calibration version
    (`edge-inspect calibration history` shows it; `rollback` undoes it). Frames near an NG result and
    frames while the drift alarm is on are never taken; an operator's ng removes its frame. Refits run on
    one low-priority thread with one ONNX Runtime thread; the cameras swap to the new version between two
    frames. Products calibrated before the bank was a graph input must be recalibrated once to learn."""

    enabled: bool = Field(
        False,
        title="Learn from the line",
        description="Learn every product from its OK frames, unless `products` says otherwise for it. Off by default: "
        "on the real sets it raised most products but lowered one (ball screw, docs/calibration.md#learning-from-the-line); "
        "run `edge-inspect evaluate --stream` on your own parts, then turn it on per product.",
    )
    products: dict[str, bool] = Field(
        default_factory=dict,
        description="Per product: true or false overrides `enabled` (e.g. {bracket-a: false} while a new batch is qualified).",
    )
    refit_every: int = Field(50, ge=5, le=100_000, description="New candidates that start a refit.")
    refit_minutes: float = Field(
        30.0, gt=0, le=10_080, description="Also refit when this long has passed since the last one and there are new candidates."
    )
    max_frames: int = Field(
        200, ge=10, le=100_000,
        description="Candidates kept on disk per product (calibration/<product>/stream/); the oldest leave first. "
        "Each is the frame's patch features in float16, about 300 KB at 256 px; a refit holds about 0.8 MB per "
        "candidate in memory (the frames and the coreset's projection): lower it on a box short of memory.",
    )
    max_position: float = Field(
        0.8, gt=0, le=1,
        description="Only frames whose score is at most this far from the calibration's good median toward the "
        "threshold become candidates (0 = the median, 1 = the threshold).",
    )
    quiet_frames: int = Field(
        2, ge=0, le=1000,
        description="A candidate is taken only when this many frames of its camera after it were not NG; an NG "
        "discards the waiting ones and the next this many frames.",
    )
    sample_every: int = Field(1, ge=1, le=100_000, description="Take every n-th eligible frame (a fast line need not store them all).")
    keep_fraction: float = Field(
        0.8, gt=0.1, le=1.0,
        description="Frame guard: the share of candidates, lowest scored against each other, that may join the bank.",
    )
    holdback: float = Field(
        0.2, ge=0.0, lt=0.9,
        description="The newest share of candidates held out of a refit to check it; a refit under which they score "
        "worse is not committed.",
    )

    @field_validator("products")
    @classmethod
    def _product_names(cls, value: dict[str, bool]) -> dict[str, bool]:
        bad = [name for name in value if not is_product_name(name)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a product name (letters, digits, - _ ., starting with a letter or digit)")
        return value

    def learns(self, product: str) -> bool:
        return self.products.get(product, self.enabled)
