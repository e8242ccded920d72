"""The live stream as evidence: per product, the OK scores of the line against the calibration.

A threshold is fitted on a handful of good parts; thousands of OK frames later the line shows whether it
still looks like them. When the OK scores creep toward the threshold (lighting, focus, a moved camera,
a new batch) the false rejects are about to start, and the scores say so before the NG count does.

Per product (across its cameras) a `ScoreWindow` keeps the last W OK scores (frames below the threshold)
and the verdicts of the last W frames. Against the calibration reference (threshold.json's evidence):

    m0 = median(loo_scores + view_scores)           the calibration's good parts
    s0 = max(1.4826 * MAD, 0.05 * |m0|)             their robust spread (floored like gumbel_fit)
    T  = the calibrated threshold (of the last version that was not a threshold.adapt step)
    position p = (median(window) - m0) / (T - m0)   0 = like calibration, 1 = at the threshold

Drift alarm: on when the window holds >= min_frames OK scores and p >= drift_alarm, or when
>= min_frames frames are in the window and their NG share >= drift_flag_rate (a moved camera makes every
frame NG, and then no OK score moves); off below 0.8 x either level (hysteresis). A new reference (new
bank, new calibrated threshold: recalibration, feedback, rollback) starts the window over.

threshold.adapt (off by default): every `adapt_every` new OK frames,

    T_new = median(window) + ((T - m0) / s0) * spread(window)     the calibrated margin, in spreads
    clamped to [T * (1 - adapt_max_drop), T * (1 + adapt_max_rise)]

and a step is taken when |T_new - T_active| / T_active >= adapt_min_change: a new calibration version
(change threshold_adapt, its threshold.json evidence holding the numbers and `adapt_bounds`), a log line,
then the product's scorers are swapped. While the drift alarm is on, the threshold is only lowered, never
raised: raising it to follow a drifting stream would hide the drift and let defects through.

The window holds scores below the active threshold only: a truncated sample. With the usual margin of
3-5 spreads the cut removes well under 1 % of the OK frames, and median and MAD barely notice.

The numbers (position, alarm levels, the adapted threshold) are plain functions in
calibration/threshold.py; this module holds the per-product windows and the thread that commits steps.

Example:
    monitor = DriftMonitor(config.threshold, "calibration", swap=daemon.reload_product)
    monitor.observe(scorer.product, result.score, result.flagged)     # the scorer thread, per frame
    monitor.snapshot()["bracket-a"]["position"]                         # 0.12
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..calibration import store
from ..calibration.threshold import (
    ADAPT_BY,
    ADAPT_CHANGE,
    AdaptStep,
    Reference,
    adapt_decision,
    adapted_threshold,
    calibration_reference,
    next_alarm,
    position,
    rounded,
    window_summary,
)
from ..config.threshold import ThresholdConfig
from ..mqtt.payloads import iso_utc
from ..scorer.layout import THRESHOLD_FILE, current_version

log = logging.getLogger(__name__)

_OLDER_FRAMES_IGNORED = 32  # frames from a lower calibration version than the newest seen, before it counts


def _key(reference: Reference | None) -> tuple[Any, ...] | None:
    return None if reference is None else reference.key


# --- one product's window -------------------------------------------------------------------------


class ScoreWindow:
    """One product's rolling window, alarm and adapt state. Thread-safe: every camera of the product adds to it."""

    def __init__(self, product: str, config: ThresholdConfig, clock: Callable[[], float] = time.time):
        self.product = product
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._ok: deque[float] = deque(maxlen=config.window)
        self._flags: deque[bool] = deque(maxlen=config.window)
        self.reference: Reference | None = None
        self._seen = False  # a first frame arrived (its reference, possibly None, is the current one)
        self._older = 0  # frames in a row from a lower version than the newest seen
        self.version: int | None = None
        self.threshold: float | None = None
        self.alarm = False
        self.reason: str | None = None
        self.since: float | None = None
        self._summary: dict[str, Any] = window_summary(np.empty(0), np.empty(0, bool))
        self._position: float | None = None
        self._ok_since_step = 0
        self.pending = False  # an adapt step is being committed
        self.paused = False  # the last adapt check wanted to raise during an alarm
        self.steps = 0
        self.last_step: float | None = None

    def configure(self, config: ThresholdConfig) -> None:
        """A SIGHUP's new settings; a new window size keeps the newest scores."""
        with self._lock:
            if config.window != self.config.window:
                self._ok = deque(self._ok, maxlen=config.window)
                self._flags = deque(self._flags, maxlen=config.window)
            self.config = config

    def observe(self, reference: Reference | None, version: int | None, threshold: float, score: float, flagged: bool,
                engines_dir: Path | None = None) -> AdaptStep | None:
        """One inspected frame of this product; an AdaptStep when threshold.adapt wants one now."""
        with self._lock:
            if version is not None and self.version is not None and version < self.version:
                # A camera still on the previous version for a frame or two during a swap; many in a row
                # mean the product was calibrated afresh (its folder deleted): that is the truth now.
                self._older += 1
                if self._older <= _OLDER_FRAMES_IGNORED:
                    return None
            self._older = 0
            if not self._seen or _key(reference) != _key(self.reference):
                self._start_over(reference, version)
                self._seen = True
            self.version, self.threshold = version, float(threshold)
            self._flags.append(bool(flagged))
            if not flagged and math.isfinite(score):
                self._ok.append(float(score))
                self._ok_since_step += 1
            self._evaluate()
            return self._adapt_check(engines_dir)

    def _start_over(self, reference: Reference | None, version: int | None) -> None:
        first = not self._seen
        had = len(self._flags)
        self._ok.clear()
        self._flags.clear()
        self._ok_since_step = 0
        self.paused = False
        if self.alarm:
            log.info("drift alarm for product %s cleared: calibration version %s is a new reference", self.product, version)
        self.alarm, self.reason, self.since = False, None, None
        self.reference = reference
        if reference is None:
            log.warning("product %s: calibration version %s has no good-part scores in its threshold.json evidence; "
                        "no drift alarm or threshold.adapt for it (recalibrate with --force to record them)",
                        self.product, version)
        elif not first:
            log.info("drift window of product %s starts over (%d frames dropped): calibration version %s is a new "
                     "reference (median %.5g, spread %.5g, threshold %.5g)", self.product, had, version,
                     reference.median, reference.spread, reference.threshold)

    def _evaluate(self) -> None:
        ref = self.reference
        summary = window_summary(np.fromiter(self._ok, np.float64, len(self._ok)),
                                 np.fromiter(self._flags, bool, len(self._flags)))
        pos = position(summary["median"], ref.median, ref.threshold) if ref is not None and summary["median"] is not None else None
        self._summary, self._position = summary, pos
        if ref is None:
            return
        alarm, reason = next_alarm(self.alarm, summary, pos, self.config)
        if alarm and not self.alarm:
            self.since = self._clock()
            log.warning("%s", self._alarm_text(reason, summary, pos))
        elif self.alarm and not alarm:
            log.info("drift alarm for product %s cleared after %.0f s: %s", self.product,
                     self._clock() - (self.since or self._clock()), self._numbers(summary, pos))
            self.since = None
        self.alarm, self.reason = alarm, reason

    def _numbers(self, s: dict[str, Any], pos: float | None) -> str:
        ref = self.reference
        med = "-" if s["median"] is None else f"{s['median']:.5g}"
        p90 = "-" if s["p90"] is None else f"{s['p90']:.5g}"
        spread = "-" if s["spread"] is None else f"{s['spread']:.5g}"
        where = "-" if pos is None else f"{pos:.2f}"
        return (f"OK-score median {med} (calibration {ref.median:.5g}), p90 {p90}, spread {spread} (calibration "
                f"{ref.spread:.5g}) over {s['window']} OK frames; position {where} (alarm at {self.config.drift_alarm:g}, "
                f"0 = like calibration, 1 = at the threshold {ref.threshold:.5g}); NG {s['flag_rate']:.1%} of the last "
                f"{s['frames']} frames (alarm at {self.config.drift_flag_rate:.0%})")

    def _alarm_text(self, reason: str | None, s: dict[str, Any], pos: float | None) -> str:
        what = ("the OK scores moved toward the threshold" if reason == "position"
                else "most frames are NG")
        return (f"drift alarm for product {self.product}: {what}: {self._numbers(s, pos)}. Likely causes: lighting "
                f"changed, focus drifted, the camera moved or a new batch of parts (or, for NG frames, a real defect "
                f"run). Check the camera and the light; if the parts are good, send feedback ok on the false rejects "
                f"or recalibrate (`edge-inspect calibrate --product {self.product} --images DIR --force`)")

    def _adapt_check(self, engines_dir: Path | None) -> AdaptStep | None:
        config, ref, s = self.config, self.reference, self._summary
        if (not config.adapt or ref is None or self.pending or self.version is None or self.threshold is None
                or self._ok_since_step < config.adapt_interval or s["window"] < config.min_frames):
            return None
        self._ok_since_step = 0
        proposal = adapted_threshold(ref, s["median"], s["spread"], config.adapt_max_drop, config.adapt_max_rise)
        decision = adapt_decision(self.threshold, proposal.threshold, config.adapt_min_change, self.alarm)
        if decision == "paused":
            if not self.paused:
                log.info("threshold.adapt for product %s paused by the drift alarm: it would raise the threshold "
                         "%.5g -> %.5g, which would hide the drift; only lowering is allowed while the alarm is on",
                         self.product, self.threshold, proposal.threshold)
            self.paused = True
            return None
        self.paused = False
        if decision == "small":
            log.debug("threshold.adapt for product %s: %.5g -> %.5g is under adapt_min_change %g; no step",
                      self.product, self.threshold, proposal.threshold, config.adapt_min_change)
            return None
        self.pending = True
        return AdaptStep(product=self.product, from_version=self.version, old_threshold=self.threshold,
                         proposal=proposal, reference=ref, summary=dict(s), position=self._position,
                         engines_dir=engines_dir)

    def step_done(self, committed: bool) -> None:
        with self._lock:
            self.pending = False
            if committed:
                self.steps += 1
                self.last_step = self._clock()

    def snapshot(self) -> dict[str, Any]:
        """The stats block of this product (payloads: pipeline.drift.<product>)."""
        with self._lock:
            s, ref, pos = dict(self._summary), self.reference, self._position
            out = {
                "window": s["window"], "frames": s["frames"],
                "median": rounded(s["median"]), "p90": rounded(s["p90"]), "spread": rounded(s["spread"]),
                "calibration_median": rounded(ref.median) if ref else None,
                "calibration_spread": rounded(ref.spread) if ref else None,
                "calibration_threshold": rounded(ref.threshold) if ref else None,
                "calibration_version": ref.calibration_version if ref else None,
                "threshold": rounded(self.threshold), "version": self.version,
                "position": rounded(pos), "flag_rate": rounded(s["flag_rate"]),
                "alarm": self.alarm, "reason": self.reason,
                "since": iso_utc(self.since) if self.since is not None else None,
                "adapt": {
                    "enabled": self.config.adapt, "steps": self.steps, "pending": self.pending, "paused": self.paused,
                    "last_step": iso_utc(self.last_step) if self.last_step is not None else None,
                },
            }
        return out


