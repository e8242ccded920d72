"""The live stream as evidence (daemon/drift.py): the drift alarm on a product's OK scores and threshold.adapt.

Unit tests of the numbers and of one product's window first, then the monitor committing a version on a
calibration folder, then the real daemon on a replay source with a real broker: blurred frames raise the
drift alarm in the published stats, and with threshold.adapt a new calibration version scores the results."""

from __future__ import annotations

import json
import logging
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import numpy as np
import pytest
from conftest import wait_until
from mqtt_broker import MessageCollector, mosquitto_binary
from test_daemon import (
    RESULT,
    STATS,
    Daemon,
    NotifySocket,
    latest_stats,
    results,
    write_config,
)

from edge_inspect.calibration import store
from edge_inspect.calibration.threshold import (
    Reference,
    adapt_decision,
    adapted_threshold,
    calibration_reference,
    next_alarm,
    position,
    robust_spread,
    window_summary,
)
from edge_inspect.config import ThresholdConfig, parse_config
from edge_inspect.daemon.drift import DriftMonitor, ScoreWindow
from edge_inspect.mqtt.payloads import load_schema, stats_payload
from edge_inspect.scorer import layout

# A calibration whose good parts score around 10 (spread 0.5, the 5 % floor), threshold 15: a margin of 10 spreads.
GOOD = [9.0, 9.5, 10.0, 10.0, 10.5, 11.0, 9.8, 10.2, 10.1, 9.9]
M0 = float(np.median(GOOD))
S0 = robust_spread(GOOD)
T_CAL = 15.0


def config(**values) -> ThresholdConfig:
    base = {"window": 20, "min_frames": 10, "drift_alarm": 0.5}
    return ThresholdConfig(**{**base, **values})


def reference(threshold: float = T_CAL, bank: str = "bank-1", version: int = 1) -> Reference:
    return Reference(median=M0, spread=S0, threshold=threshold, calibration_version=version, bank=bank, samples=len(GOOD))


def at(p: float, ref: Reference | None = None) -> float:
    """The score at position p between the calibration median (0) and the threshold (1)."""
    ref = ref or reference()
    return ref.median + p * (ref.threshold - ref.median)


def feed(window: ScoreWindow, scores, version: int = 1, threshold: float = T_CAL, ref: Reference | None = None,
         flagged: bool | None = None):
    steps = []
    for score in scores:
        is_ng = score >= threshold if flagged is None else flagged
        step = window.observe(ref or reference(), version, threshold, float(score), is_ng)
        if step is not None:
            steps.append(step)
    return steps


# --- the numbers ----------------------------------------------------------------------------------


def test_robust_spread_is_mad_scaled_and_floored():
    x = np.array([1.0, 2.0, 3.0, 4.0, 100.0])  # one outlier barely moves it
    assert robust_spread(x) == pytest.approx(1.4826 * 1.0)
    assert robust_spread([10.0] * 8) == pytest.approx(0.05 * 10.0)  # identical scores: the floor, never 0
    assert robust_spread([]) == 0.0


def test_position_is_zero_at_the_calibration_and_one_at_the_threshold():
    assert position(10.0, 10.0, 15.0) == 0.0
    assert position(15.0, 10.0, 15.0) == 1.0
    assert position(12.5, 10.0, 15.0) == pytest.approx(0.5)
    assert position(9.0, 10.0, 15.0) == pytest.approx(-0.2)
    assert np.isfinite(position(11.0, 10.0, 10.0))  # a degenerate calibration never divides by zero


def test_window_summary():
    s = window_summary(np.arange(1.0, 11.0), np.array([True, False, False, False]))
    assert s["window"] == 10 and s["frames"] == 4
    assert s["median"] == 5.5 and s["p90"] == pytest.approx(9.1) and s["flag_rate"] == 0.25
    assert s["spread"] == pytest.approx(robust_spread(np.arange(1.0, 11.0)))
    empty = window_summary(np.empty(0), np.empty(0, bool))
    assert empty["median"] is None and empty["flag_rate"] == 0.0


