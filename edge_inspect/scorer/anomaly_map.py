"""The scorer's maths after the nearest-neighbour search, as plain numpy: patch distances -> anomaly map
-> image score. The one definition the ONNX graph (scorer_graph.py) and the eager reference
(export/reference.py) are checked against (tests/test_graph_parity.py), and what calibration scores
with when it needs no graph (leave-one-out, synthetic anomalies).

    dist = patch_distances(features, bank)            # [h, w] nearest-neighbour distance per patch
    amap = anomaly_map_from_distances(dist, params)   # [H, W]: bilinear upsampling + Gaussian (edge pad)
    score = image_score(amap, params)                 # mean of the top score_topk of the map (or its max)
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from .memory_bank import nearest_distances
from .params import ScorerParams

# TensorRT's TopK takes K < 3840: the top fraction of a large map is capped there.
TOPK_LIMIT = 3839


def score_topk_count(params: ScorerParams) -> int:
    """How many map pixels the image score averages (0 = the max alone)."""
    if not params.score_topk:
        return 0
    h, w = params.input_size
    return int(min(TOPK_LIMIT, max(1, round(params.score_topk * h * w))))


def image_score(anomaly_map: np.ndarray, params: ScorerParams) -> float:
    """numpy twin of the graph's score: max, or the mean of the top score_topk_count pixels."""
    k = score_topk_count(params)
    flat = np.asarray(anomaly_map, np.float32).ravel()
    if k <= 1:
        return float(flat.max())
    return float(np.partition(flat, flat.size - k)[-k:].astype(np.float64).mean())


def gaussian_kernel_1d(sigma: float) -> np.ndarray:
    radius = max(1, int(3.0 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def anomaly_map_from_distances(patch_dist: np.ndarray, params: ScorerParams) -> np.ndarray:
    """numpy twin of the graph's tail: bilinear upsampling + separable Gaussian with edge padding."""
    H, W = params.input_size
    full = cv2.resize(patch_dist.astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR)
    k = gaussian_kernel_1d(params.sigma_px)
    return cv2.sepFilter2D(full, -1, k, k, borderType=cv2.BORDER_REPLICATE)


def patch_distances(features: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """[D, h, w] patch features -> [h, w] distance of each patch to its nearest bank row."""
    d, h, w = features.shape
    return nearest_distances(features.reshape(d, h * w).T, bank).reshape(h, w)


def score_patches(features: np.ndarray, bank: np.ndarray, params: ScorerParams) -> tuple[float, np.ndarray]:
    """(image score, anomaly map) of one [D, h, w] feature map against a bank: the graph's work after the backbone."""
    amap = anomaly_map_from_distances(patch_distances(features, bank), params)
    return image_score(amap, params), amap


def score_many(features: Sequence[np.ndarray], bank: np.ndarray, params: ScorerParams) -> list[float]:
    """Image scores of several [D, h, w] feature maps against one bank, in one nearest-neighbour pass."""
    d, h, w = features[0].shape
    queries = np.concatenate([f.reshape(d, h * w).T for f in features])
    dist = nearest_distances(queries, bank).reshape(len(features), h, w)
    return [image_score(anomaly_map_from_distances(x, params), params) for x in dist]
