"""The automatic threshold rule (edge_inspect.calibration.threshold): good parts only, evidence kept."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_inspect.calibration.threshold import (
    EULER_GAMMA,
    MIN_RELATIVE_SPREAD,
    automatic_threshold,
    gumbel_fit,
    gumbel_quantile,
    rate_from_sensitivity,
)


def test_gumbel_fit_recovers_a_sampled_distribution():
    rng = np.random.default_rng(0)
    mu, beta = 2.0, 0.3
    sample = mu - beta * np.log(-np.log(rng.uniform(size=20000)))
    fit_mu, fit_beta = gumbel_fit(sample)
    assert fit_mu == pytest.approx(mu, abs=0.02) and fit_beta == pytest.approx(beta, abs=0.02)
    # The fitted 99 % quantile is exceeded by about 1 % of the sample.
    q = gumbel_quantile(fit_mu, fit_beta, 0.99)
    assert (sample > q).mean() == pytest.approx(0.01, abs=0.003)


def test_threshold_is_the_tail_quantile_of_loo_and_view_scores():
    loo = np.array([0.50, 0.55, 0.60, 0.52])
    views = np.array([0.51, 0.58, 0.62, 0.49, 0.57, 0.60, 0.66, 0.53])
    threshold, evidence = automatic_threshold(loo, np.array([]), 0.01, views)
    good = np.concatenate([loo, views])
    beta = good.std() * math.sqrt(6) / math.pi
    expected = good.mean() - EULER_GAMMA * beta - beta * math.log(-math.log(0.99))
    assert threshold == pytest.approx(expected, rel=1e-6)
    assert threshold > good.max()
    assert evidence["gumbel"]["samples"] == 12 and evidence["false_reject_rate"] == 0.01
    assert evidence["view_scores"] == [round(float(v), 5) for v in views]
    assert "synthetic_detected" not in evidence  # no synthetic anomalies, no claim about them


def test_a_higher_false_reject_rate_lowers_the_threshold_but_never_below_a_good_shot():
    loo = np.array([0.50, 0.55, 0.60, 0.52])
    strict, _ = automatic_threshold(loo, np.array([]), 0.001)
    default, _ = automatic_threshold(loo, np.array([]), 0.01)
    lenient, _ = automatic_threshold(loo, np.array([]), 0.2)
    assert strict > default > lenient
    floor, evidence = automatic_threshold(loo, np.array([]), 0.5)
    assert floor == pytest.approx(0.60) and evidence["gumbel"]["quantile"] < 0.60
    for bad in (0.0, 0.6, -1.0):
        with pytest.raises(ValueError, match="false-reject rate"):
            automatic_threshold(loo, np.array([]), bad)


def test_identical_good_scores_still_get_room_above_them():
    loo = np.array([0.5, 0.5, 0.5, 0.5])
    threshold, evidence = automatic_threshold(loo, np.array([]))
    assert evidence["gumbel"]["beta"] == pytest.approx(MIN_RELATIVE_SPREAD * 0.5 * math.sqrt(6) / math.pi, rel=1e-4)
    assert threshold > 0.5 * 1.1


def test_sensitivity_maps_onto_the_false_reject_rate():
    assert rate_from_sensitivity(1.0) == pytest.approx(0.01)
    assert rate_from_sensitivity(2.0) == pytest.approx(0.02)
    for bad in (0.05, 11.0):
        with pytest.raises(ValueError, match="sensitivity"):
            rate_from_sensitivity(bad)


def test_evidence_reports_how_many_synthetic_anomalies_the_threshold_catches():
    loo = np.array([0.50, 0.51, 0.52, 0.50])
    threshold, evidence = automatic_threshold(loo, np.array([0.4, 0.6, 0.7, 0.9]))
    assert 0.52 < threshold < 0.7
    assert evidence["synthetic_detected"] == pytest.approx(0.5 if threshold > 0.6 else 0.75)
    assert evidence["synthetic_median"] == pytest.approx(0.65)
    assert evidence["loo_scores"] == [0.5, 0.51, 0.52, 0.5]
