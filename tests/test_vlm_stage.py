"""The VLM stage behind the one flagged-frame queue: queue policy, decision rule, updates, and a real worker process
that crashes and hangs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from conftest import wait_until
from model_helpers import tiny_vlm_or_skip
from test_vlm_prompt import photo_product  # noqa: F401 - fixture: a product calibrated on four photos

from edge_inspect.config.vlm import VlmConfig
from edge_inspect.daemon.flagged_queue import FlaggedFrame, FlaggedQueue
from edge_inspect.errors import ConfigError
from edge_inspect.records import (
    Frame,
    Inspection,
    Region,
    ScoreResult,
    Verdict,
    new_inspection_id,
)
from edge_inspect.vlm.stage import Decision, VlmStage, build_update, decide
from edge_inspect.vlm.worker import backoff_delay, hard_timeout

REPO = Path(__file__).resolve().parents[1]
UPDATE_SCHEMA = json.loads((REPO / "edge_inspect" / "mqtt" / "schemas" / "result_update.json").read_text())


# --- pure parts ------------------------------------------------------------------------------------


def _flagged(score: float, published: list) -> FlaggedFrame:
    inspection = _inspection(score)
    frame = Frame(frame_id=1, timestamp=time.time(), source="cam0", pixels=np.zeros((4, 4, 3), np.uint8))
    return FlaggedFrame(inspection=inspection, frame=frame, view=frame.pixels, score=_score(score), product=None,
                        publish_update=lambda update: published.append((score, update)))


def _offer(queue: FlaggedQueue, score: float, published: list) -> bool:
    if not queue.reserve(score):
        return False
    queue.put(_flagged(score, published))
    return True


def test_queue_keeps_the_highest_scores_and_serves_the_highest_first():
    served, published, gate = [], [], threading.Event()

    def sink(item):
        gate.wait(5)
        served.append(item.score.score)

    queue = FlaggedQueue(4, sink)  # one in the sink + three waiting
    queue.start()
    assert _offer(queue, 9.0, published)
    assert wait_until(lambda: queue.depth() == 1 and queue._current is not None)  # the sink holds 9.0
    assert [_offer(queue, s, published) for s in (1.0, 5.0, 3.0)] == [True, True, True]
    assert _offer(queue, 4.0, published)  # full: the lowest (1.0) leaves with a skipped update
    assert not _offer(queue, 2.0, published)  # lower than everything queued
    assert not _offer(queue, 3.0, published)  # ties keep the frame that came first
    assert published == [(1.0, {"vlm_status": "skipped", "error": "flagged-frame queue full "
                                "(pipeline.flagged_queue_size=4): a higher-scoring frame took its place"})]
    gate.set()
    assert wait_until(lambda: not queue.outstanding())
    assert served == [9.0, 5.0, 4.0, 3.0]
    counts = queue.counters.snapshot()
    assert (counts["offered"], counts["skipped"], counts["evicted"], counts["explained"]) == (5, 2, 1, 4)
    queue.close(time.monotonic() + 1)


def test_closed_queue_skips_what_was_left_and_accepts_nothing():
    published, gate = [], threading.Event()
    queue = FlaggedQueue(4, lambda item: gate.wait(5))
    _offer(queue, 1.0, published)
    _offer(queue, 2.0, published)  # not started: both wait
    queue.close(time.monotonic())
    assert [s for s, u in published] == [2.0, 1.0] and {u["vlm_status"] for s, u in published} == {"skipped"}
    assert not queue.reserve(9.0) and queue.outstanding() == 0


def test_decision_rule_default_reports_both_and_the_scorer_decides():
    no_defect = Verdict(False, "none", (), "Within tolerance.", 0.95)
    defect = Verdict(True, "scratch", ("top",), "Scratch.", 0.95)
    assert decide("NG", no_defect, allow_downgrade=False, min_confidence=0.8) == Decision("NG", "scorer")
    assert decide("NG", no_defect, allow_downgrade=True, min_confidence=0.8) == Decision("OK", "vlm")
    assert decide("NG", no_defect, allow_downgrade=True, min_confidence=0.99) == Decision("NG", "scorer")
    assert decide("NG", defect, allow_downgrade=True, min_confidence=0.0) == Decision("NG", "scorer")
    assert decide("OK", defect, allow_downgrade=True, min_confidence=0.0) == Decision("OK", "scorer")  # never upgrades
    assert decide("NG", None, allow_downgrade=True, min_confidence=0.0) == Decision("NG", "scorer")


def test_updates_fit_the_published_update_schema():
    from edge_inspect.mqtt.payloads import update_payload

    verdict = Verdict(True, "scratch", ("top left",), "Scratch across the plating.", 0.7, model="m", latency_ms=830.0)
    for update in (
        build_update("done", verdict),
        build_update("failed", error="timeout after 60 s (generation stopped)"),
        build_update("skipped", error="VLM queue full"),
    ):
        jsonschema.validate(update_payload("abc123", "line1", 1, update), UPDATE_SCHEMA)


def test_a_downgrade_is_a_schema_valid_update_that_says_the_vlm_decided(tmp_path):
    from edge_inspect.mqtt.payloads import update_payload

    within_tolerance = Verdict(False, "none", (), "A faint mark within tolerance.", 0.9, model="m", latency_ms=640.0)
    decision = decide("NG", within_tolerance, allow_downgrade=True, min_confidence=0.8)
    update = build_update("done", within_tolerance, decision=decision)
    payload = update_payload("abc123", "line1", 1, update)
    jsonschema.validate(payload, UPDATE_SCHEMA)
    assert (payload["final_verdict"], payload["decided_by"], payload["vlm"]["defect"]) == ("OK", "vlm", False)
    # The stage starts with allow_downgrade (it used to refuse while updates could not carry the decision).
    VlmStage(VlmConfig(allow_downgrade=True), publisher=None, calibration_dir=tmp_path)


def test_backoff_doubles_up_to_the_cap():
    assert [backoff_delay(n, 1.0, 10.0) for n in range(6)] == [0.0, 1.0, 2.0, 4.0, 8.0, 10.0]
    assert hard_timeout(60) == 75 and hard_timeout(1) == 3


def test_a_stage_that_is_not_running_skips_and_says_so(tmp_path):
    updates = Updates()
    stage = VlmStage(VlmConfig(), publisher=None, calibration_dir=tmp_path)
    inspection = _inspection(3.0)
    assert stage.explain(inspection, _frame(), _score(3.0), inspection.regions, publish_update=updates.sink(inspection)) == "skipped"
    assert updates.only(inspection)["vlm_status"] == "skipped"
    assert "not running" in updates.only(inspection)["error"]


def test_config_requires_model_files_when_enabled():
    with pytest.raises(ValueError, match="vlm.model is empty"):
        VlmConfig(enabled=True)
    with pytest.raises(ValueError, match="vlm.mmproj is empty"):
        VlmConfig(enabled=True, model="m.gguf")
    VlmConfig(enabled=True, model="m.gguf", mode="text")
    with pytest.raises(ValueError, match="extra"):
        VlmConfig(modell="x")


# --- with a real worker process ---------------------------------------------------------------------


class Updates:
    """Collects the stage's updates per inspection (the daemon hook's publish_update callables)."""

    def __init__(self):
        self._cond = threading.Condition()
        self.by_id: dict[str, list[dict]] = {}
        self.order: list[str] = []

    def sink(self, inspection):
        def publish(update):
            with self._cond:
                self.by_id.setdefault(inspection.inspection_id, []).append(update)
                self.order.append(inspection.inspection_id)
                self._cond.notify_all()

        return publish

    def wait(self, inspection, timeout=60.0):
        with self._cond:
            assert self._cond.wait_for(lambda: inspection.inspection_id in self.by_id, timeout), "no update arrived"
            return self.by_id[inspection.inspection_id][0]

    def only(self, inspection):
        updates = self.by_id.get(inspection.inspection_id, [])
        assert len(updates) == 1, updates
        return updates[0]


def _inspection(score: float) -> Inspection:
    region = Region(box=(60, 40, 120, 90), area_pct=2.0, peak=score, grid_words=("top left",))
    return Inspection(
        inspection_id=new_inspection_id(), station="line1", camera="cam0", product="bracket", frame_id=1,
        timestamp=time.time(), score=score, threshold=2.0, verdict="NG", regions=(region,), vlm_status="pending",
    )


def _frame() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[:, :, ::-1])


def _score(score: float) -> ScoreResult:
    return ScoreResult(score=score, threshold=2.0, anomaly_map=np.zeros((8, 8), np.float32))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_vlm_or_skip(tmp_path_factory)


@pytest.fixture
def calibration(tmp_path):
    (tmp_path / "bracket").mkdir()
    shutil.copy(REPO / "examples" / "knowledge.yaml", tmp_path / "bracket" / "knowledge.yaml")
    return tmp_path


def _config(tiny, **changes) -> VlmConfig:
    values = dict(
        enabled=True, model=str(tiny.model), mmproj=str(tiny.mmproj), n_ctx=8192, n_threads=1, max_tokens=1500,
        timeout_s=60, restart_backoff_s=0.1,
    )
    values.update(changes)
    return VlmConfig(**values)


@pytest.fixture
def make_stage(tiny, calibration):
    stages = []

    def make(queue_size: int = 3, **changes) -> VlmStage:
        stage = VlmStage(_config(tiny, **changes), publisher=None, calibration_dir=calibration)
        stages.append(stage)
        stage.start()
        stage.queue = _queue(stage, queue_size)
        assert stage.worker.wait_ready(60), stage.worker.state()
        return stage

    yield make
    for stage in stages:
        pid = stage.worker.pid
        if pid:
            _signal(pid, signal.SIGCONT)
        _stop(stage, 5)


def _queue(stage: VlmStage, capacity: int) -> FlaggedQueue:
    """The daemon's flagged-frame queue in front of the stage (capacity: waiting + the one explained)."""
    queue = FlaggedQueue(capacity, stage)
    queue.start()
    return queue


