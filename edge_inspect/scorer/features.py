"""The feature graph in ONNX Runtime: patch features and a global embedding of one image.

Calibration fits the memory bank on these features, and the offline tools score with them; the live
scorer runs the product's scorer graph instead (same trunk, the bank inside).

    extractor = FeatureExtractor(folded, params)
    features, embedding = extractor(bgr)        # [D, h, w], [C]
"""

from __future__ import annotations

import numpy as np

from ..imageio import to_input
from .backends.ort_backend import ort_session
from .params import ScorerParams
from .scorer_graph import build_features_model


class FeatureExtractor:
    """Patch features + global embedding for one image at a time (CPU)."""

    def __init__(self, folded: dict[str, np.ndarray], params: ScorerParams, threads: int = 0) -> None:
        self.params = params
        self.model = build_features_model(folded, params)
        self.session = ort_session(self.model.SerializeToString(), threads, use_cuda=False)

    def __call__(self, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features, embedding = self.session.run(["features", "embedding"], {"image": to_input(bgr, self.params.input_size)})
        return features[0], embedding[0]