def test_next_alarm_needs_min_frames_and_has_hysteresis():
    cfg = config(drift_alarm=0.5, drift_flag_rate=0.5, min_frames=10)
    few = {"window": 9, "frames": 9, "flag_rate": 0.0}
    many = {"window": 10, "frames": 10, "flag_rate": 0.0}
    assert next_alarm(False, few, 0.9, cfg) == (False, None)  # not enough OK frames yet
    assert next_alarm(False, many, 0.49, cfg) == (False, None)
    assert next_alarm(False, many, 0.5, cfg) == (True, "position")
    assert next_alarm(True, many, 0.41, cfg) == (True, "position")  # kept above 0.8 x 0.5
    assert next_alarm(True, many, 0.39, cfg) == (False, None)
    ng = {"window": 0, "frames": 10, "flag_rate": 0.6}
    assert next_alarm(False, ng, None, cfg) == (True, "flag_rate")  # every frame NG: no OK score to move
    assert next_alarm(True, {**ng, "flag_rate": 0.41}, None, cfg) == (True, "flag_rate")
    assert next_alarm(True, {**ng, "flag_rate": 0.39}, None, cfg) == (False, None)


def test_adapted_threshold_keeps_the_calibrated_margin_in_spreads_and_is_clamped():
    ref = reference()
    margin = (T_CAL - M0) / S0
    prop = adapted_threshold(ref, median=10.5, spread=1.1 * S0, max_drop=0.1, max_rise=0.25)
    assert prop.margin_spreads == pytest.approx(margin)
    assert prop.raw == pytest.approx(10.5 + margin * 1.1 * S0)
    assert prop.threshold == pytest.approx(prop.raw) and prop.low == pytest.approx(13.5) and prop.high == pytest.approx(18.75)
    # The stream exactly like calibration gives the calibrated threshold back.
    assert adapted_threshold(ref, M0, S0, 0.1, 0.25).threshold == pytest.approx(T_CAL)
    assert adapted_threshold(ref, 5.0, 0.1, 0.1, 0.25).threshold == pytest.approx(T_CAL * 0.9)  # floor
    assert adapted_threshold(ref, 30.0, 3.0, 0.1, 0.25).threshold == pytest.approx(T_CAL * 1.25)  # ceiling


def test_adapt_decision_min_change_and_pause_on_alarm():
    assert adapt_decision(15.0, 15.2, 0.02, alarm=False) == "small"  # 1.3 % < 2 %
    assert adapt_decision(15.0, 15.4, 0.02, alarm=False) == "step"
    assert adapt_decision(15.0, 14.5, 0.02, alarm=False) == "step"
    assert adapt_decision(15.0, 15.4, 0.02, alarm=True) == "paused"  # raising during drift would hide it
    assert adapt_decision(15.0, 14.5, 0.02, alarm=True) == "step"  # lowering is the safe side


def _doc(threshold: float = T_CAL, **evidence) -> dict:
    return {"threshold": threshold, "evidence": {"loo_scores": GOOD[:4], "view_scores": GOOD[4:], **evidence}}


def test_calibration_reference_from_threshold_evidence():
    manifest = {"bank": {"sha256": "b1"}, "version": {"number": 3, "change": "calibrate"}}
    ref = calibration_reference(_doc(), manifest, 3)
    assert ref.median == pytest.approx(M0) and ref.spread == pytest.approx(S0)
    assert ref.threshold == T_CAL and ref.calibration_version == 3 and ref.bank == "b1" and ref.samples == len(GOOD)
    assert calibration_reference({"threshold": 1.0, "evidence": {}}, manifest, 3) is None  # nothing to compare with