def _stop(stage: VlmStage, timeout: float) -> None:
    """As the daemon stops: queued frames skipped, then the worker (the frame in progress fails)."""
    stage.queue.close(time.monotonic() + timeout, abandon_current=False)
    stage.stop(timeout=timeout)
    stage.queue.join(time.monotonic() + 5)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _submit(stage, updates, score, pixels=None):
    """Offer a flagged frame as the daemon's pipeline does: reserve a slot, then hand the frame over."""
    inspection = _inspection(score)
    if not stage.queue.reserve(score):
        return inspection, False  # the daemon publishes such a result with vlm_status "skipped"
    frame = Frame(frame_id=1, timestamp=time.time(), source="cam0", pixels=_frame() if pixels is None else pixels)
    stage.queue.put(FlaggedFrame(inspection=inspection, frame=frame, view=frame.pixels, score=_score(score),
                                 product=None, publish_update=updates.sink(inspection)))
    return inspection, True


def _wait_busy(stage, timeout=30.0):
    assert wait_until(lambda: stage.worker.state()["busy"], timeout), "the stage never started the request"


@pytest.mark.vlm
def test_stage_explains_a_flagged_frame_with_a_catalogue_verdict(make_stage):
    from edge_inspect.mqtt.payloads import update_payload
    from edge_inspect.vlm.knowledge import load_knowledge

    stage = make_stage()
    updates = Updates()
    inspection, accepted = _submit(stage, updates, 3.0)
    assert accepted
    update = updates.wait(inspection)
    assert update["vlm_status"] == "done", update
    assert update["vlm"]["defect_type"] in load_knowledge(stage.calibration_dir, "bracket").defect_types
    assert update["vlm"]["model"] == "edge-inspect tiny random llama" and update["vlm"]["latency_ms"] > 0
    jsonschema.validate(update_payload(inspection.inspection_id, "line1", 1, update), UPDATE_SCHEMA)
    state = stage.state()
    assert state["done"] == 1 and state["last"]["images"] == 2  # frame + close-up; no calibrated references here
    assert state["worker"]["chat_format"] == "llava15"


