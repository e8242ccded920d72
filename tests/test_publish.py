"""ResultPublisher against a real mosquitto: delivery, outages, restarts, auth/TLS failures, bad commands, listen."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import paho.mqtt.client as paho
import pytest
from conftest import wait_until
from mqtt_broker import MessageCollector, make_password_file, make_tls_files
from paho.mqtt.enums import CallbackAPIVersion
from publisher_harness import kill_network_thread, synthetic_inspection

from edge_inspect import records
from edge_inspect.config.mqtt import MqttConfig, SpoolConfig
from edge_inspect.errors import ConfigError
from edge_inspect.mqtt.listen import StreamCheck
from edge_inspect.mqtt.payloads import Topics, load_schema, vlm_update
from edge_inspect.mqtt.publisher import ResultPublisher

HARNESS = Path(__file__).with_name("publisher_harness.py")
REPO = Path(__file__).resolve().parents[1]
STATION = "st1"
TOPICS = Topics("edge-inspect", STATION)
VALIDATORS = {name: jsonschema.Draft202012Validator(load_schema(name)) for name in ("result", "result_update", "stats")}


def mqtt_config(port: int, **changes) -> MqttConfig:
    settings = {"host": "127.0.0.1", "reconnect_min_s": 0.2, "reconnect_max_s": 1.0, "keepalive_s": 5, **changes}
    return MqttConfig(port=port, **settings)


def spool_config(tmp_path: Path, **changes) -> SpoolConfig:
    return SpoolConfig(path=str(tmp_path / "spool.sqlite3"), **changes)


def results(collector: MessageCollector, topic: str = TOPICS.result) -> list[dict]:
    return [message.json() for message in collector.on(topic)]


def validate_all(collector: MessageCollector) -> int:
    """Validate every JSON message the collector got against its schema; returns how many were checked."""
    checked = 0
    for message in collector.messages:
        if message.topic.endswith("/status"):
            assert message.payload in (b"online", b"offline", b"stopped")
            continue
        if "/image/" in message.topic:
            assert message.payload.startswith(b"\xff\xd8")
            continue
        payload = message.json()
        VALIDATORS[payload["type"]].validate(payload)
        checked += 1
    return checked


def wait_for_line(stream, text: str) -> bool:
    """Read lines until one contains text (True) or the stream ends (False)."""
    for line in stream:
        if text in line:
            return True
    return False




@pytest.mark.mosquitto
def test_results_updates_stats_and_images_arrive_in_documented_shape(mosquitto_broker, tmp_path):
    with MessageCollector(mosquitto_broker.port, [f"edge-inspect/{STATION}/#"]) as collector:
        collector.wait_subscribed()
        publisher = ResultPublisher(mqtt_config(mosquitto_broker.port, publish_images=True, image_max_bytes=2048),
                                    spool_config(tmp_path), STATION)
        publisher.start()
        assert publisher.wait_connected(10)
        sent = [synthetic_inspection(i, "live", STATION) for i in range(20)]
        for item in sent:
            publisher.publish_result(item)
        verdict = records.Verdict(True, "scratch", ("top left",), "a scratch", 0.9, model="m", latency_ms=5.0)
        publisher.publish_update(sent[0].inspection_id, vlm_update("done", verdict))
        publisher.publish_update(sent[5].inspection_id, vlm_update("failed", error="timeout"))
        publisher.publish_image(sent[0].inspection_id, b"\xff\xd8" + b"\0" * 100)
        publisher.publish_image(sent[5].inspection_id, b"\xff\xd8" + b"\0" * 5000)  # over the cap
        with pytest.raises(ValueError, match="JPEG"):
            publisher.publish_image(sent[5].inspection_id, b"PNG...")
        assert collector.wait_for(lambda msgs: len([m for m in msgs if m.topic.startswith(TOPICS.result)]) == 22)
        publisher.publish_stats({"frames": 20})
        assert collector.wait_for(lambda msgs: any(m.topic == TOPICS.stats for m in msgs))
        state = publisher.state()
        publisher.stop()
        assert collector.wait_for(lambda msgs: msgs[-1].topic == TOPICS.status and msgs[-1].payload == b"stopped")

    got = results(collector)
    assert [r["inspection_id"] for r in got] == [i.inspection_id for i in sent]
    assert [r["seq"] for r in got] == list(range(1, 21))
    assert not any(r["replayed"] for r in got)
    updates = results(collector, TOPICS.result_update)
    assert [(u["inspection_id"], u["vlm_status"], u["seq"]) for u in updates] == [
        (sent[0].inspection_id, "done", 1), (sent[5].inspection_id, "failed", 2)]
    assert [m.payload[:2] for m in collector.on(TOPICS.image(sent[0].inspection_id))] == [b"\xff\xd8"]
    assert collector.on(TOPICS.image(sent[5].inspection_id)) == []
    assert validate_all(collector) == 23
    stats = results(collector, TOPICS.stats)[0]
    assert stats["pipeline"] == {"frames": 20} and stats["mqtt"]["connected"] is True
    assert [m.payload for m in collector.on(TOPICS.status)] == [b"online", b"stopped"]
    assert (state["images_published"], state["images_skipped"], state["spool_depth"]) == (1, 1, 0)
    assert publisher.state()["published"] == 22 and publisher.state()["last_seq"] == 20


@pytest.mark.mosquitto
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_results_spooled_during_an_outage_are_replayed_in_order(mosquitto_factory, tmp_path, protocol):
    broker = mosquitto_factory(persistence_dir=tmp_path / "broker")
    collector = MessageCollector(broker.port, [TOPICS.result], client_id=f"scada-{protocol}", persistent=True,
                                 protocol=protocol)
    collector.wait_subscribed()
    publisher = ResultPublisher(mqtt_config(broker.port, protocol=protocol), spool_config(tmp_path), STATION)
    publisher.start()
    assert publisher.wait_connected(10)
    for index in range(5):
        publisher.publish_result(synthetic_inspection(index, "a", STATION))
    assert collector.wait_for(lambda msgs: len(msgs) == 5)
    assert wait_until(lambda: publisher.state()["published"] == 5)  # all PUBACKs in: no duplicates expected
    broker.stop()
    assert wait_until(lambda: not publisher.state()["connected"])
    for index in range(5, 35):
        publisher.publish_result(synthetic_inspection(index, "a", STATION))
    state = publisher.state()
    assert state["spool_depth"] == 30 and not state["connected"] and state["last_error"]
    broker.start()
    assert collector.wait_for(lambda msgs: len({m.json()["inspection_id"] for m in msgs}) == 35, timeout=20)
    publisher.stop()
    collector.close()
    got = results(collector)
    first_seen = list(dict.fromkeys(r["seq"] for r in got))
    assert first_seen == list(range(1, 36))  # in order; the subscriber may see the QoS 1 redeliveries
    assert len(got) - len(first_seen) <= 20  # of its own unacknowledged messages when the broker went down
    assert all(r["replayed"] for r in got if r["seq"] > 5)
    assert validate_all(collector) == len(got)
    assert publisher.state()["spool_depth"] == 0


@pytest.mark.mosquitto
def test_a_full_disk_still_publishes_the_result_without_the_spool(mosquitto_broker, tmp_path, caplog):
    with MessageCollector(mosquitto_broker.port, [TOPICS.result]) as collector:
        collector.wait_subscribed()
        publisher = ResultPublisher(mqtt_config(mosquitto_broker.port), spool_config(tmp_path), STATION)
        publisher.start()
        assert publisher.wait_connected(10)
        publisher.publish_result(synthetic_inspection(0, "disk", STATION))
        assert wait_until(lambda: publisher.state()["published"] == 1)
        spool_db = publisher._spool._db  # a real SQLITE_FULL: cap the file at its current size
        spool_db.execute(f"PRAGMA max_page_count = {spool_db.execute('PRAGMA page_count').fetchone()[0]}")
        big = synthetic_inspection(1, "disk", STATION).replace(regions=tuple(
            records.Region((i, i, i + 1, i + 1), 0.1, 0.9, ("center",)) for i in range(300)))
        publisher.publish_result(big)
        assert collector.wait_for(lambda msgs: len(msgs) == 2)
        state = publisher.state()
        publisher.stop()
    assert (state["spool_errors"], state["unspooled"]) == (1, 1)
    assert [m.json()["seq"] for m in collector.messages] == [1, 2]
    assert any("spool write failed" in r.getMessage() for r in caplog.records)


@pytest.mark.mosquitto
def test_retained_status_and_stats_are_republished_after_the_broker_lost_them(mosquitto_broker, tmp_path):
    publisher = ResultPublisher(mqtt_config(mosquitto_broker.port), spool_config(tmp_path), STATION)
    publisher.start()
    assert publisher.wait_connected(10)
    publisher.publish_stats({"frames": 1})
    mosquitto_broker.stop()  # no persistence: retained messages are gone
    assert wait_until(lambda: not publisher.state()["connected"])
    mosquitto_broker.start()
    assert wait_until(lambda: publisher.state()["connected"], timeout=15)
    with MessageCollector(mosquitto_broker.port, [TOPICS.status, TOPICS.stats]) as late:
        assert late.wait_for(lambda msgs: len(msgs) == 2)
        retained = {m.topic: m for m in late.messages}
    publisher.stop()
    assert retained[TOPICS.status].payload == b"online" and retained[TOPICS.status].retain
    assert retained[TOPICS.stats].json()["pipeline"] == {"frames": 1} and retained[TOPICS.stats].retain
    assert publisher.state()["connects"] == 2 and publisher.state()["disconnects"] == 1


@pytest.mark.mosquitto
def test_spool_overflow_drops_ok_first_and_listen_reports_the_gaps(mosquitto_broker, tmp_path):
    # Results published before start() wait in the spool, exactly as during an outage.
    publisher = ResultPublisher(mqtt_config(mosquitto_broker.port), spool_config(tmp_path, max_rows=100), STATION)
    sent = [synthetic_inspection(index, "full", STATION) for index in range(120)]  # every 5th NG
    for item in sent:
        publisher.publish_result(item)
    state = publisher.state()
    assert (state["spool_depth"], state["dropped"], state["dropped_ok"], state["dropped_ng"]) == (100, 20, 20, 0)
    listen = subprocess.Popen(
        [sys.executable, "-m", "edge_inspect.cli", "listen", "--host", "127.0.0.1", "--port", str(mosquitto_broker.port),
         "--station", STATION, "--count", "100", "--timeout", "30", "--check-gaps", "--json", "--validate"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert wait_for_line(listen.stderr, "listening on")
        publisher.start()
        out, err = listen.communicate(timeout=40)
    finally:
        listen.kill()
        publisher.stop()
    assert listen.returncode == 1, err  # gaps
    lines = [json.loads(line) for line in out.splitlines()]
    summary = lines[-1]
    received = {r["inspection_id"] for r in lines[:-1]}
    assert summary["type"] == "listen_summary" and summary["distinct"] == 100 and summary["invalid"] == 0
    assert summary["missing"] == 20 and summary["gaps"][STATION]
    assert {i.inspection_id for i in sent if i.verdict == "NG"} <= received  # every NG kept
    dropped = [i for i in sent if i.inspection_id not in received]
    assert len(dropped) == 20 and all(i.verdict == "OK" for i in dropped)
    assert dropped == [i for i in sent if i.verdict == "OK"][:20]  # the oldest OK ones


@pytest.mark.mosquitto
def test_listen_exits_zero_on_a_complete_stream(mosquitto_broker, tmp_path):
    listen = subprocess.Popen(
        [sys.executable, "-m", "edge_inspect.cli", "listen", "--port", str(mosquitto_broker.port), "--host", "127.0.0.1",
         "--count", "10", "--timeout", "30", "--check-gaps", "--updates"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert wait_for_line(listen.stderr, "listening on")
        with ResultPublisher(mqtt_config(mosquitto_broker.port), spool_config(tmp_path), STATION) as publisher:
            for index in range(10):
                publisher.publish_result(synthetic_inspection(index, "ok", STATION))
            out, err = listen.communicate(timeout=30)
    finally:
        listen.kill()
    assert listen.returncode == 0, err
    assert len([line for line in out.splitlines() if line.startswith("#")]) == 10
    assert "10 distinct, 0 duplicate(s), 0 replayed, 0 missing" in err


def test_stream_check_counts_duplicates_reused_seqs_and_gaps():
    check = StreamCheck()
    for seq, inspection_id in [(1, "a"), (2, "b"), (2, "b"), (5, "e"), (4, "d"), (5, "x"), (9, "i")]:
        check.add({"station": "s", "seq": seq, "inspection_id": inspection_id, "replayed": seq == 4})
    summary = check.summary()
    assert (summary["distinct"], summary["duplicates"], summary["replayed"], summary["out_of_order"]) == (6, 1, 1, 1)
    assert summary["gaps"] == {"s": [[3, 3], [6, 8]]} and summary["missing"] == 4
    assert summary["reused_seqs"] == [["s", 5]]


@pytest.mark.mosquitto
def test_wrong_password_is_reported_retried_and_the_right_one_connects(mosquitto_factory, tmp_path, monkeypatch, caplog):
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd not found (apt-get install mosquitto)")
    password_file = make_password_file(tmp_path / "passwd", {"line3": "right-password"})
    broker = mosquitto_factory(password_file=password_file)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv("EI_TEST_PW", "wrong-password")
    config = mqtt_config(broker.port, username="line3", password_env="EI_TEST_PW")
    caplog.set_level(logging.INFO, logger="edge_inspect.mqtt.publisher")
    publisher = ResultPublisher(config, spool_config(tmp_path), STATION)
    publisher.start()
    publisher.publish_result(synthetic_inspection(0, "auth", STATION))
    assert wait_until(lambda: publisher.state()["connect_failures"] >= 3, timeout=15)
    state = publisher.state()
    publisher.stop(timeout=0.5)
    assert not state["connected"] and state["spool_depth"] == 1
    assert "refused the connection" in state["last_error"] and "mqtt.username" in state["last_error"]
    assert "env EI_TEST_PW" in state["last_error"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "refused the connection" in r.getMessage()]
    assert len(errors) == 1  # logged once, not once per retry

    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "mqtt-password").write_text("right-password\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    publisher = ResultPublisher(config, spool_config(tmp_path), STATION)
    publisher.start()
    assert publisher.wait_connected(10)
    assert wait_until(lambda: publisher.state()["spool_depth"] == 0)
    assert publisher.state()["published"] == 1 and publisher.state()["replayed"] == 1
    publisher.stop()


@pytest.mark.mosquitto
def test_tls_verification_client_certificates_and_their_failures(mosquitto_factory, tmp_path, caplog):
    from mqtt_broker import BrokerTls

    if shutil.which("openssl") is None:
        pytest.skip("openssl binary not found (needed to make the test certificates)")
    files = make_tls_files(tmp_path / "tls")
    broker = mosquitto_factory(tls=BrokerTls(files["ca"], files["server_cert"], files["server_key"], require_certificate=True))
    caplog.set_level(logging.INFO, logger="edge_inspect.mqtt.publisher")

    def attempt(name: str, **tls) -> dict:
        publisher = ResultPublisher(mqtt_config(broker.port, host="localhost", tls={"enabled": True, **tls}),
                                    spool_config(tmp_path / name), STATION)
        publisher.start()
        publisher.publish_result(synthetic_inspection(0, name, STATION))
        wait_until(lambda: publisher.state()["spool_depth"] == 0 or publisher.state()["connect_failures"] >= 2, 15)
        state = publisher.state()
        publisher.stop(timeout=1)
        return state

    client_cert = {"cert_file": str(files["client_cert"]), "key_file": str(files["client_key"])}
    good = attempt("good", ca_file=str(files["ca"]), **client_cert)
    assert good["connected"] and good["tls"] and good["spool_depth"] == 0 and good["last_error"] is None

    wrong_ca = attempt("wrong-ca", ca_file=str(files["other_ca"]), **client_cert)
    assert not wrong_ca["connected"] and wrong_ca["connect_failures"] >= 2 and wrong_ca["spool_depth"] == 1
    assert "TLS certificate check" in wrong_ca["last_error"] and "ca_file" in wrong_ca["last_error"]

    unverified = attempt("unverified", ca_file=str(files["other_ca"]), verify=False, **client_cert)
    assert unverified["connected"] and unverified["spool_depth"] == 0

    no_client_cert = attempt("no-client-cert", ca_file=str(files["ca"]))
    assert not no_client_cert["connected"] and no_client_cert["connect_failures"] >= 2
    assert no_client_cert["last_error"] and str(broker.port) in no_client_cert["last_error"]

    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("TLS certificate check" in message for message in logged)
    with pytest.raises(ConfigError, match="tls.ca_file"):
        ResultPublisher(mqtt_config(broker.port, tls={"enabled": True, "ca_file": str(tmp_path / "missing.pem")}),
                        spool_config(tmp_path / "x"), STATION)


MALFORMED_COMMANDS = [
    (TOPICS.trigger, payload) for payload in (
        b"not json", b"{", b"[]", b"42", b'"A-1"', b"null", b'{"part_id": 5}', b'{"part_id": ""}',
        b'{"part_id": "a\\u0000b"}', b'{"partid": "A"}', b'{"part_id": "A", "x": 1}', b'{"part_id": ["A"]}',
        b'{"part_id": "A", "part_id": "B"}', b"\xff\xfe", b"z" * 5000, b'{"part_id": "' + b"x" * 200 + b'"}',
    )
] + [
    (TOPICS.product_set, payload) for payload in (
        b"", b"two words", b"../etc", b"a/b", b"x" * 65, b"\xff", b'{"product": 1}', b'{"prod": "a"}', b"{}",
        b"[]", b'{"product": ""}', b'{"product": "a", "extra": 1}', b"null", b"{broken", b"-dash",
    )
]


@pytest.mark.mosquitto
def command_client(port: int, client_id: str) -> paho.Client:
    """A PLC/MES stand-in that publishes commands to the broker."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def logged_totals(lines: list[str]) -> dict[str, int]:
    """Per kind of limited log line ("ignored malformed trigger ..."): the highest "N in total" it gave, or 1."""
    import re

    totals: dict[str, int] = {}
    for line in lines:
        kind = line.split(" command:")[0]
        match = re.search(r"(\d+) in total\)$", line)
        totals[kind] = max(totals.get(kind, 0), int(match.group(1)) if match else 1)
    return totals