def test_an_adapt_version_keeps_the_calibrated_threshold_as_its_reference():
    bounds = {"calibration_version": 1, "calibration_threshold": T_CAL, "min": 13.5, "max": 18.75, "set_threshold": 14.0}
    adapted = {"bank": {"sha256": "b1"}, "version": {"number": 2, "change": "threshold_adapt"}}
    ref = calibration_reference(_doc(14.0, adapt_bounds=bounds), adapted, 2)
    assert ref.threshold == T_CAL and ref.calibration_version == 1
    assert ref.key == calibration_reference(_doc(), {"bank": {"sha256": "b1"}, "version": {"change": "calibrate"}}, 1).key
    # A rollback copies an adapt version's files: still the calibration's bounds.
    rolled = {"bank": {"sha256": "b1"}, "version": {"number": 3, "change": "rollback"}}
    assert calibration_reference(_doc(14.0, adapt_bounds=bounds), rolled, 3).threshold == T_CAL
    # Feedback that set its own threshold on top of an adapt version (its evidence inherited the bounds): its own.
    feedback = {"bank": {"sha256": "b2"}, "version": {"number": 4, "change": "feedback_ok"}}
    assert calibration_reference(_doc(16.0, adapt_bounds=bounds), feedback, 4).threshold == 16.0
    # Bounds that do not describe this file's threshold are ignored.
    assert calibration_reference(_doc(14.5, adapt_bounds=bounds), adapted, 2).threshold == 14.5


# --- one product's window -------------------------------------------------------------------------


def test_alarm_starts_with_one_warning_holds_with_hysteresis_and_clears_with_info(caplog):
    window = ScoreWindow("bracket-a", config(window=10, min_frames=5))
    caplog.set_level(logging.INFO, logger="edge_inspect.daemon.drift")
    feed(window, [at(0.1)] * 10)
    assert not window.snapshot()["alarm"]
    feed(window, [at(0.7)] * 6)  # the median crosses 0.5 once most of the window is drifted
    snap = window.snapshot()
    assert snap["alarm"] and snap["reason"] == "position" and snap["since"] is not None
    assert snap["position"] == pytest.approx(0.7, abs=1e-4)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    for word in ("drift alarm for product bracket-a", "median", "position 0.70", "lighting", "focus", "camera moved",
                 "feedback ok", "recalibrate"):
        assert word in text, (word, text)
    feed(window, [at(0.45)] * 10)  # below the level, above 0.8 x level: still on, no new line
    assert window.snapshot()["alarm"]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    feed(window, [at(0.2)] * 10)
    snap = window.snapshot()
    assert not snap["alarm"] and snap["since"] is None and snap["reason"] is None
    assert any("drift alarm for product bracket-a cleared" in r.getMessage() and r.levelno == logging.INFO
               for r in caplog.records)


def test_every_frame_ng_raises_the_flag_rate_alarm():
    window = ScoreWindow("p", config(window=10, min_frames=5))
    feed(window, [at(0.1)] * 5)
    feed(window, [T_CAL * 2] * 10)  # a moved camera: nothing below the threshold any more
    snap = window.snapshot()
    assert snap["alarm"] and snap["reason"] == "flag_rate" and snap["flag_rate"] == 1.0
    assert snap["window"] == 5  # the OK window keeps its last OK scores


def test_a_new_reference_starts_the_window_over_an_adapt_version_does_not(caplog):
    caplog.set_level(logging.INFO, logger="edge_inspect.daemon.drift")
    window = ScoreWindow("p", config(window=10, min_frames=5))
    feed(window, [at(0.8)] * 8)
    assert window.snapshot()["alarm"] and window.snapshot()["window"] == 8
    # An adapt step: a new version with the same reference (bank, calibrated threshold): the window goes on.
    feed(window, [at(0.8)] * 2, version=2, threshold=14.5)
    snap = window.snapshot()
    assert snap["window"] == 10 and snap["alarm"] and snap["version"] == 2 and snap["threshold"] == 14.5
    assert snap["calibration_threshold"] == T_CAL
    # A frame still scored by the previous version (a camera mid-swap) is ignored.
    window.observe(reference(), 1, T_CAL, at(0.0), False)
    assert window.snapshot()["version"] == 2 and window.snapshot()["window"] == 10
    window.observe(reference(), 2, 14.5, at(0.8), False)
    # A recalibration (new bank, new threshold): a new yardstick, the window and the alarm start over.
    new_ref = reference(threshold=16.0, bank="bank-2", version=3)
    feed(window, [at(0.1, new_ref)], version=3, threshold=16.0, ref=new_ref)
    snap = window.snapshot()
    assert snap["window"] == 1 and snap["frames"] == 1 and not snap["alarm"] and snap["calibration_threshold"] == 16.0
    assert any("starts over" in r.getMessage() for r in caplog.records)
    # A product calibrated afresh (its folder deleted: versions start at 1 again): after a few frames that counts.
    fresh = reference(threshold=17.0, bank="bank-3", version=1)
    feed(window, [at(0.1, fresh)] * 32, version=1, threshold=17.0, ref=fresh)
    assert window.snapshot()["version"] == 3
    feed(window, [at(0.1, fresh)] * 2, version=1, threshold=17.0, ref=fresh)
    snap = window.snapshot()
    assert snap["version"] == 1 and snap["calibration_threshold"] == 17.0 and snap["window"] == 2


