"""Learning from the line (calibration/stream.py): the guards, the gate, the candidate store, a refit that
becomes a version, its check, rollback, and an operator's ng. Small images (--size 64) keep fits fast."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from test_drift import own_product, run_daemon  # noqa: F401 - fixtures

from edge_inspect import cli
from edge_inspect.calibration import store
from edge_inspect.calibration.calibrate import rollback_product
from edge_inspect.calibration.stream import (
    CandidateStore,
    RefitStopped,
    StreamCadence,
    StreamGate,
    StreamLearner,
    StreamSettings,
    frame_guard,
    holdback_check,
    patch_guard,
    patches_of,
    refit_from_stream,
)
from edge_inspect.scorer import layout
from edge_inspect.scorer.params import ScorerParams
from edge_inspect.scorer.product import Scorer, load_product

SIZE = 64


# --- the numbers ------------------------------------------------------------------------------------


def test_the_frame_guard_keeps_the_low_share_and_nothing_far_above_the_rest():
    scores = np.array([1.0, 1.1, 0.9, 1.05, 0.95, 1.02, 0.98, 1.01, 9.0, 1.03])
    keep = frame_guard(scores, keep_fraction=0.8, spread_cut=4.0)
    assert not keep[8] and keep.sum() == 8
    everything = frame_guard(scores, keep_fraction=1.0, spread_cut=4.0)
    assert not everything[8] and everything.sum() == 9  # the outlier goes even when every share may stay


def test_the_patch_guard_drops_the_patches_far_from_every_other_frame():
    rng = np.random.default_rng(0)
    dists = [rng.uniform(0, 1, 100) for _ in range(5)]
    dists[2][7] = 50.0  # a small defect in an otherwise good frame
    keep = patch_guard(dists, np.array([True, True, True, True, False]), quantile=0.99)
    assert not keep[2][7] and keep[2].sum() >= 95
    assert not keep[4].any()  # a frame the frame guard removed gives nothing


def test_a_refit_from_a_contaminated_stream_keeps_the_outlier_frames_out_of_the_bank():
    """Trusted patches and good candidates from one distribution, two candidates far from it: the guards keep
    them out, and the threshold is fitted on the frames that stay."""
    rng = np.random.default_rng(1)
    grid, d = (8, 8), 16
    params = ScorerParams(input_size=(64, 64), score_topk=0.0)
    good = lambda: rng.normal(0, 1, (64, d)).astype(np.float32)  # noqa: E731
    trusted = [good() for _ in range(3)]
    candidates = [good() for _ in range(18)]
    for j in (5, 11):
        candidates[j][:20] += 12.0  # a third of the frame is something else
    fit = refit_from_stream(trusted, candidates, grid, params, capacity=512, settings=StreamSettings(keep_fraction=0.85))
    assert 5 in fit.dropped_frames and 11 in fit.dropped_frames
    assert fit.bank.shape == (512, d) and np.abs(fit.bank).max() < 8  # no defect patch in the bank
    assert fit.threshold >= max(fit.evidence["trusted_loo_scores"])
    assert fit.evidence["stream"]["frames_used"] == len(fit.used) == 18 - len(fit.dropped_frames)


def test_a_refit_holds_no_float32_copy_of_its_candidates():
    """The default store keeps 200 frames: a refit that stacked them in float32 (and copied that stack for the
    coreset) took ~450 MB beside the scorer. The coreset's projection is the one array of the candidates' size
    left (128 float32 columns against 152 float16 ones: 1.7x); everything else is a chunk at a time."""
    import tracemalloc

    rng = np.random.default_rng(2)
    grid, d = (16, 16), 152
    params = ScorerParams(input_size=(128, 128), score_topk=0.0)
    trusted = [rng.normal(0, 1, (256, d)).astype(np.float32) for _ in range(4)]
    candidates = [rng.normal(0, 1, (256, d)).astype(np.float16) for _ in range(400)]
    stored = sum(c.nbytes for c in candidates)
    tracemalloc.start()
    try:
        fit = refit_from_stream(trusted, candidates, grid, params, capacity=256,
                                settings=StreamSettings(reference_patches=2048), held=candidates[:4])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert fit.bank.dtype == np.float32 and fit.bank.shape == (256, d)
    assert peak < 3.0 * stored, f"peak {peak / 2**20:.0f} MB for {stored / 2**20:.0f} MB of stored candidates"


def test_the_gate_takes_quiet_ok_frames_only():
    gate = StreamGate(quiet_frames=2, max_position=0.5)
    taken = []
    feed = [  # (item, score, flagged): median 1.0, threshold 3.0 -> position 0.5 at score 2.0
        ("a", 1.0, False), ("b", 1.5, False), ("c", 2.5, False), ("d", 1.2, False), ("ng", 4.0, True),
        ("e", 1.0, False), ("f", 1.0, False), ("g", 1.0, False), ("h", 1.0, False), ("i", 1.0, False),
    ]
    for item, score, flagged in feed:
        taken += gate.offer(item, score, 3.0, 1.0, flagged, alarm=False)
    # c scores too high; d is discarded by the NG two frames later; e and f are within the quiet frames after it
    assert taken == ["a", "b", "g"]
    assert gate.offer("j", 1.0, 3.0, 1.0, False, alarm=True) == [] and gate.offer("k", 1.0, 3.0, 1.0, False, alarm=False) == []
    sampled = StreamGate(quiet_frames=0, max_position=1.0, sample_every=3)
    out = [x for i in range(9) for x in sampled.offer(i, 1.0, 3.0, 1.0, False, False)]
    assert out == [0, 3, 6]


def test_the_candidate_store_is_bounded_forgets_an_ng_and_starts_over_for_other_params(tmp_path):
    candidates = CandidateStore(tmp_path / "calibration", "p", max_frames=3)
    for i in range(5):
        candidates.add(np.full((4, 2, 2), i, np.float32), {"inspection_id": f"id{i}"}, key="k1")
    entries = candidates.entries()
    assert [e["inspection_id"] for e in entries] == ["id2", "id3", "id4"]
    assert len(list(candidates.folder.glob("*.npy"))) == 3
    loaded = candidates.load(entries)
    assert loaded[0][1].dtype == np.float16 and float(loaded[0][1][0, 0, 0]) == 2.0
    assert patches_of(loaded[0][1]).dtype == np.float16  # float32 only a chunk at a time, in the maths
    assert candidates.remove("id3") == 1 and [e["inspection_id"] for e in candidates.entries()] == ["id2", "id4"]
    candidates.add(np.zeros((4, 2, 2), np.float32), {"inspection_id": "new"}, key="k2")  # a recalibration's features
    assert [e["inspection_id"] for e in candidates.entries()] == ["new"]


# --- a product learning from frames, as the daemon and evaluate --stream do ---------------------------------------


@pytest.fixture(scope="module")
def frames():
    pytest.importorskip("skimage")
    from edge_inspect.calibration.defects import inject_defect
    from edge_inspect.offline.datasets.generate import CATEGORIES, load_photo, render_good

    photo, spec = load_photo("brick"), CATEGORIES["brick"]
    goods = [render_good(photo, spec, np.random.default_rng(seed), 96) for seed in range(28)]
    defects = [inject_defect(goods[20 + i], np.random.default_rng(100 + i), "hole")[0] for i in range(3)]
    return goods, defects


@pytest.fixture
def product(tmp_path, engines_dir, frames):
    goods, _ = frames
    folder = tmp_path / "good"
    folder.mkdir()
    for i, image in enumerate(goods[:4]):
        cv2.imwrite(str(folder / f"good_{i:02d}.png"), image)
    cal = tmp_path / "calibration"
    assert cli.main(["calibrate", "--product", "brick", "--images", str(folder), "--calibration-dir", str(cal),
                     "--engines-dir", str(engines_dir), "--size", str(SIZE), "--bank-size", "256"]) == 0
    return cal, engines_dir


def _feed(learner: StreamLearner, scorer: Scorer, images, prefix: str) -> None:
    for i, image in enumerate(images):
        result = scorer.score(image, features=True)
        for _id, features, meta in learner.observe("cam0", scorer.product, f"{prefix}{i}", result.score, result.flagged,
                                                   result.patch_features):
            learner.add_candidate(features, meta, scorer.product.params)


def test_a_stream_refit_is_a_version_that_scores_live_and_rolls_back(product, frames):
    cal, engines = product
    goods, defects = frames
    learner = StreamLearner(cal, engines, "brick", StreamSettings(min_candidates=5, holdback=0.2),
                            StreamCadence(refit_every=10, quiet_frames=0, max_position=1.0))
    scorer = Scorer(load_product(cal, "brick", engines), "onnxruntime", threads=1)
    try:
        flagged_before = [scorer.score(d).flagged for d in defects]
        _feed(learner, scorer, goods[4:20], "good")
    finally:
        scorer.close()
    assert any(flagged_before)
    assert learner.due() and len(learner.store.entries()) >= 10
    with store.product_lock(cal, "brick"):
        outcome = learner.refit()
    assert outcome.committed, outcome
    history = store.history(cal, "brick")
    assert history[-1]["change"] == "stream" and history[-1]["parent"] == 1 and history[-1]["active"]
    manifest = layout.read_manifest(cal, "brick", outcome.version)
    assert manifest["stream"]["frames_used"] == outcome.numbers["frames_used"] > 0
    assert manifest["scorer_onnx"] == layout.read_manifest(cal, "brick", 1)["scorer_onnx"]  # the same graph
    doc = json.loads((layout.version_dir(cal, "brick", outcome.version) / "threshold.json").read_text())
    held = doc["evidence"]["held_back_scores"]  # out-of-sample: the held-back frames never touched the bank
    assert 0 < len(held) <= outcome.numbers["held_back"]
    assert len(doc["evidence"]["loo_scores"]) == 4 + outcome.numbers["frames_used"] + len(held)
    after = load_product(cal, "brick", engines)
    live = Scorer(after, "onnxruntime", threads=1)
    try:
        assert all(not live.score(g).flagged for g in goods[20:24])  # good parts the stream never showed
        flagged_after = [live.score(d).flagged for d in defects]
        assert all(a or not b for a, b in zip(flagged_after, flagged_before))  # no defect it found before passes now
    finally:
        live.close()
    rollback_product(cal, "brick", engines, by="test")
    assert load_product(cal, "brick", engines).bank_capacity == 256
    assert store.history(cal, "brick")[-1]["restored_from"] == 1


def test_a_refit_stopped_at_a_checkpoint_writes_nothing_and_keeps_the_candidates(product, frames):
    """The daemon stopping mid-refit: the refit gives up at its next step; no version, candidates kept."""
    cal, engines = product
    goods, _ = frames
    learner = StreamLearner(cal, engines, "brick", StreamSettings(min_candidates=5),
                            StreamCadence(refit_every=10, quiet_frames=0, max_position=1.0))
    scorer = Scorer(load_product(cal, "brick", engines), "onnxruntime", threads=1)
    try:
        _feed(learner, scorer, goods[4:16], "good")
    finally:
        scorer.close()
    stored = len(learner.store.entries())
    calls = []

    def stop_at_the_second_step():
        calls.append(1)
        if len(calls) >= 2:
            raise RefitStopped()

    with store.product_lock(cal, "brick"), pytest.raises(RefitStopped):
        learner.refit(checkpoint=stop_at_the_second_step)
    assert len(store.history(cal, "brick")) == 1 and layout.current_version(cal, "brick") == 1
    assert len(learner.store.entries()) == stored > 0


def test_learning_is_off_by_default_and_doctor_says_what_it_holds(product, frames):
    from edge_inspect.config.stream import StreamConfig
    from edge_inspect.ops.doctor import _check_stream

    cal, engines = product
    calibration = load_product(cal, "brick", engines)
    assert not StreamConfig().learns("brick")
    off = _check_stream(calibration, StreamConfig(), cal)
    assert off.status == "ok" and "off for this product" in off.detail
    learner = StreamLearner(cal, engines, "brick", cadence=StreamCadence(quiet_frames=0, max_position=1.0))
    scorer = Scorer(calibration, "onnxruntime", threads=1)
    try:
        _feed(learner, scorer, frames[0][4:8], "good")
    finally:
        scorer.close()
    on = _check_stream(calibration, StreamConfig(products={"brick": True}), cal)
    assert on.status == "ok" and f"{len(learner.store.entries())} candidate frame(s) on disk" in on.detail
    assert len(learner.store.entries()) > 0


def test_the_held_back_check_refuses_a_bank_under_which_they_score_worse():
    rng = np.random.default_rng(3)
    grid, d = (8, 8), 16
    params = ScorerParams(input_size=(64, 64), score_topk=0.0)
    held = [rng.normal(0, 1, (64, d)).astype(np.float32) for _ in range(5)]
    old = rng.normal(0, 1, (512, d)).astype(np.float32)
    elsewhere = rng.normal(3, 1, (512, d)).astype(np.float32)
    richer = np.concatenate([old, rng.normal(0, 1, (512, d)).astype(np.float32)])
    worse = holdback_check(held, grid, params, old, 100.0, elsewhere, 100.0)
    assert not worse["passed"] and worse["new_median_score"] > worse["old_median_score"]
    better = holdback_check(held, grid, params, old, 100.0, richer, 100.0)
    assert better["passed"] and better["new_median_score"] <= better["old_median_score"]
    lower = holdback_check(held, grid, params, old, 100.0, richer, 0.1)  # a threshold that rejects them
    assert not lower["passed"] and lower["new_flagged"] == 5


def test_frames_without_features_never_become_candidates(product, frames):
    cal, engines = product
    learner = StreamLearner(cal, engines, "brick", cadence=StreamCadence(quiet_frames=0, max_position=1.0))
    calibration = load_product(cal, "brick", engines)
    for i in range(5):
        assert learner.observe("cam0", calibration, f"i{i}", 0.0, False, None) == []


# --- the daemon learns while it scores ------------------------------------------------------------------


@pytest.mark.mosquitto
@pytest.mark.slow
def test_the_daemon_learns_from_its_ok_frames_and_swaps_to_the_new_version(tmp_path, own_product, mosquitto_broker, run_daemon):
    """A replay of good coins with stream learning on: candidates are taken, a refit is committed as a
    "stream" version, the cameras score with it without a restart, and the stats say so (schema-valid)."""
    import signal

    import jsonschema
    from conftest import wait_until
    from mqtt_broker import MessageCollector
    from test_daemon import RESULT, STATS, latest_stats, load_schema, results, write_config

    folder = tmp_path / "frames"
    folder.mkdir()
    goods = sorted((own_product["dataset"] / "train" / "good").glob("*.png")) + sorted((own_product["dataset"] / "test" / "good").glob("*.png"))
    for i, path in enumerate(goods):
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.imread(str(path)))
    config = write_config(
        tmp_path, own_product, mosquitto_broker.port, camera_product="coin",
        source={"type": "replay", "path": str(folder), "fps": 10, "loop": True}, trigger={"mode": "every_frame"},
        stream={"enabled": True, "refit_every": 5, "quiet_frames": 0, "max_position": 1.0},
    )
    cal = own_product["calibration_dir"]
    with MessageCollector(mosquitto_broker.port, [RESULT, STATS]) as collector:
        collector.wait_subscribed()
        daemon, _ = run_daemon(config)
        assert wait_until(lambda: any(r["calibration_version"] == 2 for r in results(collector)), 300), daemon.log
        last = store.history(cal, "coin")[-1]
        assert last["change"] == "stream" and last["by"] == "stream" and last["active"] and "joined the bank" in last["why"]
        assert daemon.wait_log(r"stream learning: product coin version 2"), daemon.log
        block = lambda: ((latest_stats(collector) or {}).get("pipeline", {}).get("stream") or {}).get("products", {}).get("coin", {})  # noqa: E731
        assert wait_until(lambda: block().get("committed", 0) >= 1, 60), latest_stats(collector)
        assert block()["stored"] >= 10 and block()["last_refit"]["committed"]
        jsonschema.validate(latest_stats(collector), load_schema("stats"))
        daemon.send(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.log
    assert all(r["verdict"] == "OK" for r in results(collector))