@pytest.mark.vlm
def test_allow_downgrade_updates_carry_the_decision_the_rule_makes(make_stage):
    """With allow_downgrade every done update says which verdict counts; the real model's verdict
    decides (min confidence 0: any "no defect" downgrades), and the payload fits the schema."""
    from edge_inspect.mqtt.payloads import update_payload

    stage = make_stage(allow_downgrade=True, downgrade_min_confidence=0.0, queue_size=5)
    updates = Updates()
    sent = [_submit(stage, updates, score)[0] for score in (3.0, 4.0, 5.0)]
    for inspection in sent:
        update = updates.wait(inspection)
        assert update["vlm_status"] == "done", update
        verdict = Verdict(**{k: tuple(v) if k == "location" else v for k, v in update["vlm"].items()})
        expected = decide("NG", verdict, allow_downgrade=True, min_confidence=0.0)
        assert (update["final_verdict"], update["decided_by"]) == (expected.final_verdict, expected.decided_by)
        jsonschema.validate(update_payload(inspection.inspection_id, "line1", 1, update), UPDATE_SCHEMA)
    downgrades = sum(updates.only(i)["decided_by"] == "vlm" for i in sent)
    assert stage.state()["downgraded"] == downgrades and stage.outstanding() == 0


@pytest.mark.vlm
def test_full_queue_keeps_the_highest_scoring_frames(make_stage):
    stage = make_stage(queue_size=3)  # one being explained + two waiting
    updates = Updates()
    pid = stage.worker.pid
    _signal(pid, signal.SIGSTOP)  # the worker holds the first frame; the queue behind it fills
    try:
        first, _ = _submit(stage, updates, 9.0)
        _wait_busy(stage)
        low, ok_low = _submit(stage, updates, 2.5)
        high, ok_high = _submit(stage, updates, 5.0)
        mid, ok_mid = _submit(stage, updates, 3.0)  # full: takes the place of 2.5
        lower, ok_lower = _submit(stage, updates, 2.2)  # below everything queued
        assert (ok_low, ok_high, ok_mid, ok_lower) == (True, True, True, False)
        assert updates.only(low)["vlm_status"] == "skipped" and "higher-scoring frame took its place" in updates.only(low)["error"]
        assert lower.inspection_id not in updates.by_id  # not taken: its result says skipped
    finally:
        _signal(pid, signal.SIGCONT)
    for inspection in (first, high, mid):
        assert updates.wait(inspection)["vlm_status"] == "done"
    assert updates.order.index(high.inspection_id) < updates.order.index(mid.inspection_id)  # highest first
    assert all(len(v) == 1 for v in updates.by_id.values())
    state, counts = stage.state(), stage.queue.counters.snapshot()
    assert (state["submitted"], state["accepted"], state["done"]) == (3, 3, 3)
    assert (counts["offered"], counts["skipped"], counts["evicted"]) == (4, 1, 1)


