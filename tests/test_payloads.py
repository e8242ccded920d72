"""Payloads against their JSON Schemas, and the strict parsing of incoming commands."""

from __future__ import annotations

import json
import math

import jsonschema
import numpy as np
import pytest

from edge_inspect import records
from edge_inspect.config.mqtt import MqttConfig, SpoolConfig
from edge_inspect.errors import ConfigError
from edge_inspect.mqtt.payloads import (
    SCHEMA_NAMES,
    Topics,
    check_station,
    encode,
    iso_utc,
    load_schema,
    mark_replayed,
    parse_product_set,
    parse_trigger,
    result_payload,
    stats_payload,
    update_payload,
    vlm_update,
)
from edge_inspect.mqtt.publisher import ResultPublisher


def validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_schema(name))


def inspection(**changes) -> records.Inspection:
    base = records.Inspection(
        inspection_id=records.new_inspection_id(),
        station="line3-cam1",
        camera="top",
        product="bracket-a",
        frame_id=1234,
        timestamp=1_750_000_000.123,
        score=0.8123,
        threshold=0.5,
        verdict="NG",
        regions=(
            records.Region((10, 20, 60, 90), 2.5, 0.93, ("top left", "top"), (30.0, 50.0)),
            records.Region((200, 200, 220, 230), 0.31, 0.61, ("center",)),
        ),
        part_id="A-1001",
        latency_ms={"capture": 1.2, "score": 35.71234, "localize": 2.0, "total": 40.1},
        calibration_id="cal-3f2a",
        model_id="effnet-lite0-9c1d",
        vlm_status="pending",
        evidence_path="/var/lib/edge-inspect/evidence/2025/x.jpg",
    )
    return base.replace(**changes)


def test_all_schemas_are_valid_draft_2020_12():
    for name in SCHEMA_NAMES:
        jsonschema.Draft202012Validator.check_schema(load_schema(name))
    with pytest.raises(ValueError, match="no schema"):
        load_schema("nope")


def test_ng_result_has_every_documented_field_and_validates():
    item = inspection()
    payload = result_payload(item, seq=7)
    validator("result").validate(payload)
    assert payload["inspection_id"] == item.inspection_id and payload["seq"] == 7
    assert payload["timestamp"] == "2025-06-15T15:06:40.123Z"
    assert payload["verdict"] == "NG" and payload["part_id"] == "A-1001"
    assert payload["regions"][0] == {"box": [10, 20, 60, 90], "area_pct": 2.5, "peak": 0.93, "grid": ["top left", "top"]}
    assert payload["latency_ms"]["score"] == 35.712
    assert payload["replayed"] is False
    decoded = json.loads(encode(payload))
    assert decoded == payload
    replayed = json.loads(mark_replayed(encode(payload)))
    assert replayed["replayed"] is True and {k: v for k, v in replayed.items() if k != "replayed"} == {
        k: v for k, v in payload.items() if k != "replayed"
    }
    validator("result").validate(replayed)


def test_minimal_ok_result_validates():
    payload = result_payload(
        records.Inspection("abc", "s1", "c", "p", 0, 0.0, 0.1, 0.5, "OK"), seq=1
    )
    validator("result").validate(payload)
    assert payload["regions"] == [] and payload["part_id"] is None and payload["vlm_status"] == "skipped"


@pytest.mark.parametrize(
    "changes, seq, message",
    [
        ({"score": math.nan}, 1, "score is nan"),
        ({"threshold": math.inf}, 1, "threshold is inf"),
        ({"latency_ms": {"score": math.nan}}, 1, "latency_ms.score"),
        ({"verdict": "MAYBE"}, 1, "verdict"),
        ({"vlm_status": "thinking"}, 1, "vlm_status"),
        ({}, 0, "seq must be"),
        ({"inspection_id": "a/b"}, 1, "inspection_id"),
        ({"inspection_id": ""}, 1, "inspection_id"),
    ],
)
def test_result_payload_refuses_what_is_not_a_valid_result(changes, seq, message):
    with pytest.raises(ValueError, match=message):
        result_payload(inspection(**changes), seq=seq)


def test_schema_rejects_what_a_subscriber_must_not_receive():
    payload = result_payload(inspection(), seq=3)
    check = validator("result")
    for broken in (
        {**payload, "extra": 1},
        {**payload, "verdict": "ok"},
        {**payload, "seq": 0},
        {**payload, "timestamp": "2025-06-15 15:06:40"},
        {k: v for k, v in payload.items() if k != "inspection_id"},
        {**payload, "regions": [{"box": [1, 2, 3], "area_pct": 1, "peak": 1, "grid": []}]},
    ):
        assert not check.is_valid(broken)