def test_malformed_commands_are_logged_counted_and_ignored(mosquitto_broker, tmp_path, caplog):
    triggers: list = []
    products: list = []

    def on_product_set(name: str) -> None:
        if name == "explode":
            raise RuntimeError("handler bug")
        products.append(name)

    caplog.set_level(logging.INFO, logger="edge_inspect.mqtt.publisher")
    publisher = ResultPublisher(mqtt_config(mosquitto_broker.port), spool_config(tmp_path), STATION,
                                on_trigger=triggers.append, on_product_set=on_product_set)
    publisher.start()
    assert publisher.wait_connected(10)
    assert wait_until(lambda: publisher.state()["connects"] == 1)
    assert wait_until(lambda: publisher.state()["commands_subscribed"])  # the broker's SUBACK
    commander = command_client(mosquitto_broker.port, "plc")
    try:
        for topic, payload in MALFORMED_COMMANDS:
            commander.publish(topic, payload, qos=1).wait_for_publish(5)
        commander.publish(TOPICS.trigger, b'{"part_id": "A-7"}', qos=1).wait_for_publish(5)
        commander.publish(TOPICS.trigger, b"{}", qos=1).wait_for_publish(5)
        commander.publish(TOPICS.trigger, b'{"part_id": "R"}', qos=1, retain=True).wait_for_publish(5)
        commander.publish(TOPICS.trigger, b"", qos=1, retain=True).wait_for_publish(5)  # clears it: not a trigger
        commander.publish(TOPICS.product_set, b"explode", qos=1).wait_for_publish(5)
        commander.publish(TOPICS.product_set, b'{"product": "gear-2"}', qos=1).wait_for_publish(5)
        assert wait_until(lambda: products == ["gear-2"])
        publisher.publish_result(synthetic_inspection(0, "after", STATION))
        assert wait_until(lambda: publisher.state()["published"] == 1)
        assert wait_until(lambda: publisher.state()["malformed_commands"] == len(MALFORMED_COMMANDS) + 1)
    finally:
        commander.disconnect()
        commander.loop_stop()
    state = publisher.state()
    publisher.stop()
    assert [t.part_id for t in triggers] == ["A-7", None, "R"]  # a live retained message arrives unflagged
    assert len(MALFORMED_COMMANDS) >= 30 and state["triggers"] == 3 and state["product_sets"] == 2
    assert state["command_errors"] == 1 and state["connected"]
    # Logged, but not one line each (issue 23): the first of each kind at once, repeats with their count.
    warnings = [r.getMessage() for r in caplog.records if "ignored malformed" in r.getMessage()]
    assert 2 <= len(warnings) < len(MALFORMED_COMMANDS) / 2, warnings
    assert sum(logged_totals(warnings).values()) == len(MALFORMED_COMMANDS) + 1, warnings

    # A retained trigger is stale by definition: after a reconnect it must not fire.
    commander = paho.Client(CallbackAPIVersion.VERSION2, client_id="plc2")
    commander.connect("127.0.0.1", mosquitto_broker.port)
    commander.loop_start()
    commander.publish(TOPICS.trigger, b'{"part_id": "stale"}', qos=1, retain=True).wait_for_publish(5)
    publisher = ResultPublisher(mqtt_config(mosquitto_broker.port), spool_config(tmp_path), STATION,
                                on_trigger=triggers.append)
    publisher.start()
    assert wait_until(lambda: publisher.state()["retained_triggers_ignored"] == 1)
    publisher.stop()
    commander.publish(TOPICS.trigger, b"", qos=1, retain=True).wait_for_publish(5)
    commander.disconnect()
    commander.loop_stop()
    assert [t.part_id for t in triggers] == ["A-7", None, "R"]