@pytest.mark.vlm
def test_worker_killed_mid_request_fails_that_frame_and_the_next_is_served(make_stage):
    stage = make_stage()
    updates = Updates()
    pid = stage.worker.pid
    _signal(pid, signal.SIGSTOP)  # so the kill lands while the request is in the worker's hands
    victim, _ = _submit(stage, updates, 4.0)
    _wait_busy(stage)
    _signal(pid, signal.SIGKILL)
    failed = updates.wait(victim)
    assert failed == {"vlm_status": "failed", "error": "worker died mid-request (killed by SIGKILL)"}
    survivor, accepted = _submit(stage, updates, 4.0)
    assert accepted
    assert updates.wait(survivor)["vlm_status"] == "done"
    worker = stage.worker.state()
    assert worker["deaths"] == 1 and worker["starts"] == 2 and worker["pid"] != pid
    assert stage.queue._thread.is_alive()


@pytest.mark.vlm
@pytest.mark.slow
def test_stuck_worker_times_out_is_killed_and_replaced(make_stage):
    stage = make_stage(timeout_s=1.0, image_max_side=1600)
    updates = Updates()
    pid = stage.worker.pid
    _signal(pid, signal.SIGSTOP)  # hangs like a worker stuck in native code
    # a noise frame makes a request of megabytes, more than the socket buffer: sending it blocks too
    noise = np.random.default_rng(0).integers(0, 256, (1600, 1600, 3), dtype=np.uint8)
    stuck, _ = _submit(stage, updates, 4.0, pixels=noise)
    update = updates.wait(stuck, timeout=30)
    assert update == {"vlm_status": "failed", "error": "timeout after 1 s (worker unresponsive, killed)"}
    nxt, _ = _submit(stage, updates, 4.0)
    assert updates.wait(nxt, timeout=60)["vlm_status"] in ("done", "failed")
    assert stage.worker.state()["pid"] != pid