def test_updates_validate_for_done_failed_and_skipped():
    verdict = records.Verdict(True, "scratch", ("top left",), "a 3 mm scratch", 0.87, model="qwen2-vl-2b-q4", latency_ms=812.4)
    check = validator("result_update")
    for update in (vlm_update("done", verdict), vlm_update("failed", error="timeout after 30 s"), vlm_update("skipped", error="queue full")):
        payload = update_payload("abc123", "s1", 4, update, timestamp=1_750_000_000.0)
        check.validate(payload)
    assert payload["type"] == "result_update" and payload["vlm"] is None


@pytest.mark.parametrize(
    "update, message",
    [
        ({"vlm_status": "done"}, "needs the verdict"),
        ({"vlm_status": "pending"}, "vlm_status"),
        ({}, "vlm_status"),
        ({"vlm_status": "failed", "error": 3}, "error must be a string"),
        ({"vlm_status": "done", "vlm": {}, "verdict": "NG"}, "unknown keys"),
    ],
)
def test_malformed_updates_are_refused(update, message):
    with pytest.raises(ValueError, match=message):
        update_payload("abc", "s1", 1, update)


def test_updates_may_say_which_verdict_counts():
    """vlm.allow_downgrade: a done update carries final_verdict and decided_by (schema 1.1, optional keys)."""
    no_defect = records.Verdict(False, "none", (), "within tolerance", 0.93, model="m", latency_ms=700.0)
    defect = records.Verdict(True, "scratch", ("top",), "a scratch", 0.9, model="m", latency_ms=700.0)
    check = validator("result_update")
    downgrade = update_payload("abc", "s1", 2, {**vlm_update("done", no_defect), "final_verdict": "OK", "decided_by": "vlm"})
    stands = update_payload("abd", "s1", 3, {**vlm_update("done", defect), "final_verdict": "NG", "decided_by": "scorer"})
    for payload in (downgrade, stands):
        check.validate(payload)
    assert (downgrade["final_verdict"], downgrade["decided_by"]) == ("OK", "vlm")
    assert (stands["final_verdict"], stands["decided_by"]) == ("NG", "scorer")
    assert "final_verdict" not in update_payload("abe", "s1", 4, vlm_update("failed", error="timeout"))
    # The schema holds subscribers to the same rules the payload builder enforces.
    for broken in (
        {k: v for k, v in downgrade.items() if k != "decided_by"},
        {**downgrade, "final_verdict": "NG"},
        {**downgrade, "vlm_status": "failed", "vlm": None},
        {**downgrade, "decided_by": "operator"},
        {**stands, "final_verdict": "ok"},
    ):
        assert not check.is_valid(broken), broken


@pytest.mark.parametrize(
    "decision, status, message",
    [
        ({"final_verdict": "OK"}, "done", "needs final_verdict"),
        ({"decided_by": "vlm"}, "done", "needs final_verdict"),
        ({"final_verdict": "PASS", "decided_by": "scorer"}, "done", "'PASS'"),
        ({"final_verdict": "NG", "decided_by": "vlm"}, "done", "downgraded NG to OK"),
        ({"final_verdict": "OK", "decided_by": "vlm"}, "failed", "needs vlm_status 'done'"),
    ],
)
def test_inconsistent_decisions_are_refused(decision, status, message):
    verdict = records.Verdict(False, "none", (), "", 0.9)
    update = {**vlm_update(status, verdict if status == "done" else None, None if status == "done" else "x"), **decision}
    with pytest.raises(ValueError, match=message):
        update_payload("abc", "s1", 1, update)


def test_stats_carry_the_publisher_state_and_plain_numbers(tmp_path):
    publisher = ResultPublisher(MqttConfig(), SpoolConfig(path=str(tmp_path / "s.sqlite3")), station="s1")
    try:
        pipeline = {"fps": np.float32(2.5), "frames": np.int64(10), "queues": {"vlm": 1}, "nan": float("nan")}
        payload = stats_payload("s1", pipeline, publisher.state(), timestamp=0.0)
    finally:
        publisher.stop()
    validator("stats").validate(payload)
    assert json.loads(encode(payload))["pipeline"] == {"fps": 2.5, "frames": 10, "queues": {"vlm": 1}, "nan": None}
    with pytest.raises(ValueError, match="not JSON"):
        stats_payload("s1", {"bad": object()}, {})


def test_topic_layout_and_names():
    topics = Topics("factory/line3", "cam-1")
    assert topics.status == "factory/line3/cam-1/status"
    assert topics.result == "factory/line3/cam-1/result"
    assert topics.result_update == "factory/line3/cam-1/result/update"
    assert topics.stats == "factory/line3/cam-1/stats"
    assert topics.trigger == "factory/line3/cam-1/trigger"
    assert topics.product_set == "factory/line3/cam-1/product/set"
    assert topics.image("abc") == "factory/line3/cam-1/image/abc"
    assert check_station("cam-1") == "cam-1"
    for bad in ("", "a/b", "a+", "#", "x" * 65, "st\n"):
        with pytest.raises(ValueError):
            check_station(bad)
    with pytest.raises(ConfigError, match="station"):
        ResultPublisher(MqttConfig(), SpoolConfig(path="/nonexistent/never-created.sqlite3"), station="a/b")
    assert iso_utc(0) == "1970-01-01T00:00:00.000Z"


