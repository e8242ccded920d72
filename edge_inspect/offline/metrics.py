"""Detection metrics as plain numpy functions (no scikit-learn on an edge box)."""

from __future__ import annotations

import numpy as np


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney U) statistic, ties counted half."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # average ranks of tied scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [scores.size]))
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_counts(labels: np.ndarray, predicted: np.ndarray) -> dict[str, int]:
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(predicted).astype(bool)
    return {
        "tp": int((labels & predicted).sum()),
        "fp": int((~labels & predicted).sum()),
        "fn": int((labels & ~predicted).sum()),
        "tn": int((~labels & ~predicted).sum()),
    }


def f1_score(labels: np.ndarray, predicted: np.ndarray) -> float:
    c = binary_counts(labels, predicted)
    denom = 2 * c["tp"] + c["fp"] + c["fn"]
    return float(2 * c["tp"] / denom) if denom else float("nan")


def best_f1(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The best F1 over all thresholds and that threshold (an oracle: for reports only)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    best = (0.0, float("nan"))
    for t in np.unique(scores):
        f = f1_score(labels, scores >= t)
        if f > best[0]:
            best = (f, float(t))
    return best
