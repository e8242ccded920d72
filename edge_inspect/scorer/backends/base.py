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

    def run_features(self, image: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        """As run, plus the patch features [D, h, w] the map was scored from (graphs with the bank as an
        input have them as an output; stream learning keeps them for candidate frames)."""
        raise NotImplementedError(f"the {self.name} backend does not return patch features")

    has_features: bool = False  # run_features works
    capacity: int | None = None  # bank slots of a graph that takes the bank as an input; None: bank inside

    @property
    @abstractmethod
    def input_shape(self) -> tuple[int, int, int, int]:
        """The static input shape of the graph, [1, 3, H, W]."""

    def describe(self) -> dict[str, Any]:
        """Facts for logs, stats and `doctor`: backend name, device, precision."""
        return {"backend": self.name}

    def close(self) -> None:
        """Release device resources. Safe to call twice."""
