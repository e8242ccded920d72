"""The automatic threshold: chosen from good parts only, no defective sample needed.

One knob: the false-reject rate the line accepts (`--false-reject-rate`, default 1 %). The threshold
is the score a good part exceeds with that probability, read off a model of the good parts' score tail.

Evidence, computed at calibration:
- leave-one-out (LOO) scores: each good image scored against a bank built from the *other* good
  images: how a new good part will score.
- nuisance views: each good image shifted by 2 % and with its gain at 0.95 / 1.05 (what a fixtured
  line varies from part to part), scored against the same leave-one-out bank. Four shots give four
  LOO scores, a thin sample of a tail; the views give five times as many.
- synthetic anomaly scores: good images with a Poisson-blended cut-paste patch, scored against the
  same bank: reported (`synthetic_detected`) so calibration can warn when they would pass.

Model: the image score is a maximum over many patches, so its tail is modelled as a Gumbel
(extreme-value type I) distribution, fitted by the method of moments to the LOO and view scores. The
threshold is its (1 - rate) quantile, and never below the highest LOO score of an original shot (a
threshold that rejects a known good part is wrong whatever the model says). The spread has a floor
(5 % of the mean score) so four near-identical shots cannot give a threshold on top of them.

`--sensitivity S` is kept as an alias: it means a false-reject rate of S x 1 %.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

DEFAULT_FALSE_REJECT_RATE = 0.01
MIN_FALSE_REJECT_RATE = 1e-4
MAX_FALSE_REJECT_RATE = 0.5
DEFAULT_SENSITIVITY = 1.0
EULER_GAMMA = 0.5772156649015329
MIN_RELATIVE_SPREAD = 0.05  # of the mean good score: the Gumbel's spread never goes below it


def rate_from_sensitivity(sensitivity: float) -> float:
    """The old knob as the new one: sensitivity 1 = 1 % false rejects, 2 = 2 %, 0.5 = 0.5 %."""
    if not 0.1 <= sensitivity <= 10:
        raise ValueError("sensitivity must be between 0.1 and 10 (1 = default; higher flags more)")
    return DEFAULT_FALSE_REJECT_RATE * sensitivity


def gumbel_fit(scores: np.ndarray) -> tuple[float, float]:
    """(location, scale) of a Gumbel fitted by moments: mean = mu + gamma*beta, std = pi*beta/sqrt(6)."""
    x = np.asarray(scores, np.float64)
    spread = max(float(x.std()), MIN_RELATIVE_SPREAD * abs(float(x.mean())))
    beta = spread * math.sqrt(6.0) / math.pi
    return float(x.mean()) - EULER_GAMMA * beta, beta


def gumbel_quantile(mu: float, beta: float, p: float) -> float:
    return mu - beta * math.log(-math.log(p))


def automatic_threshold(
    loo_scores: np.ndarray,
    synthetic_scores: np.ndarray,
    false_reject_rate: float = DEFAULT_FALSE_REJECT_RATE,
    view_scores: np.ndarray | None = None,
) -> tuple[float, dict[str, Any]]:
    if not MIN_FALSE_REJECT_RATE <= false_reject_rate <= MAX_FALSE_REJECT_RATE:
        raise ValueError(
            f"false-reject rate {false_reject_rate}: use {MIN_FALSE_REJECT_RATE} .. {MAX_FALSE_REJECT_RATE} "
            "(0.01 = 1 % of good parts rejected, the default)"
        )
    loo = np.asarray(loo_scores, np.float64).ravel()
    views = np.asarray(view_scores if view_scores is not None else [], np.float64).ravel()
    syn = np.asarray(synthetic_scores, np.float64).ravel()
    if loo.size == 0:
        raise ValueError("no leave-one-out scores: calibration needs at least two good images")
    good = np.concatenate([loo, views])
    mu, beta = gumbel_fit(good)
    quantile = gumbel_quantile(mu, beta, 1.0 - false_reject_rate)
    threshold = max(quantile, float(loo.max()))
    evidence: dict[str, Any] = {
        "rule": "max(max(loo), Gumbel(loo + views) quantile at 1 - false_reject_rate)",
        "false_reject_rate": false_reject_rate,
        "gumbel": {"mu": round(mu, 6), "beta": round(beta, 6), "quantile": round(quantile, 6), "samples": int(good.size)},
        "loo_scores": [round(float(s), 5) for s in loo],
        "view_scores": [round(float(s), 5) for s in views],
        "loo_max": round(float(loo.max()), 5),
        "loo_median": round(float(np.median(loo)), 5),
        "synthetic_scores": [round(float(s), 5) for s in syn],
    }
    if syn.size:
        evidence["synthetic_detected"] = round(float((syn >= threshold).mean()), 4)
        evidence["synthetic_median"] = round(float(np.median(syn)), 5)
    return float(threshold), evidence