@pytest.mark.vlm
def test_stop_skips_queued_frames_and_fails_the_one_in_progress(make_stage):
    stage = make_stage(queue_size=5)
    updates = Updates()
    _signal(stage.worker.pid, signal.SIGSTOP)
    running, _ = _submit(stage, updates, 5.0)
    _wait_busy(stage)
    queued, _ = _submit(stage, updates, 4.0)
    _stop(stage, 0.5)
    assert updates.only(queued)["vlm_status"] == "skipped"
    assert updates.only(running) == {"vlm_status": "failed", "error": "vlm stage stopping"}
    late, accepted = _submit(stage, updates, 9.0)
    assert not accepted and late.inspection_id not in updates.by_id


def test_wrong_model_files_stop_the_stage_at_start(tmp_path):
    from edge_inspect.errors import UserError

    html = tmp_path / "model.gguf"
    html.write_text("<html>404</html>")
    with pytest.raises(UserError, match="is not a GGUF file"):
        VlmStage(VlmConfig(enabled=True, mode="text", model=str(html)), publisher=None, calibration_dir=tmp_path)
    model = tmp_path / "llama.gguf"
    model.write_bytes(_gguf_header("llama"))
    with pytest.raises(ConfigError, match="vlm.mmproj: .* does not exist"):
        VlmStage(VlmConfig(enabled=True, model=str(model), mmproj=str(tmp_path / "nope.gguf")), publisher=None, calibration_dir=tmp_path)
    with pytest.raises(ConfigError, match="not a vision projector"):
        VlmStage(VlmConfig(enabled=True, model=str(model), mmproj=str(model)), publisher=None, calibration_dir=tmp_path)


def _gguf_header(architecture: str) -> bytes:
    """A GGUF v3 file with one key (general.architecture) and no tensors."""
    import struct

    key, value = b"general.architecture", architecture.encode()
    return (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
            + struct.pack("<I", 8) + struct.pack("<Q", len(value)) + value)


@pytest.mark.vlm
def test_a_model_llama_cpp_cannot_load_fails_frames_with_the_reason(tiny, calibration, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny.model.read_bytes()[:60_000])  # metadata intact, tensor data cut off
    stage = VlmStage(_config(tiny, model=str(truncated), restart_backoff_s=30), publisher=None, calibration_dir=calibration)
    stage.start()
    stage.queue = _queue(stage, 3)
    try:
        updates = Updates()
        inspection, _ = _submit(stage, updates, 3.0)
        update = updates.wait(inspection, timeout=60)
        assert update["vlm_status"] == "failed"
        assert update["error"].startswith("model load failed: llama.cpp could not load vlm.model"), update
        assert stage.worker.state()["consecutive_failures"] >= 1
    finally:
        _stop(stage, 5)


@pytest.mark.vlm
def test_broken_knowledge_fails_frames_with_the_file_and_key(make_stage):
    stage = make_stage()
    (stage.calibration_dir / "bracket" / "knowledge.yaml").write_text("good_part: ok part\ndefects: []\n")
    updates = Updates()
    inspection, _ = _submit(stage, updates, 3.0)
    update = updates.wait(inspection)
    assert update["vlm_status"] == "failed"
    assert "bracket/knowledge.yaml: defects: the catalogue needs at least one defect" in update["error"]


@pytest.mark.vlm
def test_daemon_hook_with_a_calibrated_reference(make_stage, photo_product):  # noqa: F811
    """As the flagged-frame queue calls it: stage(FlaggedFrame) explains it; the reference comes from ReferenceIndex."""
    stage = make_stage()
    stage.calibration_dir = photo_product.directory.parent  # the product's calibration folder
    updates = Updates()
    inspection = _inspection(3.0).replace(product="photos")
    frame = Frame(frame_id=1, timestamp=time.time(), source="cam0", pixels=_frame())
    stage(FlaggedFrame(inspection=inspection, frame=frame, view=frame.pixels, score=_score(3.0), product=photo_product,
                       publish_update=updates.sink(inspection)))
    assert updates.wait(inspection)["vlm_status"] == "done"
    last = stage.state()["last"]
    assert last["images"] == 3 and last["reference"].endswith("000.jpg")  # astronaut.png sorts first