def test_no_reference_means_no_alarm_and_one_warning(caplog):
    window = ScoreWindow("legacy", config(window=10, min_frames=5))
    caplog.set_level(logging.INFO, logger="edge_inspect.daemon.drift")
    for _ in range(20):
        window.observe(None, None, T_CAL, T_CAL * 3, True)
    snap = window.snapshot()
    assert not snap["alarm"] and snap["position"] is None and snap["calibration_median"] is None
    assert len([r for r in caplog.records if "no good-part scores" in r.getMessage()]) == 1


def test_adapt_steps_every_adapt_every_ok_frames_and_one_at_a_time():
    window = ScoreWindow("p", config(window=10, min_frames=5, adapt=True, adapt_every=5))
    low = [M0 - 0.5] * 20  # the stream scores lower than calibration: the threshold may come down
    assert feed(window, low[:4]) == []  # not yet adapt_every OK frames
    steps = feed(window, low[:1])
    assert len(steps) == 1
    step = steps[0]
    assert step.from_version == 1 and step.old_threshold == T_CAL and step.product == "p"
    assert step.proposal.threshold < T_CAL and step.proposal.threshold >= T_CAL * 0.9
    assert feed(window, low) == []  # pending: no second step until the first is committed
    window.step_done(True)
    assert window.snapshot()["adapt"]["steps"] == 1 and window.snapshot()["adapt"]["last_step"] is not None
    assert len(feed(window, low[:5])) == 1  # the next one after adapt_every new OK frames
    # Numbers for the version's why and evidence.
    assert "->" in step.why() and "spreads" in step.why()
    evidence = step.evidence(window.config)
    assert evidence["adapt_bounds"]["calibration_threshold"] == T_CAL
    assert evidence["adapt_bounds"]["set_threshold"] == step.proposal.threshold
    assert evidence["adapt_bounds"]["min"] == pytest.approx(13.5) and evidence["adapt_bounds"]["max"] == pytest.approx(18.75)
    assert evidence["adapt_step"]["window"] == step.summary["window"]


def test_adapt_never_raises_during_a_drift_alarm_but_may_lower(caplog):
    caplog.set_level(logging.INFO, logger="edge_inspect.daemon.drift")
    window = ScoreWindow("p", config(window=10, min_frames=5, adapt=True, adapt_every=5))
    steps = feed(window, [at(0.8) + 0.01 * i for i in range(10)])  # drifting up: the alarm is on
    assert window.snapshot()["alarm"]
    assert steps == [] and window.snapshot()["adapt"]["paused"]
    assert len([r for r in caplog.records if "paused by the drift alarm" in r.getMessage()]) == 1  # once
    # Lowering is allowed while the alarm is on: the threshold above a tight, high window comes down.
    tight = [at(0.44)] * 10  # still above 0.8 x drift_alarm: the alarm stays on
    steps = feed(window, tight, threshold=T_CAL * 1.25)
    assert window.snapshot()["alarm"] and steps and steps[0].proposal.threshold < T_CAL * 1.25


def test_adapt_is_off_by_default_and_small_changes_make_no_step():
    window = ScoreWindow("p", config(window=10, min_frames=5))
    assert feed(window, [M0 - 3] * 30) == []  # off
    # Any 10 consecutive frames of this stream are the calibration's good scores: median and spread as calibrated.
    window = ScoreWindow("p", config(window=10, min_frames=10, adapt=True, adapt_every=10, adapt_min_change=0.02))
    like_calibration = list(np.resize(GOOD, 40))
    assert feed(window, like_calibration) == []  # the stream looks like calibration: no new version


