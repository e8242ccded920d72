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

The second half of this module measures the live stream against that evidence (the drift alarm and
`threshold.adapt`); daemon/drift.py runs it per product on the scorer threads:

    m0 = median(loo_scores + view_scores)           the calibration's good parts
    s0 = max(1.4826 * MAD, 0.05 * |m0|)             their robust spread (floored like gumbel_fit)
    T  = the calibrated threshold (of the last version that was not a threshold.adapt step)
    position p = (median(window) - m0) / (T - m0)   0 = like calibration, 1 = at the threshold
    T_new = median(window) + ((T - m0) / s0) * spread(window), clamped to [T (1 - max_drop), T (1 + max_rise)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..config.threshold import ThresholdConfig
from .store import now_utc

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


def tail_threshold(good: np.ndarray, floor: float, false_reject_rate: float) -> tuple[float, dict[str, Any]]:
    """The (1 - rate) quantile of a Gumbel tail fitted to good scores, never below `floor` (the highest
    score a trusted good part was seen to reach); and the fit, for the evidence."""
    mu, beta = gumbel_fit(good)
    quantile = gumbel_quantile(mu, beta, 1.0 - false_reject_rate)
    return float(max(quantile, floor)), {"mu": round(mu, 6), "beta": round(beta, 6), "quantile": round(quantile, 6),
                                         "samples": int(np.asarray(good).size)}


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
    threshold, gumbel = tail_threshold(good, float(loo.max()), false_reject_rate)
    evidence: dict[str, Any] = {
        "rule": "max(max(loo), Gumbel(loo + views) quantile at 1 - false_reject_rate)",
        "false_reject_rate": false_reject_rate,
        "gumbel": gumbel,
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


# --- the live stream against the calibration: drift position and threshold.adapt -----------------

ROBUST_SIGMA = 1.4826  # MAD -> standard deviation of a normal


CLEAR_FRACTION = 0.8  # an alarm clears below this share of the level that raised it


ADAPT_CHANGE = "threshold_adapt"


ADAPT_BY = "threshold.adapt"


_DIGITS = 5


@dataclass(frozen=True)
class Reference:
    """What calibration said good parts score: the yardstick of the stream."""

    median: float  # m0
    spread: float  # s0
    threshold: float  # T: the calibrated threshold (not an adapt step's)
    calibration_version: int | None  # the version T was calibrated in
    bank: str  # the memory bank's sha256: a new bank is a new reference
    samples: int

    @property
    def margin_spreads(self) -> float:
        """How many spreads above the median calibration put the threshold."""
        return (self.threshold - self.median) / self.spread

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.bank, round(self.threshold, 9), round(self.median, 9), round(self.spread, 9))


def robust_spread(values: Iterable[float] | np.ndarray) -> float:
    """1.4826 x MAD, never below 5 % of the median (MIN_RELATIVE_SPREAD): near-identical scores must not
    make a zero spread that turns every small wobble into many spreads."""
    x = np.asarray(values, np.float64).ravel()
    if x.size == 0:
        return 0.0
    med = float(np.median(x))
    mad = float(np.median(np.abs(x - med)))
    return max(ROBUST_SIGMA * mad, MIN_RELATIVE_SPREAD * abs(med), 1e-12)


def position(median: float, reference_median: float, threshold: float) -> float:
    """(median - m0) / (T - m0): 0 = the calibration's good parts, 1 = at the threshold."""
    span = max(threshold - reference_median, 1e-12 * max(1.0, abs(threshold)))
    return (median - reference_median) / span


def window_summary(ok_scores: np.ndarray, flags: np.ndarray) -> dict[str, Any]:
    """Median, p90 and spread of the OK scores; the NG share of the frames."""
    ok = np.asarray(ok_scores, np.float64).ravel()
    flagged = np.asarray(flags, bool).ravel()
    out: dict[str, Any] = {"window": int(ok.size), "frames": int(flagged.size),
                           "median": None, "p90": None, "spread": None,
                           "flag_rate": float(flagged.mean()) if flagged.size else 0.0}
    if ok.size:
        out["median"] = float(np.median(ok))
        out["p90"] = float(np.percentile(ok, 90))
        out["spread"] = robust_spread(ok)
    return out


def next_alarm(on: bool, summary: dict[str, Any], pos: float | None, config: ThresholdConfig) -> tuple[bool, str | None]:
    """(alarm, reason) after this window: raised at the levels, kept until below 0.8 x them."""
    by_position = summary["window"] >= config.min_frames and pos is not None
    by_rate = summary["frames"] >= config.min_frames
    scale = CLEAR_FRACTION if on else 1.0
    if by_position and pos >= scale * config.drift_alarm:
        return True, "position"
    if by_rate and summary["flag_rate"] >= scale * config.drift_flag_rate:
        return True, "flag_rate"
    return False, None


@dataclass(frozen=True)
class Proposal:
    """Where threshold.adapt would put the threshold, and why."""

    raw: float  # median + margin x spread, before the bounds
    threshold: float  # clamped into [low, high]
    low: float
    high: float
    margin_spreads: float


def adapted_threshold(reference: Reference, median: float, spread: float, max_drop: float, max_rise: float) -> Proposal:
    """T_new = median + ((T - m0) / s0) * spread, clamped to [T (1 - max_drop), T (1 + max_rise)]."""
    margin = reference.margin_spreads
    raw = median + margin * spread
    low = reference.threshold * (1.0 - max_drop)
    high = reference.threshold * (1.0 + max_rise)
    low, high = min(low, high), max(low, high)
    return Proposal(raw=raw, threshold=min(max(raw, low), high), low=low, high=high, margin_spreads=margin)


def adapt_decision(active: float, proposed: float, min_change: float, alarm: bool) -> str:
    """"step", "small" (under adapt_min_change) or "paused" (it would raise the threshold during an alarm)."""
    change = abs(proposed - active) / max(abs(active), 1e-12)
    if change < min_change or proposed == active:
        return "small"
    if alarm and proposed > active:
        return "paused"
    return "step"


def calibration_reference(doc: dict[str, Any], manifest: dict[str, Any], version: int | None) -> Reference | None:
    """The reference of one calibration version from its threshold.json and manifest; None when its evidence
    holds no good scores (nothing to compare the stream with).

    An adapt step's threshold.json names the calibration it adapts (`adapt_bounds`); that, not the adapted
    threshold, stays the yardstick. A rollback to an adapt version copies its file and keeps it; a version
    that sets its own threshold (calibrate, feedback) is a calibration of its own."""
    evidence = doc.get("evidence") if isinstance(doc.get("evidence"), dict) else {}
    good = [float(s) for key in ("loo_scores", "view_scores") for s in (evidence.get(key) or [])
            if isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)]
    threshold = doc.get("threshold")
    if not good or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        return None
    calibrated, calibrated_in = float(threshold), version
    bounds = evidence.get("adapt_bounds")
    change = (manifest.get("version") or {}).get("change") if isinstance(manifest.get("version"), dict) else None
    if (isinstance(bounds, dict) and change in (ADAPT_CHANGE, "rollback")
            and isinstance(bounds.get("set_threshold"), (int, float))
            and math.isclose(float(bounds["set_threshold"]), float(threshold), rel_tol=1e-9, abs_tol=1e-12)
            and isinstance(bounds.get("calibration_threshold"), (int, float))
            and math.isfinite(bounds["calibration_threshold"])):
        calibrated = float(bounds["calibration_threshold"])
        calibrated_in = bounds.get("calibration_version") if isinstance(bounds.get("calibration_version"), int) else None
    x = np.asarray(good, np.float64)
    bank = (manifest.get("bank") or {}).get("sha256") if isinstance(manifest.get("bank"), dict) else None
    return Reference(median=float(np.median(x)), spread=robust_spread(x), threshold=calibrated,
                     calibration_version=calibrated_in, bank=str(bank or ""), samples=int(x.size))


def rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), _DIGITS)


@dataclass(frozen=True)
class AdaptStep:
    """One threshold.adapt step to commit (on the monitor's worker thread)."""

    product: str
    from_version: int
    old_threshold: float
    proposal: Proposal
    reference: Reference
    summary: dict[str, Any]
    position: float | None
    engines_dir: Path | None

    def why(self) -> str:
        """The version's `why`: old -> new and the numbers that moved it."""
        return f"threshold {self.old_threshold:.5g} -> {self.proposal.threshold:.5g}: {self.numbers()}"

    def numbers(self) -> str:
        s, ref, prop = self.summary, self.reference, self.proposal
        clamp = "" if prop.threshold == prop.raw else f", clamped from {prop.raw:.5g}"
        return (f"OK-score window of {s['window']} has "
                f"median {s['median']:.5g} (calibration {ref.median:.5g}) and spread {s['spread']:.5g} "
                f"(calibration {ref.spread:.5g}); median + {prop.margin_spreads:.3g} spreads{clamp}; bounds "
                f"[{prop.low:.5g}, {prop.high:.5g}] around the calibrated {ref.threshold:.5g}"
                f"{'' if ref.calibration_version is None else f' of version {ref.calibration_version}'}; "
                f"position {self.position if self.position is None else round(self.position, 3)}, "
                f"flag rate {s['flag_rate']:.1%} over {s['frames']} frames")

    def evidence(self, config: ThresholdConfig) -> dict[str, Any]:
        """What goes into the new version's threshold.json evidence: the bounds and what moved it."""
        s, ref, prop = self.summary, self.reference, self.proposal
        return {
            "adapt_bounds": {
                "calibration_version": ref.calibration_version,
                "calibration_threshold": ref.threshold,
                "min": prop.low, "max": prop.high,
                "max_drop": config.adapt_max_drop, "max_rise": config.adapt_max_rise,
                "set_threshold": prop.threshold,
            },
            "adapt_step": {
                "from_version": self.from_version,
                "from_threshold": self.old_threshold,
                "to_threshold": prop.threshold,
                "unclamped": rounded(prop.raw),
                "margin_spreads": rounded(prop.margin_spreads),
                "window": s["window"], "frames": s["frames"],
                "median": rounded(s["median"]), "p90": rounded(s["p90"]), "spread": rounded(s["spread"]),
                "flag_rate": rounded(s["flag_rate"]), "position": rounded(self.position),
                "calibration_median": rounded(ref.median), "calibration_spread": rounded(ref.spread),
                "created_utc": now_utc(),
            },
        }