def test_describe_connect_error_names_the_cause_and_the_key_to_fix():
    """Public for `doctor`: a real refused connection in words."""
    import socket

    from mqtt_broker import free_port

    from edge_inspect.mqtt.client import describe_connect_error

    port = free_port()
    config = mqtt_config(port)
    with pytest.raises(OSError) as refused:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    text = describe_connect_error(refused.value, f"127.0.0.1:{port}", config)
    assert text == f"connection to 127.0.0.1:{port} refused; is the broker running and listening on that port?"
    assert describe_connect_error(None, "b:1883", config) == "cannot connect to b:1883 (unknown error)"


def _run_harness(port: int, spool: Path, count: int, id_prefix: str, rate: float = 200.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HARNESS), "--port", str(port), "--spool", str(spool), "--station", STATION,
         "--count", str(count), "--rate", str(rate), "--id-prefix", id_prefix],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.mosquitto
def test_publisher_sigkilled_mid_stream_loses_nothing_after_restart(mosquitto_broker, tmp_path):
    """Killed with messages in flight (the broker is frozen, so no PUBACKs) and a backlog in the spool."""
    spool = tmp_path / "spool.sqlite3"
    with MessageCollector(mosquitto_broker.port, [TOPICS.result, TOPICS.status]) as collector:
        collector.wait_subscribed()
        first = _run_harness(mosquitto_broker.port, spool, 400, "run1")
        spooled: list[str] = []
        try:
            for line in first.stdout:
                if line.startswith("spooled "):
                    spooled.append(line.split()[1])
                if len(spooled) == 100:
                    mosquitto_broker.pause()
                if len(spooled) == 150:
                    os.kill(first.pid, signal.SIGKILL)
                    break
            first.wait(10)
            spooled += [line.split()[1] for line in first.stdout.read().splitlines() if line.startswith("spooled ")]
        finally:
            first.kill()
            mosquitto_broker.resume()
        assert first.returncode == -signal.SIGKILL
        assert collector.wait_for(lambda msgs: any(m.payload == b"offline" for m in msgs))  # the last will

        second = _run_harness(mosquitto_broker.port, spool, 50, "run2")
        out, err = second.communicate(timeout=60)
        assert second.returncode == 0, err
        spooled += [line.split()[1] for line in out.splitlines() if line.startswith("spooled ")]
        final_state = json.loads(next(line for line in out.splitlines() if line.startswith("state "))[6:])
        assert collector.wait_for(lambda msgs: msgs[-1].payload == b"stopped")

    got = results(collector)
    received = [r["inspection_id"] for r in got]
    assert set(spooled) <= set(received), f"lost: {sorted(set(spooled) - set(received))[:10]}"
    check = StreamCheck()
    for payload in got:
        check.add(payload)
    summary = check.summary()
    assert summary["missing"] == 0 and not summary["reused_seqs"]  # seqs continued across the restart
    assert summary["stations"][STATION]["first_seq"] == 1
    assert summary["stations"][STATION]["last_seq"] == check.distinct >= 200
    assert summary["duplicates"] <= 20  # max_inflight: what was sent but not acknowledged when it died
    assert final_state["replayed"] >= 30  # the backlog the first run never sent
    assert sum(r["replayed"] for r in got if r["inspection_id"].startswith("run1")) >= 30
    assert not any(r["replayed"] for r in got if r["inspection_id"].startswith("run2"))
    assert final_state["spool_depth"] == 0 and final_state["last_seq"] == check.distinct
    assert [m.payload for m in collector.on(TOPICS.status)][-3:] == [b"offline", b"online", b"stopped"]
    assert validate_all(collector) == len(got)
    print(f"kill test: {len(got)} messages, {summary['duplicates']} duplicates, {final_state['replayed']} replayed")