def test_a_sighup_resizes_the_window_keeping_the_newest_scores():
    window = ScoreWindow("p", config(window=12, min_frames=5))
    feed(window, [float(i) for i in range(12)])
    window.configure(config(window=20, min_frames=5))
    feed(window, [1.0])
    assert window.snapshot()["window"] == 13
    window.configure(config(window=10, min_frames=5))
    feed(window, [2.0])
    assert window.snapshot()["window"] == 10 and window.snapshot()["median"] == 6.5  # 4..11, 1, 2: the newest


# --- the monitor: versions on disk -----------------------------------------------------------------


def _calibrate(cal_dir: Path, product: str = "p", threshold: float = T_CAL) -> int:
    def write(folder: Path) -> dict:
        (folder / "threshold.json").write_text(json.dumps(_doc(threshold)))
        return {"bank": {"sha256": "b1"}, "threshold": threshold, "calibration_id": "p@1"}

    with store.product_lock(cal_dir, product):
        return store.commit_version(cal_dir, product, write, change={"change": "calibrate", "by": "test"})


def _loaded(cal_dir: Path, product: str = "p") -> SimpleNamespace:
    """What the pipeline hands the monitor: a ProductCalibration's fields."""
    number = layout.current_version(cal_dir, product)
    directory = cal_dir / product / "versions" / str(number)
    doc = json.loads((directory / "threshold.json").read_text())
    manifest = json.loads((directory / "manifest.json").read_text())
    return SimpleNamespace(name=product, directory=directory, version=number, threshold=doc["threshold"],
                           manifest=manifest, engines_dir=None)


def test_monitor_commits_an_adapt_version_with_its_bounds_then_swaps(tmp_path):
    cal_dir = tmp_path / "calibration"
    _calibrate(cal_dir)
    swapped = []
    monitor = DriftMonitor(config(window=10, min_frames=5, adapt=True, adapt_every=5), cal_dir, swap=swapped.append)
    calibration = _loaded(cal_dir)
    for _ in range(5):
        monitor.observe(calibration, M0 - 2.0, False)  # scores well below calibration: the threshold comes down
    assert wait_until(lambda: swapped == ["p"])
    assert wait_until(lambda: not monitor.window("p").pending)
    assert layout.current_version(cal_dir, "p") == 2
    history = store.history(cal_dir, "p")
    assert history[-1]["change"] == "threshold_adapt" and history[-1]["by"] == "threshold.adapt"
    assert "->" in history[-1]["why"] and "median" in history[-1]["why"]
    adapted = _loaded(cal_dir)
    assert adapted.threshold == pytest.approx(T_CAL * 0.9)  # clamped at adapt_max_drop
    evidence = json.loads((adapted.directory / "threshold.json").read_text())["evidence"]
    assert evidence["adapt_bounds"] == {
        "calibration_version": 1, "calibration_threshold": T_CAL, "min": pytest.approx(T_CAL * 0.9),
        "max": pytest.approx(T_CAL * 1.25), "max_drop": 0.1, "max_rise": 0.25, "set_threshold": adapted.threshold}
    assert evidence["adapt_step"]["from_version"] == 1 and evidence["loo_scores"] == GOOD[:4]  # the rest is kept
    # The adapted version measures drift against the calibrated threshold, and keeps the window.
    monitor.observe(adapted, M0 - 2.0, False)
    snap = monitor.snapshot()["p"]
    assert snap["version"] == 2 and snap["calibration_threshold"] == T_CAL and snap["calibration_version"] == 1
    assert snap["window"] == 6 and snap["adapt"]["steps"] == 1
    # At the floor already: more of the same stream makes no further version.
    for _ in range(10):
        monitor.observe(adapted, M0 - 2.0, False)
    monitor.stop()
    assert layout.current_version(cal_dir, "p") == 2
    payload = stats_payload("s1", {"drift": monitor.snapshot()}, {"connected": True, "broker": "b", "spool_depth": 0,
                            "spool_bytes": 0, "spool_oldest_age_s": None, "dropped": 0, "dropped_ok": 0,
                            "dropped_update": 0, "dropped_ng": 0, "malformed_commands": 0, "last_seq": 0})
    jsonschema.validate(payload, load_schema("stats"))


