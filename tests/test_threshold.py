"""The automatic threshold rule (edge_inspect.scorer.threshold): good parts only, evidence kept."""

from __future__ import annotations

import numpy as np
import pytest

from edge_inspect.scorer.threshold import MARGIN_FRACTION, MARGIN_STDS, automatic_threshold


def test_tight_good_scores_get_the_fractional_margin():
    loo = np.array([0.50, 0.51, 0.52, 0.50])  # std 0.008: the fraction of the max dominates
    threshold, evidence = automatic_threshold(loo, np.array([]))
    assert threshold == pytest.approx(0.52 * (1 + MARGIN_FRACTION))
    assert evidence["loo_max"] == pytest.approx(0.52) and evidence["margin"] == pytest.approx(MARGIN_FRACTION * 0.52)
    assert "synthetic_detected" not in evidence  # no synthetic anomalies, no claim about them


def test_spread_out_good_scores_get_a_wider_margin():
    loo = np.array([0.3, 0.9, 0.5, 1.1])
    threshold, evidence = automatic_threshold(loo, np.array([]))
    assert MARGIN_STDS * loo.std() > MARGIN_FRACTION * loo.max()
    assert threshold == pytest.approx(1.1 + MARGIN_STDS * loo.std())
    assert evidence["rule"].startswith("max(loo) + max(")


def test_sensitivity_divides_the_margin_and_is_bounded():
    loo = np.array([0.50, 0.51, 0.52, 0.50])
    default, _ = automatic_threshold(loo, np.array([]))
    strict, _ = automatic_threshold(loo, np.array([]), sensitivity=2.0)
    lenient, _ = automatic_threshold(loo, np.array([]), sensitivity=0.5)
    assert 0.52 < strict < default < lenient
    assert strict - 0.52 == pytest.approx((default - 0.52) / 2)
    for bad in (0.05, 11.0):
        with pytest.raises(ValueError, match="sensitivity"):
            automatic_threshold(loo, np.array([]), sensitivity=bad)


def test_evidence_reports_how_many_synthetic_anomalies_the_threshold_catches():
    loo = np.array([0.50, 0.51, 0.52, 0.50])
    threshold, evidence = automatic_threshold(loo, np.array([0.4, 0.6, 0.7, 0.9]))
    assert 0.6 < threshold < 0.7
    assert evidence["synthetic_detected"] == pytest.approx(0.5)
    assert evidence["synthetic_median"] == pytest.approx(0.65)
    assert evidence["loo_scores"] == [0.5, 0.51, 0.52, 0.5]
