"""Operator feedback (edge_inspect/feedback/, mqtt/feedback.py, `edge-inspect feedback`): the payloads and their
schemas, the labelled-defect report, the service's queue and rate limit, the one apply path on a real calibrated
product (refit once, duplicates, conflicts, crash recovery, labelled defects, the error cases), and the daemon over a
real mosquitto: applied once with the new version live, surviving a restart, errors on the result topic, a flood."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import jsonschema
import numpy as np
import pytest
from conftest import wait_until
from mqtt_broker import MessageCollector, mosquitto_binary
from test_daemon import (  # noqa: F401 - daemons: the fixture that runs `edge-inspect run` subprocesses
    PREFIX,
    RESULT,
    STATION,
    daemons,
    latest_stats,
    paint_defect,
    results,
    write_config,
)

from edge_inspect import cli
from edge_inspect.calibration import store
from edge_inspect.calibration.calibrate import REFIT_EVIDENCE, rollback_product
from edge_inspect.config import CameraConfig
from edge_inspect.config.evidence import EvidenceConfig
from edge_inspect.config.feedback import FeedbackConfig
from edge_inspect.evidence import EvidenceStore
from edge_inspect.feedback.apply import (
    FeedbackApplier,
    FeedbackOutcome,
    error_body,
    result_body,
)
from edge_inspect.feedback.defects import (
    DefectStore,
    good_loo_scores,
    labelled_defect_report,
)
from edge_inspect.feedback.ledger import FeedbackLedger
from edge_inspect.feedback.service import FeedbackService
from edge_inspect.mqtt.feedback import (
    MAX_FEEDBACK_BYTES,
    FeedbackRequest,
    feedback_message,
    feedback_result_payload,
    parse_feedback,
)
from edge_inspect.mqtt.payloads import load_schema
from edge_inspect.records import Inspection, new_inspection_id
from edge_inspect.scorer import layout
from edge_inspect.scorer.product import Scorer, load_product

FEEDBACK = f"{PREFIX}/{STATION}/feedback"
FEEDBACK_RESULT = f"{PREFIX}/{STATION}/feedback/result"
STATS = f"{PREFIX}/{STATION}/stats"
PRODUCT = "coin"  # conftest.calibrated_product
ID = "5f0c2a9e8d7b4c1a9e3f6b2d4c8a1e07"

needs_broker = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto broker binary not found")


def _parse(**fields) -> FeedbackRequest:
    return parse_feedback(json.dumps(fields).encode("utf-8"))


def _validate(payload: dict, name: str = "feedback_result") -> dict:
    jsonschema.Draft202012Validator(load_schema(name)).validate(payload)
    return payload


# --- payloads and schemas -------------------------------------------------------------------------


def test_parse_feedback_takes_a_full_message_and_keeps_a_note_with_lines():
    request = _parse(inspection_id=ID, verdict="ng", defect_type=" scratch ", operator="anna", note="left flange\nsecond line",
                     request_id="hmi-1")
    assert request.error is None
    assert (request.inspection_id, request.verdict, request.defect_type, request.operator, request.request_id) == (
        ID, "ng", "scratch", "anna", "hmi-1")
    assert request.note == "left flange\nsecond line" and request.received_at > 0
    message = feedback_message(request)
    _validate(message, "feedback")
    assert parse_feedback(json.dumps(message).encode(), now=request.received_at) == request  # what the CLI sends
    assert _parse(inspection_id=ID, verdict="ok").error is None  # request_id, operator and note are optional


@pytest.mark.parametrize(
    "fields, error",
    [
        ({"inspection_id": ID, "verdict": "maybe"}, "verdict must be"),
        ({"inspection_id": ID, "verdict": "OK"}, "verdict must be"),
        ({"inspection_id": ID}, "verdict must be"),
        ({"inspection_id": ID, "verdict": "ok", "defect_type": "scratch"}, "defect_type goes with"),
        ({"inspection_id": ID, "verdict": "ng", "colour": "red"}, "unknown keys"),
        ({"inspection_id": "a/b", "verdict": "ok", "request_id": "r-1"}, "inspection_id must be"),
        ({"inspection_id": ID, "verdict": "ok", "request_id": "r 1"}, "request_id must be"),
        ({"inspection_id": ID, "verdict": "ng", "operator": "an\x00na"}, "control characters"),
        ({"inspection_id": ID, "verdict": "ng", "defect_type": "x" * 65}, "at most 64"),
        ({"inspection_id": ID, "verdict": "ng", "note": " "}, "non-empty"),
        ({"inspection_id": ID, "verdict": "ng", "operator": 7}, "non-empty string"),
    ],
)
def test_unusable_feedback_that_can_be_answered_carries_its_error_and_fails_the_schema(fields, error):
    request = _parse(**fields)
    assert request.error and error in request.error, request
    assert not jsonschema.Draft202012Validator(load_schema("feedback")).is_valid(fields)
    payload = feedback_result_payload("t1", error_body(request, "invalid_request", request.error))
    _validate(payload)
    assert payload["status"] == "error" and payload["error_code"] == "invalid_request"


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "not JSON"),
        (b"ok", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"verdict": "ok"}', "needs the inspection_id"),
        (b'{"inspection_id": "a/b", "verdict": "ok"}', "needs the inspection_id"),
        (b'{"inspection_id": "' + b"x" * MAX_FEEDBACK_BYTES + b'"}', "bytes"),
        (b"\xff\xfe", "not JSON"),
    ],
)
def test_feedback_nobody_can_be_answered_about_is_malformed(payload, message):
    with pytest.raises(ValueError, match=message):
        parse_feedback(payload)


def test_feedback_results_validate_for_applied_duplicate_and_error():
    request = _parse(inspection_id=ID, verdict="ok", request_id="r-1")
    report = {"calibration_version": 3, **labelled_defect_report({"scratch": [3.0, 1.0]}, [0.5, 2.5], 2.0)}
    applied = _validate(feedback_result_payload("t1", result_body(
        request, "applied", product="coin", camera="cam0", calibration_version=3, previous_version=2, threshold=2.0,
        labelled_defects=report), timestamp=1_750_000_000.0))
    assert applied["type"] == "feedback_result" and applied["schema_version"] == "1.3"
    assert applied["timestamp"] == "2025-06-15T15:06:40.000Z" and applied["labelled_defects"]["types"]["scratch"]["n"] == 2
    duplicate = _validate(feedback_result_payload("t1", result_body(request, "duplicate", calibration_version=3,
                                                                    previous_version=2, threshold=2.0)))
    assert duplicate["status"] == "duplicate" and "error_code" not in duplicate
    anonymous = _validate(feedback_result_payload("t1", error_body(
        FeedbackRequest("", "", request_id="r-2", error="x"), "invalid_request", "x")))
    assert anonymous["inspection_id"] is None and anonymous["verdict"] is None and anonymous["request_id"] == "r-2"
    check = jsonschema.Draft202012Validator(load_schema("feedback_result"))
    for broken in ({**applied, "status": "done"}, {**applied, "error_code": "conflict"}, {**duplicate, "verdict": None},
                   {k: v for k, v in applied.items() if k != "threshold"}, {**applied, "extra": 1}):
        assert not check.is_valid(broken), broken


@pytest.mark.parametrize(
    "body, message",
    [
        ({"status": "done", "verdict": "ok"}, "status must be"),
        ({"status": "error", "error_code": "oops", "error": "x"}, "error_code"),
        ({"status": "applied", "verdict": None}, "needs the verdict"),
    ],
)
def test_feedback_result_payload_refuses_what_is_not_a_result(body, message):
    with pytest.raises(ValueError, match=message):
        feedback_result_payload("t1", body)


# --- the labelled-defect report -----------------------------------------------------------------


def test_labelled_defect_report_counts_recall_per_type_and_precision_against_good_scores():
    report = labelled_defect_report({"scratch": [3.0, 1.0, 2.0], "hole": [5.0], "dent": []}, [0.5, 2.5, 1.0, 2.0], 2.0)
    assert report["false_positives"] == 2 and report["good_scores"] == 4  # 2.5 and 2.0: at or above the threshold
    assert report["types"]["scratch"] == {"n": 3, "detected": 2, "recall": 0.6667, "precision": 0.5}
    assert report["types"]["hole"] == {"n": 1, "detected": 1, "recall": 1.0, "precision": 0.3333}
    assert report["types"]["dent"] == {"n": 0, "detected": 0, "recall": None, "precision": 0.0}
    assert report["overall"] == {"n": 4, "detected": 3, "recall": 0.75, "precision": 0.6}
    clean = labelled_defect_report({"hole": [0.1]}, [0.2], 1.0)
    assert clean["types"]["hole"] == {"n": 1, "detected": 0, "recall": 0.0, "precision": None}  # nothing flagged at all


# --- the service: never blocks, bounded, rate-limited, one result per message ---------------------


class _SlowApplier:
    """Stands in for FeedbackApplier: holds each request until released, answers applied."""

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Event()
        self.seen: list[str] = []

    def check(self, request):
        FeedbackApplier.check(self, request)

    def apply(self, request):
        self.started.set()
        self.release.wait(30)
        self.seen.append(request.request_id)
        return FeedbackOutcome(result_body(request, "applied", calibration_version=2, previous_version=1, threshold=1.0),
                               refitted="coin" if request.verdict == "ok" else None)


def test_service_rate_limits_bounds_its_queue_and_answers_every_message_once():
    now = [0.0]
    applier, published, refits = _SlowApplier(), [], []
    service = FeedbackService(FeedbackConfig(queue_size=2, rate_per_min=60, burst=4), applier, published.append,
                              on_refit=refits.append, clock=lambda: now[0])
    service.start()
    try:
        service.submit(_parse(inspection_id=ID, verdict="ok", request_id="r-0"))
        assert applier.started.wait(10)  # r-0 is being applied; the queue is empty
        for i in range(1, 6):
            service.submit(_parse(inspection_id=ID, verdict="ng", request_id=f"r-{i}"))
        service.submit(_parse(inspection_id=ID, verdict="maybe", request_id="r-bad"))  # no token used
        codes = {b["request_id"]: b.get("error_code") for b in published}
        assert codes == {"r-3": "queue_full", "r-4": "rate_limited", "r-5": "rate_limited", "r-bad": "invalid_request"}
        now[0] += 1.0  # one token back
        service.submit(_parse(inspection_id=ID, verdict="ng", request_id="r-6"))
        assert published[-1]["error_code"] == "queue_full"  # r-1, r-2 still wait
        applier.release.set()
        assert wait_until(lambda: len(published) == 8, 10), published
    finally:
        service.stop()
    assert applier.seen == ["r-0", "r-1", "r-2"] and refits == ["coin"]
    state = service.state()
    assert (state["received"], state["applied"], state["errors"], state["rate_limited"], state["queue_full"], state["refits"]) == (
        8, 3, 5, 2, 2, 1)
    assert sorted(b["request_id"] for b in published) == ["r-0", "r-1", "r-2", "r-3", "r-4", "r-5", "r-6", "r-bad"]


def test_service_without_an_applier_or_when_stopping_says_why():
    published: list[dict] = []
    off = FeedbackService(FeedbackConfig(), None, published.append, unavailable="feedback.enabled is false on this station")
    off.submit(_parse(inspection_id=ID, verdict="ok"))
    assert published[-1]["error_code"] == "disabled" and "feedback.enabled" in published[-1]["error"]
    applier = _SlowApplier()
    service = FeedbackService(FeedbackConfig(), applier, published.append)
    service.start()
    service.submit(_parse(inspection_id=ID, verdict="ng", request_id="a"))
    assert applier.started.wait(10)
    service.submit(_parse(inspection_id=ID, verdict="ng", request_id="b"))  # queued behind a
    stopper = threading.Thread(target=service.stop, kwargs={"timeout": 10})
    stopper.start()
    assert wait_until(lambda: any(b.get("request_id") == "b" for b in published), 10)
    service.submit(_parse(inspection_id=ID, verdict="ng", request_id="c"))
    applier.release.set()
    stopper.join(15)
    codes = {b.get("request_id"): b.get("error_code") for b in published[1:]}
    assert codes["b"] == "stopping" and codes["c"] == "stopping" and codes["a"] is None


# --- the one apply path, on a real calibrated product ---------------------------------------------

CAMERA = CameraConfig.model_validate({"name": "cam0", "product": PRODUCT, "source": {"type": "replay", "path": "frames"}})


@pytest.fixture
def station(tmp_path, calibrated_product):
    """A copy of the session's calibrated product (calibration and engines: feedback writes both) and an
    empty evidence folder."""
    cal, engines = tmp_path / "calibration", tmp_path / "engines"
    shutil.copytree(calibrated_product["calibration_dir"], cal)
    shutil.copytree(calibrated_product["engines_dir"], engines, symlinks=True)
    return SimpleNamespace(
        cal=cal, engines=engines, evidence=tmp_path / "evidence", tmp=tmp_path,
        good=[cv2.imread(str(p)) for p in calibrated_product["good"]],
        defects=[(p.parent.name, cv2.imread(str(p))) for p in calibrated_product["defects"]],
    )


def _store(station, frame: np.ndarray, verdict: str = "NG", version: int | None = 1, camera: str = "cam0",
           product: str = PRODUCT, score: float = 9.0, threshold: float = 1.0) -> str:
    """One inspection in the evidence folder, as the daemon leaves it."""
    inspection = Inspection(
        inspection_id=new_inspection_id(), station=STATION, camera=camera, product=product, frame_id=1,
        timestamp=time.time(), score=score, threshold=threshold, verdict=verdict, calibration_version=version,
    )
    store = EvidenceStore(EvidenceConfig(dir=str(station.evidence), min_free_mb=0, save_ok_sample_every=1), background=False)
    assert store.save(inspection, frame, anomaly_map=np.zeros((16, 16), np.float32)) is not None
    store.close()
    return inspection.inspection_id


def _applier(station, running: str = PRODUCT, camera: CameraConfig | None = CAMERA, **config) -> FeedbackApplier:
    return FeedbackApplier(
        station.cal, station.engines, station.evidence, FeedbackConfig(**config),
        camera=lambda name: camera if name == "cam0" else None,
        running_product=lambda name: running if name == "cam0" else None,
    )


def _score(station, bgr: np.ndarray) -> float:
    """The score of a view with the active version."""
    product = load_product(station.cal, PRODUCT, station.engines)
    scorer = Scorer(product, backend="onnxruntime", threads=1)
    try:
        return float(scorer.score(bgr).score)
    finally:
        scorer.close()


@pytest.mark.slow
def test_ok_on_an_ng_refits_once_records_who_and_why_and_is_never_applied_twice(station):
    defect_type, defect = station.defects[0]
    ng_id = _store(station, defect)
    applier = _applier(station)
    first = applier.apply(_parse(inspection_id=ng_id, verdict="ng", defect_type=defect_type, operator="anna"))
    assert first.body["status"] == "applied" and first.refitted is None and first.body["calibration_version"] == 1
    assert first.body["labelled_defects"]["types"][defect_type]["n"] == 1

    frame = paint_defect(station.good[0])
    before = _score(station, frame)
    inspection_id = _store(station, frame, score=before)
    request = _parse(inspection_id=inspection_id, verdict="ok", operator="anna", note="paint mark, not a defect",
                     request_id="hmi-7")
    outcome = applier.apply(request)
    body = _validate(feedback_result_payload(STATION, outcome.body))
    assert outcome.refitted == PRODUCT, body
    assert (body["status"], body["verdict"], body["calibration_version"], body["previous_version"]) == ("applied", "ok", 2, 1)
    assert (body["request_id"], body["product"], body["camera"]) == ("hmi-7", PRODUCT, "cam0")
    now = load_product(station.cal, PRODUCT, station.engines)
    assert now.version == 2 and body["threshold"] == now.threshold
    version = now.manifest["version"]
    assert (version["change"], version["by"], version["why"], version["inspection_ids"]) == (
        "feedback_ok", "anna", "paint mark, not a defect", [inspection_id])
    assert now.manifest["good_set"][-1] == {**now.manifest["good_set"][-1], "added_by": "feedback", "inspection_id": inspection_id}
    assert _score(station, frame) < before  # what the scorer saw is in the bank now
    evidence = json.loads((now.directory / "threshold.json").read_text())["evidence"]
    assert evidence["labelled_defects"] == body["labelled_defects"] and evidence["labelled_defects"]["calibration_version"] == 2
    assert len(evidence["loo_scores"]) == (9 if REFIT_EVIDENCE == "all" else 8)  # recomputed (with the frame, by policy)

    # Applied once: a repeat (also from a fresh applier: a restarted daemon) is a duplicate, the other verdict a conflict.
    for again in (applier, _applier(station)):
        repeat = again.apply(request)
        assert repeat.refitted is None
        assert (repeat.body["status"], repeat.body["calibration_version"], repeat.body["previous_version"]) == ("duplicate", 2, 1)
    conflict = applier.apply(_parse(inspection_id=inspection_id, verdict="ng", request_id="hmi-8")).body
    assert (conflict["status"], conflict["error_code"]) == ("error", "conflict") and "calibration rollback" in conflict["error"]
    ledger = FeedbackLedger(station.cal, PRODUCT).entries()
    assert [(e["inspection_id"], e["verdict"], e["calibration_version"]) for e in ledger] == [(ng_id, "ng", 1), (inspection_id, "ok", 2)]
    assert ledger[1]["operator"] == "anna" and ledger[1]["request_id"] == "hmi-7" and ledger[1]["refit"] is True

    # A crash between the new version and its ledger line: the version's manifest still says it was applied.
    (station.cal / PRODUCT / "feedback.jsonl").unlink()
    recovered = _applier(station).apply(request)
    assert (recovered.body["status"], recovered.body["calibration_version"], recovered.refitted) == ("duplicate", 2, None)
    assert layout.version_numbers(station.cal, PRODUCT) == [1, 2]
    assert FeedbackLedger(station.cal, PRODUCT).find(inspection_id)["recovered"] is True


def _write_station_config(station) -> Path:
    import yaml

    path = station.tmp / "config.yaml"
    path.write_text(yaml.safe_dump({
        "station": STATION,
        "cameras": [{"name": "cam0", "product": PRODUCT, "source": {"type": "replay", "path": str(station.tmp / "frames")}}],
        "scoring": {"backend": "onnxruntime", "threads": 1, "calibration_dir": str(station.cal), "engines_dir": str(station.engines)},
        "evidence": {"dir": str(station.evidence)},
    }))
    return path


@pytest.mark.slow
def test_ng_is_kept_as_a_labelled_defect_and_reported_per_type(station, capsys):
    applier = _applier(station)
    kinds = sorted({kind for kind, _ in station.defects})
    stored = [(kind, _store(station, image)) for kind, image in station.defects[:2] + station.defects[-2:]]
    untyped = _store(station, station.defects[1][1])
    config = _write_station_config(station)
    bodies = []
    for kind, inspection_id in stored[:-1]:
        bodies.append(applier.apply(_parse(inspection_id=inspection_id, verdict="ng", defect_type=kind, operator="olaf")).body)
    kind, inspection_id = stored[-1]  # the CLI, without a daemon, on the same folders
    assert cli.main(["feedback", inspection_id, "ng", "--defect-type", kind, "--operator", "olaf", "--note", "deep",
                     "--local", "--json", "--config", str(config)]) == 0
    bodies.append(_validate(json.loads(capsys.readouterr().out.strip().splitlines()[-1])))
    bodies.append(applier.apply(_parse(inspection_id=untyped, verdict="ng")).body)
    for body in bodies:
        _validate(feedback_result_payload(STATION, body) if "schema_version" not in body else body)
        assert body["status"] == "applied" and body["calibration_version"] == body["previous_version"] == 1
    assert layout.current_version(station.cal, PRODUCT) == 1  # no new version for an ng

    store = DefectStore(station.cal, PRODUCT)
    entries = store.entries()
    assert [e["inspection_id"] for e in entries] == [i for _, i in stored] + [untyped]
    assert all(store.image_path(e["inspection_id"]).is_file() for e in entries)
    assert entries[-2] == {**entries[-2], "defect_type": kind, "operator": "olaf", "note": "deep", "score": 9.0,
                           "threshold": 1.0, "calibration_version": 1}
    assert entries[-1]["defect_type"] == "unspecified" and entries[-1]["received_utc"].endswith("+00:00")
    stored_png = cv2.imread(str(store.image_path(untyped)))
    assert stored_png.shape == station.defects[1][1].shape  # no camera or product ROI: the whole view, lossless
    assert np.array_equal(stored_png, cv2.imread(str(next(station.evidence.rglob(f"{untyped}.jpg")))))

    # The report: every stored defect scored with the active version, recall per type, precision against good LOO scores.
    product = load_product(station.cal, PRODUCT, station.engines)
    scorer = Scorer(product, backend="onnxruntime", threads=1)
    try:
        scores: dict[str, list[float]] = {}
        for entry in entries:
            image = cv2.imread(str(store.image_path(entry["inspection_id"])))
            scores.setdefault(entry["defect_type"], []).append(float(scorer.score(image).score))
    finally:
        scorer.close()
    report = bodies[-1]["labelled_defects"]
    assert set(report["types"]) == {*kinds, "unspecified"} and report["overall"]["n"] == 5
    assert report["calibration_version"] == 1 and report["good_scores"] == len(good_loo_scores(product)) > 0
    expected = labelled_defect_report(scores, good_loo_scores(product), product.threshold)
    for name, row in expected["types"].items():
        assert report["types"][name] == row, (name, scores)
    assert report["overall"] == expected["overall"]
    assert bodies[0]["labelled_defects"]["overall"]["n"] == 1  # each result reports the defects known so far

    # With a camera ROI and resize the stored view is what the pipeline scored: the frame cropped, then resized.
    from edge_inspect.capture.geometry import camera_view

    cropped = CameraConfig.model_validate({**CAMERA.model_dump(), "roi": {"x": 10, "y": 20, "width": 100, "height": 90},
                                           "resize": [64, 48]})
    framed = _store(station, station.defects[2][1])
    assert _applier(station, camera=cropped).apply(_parse(inspection_id=framed, verdict="ng")).body["status"] == "applied"
    jpeg = cv2.imread(str(next(station.evidence.rglob(f"{framed}.jpg"))))
    view = cv2.imread(str(store.image_path(framed)))
    assert view.shape == (48, 64, 3) and np.array_equal(view, camera_view(jpeg, (10, 20, 100, 90), (64, 48)))


@pytest.mark.slow
def test_feedback_errors_name_the_problem_and_change_nothing(station):
    applier = _applier(station)
    frame = paint_defect(station.good[1])
    inspection_id = _store(station, frame)

    def code(request, on=applier) -> str:
        body = on.apply(request).body
        _validate(feedback_result_payload(STATION, body))
        return body.get("error_code") or body["status"]

    assert code(_parse(inspection_id="0" * 32, verdict="ok")) == "unknown_inspection"
    assert code(_parse(inspection_id=inspection_id, verdict="so-so", request_id="r")) == "invalid_request"
    assert code(_parse(inspection_id=inspection_id, verdict="ok"), _applier(station, running="coin-b")) == "product_changed"
    assert code(_parse(inspection_id=inspection_id, verdict="ok"), _applier(station, camera=None)) == "product_changed"
    legacy_scored = _store(station, frame, version=None)
    assert code(_parse(inspection_id=legacy_scored, verdict="ng")) == "product_changed"
    gone = _store(station, frame)
    next(station.evidence.rglob(f"{gone}.jpg")).unlink()
    assert code(_parse(inspection_id=gone, verdict="ok")) == "evidence_missing"

    full = _applier(station, max_good_images=8).apply(_parse(inspection_id=inspection_id, verdict="ok")).body
    assert full["error_code"] == "calibration_failed" and "feedback.max_good_images" in full["error"]  # 8 shots fill it

    # Recalibrated from scratch after the inspection was scored: its verdict belongs to another calibration.
    source = station.cal / PRODUCT / "versions" / "1"
    with store.product_lock(station.cal, PRODUCT):
        store.commit_version(station.cal, PRODUCT, lambda folder: store.copy_version_files(source, folder),
                                {"change": "calibrate", "by": "test", "why": "new fixture"})
    body = applier.apply(_parse(inspection_id=inspection_id, verdict="ok")).body
    assert body["error_code"] == "product_changed" and "recalibrated" in body["error"], body
    assert layout.version_numbers(station.cal, PRODUCT) == [1, 2] and not FeedbackLedger(station.cal, PRODUCT).entries()
    assert code(_parse(inspection_id=_store(station, frame, version=2), verdict="ng")) == "applied"
    # A rollback to version 1 makes inspections scored by version 1 current again.
    rollback_product(station.cal, PRODUCT, station.engines, to=1, by="test")
    assert code(_parse(inspection_id=inspection_id, verdict="ng")) == "applied"


# --- the daemon over MQTT -------------------------------------------------------------------------


@pytest.fixture
def line(tmp_path, calibrated_product):
    """A copy of the calibrated product (plus `coin-b`, a second product with the same files) and replay frames:
    one painted defect (NG) then three held-out good parts, looped."""
    cal, engines = tmp_path / "calibration", tmp_path / "engines"
    shutil.copytree(calibrated_product["calibration_dir"], cal)
    shutil.copytree(calibrated_product["engines_dir"], engines, symlinks=True)
    shutil.copytree(cal / PRODUCT, cal / "coin-b")
    frames = tmp_path / "frames"
    frames.mkdir()
    good = [cv2.imread(str(p)) for p in calibrated_product["good"]]
    for i in range(4):
        cv2.imwrite(str(frames / f"{i:04d}.png"), paint_defect(good[0]) if i == 0 else good[i % len(good)])
    return {"calibration_dir": cal, "engines_dir": engines, "frames": frames}


def _line_config(tmp_path, line, port: int, **extra) -> Path:
    return write_config(tmp_path, line, port, source={"type": "replay", "path": str(line["frames"]), "fps": 4, "loop": True},
                        trigger={"mode": "every_frame"}, camera_product=PRODUCT, **extra)


def _send(collector, **fields) -> None:
    collector.client.publish(FEEDBACK, json.dumps(fields).encode(), qos=1)


def _feedback_results(collector) -> list[dict]:
    return [m.json() for m in collector.on(FEEDBACK_RESULT)]


def _result_for(collector, request_id: str, timeout: float) -> dict:
    assert wait_until(lambda: any(r.get("request_id") == request_id for r in _feedback_results(collector)), timeout), (
        request_id, _feedback_results(collector))
    return _validate(next(r for r in _feedback_results(collector) if r.get("request_id") == request_id))


def _ng_with_evidence(collector, tmp_path, skip: set[str] = frozenset(), timeout: float = 90) -> dict:
    def found():
        return next((r for r in results(collector) if r["verdict"] == "NG" and r["evidence_path"] and r["inspection_id"] not in skip
                     and (tmp_path / "evidence" / r["evidence_path"]).with_suffix(".json").is_file()), None)

    assert wait_until(lambda: found() is not None, timeout), results(collector)[-5:]
    return found()


@pytest.mark.slow
@pytest.mark.mosquitto
@needs_broker
def test_ok_feedback_is_applied_once_goes_live_and_survives_a_restart(tmp_path, line, mosquitto_broker, daemons, capsys):
    config = _line_config(tmp_path, line, mosquitto_broker.port)
    cal = line["calibration_dir"]
    with MessageCollector(mosquitto_broker.port, [RESULT, FEEDBACK_RESULT, STATS]) as collector:
        collector.wait_subscribed()
        daemon = daemons(config)
        ng = _ng_with_evidence(collector, tmp_path)
        assert ng["calibration_version"] == 1
        _send(collector, inspection_id=ng["inspection_id"], verdict="ok", operator="anna", note="paint, not a defect",
              request_id="fb-1")
        applied = _result_for(collector, "fb-1", 240)
        assert (applied["status"], applied["calibration_version"], applied["previous_version"]) == ("applied", 2, 1), (
            applied, daemon.log)
        assert applied["inspection_id"] == ng["inspection_id"] and applied["product"] == PRODUCT
        # The new version scores from the next frame on, and no frame is lost on the way.
        assert wait_until(lambda: any(r["calibration_version"] == 2 for r in results(collector)), 60), daemon.log
        _send(collector, inspection_id=ng["inspection_id"], verdict="ok", request_id="fb-2")
        _send(collector, inspection_id=ng["inspection_id"], verdict="ng", request_id="fb-3")
        duplicate, conflict = _result_for(collector, "fb-2", 60), _result_for(collector, "fb-3", 60)
        assert (duplicate["status"], duplicate["calibration_version"]) == ("duplicate", 2)
        assert (conflict["status"], conflict["error_code"]) == ("error", "conflict")
        daemon.send(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.log
        first_run = results(collector)
    seqs = sorted(r["seq"] for r in first_run)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # every frame published, across the swap
    versions_seen = [r["calibration_version"] for r in sorted(first_run, key=lambda r: r["seq"])]
    assert versions_seen == sorted(versions_seen)  # 1 ... 1, 2 ... 2: one swap, never back
    assert layout.version_numbers(cal, PRODUCT) == [1, 2]
    ledger = FeedbackLedger(cal, PRODUCT).entries()
    assert [(e["inspection_id"], e["verdict"], e["calibration_version"]) for e in ledger] == [(ng["inspection_id"], "ok", 2)]

    # After a restart the ledger still knows it: the CLI (over MQTT) gets "duplicate" and nothing changes.
    with MessageCollector(mosquitto_broker.port, [RESULT, STATS]) as collector:
        collector.wait_subscribed()
        daemon = daemons(config)
        # Results flowing means connected and subscribed (its SUBSCRIBE went before its first result).
        assert wait_until(lambda: any(r["calibration_version"] == 2 for r in results(collector)), 60), daemon.log
        capsys.readouterr()
        assert cli.main(["feedback", ng["inspection_id"], "ok", "--config", str(config), "--json", "--timeout", "120"]) == 0
        again = _validate(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
        assert (again["status"], again["calibration_version"]) == ("duplicate", 2)
        assert cli.main(["feedback", "0" * 32, "ok", "--config", str(config), "--timeout", "120"]) == 2
        assert "unknown_inspection" in capsys.readouterr().err
        daemon.send(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.log
    assert layout.version_numbers(cal, PRODUCT) == [1, 2] and len(FeedbackLedger(cal, PRODUCT).entries()) == 1


@pytest.mark.slow
@pytest.mark.mosquitto
@needs_broker
def test_feedback_errors_come_back_on_the_result_topic_with_codes(tmp_path, line, mosquitto_broker, daemons):
    config = _line_config(tmp_path, line, mosquitto_broker.port)
    with MessageCollector(mosquitto_broker.port, [RESULT, FEEDBACK_RESULT, STATS]) as collector:
        collector.wait_subscribed()
        daemon = daemons(config)
        first = _ng_with_evidence(collector, tmp_path)
        second = _ng_with_evidence(collector, tmp_path, skip={first["inspection_id"]})
        _send(collector, inspection_id="0" * 32, verdict="ok", request_id="e-unknown")
        (tmp_path / "evidence" / first["evidence_path"]).unlink()  # the frame is gone, its JSON still there
        _send(collector, inspection_id=first["inspection_id"], verdict="ok", request_id="e-deleted")
        _send(collector, inspection_id=second["inspection_id"], verdict="maybe", request_id="e-invalid")
        collector.client.publish(FEEDBACK, b'{"verdict": "ok"}', qos=1)  # names nothing to answer about: dropped
        for request_id in ("e-unknown", "e-deleted", "e-invalid"):
            _result_for(collector, request_id, 60)
        # The camera now runs another product: feedback on a coin inspection would teach the wrong one.
        collector.client.publish(f"{PREFIX}/{STATION}/product/set", b"coin-b", qos=1)
        assert wait_until(lambda: any(r["product"] == "coin-b" for r in results(collector)), 60), daemon.log
        _send(collector, inspection_id=second["inspection_id"], verdict="ok", request_id="e-switched")
        switched = _result_for(collector, "e-switched", 60)
        assert wait_until(lambda: ((latest_stats(collector) or {}).get("mqtt") or {}).get("malformed_commands", 0) >= 1, 30)
        daemon.send(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.log
    by_id = {r["request_id"]: r for r in _feedback_results(collector)}
    assert sorted(by_id) == ["e-deleted", "e-invalid", "e-switched", "e-unknown"]  # one result each, none for the dropped one
    assert all(r["status"] == "error" for r in by_id.values())
    assert by_id["e-unknown"]["error_code"] == "unknown_inspection" and "evidence.max_count" in by_id["e-unknown"]["error"]
    assert by_id["e-deleted"]["error_code"] == "evidence_missing"
    assert by_id["e-invalid"]["error_code"] == "invalid_request" and "verdict" in by_id["e-invalid"]["error"]
    assert switched["error_code"] == "product_changed" and "coin-b" in switched["error"]
    assert switched["product"] == PRODUCT and switched["camera"] == "cam0"
    cal = line["calibration_dir"]
    assert layout.version_numbers(cal, PRODUCT) == [1] and not FeedbackLedger(cal, PRODUCT).entries()


@pytest.mark.slow
@pytest.mark.mosquitto
@needs_broker
def test_a_flood_of_feedback_is_rate_limited_and_bounded_while_scoring_goes_on(tmp_path, line, mosquitto_broker, daemons):
    burst = 5
    # A refill this slow gives no token back during the test: exactly `burst` messages pass the rate limit.
    config = _line_config(tmp_path, line, mosquitto_broker.port,
                          feedback={"queue_size": 2, "rate_per_min": 0.001, "burst": burst})
    flood = 200
    with MessageCollector(mosquitto_broker.port, [RESULT, FEEDBACK_RESULT, STATS]) as collector:
        collector.wait_subscribed()
        daemon = daemons(config)
        ng = _ng_with_evidence(collector, tmp_path)
        for i in range(flood):  # ng: the first one applied stores a labelled defect and scores it on the worker
            _send(collector, inspection_id=ng["inspection_id"], verdict="ng", defect_type="paint", request_id=f"flood-{i}")
        before = len(results(collector))
        assert wait_until(lambda: len(_feedback_results(collector)) >= flood, 180), (len(_feedback_results(collector)), daemon.log)
        assert wait_until(lambda: len(results(collector)) >= before + 8, 120), daemon.log  # two more replay loops: scoring went on
        daemon.send(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.log
        collector.barrier()  # the daemon is gone: a second result for any message has arrived by now
    answers = _feedback_results(collector)
    for answer in answers:
        _validate(answer)
    assert sorted(a["request_id"] for a in answers) == sorted(f"flood-{i}" for i in range(flood))  # exactly one each
    codes = [a.get("error_code") or a["status"] for a in answers]
    assert codes.count("rate_limited") == flood - burst, codes
    passed = [c for c in codes if c != "rate_limited"]
    assert codes.count("applied") == 1 and set(passed) <= {"applied", "duplicate", "queue_full"}, passed
    # The queue starts empty, so the first feedback.queue_size=2 of them always get in; the rest of the burst may
    # find it full, depending on how fast the worker takes them.
    assert codes.count("applied") + codes.count("duplicate") >= 2 and codes.count("queue_full") <= burst - 2, passed
    entries = FeedbackLedger(line["calibration_dir"], PRODUCT).entries()
    assert [(e["inspection_id"], e["verdict"], e["defect_type"]) for e in entries] == [(ng["inspection_id"], "ng", "paint")]
    assert layout.version_numbers(line["calibration_dir"], PRODUCT) == [1]
    seqs = sorted(r["seq"] for r in results(collector))
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


@pytest.mark.slow
def test_ng_on_a_frame_the_line_taught_takes_it_out_of_the_bank_at_once(station):
    """Learning from the line took an OK frame into the bank; the operator says ng: a new version without it
    is committed (change "stream"), and the frame leaves the candidate store."""
    from edge_inspect.calibration.stream import CandidateStore, StreamCadence, StreamLearner, StreamSettings

    learner = StreamLearner(station.cal, station.engines, PRODUCT, StreamSettings(min_candidates=3, holdback=0.0, keep_fraction=1.0),
                            StreamCadence(quiet_frames=0, max_position=1.0))
    calibration = load_product(station.cal, PRODUCT, station.engines)
    scorer = Scorer(calibration, backend="onnxruntime", threads=1)
    ids = []
    try:
        for image in station.good + [cv2.flip(g, 1) for g in station.good]:
            result = scorer.score(image, features=True)
            inspection_id = _store(station, image, verdict="OK", score=float(result.score), threshold=calibration.threshold)
            for _id, features, meta in learner.observe("cam0", calibration, inspection_id, result.score, result.flagged,
                                                       result.patch_features):
                learner.add_candidate(features, meta, calibration.params)
                ids.append(_id)
    finally:
        scorer.close()
    assert len(ids) >= 3
    with store.product_lock(station.cal, PRODUCT):
        taught = learner.refit(guards=False)
    assert taught.committed
    learned = layout.read_manifest(station.cal, PRODUCT, taught.version)["stream"]["inspection_ids"]
    victim = learned[0]

    body = _applier(station).apply(_parse(inspection_id=victim, verdict="ng", defect_type="scratch")).body
    assert body["status"] == "applied" and body["calibration_version"] == taught.version + 1
    last = store.history(station.cal, PRODUCT)[-1]
    assert last["change"] == "stream" and f"operator ng on inspection {victim}" in last["why"]
    now = layout.read_manifest(station.cal, PRODUCT, taught.version + 1)["stream"]["inspection_ids"]
    assert victim not in now and now and set(now) <= set(ids) - {victim}  # (the refit guards drop what they drop)
    assert victim not in [e["inspection_id"] for e in CandidateStore(station.cal, PRODUCT).entries()]