@pytest.mark.mosquitto
@pytest.mark.slow
def test_broker_down_mid_stream_every_result_arrives(mosquitto_factory, tmp_path):
    """300 results at 50/s; the broker is stopped after ~100 and restarted with its persistence once the
    publisher has failed to reconnect five times and the line has made another 100 results meanwhile."""
    broker = mosquitto_factory(persistence_dir=tmp_path / "broker")
    max_inflight = 20
    collector = MessageCollector(broker.port, [TOPICS.result], client_id="scada-historian", persistent=True)
    collector.wait_subscribed()
    publisher = ResultPublisher(mqtt_config(broker.port, max_inflight=max_inflight), spool_config(tmp_path), STATION)
    publisher.start()
    assert publisher.wait_connected(10)
    sent: list[str] = []
    outage: dict[str, float] = {}

    def line() -> None:
        for index in range(300):
            item = synthetic_inspection(index, "outage", STATION)
            publisher.publish_result(item)
            sent.append(item.inspection_id)
            time.sleep(0.02)

    producer = threading.Thread(target=line)
    producer.start()
    assert wait_until(lambda: len(sent) >= 100, timeout=30)
    broker.stop()
    outage["depth_before"] = publisher.state()["spool_depth"]
    failures = publisher.state()["connect_failures"]
    assert wait_until(lambda: publisher.state()["connect_failures"] >= failures + 5 and len(sent) >= 200, timeout=120)
    outage["depth_during"] = publisher.state()["spool_depth"]
    outage["connected_during"] = publisher.state()["connected"]
    broker.start()
    producer.join()
    assert collector.wait_for(lambda msgs: len({m.json()["inspection_id"] for m in msgs}) >= 300, timeout=60)
    publisher.stop()
    collector.close()

    got = results(collector)
    ids = [r["inspection_id"] for r in got]
    assert set(ids) == set(sent) and len(sent) == 300
    duplicates = len(ids) - len(set(ids))
    assert duplicates <= max_inflight
    assert not outage["connected_during"] and outage["depth_during"] > outage["depth_before"]
    check = StreamCheck()
    for payload in got:
        check.add(payload)
    assert check.summary()["missing"] == 0 and check.summary()["stations"][STATION]["last_seq"] == 300
    assert any(r["replayed"] for r in got) and validate_all(collector) == len(got)
    print(f"outage test: {len(got)} messages, {duplicates} duplicates, {check.replayed} replayed")



