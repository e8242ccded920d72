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


def automatic_threshold(loo_scores: np.ndarray, synthetic_scores: np.ndarray, sensitivity: float = DEFAULT_SENSITIVITY) -> tuple[float, dict[str, Any]]:
    if not 0.1 <= sensitivity <= 10:
        raise ValueError("sensitivity must be between 0.1 and 10 (1 = default; higher flags more)")
    loo = np.asarray(loo_scores, np.float64)
    syn = np.asarray(synthetic_scores, np.float64)
    good_max = float(loo.max())
    good_median = float(np.median(loo))
    spread = float(loo.std()) if loo.size > 1 else 0.1 * good_max
    # Margin above the worst good part: at least 10% of its score, more where good parts vary.
    margin = max(0.10 * good_max, 1.5 * spread)
    threshold = good_max + margin / sensitivity
    evidence: dict[str, Any] = {
        "rule": "max(loo) + max(0.10*max(loo), 1.5*std(loo)) / sensitivity",
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
