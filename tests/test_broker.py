"""Embedded broker: both back-ends serve paho-mqtt 2.x (MQTT 3.1.1) with QoS 1, retained messages,
persistent sessions and last wills; a port that is already served is left alone."""

from __future__ import annotations

import shutil
import socket
import threading

import paho.mqtt.client as mqtt
import pytest
from conftest import wait_until

from edge_inspect.errors import UserError
from edge_inspect.ops.demo_broker import ensure_broker, port_open


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Client:
    """A paho 2.x client that records what it receives."""

    def __init__(self, port: int, client_id: str, clean_session: bool = True, will: bytes | None = None) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv311, clean_session=clean_session)
        self.messages: list[mqtt.MQTTMessage] = []
        self.connected = threading.Event()
        self.session_present: bool | None = None
        self.reason = None
        self.client.on_message = lambda c, u, m: self.messages.append(m)
        self.client.on_connect = self._on_connect
        if will is not None:
            self.client.will_set("plant/line1/status", will, qos=1, retain=True)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(5), "no CONNACK"
        assert not self.reason.is_failure, str(self.reason)

    def _on_connect(self, client, userdata, flags, reason, properties):
        self.session_present = flags.session_present
        self.reason = reason
        self.connected.set()

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *args: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(5), "no SUBACK"

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)
        assert info.is_published(), "no PUBACK"

    def matching(self, topic: str | None = None) -> list[mqtt.MQTTMessage]:
        return [m for m in self.messages if topic is None or m.topic == topic]

    def wait_for(self, count: int, timeout: float = 10.0, topic: str | None = None) -> list[mqtt.MQTTMessage]:
        """The messages (on `topic`, when given) once there are `count` of them or the time is up."""
        wait_until(lambda: len(self.matching(topic)) >= count, timeout)
        return self.matching(topic)

    def drop_connection(self) -> None:
        """Vanish without DISCONNECT, like a daemon killed or unplugged."""
        self.client.loop_stop()
        self.client.socket().close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _exercise(port: int, session_closed=lambda client_id: True) -> None:
    """session_closed(client_id): the broker has processed that client's DISCONNECT."""
    device = _Client(port, "edge-inspect-line1", will=b"offline")
    device.publish("plant/line1/status", b"online", retain=True)

    scada = _Client(port, "scada", clean_session=False)
    scada.subscribe("plant/line1/#")
    assert [m.payload for m in scada.wait_for(1)] == [b"online"] and scada.messages[0].retain
    for i in range(200):
        device.publish("plant/line1/result", b"%d" % i)
    results = scada.wait_for(200, topic="plant/line1/result")
    assert [int(m.payload) for m in results] == list(range(200))
    assert {m.qos for m in results} == {1}
    scada.close()
    # amqtt drops a QoS 1 message that is in flight to a client while it disconnects instead of
    # keeping it for the session (github.com/Yakifo/amqtt/issues/401): let the DISCONNECT land first.
    assert wait_until(lambda: session_closed("scada"))
    for i in range(200, 205):  # subscriber offline: the broker queues QoS 1 for its persistent session
        device.publish("plant/line1/result", b"%d" % i)
    back = _Client(port, "scada", clean_session=False)
    assert back.session_present
    assert [int(m.payload) for m in back.wait_for(5, topic="plant/line1/result")] == list(range(200, 205))

    device.drop_connection()  # last will, retained
    assert wait_until(lambda: b"offline" in [m.payload for m in back.messages])
    status = [m.payload for m in back.wait_for(0, topic="plant/line1/status")]
    assert status[-1] == b"offline" and set(status) <= {b"offline", b"online"}  # amqtt re-sends "online" on resume
    late = _Client(port, "late")
    late.subscribe("plant/line1/status")
    # QoS 1 is at-least-once: amqtt sometimes sends a retained message twice to a new subscriber.
    assert {(m.payload, m.retain) for m in late.wait_for(1)} == {(b"offline", True)}
    back.close()
    late.close()


def _amqtt_session_closed(handle, client_id: str) -> bool:
    """amqtt's own view of a client's session (its broker runs in this process)."""
    entry = handle._broker._sessions.get(client_id)
    return entry is not None and entry[0].transitions.state == "disconnected"


def test_amqtt_broker_serves_paho_clients_and_stops():
    pytest.importorskip("amqtt", reason="amqtt not installed (pip install amqtt)")
    port = _free_port()
    handle = ensure_broker("127.0.0.1", port, kind="amqtt")
    assert handle is not None and handle.kind == "amqtt" and handle.running()
    try:
        assert ensure_broker("127.0.0.1", port) is None  # already served: nothing started
        _exercise(port, lambda client_id: _amqtt_session_closed(handle, client_id))
    finally:
        handle.stop()
    assert not handle.running()
    assert not port_open("127.0.0.1", port)
    handle.stop()  # idempotent


@pytest.mark.mosquitto
@pytest.mark.skipif(shutil.which("mosquitto") is None and shutil.which("/usr/sbin/mosquitto") is None,
                    reason="mosquitto binary not installed (apt-get install mosquitto)")
def test_mosquitto_broker_serves_paho_clients_and_stops():
    port = _free_port()
    handle = ensure_broker("localhost", port, kind="mosquitto")
    assert handle is not None and handle.kind == "mosquitto" and handle.running() and handle.supports_mqtt5
    try:
        assert ensure_broker("localhost", port) is None
        _exercise(port)
    finally:
        handle.stop()
    assert not handle.running()
    assert not port_open("127.0.0.1", port)


def test_remote_host_with_nothing_listening_is_a_user_error():
    with pytest.raises(UserError, match="mqtt.host=192.0.2.1"):
        ensure_broker("192.0.2.1", _free_port())  # TEST-NET-1: never routed


def test_taken_port_reports_instead_of_hanging():
    pytest.importorskip("amqtt")
    with socket.socket() as blocker:  # bound but not listening: connect fails, bind fails too
        blocker.bind(("127.0.0.1", 0))
        port = blocker.getsockname()[1]
        with pytest.raises(UserError, match=f"127.0.0.1:{port}"):
            ensure_broker("127.0.0.1", port, kind="amqtt")


def test_amqtt_refuses_mqtt5_in_words_and_says_so():
    pytest.importorskip("amqtt")
    port = _free_port()
    handle = ensure_broker("127.0.0.1", port, kind="amqtt")
    try:
        assert handle.supports_mqtt5 is False
        answer: dict = {}
        done = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="v5", protocol=mqtt.MQTTv5)
        client.on_connect = lambda c, u, f, reason, p: (answer.setdefault("reason", reason), done.set())
        client.connect("127.0.0.1", port)
        client.loop_start()
        assert done.wait(5)
        client.loop_stop()
        assert answer["reason"].is_failure and str(answer["reason"]) == "Unsupported protocol version"
    finally:
        handle.stop()