def test_a_command_subscription_the_broker_refuses_is_logged_and_shown(tmp_path, caplog):
    """Brokers with ACLs (EMQX, HiveMQ, AWS IoT) refuse a SUBSCRIBE in its SUBACK; then the daemon cannot
    receive triggers. The refusal is logged with the topic, and commands_subscribed stays false.
    (mosquitto's ACL grants the SUBACK and filters deliveries instead, so the SUBACK is built here.)"""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    caplog.set_level(logging.INFO, logger="edge_inspect.mqtt.publisher")
    publisher = ResultPublisher(mqtt_config(1), spool_config(tmp_path), STATION, on_trigger=lambda t: None)
    try:
        topics = publisher._commands.topics
        granted = [ReasonCode(PacketTypes.SUBACK, "Granted QoS 1") for _ in topics]
        refused = [ReasonCode(PacketTypes.SUBACK, "Not authorized")] + granted[1:]
        publisher._on_subscribe(None, None, 1, granted, None)
        assert publisher._commands_live and "refused" not in (publisher.state()["last_error"] or "")
        publisher._on_subscribe(None, None, 2, refused, None)
        assert publisher.state()["commands_subscribed"] is False
        assert f"{topics[0]} (Not authorized)" in publisher.state()["last_error"]
        assert any("refused the command subscription" in r.getMessage() for r in caplog.records)
    finally:
        publisher.stop(timeout=0)

