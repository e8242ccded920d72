"""The plain PatchCore floor that every scorer change is measured against, in the same run.

Why: a scorer tuned on generated images once lost to the plain PatchCore it started from on real parts
(issue 13). This is that plain PatchCore, fixed: EfficientNet-Lite0 block 4 + block 10 outputs,
(x - 127) / 128 input, 256 x 256 resize, 3 x 3 average pooling, block 10 bilinearly resized to the
stride-8 grid, the full bank of raw 152-dim patch features of the shots (no projection, padding,
coreset, augmentation or layer scales), Euclidean nearest neighbour, image score = max patch
distance, map = the patch distances upsampled and smoothed with sigma 4. It runs on the project's own
feature graph in ONNX Runtime, so it needs nothing the scorer does not.

    ref = PlainPatchCore(folded)          # folded backbone weights (scorer.calibrate.load_folded)
    ref.fit([bgr1, bgr2, bgr3, bgr4])
    score, amap = ref.score(bgr)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..scorer.anomaly_map import anomaly_map_from_distances
from ..scorer.features import FeatureExtractor
from ..scorer.memory_bank import features_to_patches, nearest_distances
from ..scorer.params import ScorerParams

PLAIN_PARAMS = ScorerParams(
    input_size=(256, 256), taps=("block4", "block10"), sigma_px=4.0, context_pad=0, layer_scales=(), projection_dim=0,
)


class PlainPatchCore:
    def __init__(self, folded: dict[str, np.ndarray], threads: int = 0, params: ScorerParams = PLAIN_PARAMS) -> None:
        self.params = params
        self.extractor = FeatureExtractor(folded, params, threads)
        self.bank: np.ndarray | None = None

    def fit(self, good_bgr: Sequence[np.ndarray]) -> None:
        self.bank = features_to_patches(np.stack([self.extractor(b)[0] for b in good_bgr]))

    def score(self, bgr: np.ndarray) -> tuple[float, np.ndarray]:
        """(max patch distance, anomaly map at the input size)."""
        if self.bank is None:
            raise RuntimeError("fit() the reference on good images first")
        features, _ = self.extractor(bgr)
        d, h, w = features.shape
        dist = nearest_distances(features.reshape(d, h * w).T, self.bank).reshape(h, w)
        return float(dist.max()), anomaly_map_from_distances(dist, self.params)