def test_a_step_computed_on_a_version_that_is_no_longer_active_is_dropped(tmp_path, caplog):
    cal_dir = tmp_path / "calibration"
    _calibrate(cal_dir)
    window = ScoreWindow("p", config(window=10, min_frames=5, adapt=True, adapt_every=5))
    step = feed(window, [M0 - 2.0] * 5)[0]
    _calibrate(cal_dir, threshold=16.0)  # a recalibration meanwhile
    swapped = []
    monitor = DriftMonitor(window.config, cal_dir, swap=swapped.append)
    caplog.set_level(logging.INFO, logger="edge_inspect.daemon.drift")
    assert monitor.apply(step) is False
    assert layout.current_version(cal_dir, "p") == 2 and swapped == []
    assert any("changed meanwhile" in r.getMessage() for r in caplog.records)


def test_a_scorer_that_does_not_load_leaves_the_version_and_says_so(tmp_path, caplog):
    cal_dir = tmp_path / "calibration"
    _calibrate(cal_dir)
    window = ScoreWindow("p", config(window=10, min_frames=5, adapt=True, adapt_every=5))
    step = feed(window, [M0 - 2.0] * 5)[0]

    def broken(product: str) -> None:
        raise RuntimeError("no graph")

    caplog.set_level(logging.INFO, logger="edge_inspect.daemon.drift")
    assert DriftMonitor(window.config, cal_dir, swap=broken).apply(step) is True
    assert layout.current_version(cal_dir, "p") == 2
    assert any("did not load" in r.getMessage() and "reload" in r.getMessage() for r in caplog.records)


def test_observe_never_raises():
    monitor = DriftMonitor(config(), "/nonexistent", swap=lambda product: None)
    monitor.observe(object(), 1.0, False)  # not a calibration at all: logged once, the frame goes on
    bad = SimpleNamespace(name="p", directory=Path("/nonexistent"), version=1, threshold=1.0, manifest={}, engines_dir=None)
    monitor.observe(bad, 1.0, False)  # threshold.json unreadable: no reference, no alarm
    assert monitor.snapshot()["p"]["calibration_median"] is None


# --- config ---------------------------------------------------------------------------------------

BASE_CONFIG = """
station: s1
cameras:
  - name: cam0
    product: p
    source: {type: replay, path: frames}
"""


def test_threshold_config_defaults_and_errors():
    cfg = parse_config(BASE_CONFIG).threshold
    assert (cfg.window, cfg.min_frames, cfg.drift_alarm, cfg.adapt, cfg.adapt_every) == (200, 50, 0.5, False, None)
    assert (cfg.adapt_min_change, cfg.adapt_max_drop, cfg.adapt_max_rise) == (0.02, 0.10, 0.25)
    assert cfg.adapt_interval == 200
    assert parse_config(BASE_CONFIG + "threshold: {adapt: true, adapt_every: 30}\n").threshold.adapt_interval == 30
    with pytest.raises(Exception) as info:
        parse_config(BASE_CONFIG + "threshold: {window: 20, min_frames: 30}\n")
    assert "min_frames (30) must be <= window (20)" in str(info.value) and ":7:" in str(info.value)
    with pytest.raises(Exception) as info:
        parse_config(BASE_CONFIG + "threshold: {adapt: \"true\"}\n")
    assert "threshold.adapt" in str(info.value)
    with pytest.raises(Exception) as info:
        parse_config(BASE_CONFIG + "threshold: {adapt_max_drop: 1.0}\n")
    assert "threshold.adapt_max_drop" in str(info.value)


# --- the daemon: a replay source, a real broker, a calibrated product ------------------------------