# --- issue 23: a dead network thread, a flood of bad commands ------------------------------------


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_network_thread_is_restarted_and_no_result_is_lost(mosquitto_broker, tmp_path, caplog):
    """Before: paho's thread died, nothing reconnected or logged, and results piled up in the spool."""
    publisher = ResultPublisher(mqtt_config(mosquitto_broker.port), spool_config(tmp_path), STATION)
    ids = []
    with MessageCollector(mosquitto_broker.port, [TOPICS.result]) as collector:
        collector.wait_subscribed()
        publisher.start()
        assert publisher.wait_connected(10)
        with caplog.at_level(logging.ERROR, logger="edge_inspect.mqtt.publisher"):
            for index in range(30):
                if index == 10:
                    kill_network_thread(publisher._client)
                inspection = synthetic_inspection(index, "dead-loop", STATION)
                publisher.publish_result(inspection)
                ids.append(inspection.inspection_id)
                if index == 10:
                    assert wait_until(lambda: publisher.state()["network_restarts"] == 1, 30)
            received = lambda: {m.json()["inspection_id"] for m in collector.on(TOPICS.result)}
            assert wait_until(lambda: received() >= set(ids), 30), publisher.state()
        state = publisher.state()
        publisher.stop()
    assert state["network_thread_alive"] and state["connected"] and state["connects"] == 2
    assert publisher.fatal_error is None and publisher.hung_threads() == []
    lines = [r.getMessage() for r in caplog.records if "network thread (paho) ended" in r.getMessage()]
    assert len(lines) == 1 and "restarting it" in lines[0]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_network_thread_that_keeps_dying_is_given_up_and_reported_hung(mosquitto_broker, tmp_path):
    from edge_inspect.mqtt import publisher as publisher_module

    publisher = ResultPublisher(mqtt_config(mosquitto_broker.port), spool_config(tmp_path), STATION)
    publisher.start()
    try:
        assert publisher.wait_connected(10)
        kill_network_thread(publisher._client, times=1000)
        assert wait_until(lambda: publisher.fatal_error is not None, 60)
        state = publisher.state()
        assert state["network_restarts"] == publisher_module._NETWORK_RESTARTS
        assert not state["network_thread_alive"] and publisher.hung_threads() == ["mqtt-network"]
        assert "giving up" in publisher.fatal_error
    finally:
        publisher.stop(timeout=1.0)