def keep_versions(config) -> int:
    """How many calibration versions a step keeps: the one setting feedback also uses (feedback.keep_versions)."""
    keep = getattr(getattr(config, "feedback", None), "keep_versions", None)
    return keep if isinstance(keep, int) and not isinstance(keep, bool) else store.DEFAULT_KEEP


# --- every product: the monitor the daemon holds --------------------------------------------------


class DriftMonitor:
    """The windows of every product the daemon scores, and the one thread that commits adapt steps.

    observe() runs on the scorer threads: tens of microseconds of numpy per frame, plus reading a new
    calibration version's threshold.json once. Committing a version and loading scorers (seconds) happen on
    the "threshold-adapt" thread, never on a scorer thread or paho's.
    """

    def __init__(self, config: ThresholdConfig, calibration_dir: str | Path, swap: Callable[[str], Any],
                 keep: int = store.DEFAULT_KEEP, clock: Callable[[], float] = time.time):
        self.config = config
        self.calibration_dir = Path(calibration_dir)
        self.keep = keep
        self._swap = swap
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, ScoreWindow] = {}
        self._references: dict[str, Reference | None] = {}  # by version folder
        self._steps: queue.Queue[AdaptStep | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._stopped = False
        self._unversioned_warned: set[str] = set()
        self._failed_logged = False

    def configure(self, config: ThresholdConfig, keep: int | None = None,
                  calibration_dir: str | Path | None = None) -> None:
        """A SIGHUP's settings: levels, window sizes and adapt apply from the next frame on."""
        with self._lock:
            self.config = config
            if keep is not None:
                self.keep = keep
            if calibration_dir is not None:
                self.calibration_dir = Path(calibration_dir)
            windows = list(self._windows.values())
        for window in windows:
            window.configure(config)

    def window(self, product: str) -> ScoreWindow:
        with self._lock:
            found = self._windows.get(product)
            if found is None:
                found = self._windows[product] = ScoreWindow(product, self.config, self._clock)
            return found

    def reference(self, calibration) -> Reference | None:
        """The reference of a loaded ProductCalibration (read once per version folder)."""
        key = str(calibration.directory)
        with self._lock:
            if key in self._references:
                return self._references[key]
        try:
            doc = json.loads((Path(calibration.directory) / THRESHOLD_FILE).read_text(encoding="utf-8"))
            ref = calibration_reference(doc if isinstance(doc, dict) else {}, calibration.manifest, calibration.version)
        except (OSError, ValueError) as exc:
            log.warning("product %s: cannot read %s for the drift reference (%s); no drift alarm for this version",
                        calibration.name, Path(calibration.directory) / "threshold.json", exc)
            ref = None
        with self._lock:
            if len(self._references) > 64:
                self._references.clear()
            self._references[key] = ref
        return ref

    def observe(self, calibration, score: float, flagged: bool) -> None:
        """One inspected frame (the scorer thread). Never raises: the result is already published."""
        try:
            window = self.window(calibration.name)
            step = window.observe(self.reference(calibration), calibration.version, calibration.threshold,
                                  float(score), bool(flagged), getattr(calibration, "engines_dir", None))
            if self.config.adapt and calibration.version is None and calibration.name not in self._unversioned_warned:
                self._unversioned_warned.add(calibration.name)
                log.warning("threshold.adapt is on but product %s was calibrated before versions existed: it is not "
                            "adapted; recalibrate it once with `edge-inspect calibrate --product %s --images DIR --force`",
                            calibration.name, calibration.name)
            if step is not None:
                self._submit(step)
        except Exception:  # noqa: BLE001 - the drift view must never cost an inspection
            if not self._failed_logged:
                self._failed_logged = True
                log.exception("drift monitor failed on a frame of product %s (logged once)", getattr(calibration, "name", "?"))

    def _submit(self, step: AdaptStep) -> None:
        with self._lock:
            stopped = self._stopped
            if not stopped:
                if self._worker is None or not self._worker.is_alive():
                    self._worker = threading.Thread(target=self._work, name="threshold-adapt", daemon=True)
                    self._worker.start()
                self._steps.put(step)
        if stopped:
            self.window(step.product).step_done(False)

    def _work(self) -> None:
        while True:
            step = self._steps.get()
            if step is None:
                return
            committed = False
            try:
                committed = self.apply(step)
            except Exception:  # noqa: BLE001 - one failed step must not end the later ones
                log.exception("threshold.adapt step for product %s failed; the active calibration is unchanged "
                              "unless a version was logged as active", step.product)
            finally:
                self.window(step.product).step_done(committed)

    def apply(self, step: AdaptStep) -> bool:
        """Commit one step as a new version (under the product's lock), log it, swap the product's scorers."""
        config = self.config
        with store.product_lock(self.calibration_dir, step.product):
            active = current_version(self.calibration_dir, step.product)
            if active != step.from_version:
                log.info("threshold.adapt step for product %s dropped: its calibration changed meanwhile (version %s, "
                         "the step was computed on %s)", step.product, active, step.from_version)
                return False
            number = store.commit_threshold(
                self.calibration_dir, step.product, step.proposal.threshold,
                change={"change": ADAPT_CHANGE, "by": ADAPT_BY, "why": step.why()},
                evidence=step.evidence(config), keep=self.keep, engines_dir=step.engines_dir,
            )
        log.info("threshold.adapt: product %s threshold %.5g -> %.5g (calibration version %d, parent %d): %s",
                 step.product, step.old_threshold, step.proposal.threshold, number, step.from_version, step.numbers())
        try:
            self._swap(step.product)
        except Exception as exc:  # noqa: BLE001 - the version is written; the next reload or start loads it
            log.error("threshold.adapt: product %s version %d is active on disk but its scorer did not load (%s: %s); "
                      "the cameras keep the previous threshold until a reload (systemctl reload edge-inspect)",
                      step.product, number, type(exc).__name__, exc)
        return True

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            windows = dict(self._windows)
        return {name: window.snapshot() for name, window in sorted(windows.items())}

    def alarm_on(self, product: str) -> bool:
        """Whether `product`'s drift alarm is on now (stream learning takes no frame while it is)."""
        with self._lock:
            window = self._windows.get(product)
        return bool(window is not None and window.alarm)

    def alarms(self) -> list[tuple[str, dict[str, Any]]]:
        """(product, its stats block) of every product whose drift alarm is on."""
        return [(name, snap) for name, snap in self.snapshot().items() if snap["alarm"]]

    def stop(self, timeout: float = 30.0) -> None:
        """Let a step being committed finish (its swap included) before the pipelines close; queued ones are dropped."""
        with self._lock:
            self._stopped = True
            worker = self._worker
        while True:
            try:
                step = self._steps.get_nowait()
            except queue.Empty:
                break
            if step is not None:
                self.window(step.product).step_done(False)
        if worker is not None and worker.is_alive():
            self._steps.put(None)
            worker.join(timeout)
