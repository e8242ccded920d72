"""Follow-up questions over MQTT against `edge-inspect run` (a real mosquitto, a real calibrated product):
two questions about one NG part get two answers with the right ids, in order, while frames keep flowing;
the error cases come back on the answer topic."""

from __future__ import annotations

import json
import signal

import cv2
import jsonschema
import pytest
from conftest import wait_until
from mqtt_broker import MessageCollector
from test_daemon import (  # noqa: F401 - fixtures: product (calibrated once per session), daemons
    PREFIX,
    RESULT,
    STATION,
    daemons,
    latest_stats,
    paint_defect,
    product,
    results,
    write_config,
)

from edge_inspect.mqtt.payloads import load_schema

ASK = f"{PREFIX}/{STATION}/ask"
ANSWER = f"{PREFIX}/{STATION}/answer"
UPDATE = f"{PREFIX}/{STATION}/result/update"
STATS = f"{PREFIX}/{STATION}/stats"

pytestmark = [pytest.mark.mosquitto]


def _frames(folder, product, count: int) -> None:
    """count good frames, the first one with a painted defect (one NG per loop of the replay)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        frame = product["good"][i % len(product["good"])]
        cv2.imwrite(str(folder / f"{i:04d}.png"), paint_defect(frame) if i == 0 else frame)


def _ask(collector, inspection_id, question, request_id, **extra) -> None:
    payload = {"inspection_id": inspection_id, "question": question, "request_id": request_id, **extra}
    collector.client.publish(ASK, json.dumps(payload).encode(), qos=1)


def _answers(collector) -> list[dict]:
    return [m.json() for m in collector.on(ANSWER)]


def test_questions_without_a_vlm_get_a_clear_error_on_the_answer_topic(tmp_path, product, mosquitto_broker, daemons):
    _frames(tmp_path / "frames", product, 4)
    config = write_config(
        tmp_path, product, mosquitto_broker.port,
        source={"type": "replay", "path": str(tmp_path / "frames"), "fps": 10, "loop": True},
        trigger={"mode": "every_frame"},
    )
    with MessageCollector(mosquitto_broker.port, [RESULT, ANSWER, STATS]) as collector:
        collector.wait_subscribed()
        daemon = daemons(config)
        assert wait_until(lambda: latest_stats(collector) is not None, 30), daemon.log  # connected and subscribed
        _ask(collector, "0" * 32, "Is it scratched?", "q-off")
        collector.client.publish(ASK, b'{"question": "no request id"}', qos=1)  # dropped: nowhere to answer
        _ask(collector, "0" * 32, "x", "q-bad", colour="red")
        assert wait_until(lambda: len(_answers(collector)) >= 2, 20), daemon.log
        assert wait_until(lambda: (latest_stats(collector) or {}).get("mqtt", {}).get("malformed_commands") == 1, 10)
        assert len(results(collector)) > 0  # the line went on
        daemon.send(signal.SIGTERM)
        assert daemon.wait(30) == 0
        collector.barrier()  # every question was handled and the daemon is gone: no answer can follow
        answers = {a["request_id"]: a for a in _answers(collector)}
        assert sorted(answers) == ["q-bad", "q-off"]
        for answer in answers.values():
            jsonschema.validate(answer, load_schema("answer"))
            assert answer["status"] == "error" and answer["answer"] is None
        assert answers["q-off"]["error_code"] == "vlm_disabled" and "vlm.enabled" in answers["q-off"]["error"]
        assert answers["q-bad"]["error_code"] in ("vlm_disabled", "invalid_request")


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (tools/ensure_llama_wheel.sh)")
    pytest.importorskip("gguf", reason="the gguf package writes the tiny test model")
    from tiny_gguf import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"))


@pytest.mark.vlm
@pytest.mark.slow
def test_two_follow_ups_on_one_ng_part_are_answered_in_order_while_frames_flow(
        tmp_path, product, tiny_vlm, mosquitto_broker, daemons):
    fps = 4.0
    _frames(tmp_path / "frames", product, 24)  # one NG every 6 s
    config = write_config(
        tmp_path, product, mosquitto_broker.port,
        source={"type": "replay", "path": str(tmp_path / "frames"), "fps": fps, "loop": True},
        trigger={"mode": "every_frame"},
        pipeline={"flagged_queue_size": 3, "drain_timeout_s": 20},
        vlm={"enabled": True, "model": str(tiny_vlm.model), "mmproj": str(tiny_vlm.mmproj), "n_ctx": 8192,
             "n_threads": 1, "max_tokens": 1500, "timeout_s": 60, "restart_backoff_s": 0.1,
             "ask": {"max_tokens": 1000, "timeout_s": 60}},
    )
    with MessageCollector(mosquitto_broker.port, [RESULT, UPDATE, ANSWER, STATS]) as collector:
        collector.wait_subscribed()
        daemon = daemons(config)
        assert wait_until(lambda: any(r["verdict"] == "NG" for r in results(collector)), 60), daemon.log
        ng = next(r for r in results(collector) if r["verdict"] == "NG")
        assert ng["vlm_status"] == "pending" and ng["evidence_path"], ng
        updates = lambda: [m.json() for m in collector.on(UPDATE) if m.json()["inspection_id"] == ng["inspection_id"]]  # noqa: E731
        assert wait_until(lambda: updates(), 90), daemon.log  # the first verdict goes first
        asked_at_frame = max(r["frame_id"] for r in results(collector))
        _ask(collector, ng["inspection_id"], "Is the defect deeper than the coating?", "q-1", conversation_id="mes-7")
        _ask(collector, ng["inspection_id"], "Which side of the part is it on?", "q-2", conversation_id="mes-7")
        _ask(collector, "0" * 32, "Is it scratched?", "q-unknown")
        _ask(collector, ng["inspection_id"], "x" * 501, "q-long")
        ours = lambda: [a for a in _answers(collector) if a["request_id"] in ("q-1", "q-2")]  # noqa: E731
        assert wait_until(lambda: len(ours()) == 2, 240), (daemon.log, _answers(collector))
        answered_at_frame = max(r["frame_id"] for r in results(collector))
        asked = lambda: ((latest_stats(collector) or {}).get("pipeline", {}).get("vlm", {}).get("ask") or {})  # noqa: E731
        assert wait_until(lambda: asked().get("answered", 0) >= 2, 10), latest_stats(collector)
        daemon.send(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.log

    answers = _answers(collector)
    schema = load_schema("answer")
    for answer in answers:
        jsonschema.validate(answer, schema)
    by_id = {a["request_id"]: a for a in answers}
    assert by_id["q-unknown"]["error_code"] == "unknown_inspection"
    assert by_id["q-long"]["error_code"] == "question_too_long" and "vlm.ask.max_question_chars" in by_id["q-long"]["error"]
    first, second = ours()  # in the order asked
    assert [first["request_id"], second["request_id"]] == ["q-1", "q-2"], answers
    for answer, turn, kind in ((first, 1, "yes_no"), (second, 2, "location")):
        assert answer["status"] == "answered", answer
        assert (answer["inspection_id"], answer["conversation_id"], answer["turn"], answer["kind"]) == (
            ng["inspection_id"], "mes-7", turn, kind)
    assert first["yes_no"] in ("yes", "no") and isinstance(second["location"], list)
    assert second["prompt_tokens"] > first["prompt_tokens"]  # the first turn is in the second prompt
    # frames kept flowing while the questions were answered, and no result went missing
    assert answered_at_frame > asked_at_frame, (asked_at_frame, answered_at_frame)
    seqs = sorted(r["seq"] for r in results(collector))
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    evidence = tmp_path / "evidence" / ng["evidence_path"]
    chat = evidence.with_name(ng["inspection_id"] + ".chat.jsonl").read_text().splitlines()
    assert [json.loads(line)["request_id"] for line in chat] == ["q-1", "q-2"]