def test_a_burst_of_2000_malformed_commands_is_counted_in_a_few_log_lines(mosquitto_broker, tmp_path, caplog):
    """Before: about 2,000 WARNING lines for 2,000 malformed commands in 0.8 s."""
    publisher = ResultPublisher(mqtt_config(mosquitto_broker.port), spool_config(tmp_path), STATION)
    publisher.start()
    assert publisher.wait_connected(10)
    assert wait_until(lambda: publisher.state()["connects"] == 1)
    commander = command_client(mosquitto_broker.port, "flood")
    started = time.monotonic()
    try:
        # subscribed once a valid trigger is counted (no handler: counted, not acted on)
        assert wait_until(lambda: commander.publish(TOPICS.trigger, b"{}", qos=1) and publisher.state()["triggers"] >= 1,
                          10, step=0.2)
        with caplog.at_level(logging.WARNING, logger="edge_inspect.mqtt.dispatch"):
            sent = [commander.publish(TOPICS.trigger, b"not json %d" % i, qos=1) for i in range(2000)]
            for info in sent:
                info.wait_for_publish(10)
            assert wait_until(lambda: publisher.state()["malformed_commands"] == 2000, 60)
            elapsed = time.monotonic() - started
            publisher.stop()
    finally:
        commander.disconnect()
        commander.loop_stop()
    lines = [r.getMessage() for r in caplog.records if "ignored malformed" in r.getMessage()]
    assert 1 <= len(lines) <= 2 + elapsed / 10.0, lines  # the first at once, one per 10 s, one at stop
    assert logged_totals(lines) == {"ignored malformed trigger": 2000}, lines
