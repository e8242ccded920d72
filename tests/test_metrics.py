"""Detection metrics against their definitions, computed the slow obvious way."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_inspect.offline.metrics import auroc, best_f1, binary_counts, f1_score


def _pairwise_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted half."""
    pos, neg = scores[labels], scores[~labels]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


@pytest.mark.parametrize("seed", range(6))
def test_auroc_equals_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[0], labels[1] = True, False
    scores = np.round(rng.normal(labels * rng.uniform(0, 2), 1.0), 1)  # rounding makes many ties
    assert len(np.unique(scores)) < n
    assert auroc(labels, scores) == pytest.approx(_pairwise_auroc(labels, scores), abs=1e-12)


def test_auroc_known_values():
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auroc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert auroc([0, 1, 1], [0.3, 0.3, 0.9]) == 0.75
    assert auroc(np.array([[0, 1], [1, 0]]), np.array([[1.0, 2.0], [3.0, 0.5]])) == 1.0  # any shape, raveled
    assert math.isnan(auroc([1, 1], [0.2, 0.3])) and math.isnan(auroc([0, 0], [0.2, 0.3]))


def test_auroc_is_invariant_to_monotone_transforms():
    rng = np.random.default_rng(9)
    labels = rng.random(200) < 0.3
    scores = rng.normal(labels * 1.0, 1.0)
    assert auroc(labels, scores) == pytest.approx(auroc(labels, np.exp(3 * scores)))
    assert auroc(labels, -scores) == pytest.approx(1 - auroc(labels, scores))


def test_counts_and_f1():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 1], bool)
    predicted = np.array([1, 0, 1, 1, 0, 0, 0, 0], bool)
    assert binary_counts(labels, predicted) == {"tp": 2, "fp": 1, "fn": 2, "tn": 3}
    precision, recall = 2 / 3, 2 / 4
    assert f1_score(labels, predicted) == pytest.approx(2 * precision * recall / (precision + recall))
    assert f1_score(labels, labels) == 1.0
    assert f1_score(labels, ~labels) == 0.0
    assert math.isnan(f1_score(np.zeros(4, bool), np.zeros(4, bool)))  # nothing to find, nothing flagged


def test_best_f1_is_the_best_over_all_thresholds():
    rng = np.random.default_rng(4)
    labels = rng.random(80) < 0.4
    scores = np.round(rng.normal(labels * 1.5, 1.0), 1)
    best, threshold = best_f1(labels, scores)
    brute = max(f1_score(labels, scores >= t) for t in np.unique(scores))
    assert best == pytest.approx(brute)
    assert f1_score(labels, scores >= threshold) == pytest.approx(best)
    assert best_f1(np.array([0, 0, 1, 1], bool), np.array([0.1, 0.2, 0.8, 0.9])) == (1.0, 0.8)