def test_mqtt_config_validation_and_password_sources(tmp_path, monkeypatch):
    assert MqttConfig(protocol=5).protocol == "5"
    assert MqttConfig().broker_port == 1883 and MqttConfig(tls={"enabled": True}).broker_port == 8883
    for bad in ({"topic_prefix": "a/+/b"}, {"topic_prefix": "/a"}, {"reconnect_min_s": 10, "reconnect_max_s": 5},
                {"tls": {"cert_file": "x.pem"}}, {"password": "secret"}):
        with pytest.raises(ValueError):
            MqttConfig(**bad)
    config = MqttConfig(password_env="MY_PW", password_credential="mqtt-pw")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("MY_PW", raising=False)
    assert config.resolve_password() == (None, "none")
    monkeypatch.setenv("MY_PW", "from-env")
    assert config.resolve_password() == ("from-env", "env MY_PW")
    (tmp_path / "mqtt-pw").write_text("from-credential\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert config.resolve_password() == ("from-credential", f"credential {tmp_path / 'mqtt-pw'}")
    assert MqttConfig(client_id="ei-{station}-{hostname}").resolved_client_id("s1", "box") == "ei-s1-box"


# --- incoming commands ---------------------------------------------------------------------------

VALID_TRIGGERS = [
    (b"{}", None),
    (b" {}\n", None),
    (b'{"part_id": null}', None),
    (b'{"part_id": "A-1001"}', "A-1001"),
    ('{"part_id": "Teil-Ä 17"}'.encode(), "Teil-Ä 17"),
]

MALFORMED_TRIGGERS = [
    b"",  # also what clearing a retained trigger delivers
    b"  \n",
    b"not json",
    b"{",
    b"[]",
    b"42",
    b'"A-1001"',
    b"null",
    b'{"part_id": 5}',
    b'{"part_id": ""}',
    b'{"part_id": "   "}',
    b'{"part_id": "' + b"x" * 129 + b'"}',
    b'{"part_id": "a\\u0000b"}',
    b'{"part_id": "a\\nb"}',
    b'{"partid": "A"}',
    b'{"part_id": "A", "extra": 1}',
    b'{"part_id": ["A"]}',
    b'{"part_id": "A", "part_id": "B"}',
    b'{"part_id": NaN}',
    b"\xff\xfe\x00",
    b'{"part_id": "' + b"y" * 5000 + b'"}',
]


@pytest.mark.parametrize("payload, part_id", VALID_TRIGGERS)
def test_valid_triggers(payload, part_id):
    command = parse_trigger(payload, now=12.5)
    assert command.part_id == part_id and command.received_at == 12.5
    validator("trigger").validate(json.loads(payload))


@pytest.mark.parametrize("payload", MALFORMED_TRIGGERS)
def test_malformed_triggers_raise_value_error_and_fail_the_schema(payload):
    with pytest.raises(ValueError):
        parse_trigger(payload)
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return  # not JSON at all
    if payload.count(b'"part_id"') > 1:
        return  # json.loads keeps the last duplicate key; only the strict parser sees it
    assert not validator("trigger").is_valid(data)


VALID_PRODUCT_SETS = [
    (b"bracket-a", "bracket-a"),
    (b"  bracket-a\n", "bracket-a"),
    (b"Gear_2.v3", "Gear_2.v3"),
    (b'{"product": "bracket-a"}', "bracket-a"),
    (b'"bracket-a"', "bracket-a"),
]

MALFORMED_PRODUCT_SETS = [
    b"",
    b"   ",
    b"two words",
    b"../../etc/passwd",
    b"a/b",
    b"-leading-dash",
    b"x" * 65,
    b"\xff\xfe",
    b'{"product": 1}',
    b'{"prod": "a"}',
    b"{}",
    b"[]",
    b'{"product": ""}',
    b'{"product": "a", "extra": 1}',
    b"null",
    b'"two words"',
    b'"unterminated',
    b'{"product": "a b"}',
    b"{broken",
    b"p" * 5000,
]


@pytest.mark.parametrize("payload, name", VALID_PRODUCT_SETS)
def test_valid_product_sets(payload, name):
    assert parse_product_set(payload) == name
    validator("product_set").validate({"product": name})


@pytest.mark.parametrize("payload", MALFORMED_PRODUCT_SETS)
def test_malformed_product_sets_raise_value_error(payload):
    with pytest.raises(ValueError):
        parse_product_set(payload)
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        data = {"product": payload.decode("utf-8", "replace").strip()}
    if isinstance(data, str):
        data = {"product": data}
    assert not validator("product_set").is_valid(data)
