"""The automatic threshold: chosen from good parts only, no defective sample needed.

Evidence, computed at calibration:
- leave-one-out (LOO) scores: each good image scored against a bank built from the *other* good
  images. A new good part is scored against all of them, so LOO scores are a slightly pessimistic
  sample of what good parts will score.
- synthetic anomaly scores: good images with a Poisson-blended cut-paste patch (subtle, realistic
  structure errors) scored against the full bank: what a small real defect scores at least.

Rule (documented in docs/scorer.md): the good level is the highest LOO score; the threshold sits a
margin above it. The margin grows with the spread of the LOO scores (a product whose good parts vary
needs more room) and shrinks with `sensitivity`. If the synthetic anomalies would be missed at that
threshold, the evidence says so (`synthetic_detected`), and `edge-inspect calibrate` warns: the
product needs more good images, an ROI, or a higher sensitivity.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_SENSITIVITY = 1.0
MARGIN_FRACTION = 0.2  # of the highest leave-one-out score
MARGIN_STDS = 2.0  # leave-one-out standard deviations


def automatic_threshold(loo_scores: np.ndarray, synthetic_scores: np.ndarray, sensitivity: float = DEFAULT_SENSITIVITY) -> tuple[float, dict[str, Any]]:
    if not 0.1 <= sensitivity <= 10:
        raise ValueError("sensitivity must be between 0.1 and 10 (1 = default; higher flags more)")
    loo = np.asarray(loo_scores, np.float64)
    syn = np.asarray(synthetic_scores, np.float64)
    good_max = float(loo.max())
    good_median = float(np.median(loo))
    spread = float(loo.std()) if loo.size > 1 else 0.1 * good_max
    # Margin above the worst good part: at least 20% of its score, more where good parts vary. Four
    # leave-one-out scores are a thin sample of the good parts' tail; over 15 calibrations on seven
    # sets, a 10% / 1.5 std margin rejected 5.5% of good parts on average, this one 2.8% (F1 0.47 ->
    # 0.40; docs/scorer.md). False rejects cost a line its trust in the tool, so the default leans
    # that way; --sensitivity moves along the curve.
    margin = max(MARGIN_FRACTION * good_max, MARGIN_STDS * spread)
    threshold = good_max + margin / sensitivity
    evidence: dict[str, Any] = {
        "rule": f"max(loo) + max({MARGIN_FRACTION}*max(loo), {MARGIN_STDS}*std(loo)) / sensitivity",
        "sensitivity": sensitivity,
        "loo_scores": [round(float(s), 5) for s in loo],
        "loo_max": round(good_max, 5),
        "loo_median": round(good_median, 5),
        "loo_std": round(spread, 5),
        "margin": round(margin, 5),
        "synthetic_scores": [round(float(s), 5) for s in syn],
    }
    if syn.size:
        evidence["synthetic_detected"] = round(float((syn >= threshold).mean()), 4)
        evidence["synthetic_median"] = round(float(np.median(syn)), 5)
    return float(threshold), evidence
