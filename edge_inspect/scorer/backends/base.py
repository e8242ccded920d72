"""The interface every scorer runtime implements: one compiled scorer graph, one hot method.

Apart from the package's __init__ (which picks a backend) so a backend module never imports the module
that imports it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

INPUT_NAME = "image"
MAP_OUTPUT = "anomaly_map"
SCORE_OUTPUT = "score"


class ScorerBackend(ABC):
    """One compiled scorer graph ready to run frames. Buffers are allocated once, in __init__."""

    name: str = "abstract"

    @abstractmethod
    def run(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        """image: float32 [1,3,H,W] RGB 0..255 -> (anomaly map float32 [H,W], image score).

        The map must be an array the caller owns (never a view of a buffer the next call reuses).
        """

    @property
    @abstractmethod
    def input_shape(self) -> tuple[int, int, int, int]:
        """The static input shape of the graph, [1, 3, H, W]."""

    def describe(self) -> dict[str, Any]:
        """Facts for logs, stats and `doctor`: backend name, device, precision."""
        return {"backend": self.name}

    def close(self) -> None:
        """Release device resources. Safe to call twice."""