def needs_broker(test):
    return pytest.mark.mosquitto(pytest.mark.slow(
        pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto broker binary not found")(test)))


@pytest.fixture
def own_product(tmp_path, calibrated_product):
    """The session's calibrated `coin`, copied: threshold.adapt writes versions (and prunes graphs) in it."""
    root = tmp_path / "product"
    shutil.copytree(calibrated_product["calibration_dir"], root / "calibration")
    shutil.copytree(calibrated_product["engines_dir"], root / "engines", symlinks=True)
    return {**calibrated_product, "calibration_dir": root / "calibration", "engines_dir": root / "engines"}


@pytest.fixture
def run_daemon():
    started: list[Daemon] = []
    sockets: list[NotifySocket] = []

    def start(config: Path) -> tuple[Daemon, NotifySocket]:
        sock = NotifySocket()
        sockets.append(sock)
        daemon = Daemon(config, {"NOTIFY_SOCKET": sock.address})
        started.append(daemon)
        return daemon, sock

    yield start
    for daemon in started:
        daemon.close()
    for sock in sockets:
        sock.close()


def _reference_of(product: dict) -> tuple[Reference, float]:
    from edge_inspect.scorer.product import load_product

    loaded = load_product(product["calibration_dir"], product["name"], product["engines_dir"])
    doc = json.loads((loaded.directory / "threshold.json").read_text())
    return calibration_reference(doc, loaded.manifest, loaded.version), loaded.threshold


def _out_of_focus_frames(product: dict, folder: Path) -> dict:
    """Held-out good parts blurred (a focus drift) just enough that most stay OK with their median past the
    middle between the calibration's good parts and the threshold. Picked by scoring: the test stands on
    the calibration's numbers, not on a guess of how blur moves them."""
    import cv2

    from edge_inspect.scorer.product import Scorer, load_product

    loaded = load_product(product["calibration_dir"], product["name"], product["engines_dir"])
    ref, threshold = _reference_of(product)
    scorer = Scorer(loaded, backend="onnxruntime", threads=1)
    good = [cv2.imread(str(p)) for p in product["good"]]
    tried = {}
    try:
        for sigma in (0.6, 0.7, 0.8, 0.9, 1.0, 1.2):
            frames = [cv2.GaussianBlur(img, (0, 0), sigma) for img in good]
            scores = [float(scorer.score(f).score) for f in frames]
            ok = [s for s in scores if s < threshold]
            tried[sigma] = [round(s, 3) for s in scores]
            if len(ok) * 2 >= len(scores) and position(float(np.median(ok)), ref.median, ref.threshold) >= 0.6:
                folder.mkdir(parents=True)
                for i, frame in enumerate(frames):
                    cv2.imwrite(str(folder / f"{i:03d}.png"), frame)
                return {"sigma": sigma, "scores": scores}
    finally:
        scorer.close()
    pytest.fail(f"no blur puts the good parts between the middle and the threshold {threshold:.4g} (calibration median "
                f"{ref.median:.4g}): {tried}")


def _drift_of(collector) -> dict:
    return ((latest_stats(collector) or {}).get("pipeline", {}).get("drift") or {}).get("coin") or {}


@needs_broker
def test_a_focus_drift_raises_the_alarm_in_stats_status_and_log(tmp_path, own_product, mosquitto_broker, run_daemon):
    picked = _out_of_focus_frames(own_product, tmp_path / "frames")
    ref, threshold = _reference_of(own_product)
    config = write_config(
        tmp_path, own_product, mosquitto_broker.port, camera_product="coin",
        source={"type": "replay", "path": str(tmp_path / "frames"), "fps": 10, "loop": True},
        trigger={"mode": "every_frame"}, threshold={"window": 20, "min_frames": 8, "drift_alarm": 0.5},
    )
    with MessageCollector(mosquitto_broker.port, [STATS]) as collector:
        collector.wait_subscribed()
        daemon, notify = run_daemon(config)
        assert wait_until(lambda: _drift_of(collector).get("alarm") is True, 180), (picked, _drift_of(collector), daemon.log)
        stats = latest_stats(collector)
        jsonschema.validate(stats, load_schema("stats"))
        block = stats["pipeline"]["drift"]["coin"]
        assert block["reason"] == "position" and block["position"] >= 0.5 and block["since"]
        assert block["window"] >= 8 and block["median"] > block["calibration_median"]
        assert block["calibration_median"] == pytest.approx(ref.median, abs=1e-4)
        assert block["threshold"] == pytest.approx(threshold, abs=1e-4) and block["version"] == 1
        assert block["adapt"]["enabled"] is False and block["adapt"]["steps"] == 0
        assert daemon.wait_log(r"WARNING .*drift alarm for product coin: the OK scores moved toward the threshold"), daemon.log
        assert "lighting changed, focus drifted, the camera moved" in daemon.log
        assert wait_until(lambda: any("drift alarm: coin (position" in line for line in notify.assignments()), 30), \
            notify.assignments()[-5:]
        daemon.send(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.log
    assert layout.current_version(own_product["calibration_dir"], "coin") == 1  # adapt is off: nothing written


@needs_broker
def test_threshold_adapt_writes_a_version_and_the_results_carry_it(tmp_path, own_product, mosquitto_broker, run_daemon):
    """The line scores lower than the calibration's leave-one-out parts (it shows the calibration's own good
    parts): threshold.adapt lowers the threshold, to the adapt_max_drop floor, as version 2."""
    import cv2

    folder = tmp_path / "frames"
    folder.mkdir()
    for i, path in enumerate(sorted((own_product["dataset"] / "train" / "good").glob("*.png"))):
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.imread(str(path)))
    ref, threshold = _reference_of(own_product)
    floor = threshold * (1 - 0.10)
    config = write_config(
        tmp_path, own_product, mosquitto_broker.port, camera_product="coin",
        source={"type": "replay", "path": str(folder), "fps": 10, "loop": True},
        trigger={"mode": "every_frame"},
        threshold={"adapt": True, "window": 16, "min_frames": 8, "adapt_every": 8, "adapt_max_drop": 0.10},
    )
    cal_dir = own_product["calibration_dir"]
    with MessageCollector(mosquitto_broker.port, [RESULT, STATS]) as collector:
        collector.wait_subscribed()
        daemon, _ = run_daemon(config)
        assert wait_until(lambda: any(r["calibration_version"] == 2 for r in results(collector)), 180), daemon.log
        got = results(collector)
        first = next(i for i, r in enumerate(got) if r["calibration_version"] == 2)
        assert got[0]["calibration_version"] == 1 and got[0]["threshold"] == pytest.approx(threshold, rel=1e-6)
        assert all(r["calibration_version"] == 2 and r["threshold"] == pytest.approx(floor, rel=1e-6) for r in got[first:])
        assert all(r["verdict"] == "OK" for r in got)
        # The version: written by threshold.adapt, why = the numbers, the bounds in its evidence.
        last = store.history(cal_dir, "coin")[-1]
        assert last["number"] == 2 and last["active"] and last["change"] == "threshold_adapt" and last["by"] == "threshold.adapt"
        assert last["threshold"] == pytest.approx(floor) and "median" in last["why"] and "clamped" in last["why"]
        evidence = json.loads((cal_dir / "coin" / "versions" / "2" / "threshold.json").read_text())["evidence"]
        assert evidence["adapt_bounds"]["calibration_version"] == 1
        assert evidence["adapt_bounds"]["calibration_threshold"] == pytest.approx(threshold)
        assert evidence["adapt_bounds"]["min"] == pytest.approx(floor) and evidence["adapt_step"]["from_version"] == 1
        assert daemon.wait_log(r"INFO .*threshold\.adapt: product coin threshold [0-9.]+ -> [0-9.]+ \(calibration version 2"), daemon.log
        # At the floor: the same stream makes no further version; the stats say where it stands.
        count = len(results(collector))
        assert wait_until(lambda: len(results(collector)) >= count + 24, 120), daemon.log
        assert wait_until(lambda: _drift_of(collector).get("version") == 2, 30)
        block = _drift_of(collector)
        assert block["adapt"] == {**block["adapt"], "enabled": True, "steps": 1}
        assert block["calibration_threshold"] == pytest.approx(threshold, abs=1e-4) and not block["alarm"]
        jsonschema.validate(latest_stats(collector), load_schema("stats"))
        daemon.send(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.log
    assert layout.current_version(cal_dir, "coin") == 2
