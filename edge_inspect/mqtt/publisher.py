"""The MQTT edge: results go to the SQLite spool first, then to the broker; rows leave the spool on PUBACK.

Threads: the caller's (publish_* only insert into the spool and wake the sender), the sender
(moves spooled rows to paho in id order, at most `max_inflight` unacknowledged, deletes acked rows)
and paho's network thread (callbacks only record events and wake the sender; they never wait for
a lock the sender holds while it calls paho, so the two cannot deadlock). The sender also watches the
network thread: one that ended on its own (an exception inside paho) is restarted with a fresh connect,
and after _NETWORK_RESTARTS in _NETWORK_RESTART_WINDOW_S the publisher reports `fatal_error`.

After every (re)connect, paho's own queue is dropped and the sender starts again from the oldest
unacknowledged row, marking messages it had not sent live in that connection `replayed: true`.
Duplicates are possible (a PUBACK lost in a crash): at most `max_inflight` messages can be
delivered twice per broker outage or daemon crash. A spooled message survives broker outages and
daemon crashes; it can still be lost when the spool is full (spool.policy drops one, counted, a seq
gap), when the spool cannot be written (published unspooled, counted in `unspooled`), and on power
loss with spool.synchronous: normal (the last commits). docs/mqtt.md "Delivery guarantees".

Example:
    publisher = ResultPublisher(config.mqtt, config.spool, station="line3-cam1", on_trigger=capture.trigger)
    publisher.start()                       # returns at once; connects and replays in the background
    publisher.publish_result(inspection)    # ~0.1 ms: one SQLite insert
    publisher.publish_update(inspection.inspection_id, vlm_update("done", verdict))
    publisher.stop()                        # flush, status "stopped", disconnect
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .. import records
from ..config.mqtt import MqttConfig, SpoolConfig
from ..errors import ConfigError
from ..log_limit import LogLimiter
from .ask import AskRequest, answer_payload, answer_topic, ask_topic, parse_ask
from .client import describe_connect_error, make_client, tls_context
from .dispatch import CommandDispatcher, Route
from .feedback import FeedbackRequest, feedback_result_payload, feedback_result_topic, feedback_topic, parse_feedback
from .payloads import (
    STATUS_OFFLINE,
    STATUS_ONLINE,
    STATUS_STOPPED,
    Topics,
    TriggerCommand,
    check_inspection_id,
    check_station,
    encode,
    iso_utc,
    mark_replayed,
    parse_product_set,
    parse_trigger,
    result_payload,
    stats_payload,
    update_payload,
)
from .spool import PRIORITY_NG, PRIORITY_OK, PRIORITY_UPDATE, Spool, SpoolWriteError

log = logging.getLogger(__name__)

_SEND_BATCH = 100  # rows fetched from the spool per query while filling the in-flight window
_DROP_LOG_S = 10.0  # spool drops are logged at most this often, each time with the running total
_LOG_REPEAT_S = 60.0  # an unchanged connection error is logged again at most this often
# paho's network thread ending on its own is restarted; this many times within _NETWORK_RESTART_WINDOW_S and
# the publisher gives up (`fatal_error`): the daemon then exits non-zero and systemd restarts the process.
_NETWORK_RESTARTS = 5
_NETWORK_RESTART_WINDOW_S = 300.0
# CONNACK reason codes that mean "your credentials are wrong" (MQTT 3.1.1: 4, 5; MQTT 5: 0x86, 0x87).
_AUTH_REFUSALS = {4, 5, 0x86, 0x87}


class ResultPublisher:
    """Publishes inspection results over MQTT without ever losing one (see module docstring)."""

    def __init__(
        self,
        mqtt: MqttConfig,
        spool: SpoolConfig,
        station: str,
        on_trigger: Callable[[TriggerCommand], None] | None = None,
        on_product_set: Callable[[str], None] | None = None,
        on_ask: Callable[[AskRequest], None] | None = None,
        on_feedback: Callable[[FeedbackRequest], None] | None = None,
    ):
        try:
            self.station = check_station(station)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.config = mqtt
        self.topics = Topics(mqtt.topic_prefix, station)
        self.client_id = mqtt.resolved_client_id(station)
        self.broker = f"{mqtt.host}:{mqtt.broker_port}"
        self._tls_context = tls_context(mqtt) if mqtt.tls.enabled else None
        self._password, self._password_source = mqtt.resolve_password()
        self._spool = Spool(spool)
        self._run_id = uuid.uuid4().hex[:12]

        self._client: mqtt.Client | None = None
        self._sender: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop_sender = threading.Event()
        self._events: deque[tuple[Any, ...]] = deque()  # ("ack", mid, failure) | ("connected", gen, window) | ("disconnected",)
        self._connected = False
        self._generation = 0  # +1 per successful CONNACK (network thread)
        self._started = False
        self._stopping = False
        self._closed = False
        self._last_stats: bytes | None = None
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._last_logged: tuple[str, float] = ("", 0.0)
        self._connected_since: float | None = None
        self._commands_live = False  # the broker acknowledged the command subscriptions of this connection
        self._failures_since_connect = 0
        self._refused = False  # the last CONNACK was a refusal (its disconnect is not reported again)
        self._last_socket_error: str | None = None
        self._final_spool: dict[str, Any] = {}
        self._last_drop_log = -_DROP_LOG_S
        self._drops_unlogged = 0
        self._log = LogLimiter(log)  # per-message problems: one line per 10 s per kind, with the count
        self._network_restarts: deque[float] = deque()
        self.fatal_error: str | None = None  # set when the network thread cannot be kept alive
        self._counts = dict.fromkeys(
            (
                "connects", "disconnects", "connect_failures", "published", "replayed", "rejected", "inflight",
                "malformed_commands", "retained_triggers_ignored", "command_errors", "triggers", "product_sets",
                "images_published", "images_skipped", "spool_errors", "unspooled", "unspooled_lost",
                "network_restarts",
                "asks", "answers_published", "answers_unsent",
                "feedbacks", "feedback_results_published", "feedback_results_unsent",
            ),
            0,
        )
        self._commands = CommandDispatcher({
            self.topics.trigger: Route("trigger", parse_trigger, on_trigger, "triggers", ignore_retained=True),
            self.topics.product_set: Route("product/set", parse_product_set, on_product_set, "product_sets"),
            ask_topic(self.topics): Route("ask", parse_ask, on_ask, "asks", ignore_retained=True),
            feedback_topic(self.topics): Route("feedback", parse_feedback, on_feedback, "feedbacks", ignore_retained=True),
        }, self._counts)

    # --- public API ---------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background and replay whatever the spool holds. Never raises on a broker that is down."""
        if self._started:
            return
        self._started = True
        self._client = self._make_client()
        self._sender = threading.Thread(target=self._sender_loop, name="mqtt-sender", daemon=True)
        self._sender.start()
        depth = self._spool.stats()["spool_depth"]
        if depth:
            log.info("spool %s holds %d unacknowledged message(s); they are replayed once connected", self._spool.path, depth)
        self._client.connect_async(
            self.config.host, self.config.broker_port, self.config.keepalive_s,
            **({"clean_start": True} if self.config.protocol == "5" else {}),
        )
        self._client.loop_start()
        log.info(
            "publishing to %s as %r under %s/ (MQTT %s%s)", self.broker, self.client_id, self.topics.base,
            self.config.protocol, ", TLS" if self._tls_context else "",
        )

    def publish_result(self, inspection: records.Inspection) -> None:
        """Spool the result (one SQLite transaction), then hand it to the sender. Does not wait for the broker.

        Raises ValueError for a result that cannot be serialised (e.g. a NaN score).
        """
        priority = PRIORITY_NG if inspection.verdict == "NG" else PRIORITY_OK
        self._append("result", self.topics.result, priority, lambda seq: encode(result_payload(inspection, seq)))

    def publish_update(self, inspection_id: str, update: dict) -> None:
        """Spool and publish the VLM's verdict for an earlier result (`payloads.vlm_update(...)` builds `update`)."""
        station = self.station
        self._append(
            "update", self.topics.result_update, PRIORITY_UPDATE,
            lambda seq: encode(update_payload(inspection_id, station, seq, update)),
        )

    def publish_stats(self, stats: dict) -> None:
        """Publish the daemon's counters with the publisher's state (retained, QoS 0; not spooled)."""
        payload = encode(stats_payload(self.station, stats, self.state()))
        self._last_stats = payload
        client = self._client
        if client is not None and self._connected:
            client.publish(self.topics.stats, payload, qos=0, retain=True)

    def publish_image(self, inspection_id: str, jpeg: bytes) -> None:
        """Publish a flagged frame's JPEG (QoS 0, not spooled) when `mqtt.publish_images` is on."""
        if not self.config.publish_images:
            return
        if not jpeg.startswith(b"\xff\xd8"):
            raise ValueError("publish_image expects JPEG bytes (cv2.imencode('.jpg', ...))")
        check_inspection_id(inspection_id)
        client = self._client
        if len(jpeg) > self.config.image_max_bytes or client is None or not self._connected:
            self._counts["images_skipped"] += 1
            log.debug("image of %s not published (%d bytes, connected=%s)", inspection_id, len(jpeg), self._connected)
            return
        properties = None
        if self.config.protocol == "5":
            properties = Properties(PacketTypes.PUBLISH)
            properties.ContentType = "image/jpeg"
            properties.UserProperty = [("inspection_id", inspection_id)]
        client.publish(self.topics.image(inspection_id), jpeg, qos=0, properties=properties)
        self._counts["images_published"] += 1

    def publish_answer(self, body: dict) -> bool:
        """Publish the answer to a follow-up question (`vlm.ask.Asker` body) on .../answer: QoS 1, not
        retained, not spooled (an answer made while the broker is down is lost: the asker asks again)."""
        payload = encode(answer_payload(self.station, body))
        client = self._client
        if client is None or not self._connected:
            self._counts["answers_unsent"] += 1
            self._log.log(logging.WARNING, "answer unsent", "answer to request %s not sent: not connected to the broker",
                          body.get("request_id"))
            return False
        client.publish(answer_topic(self.topics), payload, qos=1)
        self._counts["answers_published"] += 1
        return True

    def publish_feedback_result(self, body: dict) -> bool:
        """Publish the result of an operator feedback (`feedback.apply` body) on .../feedback/result: QoS 1, not
        retained, not spooled (a result lost while the broker is down costs nothing: feedback is idempotent,
        and sending it again answers "duplicate" with the version it was applied in)."""
        payload = encode(feedback_result_payload(self.station, body))
        client = self._client
        if client is None or not self._connected:
            self._counts["feedback_results_unsent"] += 1
            self._log.log(logging.WARNING, "feedback result unsent",
                          "feedback result for inspection %s not sent: not connected to the broker", body.get("inspection_id"))
            return False
        client.publish(feedback_result_topic(self.topics), payload, qos=1)
        self._counts["feedback_results_published"] += 1
        return True

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected (True) or `timeout` s passed (False). Publishing never needs this."""
        deadline = time.monotonic() + timeout
        while not self._connected:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def state(self) -> dict[str, Any]:
        """Connection, spool and counter snapshot (also published under `mqtt` in the stats)."""
        counts = dict(self._counts)
        spool = self._spool_snapshot()
        return {
            "connected": self._connected,
            "broker": self.broker,
            "client_id": self.client_id,
            "protocol": self.config.protocol,
            "tls": self._tls_context is not None,
            "connected_since": iso_utc(self._connected_since) if self._connected and self._connected_since else None,
            "commands_subscribed": self._connected and self._commands_live,
            "last_error": self._last_error,
            "last_error_at": iso_utc(self._last_error_at) if self._last_error_at else None,
            "network_thread_alive": self.network_alive(),
            **spool,
            **counts,
        }

    def stop(self, timeout: float = 5.0) -> None:
        """Wait up to `timeout` s for the spool to drain, publish status "stopped", disconnect, close the spool."""
        if self._closed:
            return
        self._stopping = True
        deadline = time.monotonic() + timeout
        client = self._client
        if client is not None:
            while self._connected and time.monotonic() < deadline and self._spool.stats()["spool_depth"] > 0:
                self._wake.set()
                time.sleep(0.01)
            left = self._spool.stats()["spool_depth"]
            if left:
                log.warning("stopping with %d message(s) still spooled; they are replayed at the next start", left)
            if self._connected:
                info = client.publish(self.topics.status, STATUS_STOPPED, qos=1, retain=True)
                try:
                    info.wait_for_publish(max(0.1, deadline - time.monotonic()))
                except (RuntimeError, ValueError):
                    pass  # disconnected meanwhile: the broker's last will says "offline" instead
        self._stop_sender.set()
        self._wake.set()
        if self._sender is not None:
            self._sender.join(timeout=max(1.0, deadline - time.monotonic()))
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self._log_drops((), final=True)  # drops the last quiet interval hid
        self._log.flush()
        self._commands.log.flush()  # repeats of bad commands not yet reported
        self._final_spool = self._spool_snapshot()
        self._closed = True
        self._spool.close()
        log.info("publisher stopped (%d message(s) left in the spool)", self._final_spool["spool_depth"])

    def __enter__(self) -> "ResultPublisher":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- spooling -----------------------------------------------------------------------------

    def _append(self, kind: str, topic: str, priority: int, make_payload: Callable[[int], bytes]) -> None:
        if self._closed:
            raise RuntimeError("the publisher is stopped")
        origin = self._origin()
        counter = "result_seq" if kind == "result" else "update_seq"
        try:
            appended = self._spool.append(kind, topic, priority, make_payload, origin, counter=counter)
        except SpoolWriteError as exc:
            # The disk is full or broken: publish without the guarantee rather than not at all.
            self._counts["spool_errors"] += 1
            self._counts["unspooled"] += 1
            client = self._client
            sent = client is not None and self._connected
            if sent:
                client.publish(topic, exc.payload, qos=1)
            else:
                self._counts["unspooled_lost"] += 1
            self._log.log(
                logging.ERROR, "spool write", "spool write failed (%s); %s seq %d %s (stats: unspooled, unspooled_lost)",
                exc, kind, exc.seq, "published without the spool" if sent else "LOST: not spooled and not connected",
            )
            return
        if appended.dropped:
            self._log_drops(appended.dropped)
        self._wake.set()

    def _origin(self) -> str:
        """The connection a new row belongs to; sent in any other one, it is marked `replayed`.

        Rows spooled while the first connection is still being set up belong to that first
        connection (not a replay), unless an attempt has already failed (the broker is down).
        """
        if self._connected:
            return f"{self._run_id}:{self._generation}"
        if self._generation == 0 and self._counts["connect_failures"] == 0:
            return f"{self._run_id}:1"
        return f"{self._run_id}:offline"

    def _log_drops(self, dropped: tuple[tuple[str, int], ...], final: bool = False) -> None:
        """Log spool drops at most every _DROP_LOG_S, each line with the running total (and the drops the
        quiet interval hid); `final` (at stop) reports drops not yet logged."""
        self._drops_unlogged += len(dropped)
        now = time.monotonic()
        if not self._drops_unlogged or (not final and now - self._last_drop_log < _DROP_LOG_S):
            return
        self._last_drop_log = now
        stats = self._spool.stats()
        what = ", ".join(f"{name} seq {seq}" for name, seq in dropped) or "nothing more"
        log.warning(
            "spool full (%d rows, %d bytes; limits %d rows, %d bytes, policy %s): dropped %s; %d dropped since the "
            "last such message, %d dropped in total (ok %d, update %d, ng %d)",
            stats["spool_depth"], stats["spool_bytes"], self._spool.config.max_rows, self._spool.config.max_bytes,
            self._spool.config.policy, what, self._drops_unlogged, stats["dropped"],
            stats.get("dropped_ok", 0), stats.get("dropped_update", 0), stats.get("dropped_ng", 0),
        )
        self._drops_unlogged = 0

    def _spool_snapshot(self) -> dict[str, Any]:
        if self._closed:
            return dict(self._final_spool)
        spool = self._spool.stats()
        spool["last_seq"] = self._spool.counter("result_seq")
        spool["last_update_seq"] = self._spool.counter("update_seq")
        return spool

    # --- the sender thread --------------------------------------------------------------------

    def _sender_loop(self) -> None:
        state = _SenderState(window=self.config.max_inflight)
        while True:
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                self._supervise_network()
                self._sender_step(state)
            except Exception:  # noqa: BLE001 - the sender must outlive any one bad step
                self._counts["spool_errors"] += 1
                self._log.log(logging.ERROR, "sender step", "publishing from the spool failed; retrying", exc_info=True)
                time.sleep(0.5)
            if self._stop_sender.is_set():
                return

    def network_alive(self) -> bool:
        """paho's network thread runs (or the publisher was never started / is stopping)."""
        client = self._client
        if client is None or not self._started or self._stopping:
            return True
        return getattr(client, "_thread", None) is not None

    def hung_threads(self) -> list[str]:
        """Threads of the publisher that are dead and not coming back (the daemon's watchdog check)."""
        hung = []
        if self._sender is not None and not self._sender.is_alive() and not self._stop_sender.is_set():
            hung.append("mqtt-sender")
        if self.fatal_error is not None:
            hung.append("mqtt-network")
        return hung

    def _supervise_network(self) -> None:
        """Restart paho's network thread when it ended on its own: a fresh connect, then the spool is sent
        again from its oldest row (as after any disconnect)."""
        if self.network_alive() or self.fatal_error is not None:
            return
        client = self._client
        assert client is not None
        now = time.monotonic()
        while self._network_restarts and now - self._network_restarts[0] > _NETWORK_RESTART_WINDOW_S:
            self._network_restarts.popleft()
        if len(self._network_restarts) >= _NETWORK_RESTARTS:
            self.fatal_error = (
                f"the MQTT network thread (paho) ended {len(self._network_restarts) + 1} times within "
                f"{_NETWORK_RESTART_WINDOW_S:g} s; giving up so the service manager restarts the process"
            )
            log.error("%s", self.fatal_error)
            return
        self._network_restarts.append(now)
        self._counts["network_restarts"] += 1
        was_connected = self._connected
        self._connected = False
        self._events.append(("disconnected",))  # nothing in flight survives; resend from the oldest row
        log.error(
            "the MQTT network thread (paho) ended unexpectedly%s; restarting it with a new connection to %s "
            "(restart %d; results wait in the spool meanwhile)",
            " while connected" if was_connected else "", self.broker, self._counts["network_restarts"],
        )
        client.connect_async(
            self.config.host, self.config.broker_port, self.config.keepalive_s,
            **({"clean_start": True} if self.config.protocol == "5" else {}),
        )
        client.loop_start()

    def _sender_step(self, state: "_SenderState") -> None:
        """Apply connection events and PUBACKs in the order they happened, then top up the in-flight window."""
        while self._events:
            event = self._events.popleft()
            if event[0] == "ack":
                _, mid, failure = event
                if mid not in state.inflight:
                    continue  # status messages, or a connection we already gave up on
                if failure is None:
                    state.acked.append(mid)
                else:
                    row_id = state.inflight.pop(mid)
                    self._spool.unprotect([row_id])
                    self._counts["rejected"] += 1
                    self._log.log(logging.ERROR, "rejected", "broker rejected spool row %d (%s); it stays spooled and is "
                                  "retried after the next reconnect", row_id, failure)
            else:  # connected / disconnected: nothing in flight survives; resend from the oldest row
                self._delete_acked(state)
                state.inflight.clear()
                self._spool.unprotect()
                state.cursor = 0
                state.generation = event[1] if event[0] == "connected" else None
                if event[0] == "connected":
                    state.window = event[2]
        self._delete_acked(state)
        if state.generation is not None and state.generation == self._generation and self._connected:
            self._fill_window(state)
        self._counts["inflight"] = len(state.inflight)

    def _delete_acked(self, state: "_SenderState") -> None:
        if not state.acked:
            return
        try:
            self._spool.delete(state.inflight[mid] for mid in state.acked)
        except Exception:  # noqa: BLE001 - a broken spool must not stop publishing
            self._counts["spool_errors"] += 1
            self._log.log(logging.ERROR, "spool delete", "could not delete %d acknowledged row(s) from the spool; they "
                          "will be sent again", len(state.acked), exc_info=True)
        for mid in state.acked:
            state.inflight.pop(mid, None)
        self._counts["published"] += len(state.acked)
        state.acked.clear()

    def _fill_window(self, state: "_SenderState") -> None:
        client = self._client
        assert client is not None
        live_origin = f"{self._run_id}:{state.generation}"
        while len(state.inflight) < state.window:
            rows = self._spool.fetch_after(state.cursor, min(_SEND_BATCH, state.window - len(state.inflight)))
            if not rows:
                return
            for row in rows:
                live = row.origin == live_origin
                try:
                    payload = row.payload if live else mark_replayed(row.payload)
                except ValueError:
                    log.error("spool row %d (%s seq %d) is not valid JSON; removing it", row.id, row.kind, row.seq)
                    self._counts["spool_errors"] += 1
                    self._spool.delete([row.id])
                    state.cursor = row.id
                    continue
                info = client.publish(row.topic, payload, qos=1)
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    return  # the connection dropped under us; paho's copy is discarded at the next connect
                state.inflight[info.mid] = row.id
                self._spool.protect(row.id)
                state.cursor = row.id
                if not live:
                    self._counts["replayed"] += 1

    # --- paho ---------------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        if self.config.username and self._password is None:
            log.warning(
                "mqtt.username is set but no password was found (credential %r, env %s); connecting without one",
                self.config.password_credential, self.config.password_env,
            )
        if self._tls_context is not None and not self.config.tls.verify:
            log.warning("mqtt.tls.verify is false: the broker's certificate is not checked")
        client = make_client(self.config, self.client_id, password=self._password, tls=self._tls_context)
        client.on_log = self._on_paho_log
        client.suppress_exceptions = True  # a bug in a callback must not kill the network thread
        client.max_inflight_messages_set(self.config.max_inflight + 2)  # + status/stats
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(self.config.reconnect_min_s, self.config.reconnect_max_s)
        client.will_set(self.topics.status, STATUS_OFFLINE, qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            hint = ""
            if reason_code.value in _AUTH_REFUSALS:
                hint = (f"; check mqtt.username ({self.config.username!r}) and the password "
                        f"(credential {self.config.password_credential!r} or env {self.config.password_env}; "
                        f"used: {self._password_source})")
            self._refused = True
            self._record_error(f"broker {self.broker} refused the connection: {reason_code}{hint}")
            return
        client.drop_out_messages()  # the sender resends from the spool, in order, marked replayed
        self._last_socket_error = None
        window = self.config.max_inflight
        receive_maximum = getattr(properties, "ReceiveMaximum", None)
        if receive_maximum:
            window = max(1, min(window, int(receive_maximum) - 1))  # leave one for the status message
        self._generation += 1
        self._connected = True
        self._connected_since = time.time()
        self._counts["connects"] += 1
        failures, self._failures_since_connect = self._failures_since_connect, 0
        log.info("connected to %s%s", self.broker, f" after {failures} failed attempt(s)" if failures else "")
        client.publish(self.topics.status, STATUS_ONLINE, qos=1, retain=True)
        if self._last_stats is not None:
            client.publish(self.topics.stats, self._last_stats, qos=0, retain=True)
        self._commands_live = False
        client.subscribe([(topic, 1) for topic in self._commands.topics])
        self._events.append(("connected", self._generation, window))
        self._wake.set()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this from inside its `except OSError` block, so the exception is still current.
        self._record_error(describe_connect_error(sys.exc_info()[1], self.broker, self.config))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        was_connected = self._connected
        self._connected = False
        self._events.append(("disconnected",))
        self._wake.set()
        refused, self._refused = self._refused, False
        if self._stopping or refused:
            return
        if not was_connected:
            # The socket (and TLS) came up but the broker hung up before CONNACK.
            detail = self._last_socket_error or str(reason_code)
            hint = ""
            if "CERTIFICATE_REQUIRED" in detail.upper() or "CERTIFICATE REQUIRED" in detail.upper():
                hint = "; the broker requires a client certificate: set mqtt.tls.cert_file and mqtt.tls.key_file"
            elif self._tls_context is not None and "alert" in detail.lower():
                hint = "; the broker rejected the TLS session: check mqtt.tls.cert_file/key_file"
            self._record_error(f"{self.broker} closed the connection before accepting it ({detail}){hint}")
            return
        self._counts["disconnects"] += 1
        self._record_error(
            f"lost the connection to {self.broker} ({reason_code}); results are spooled until it is back",
            level=logging.WARNING, failure=False,
        )

    def _on_paho_log(self, client: mqtt.Client, userdata: Any, level: int, message: str) -> None:
        """paho's own log: socket errors are kept for the next error report, the rest goes to debug."""
        if level == mqtt.MQTT_LOG_ERR:
            if message.startswith("Client is not connected"):
                return  # paho says this on every reconnect attempt; _record_error reports the cause
            if message.startswith("failed to receive on socket"):
                self._last_socket_error = message.split(": ", 1)[-1]
                log.debug("paho: %s", message)
                return
            log.error("paho: %s", message)
        elif level == mqtt.MQTT_LOG_WARNING:
            log.warning("paho: %s", message)
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("paho: %s", message)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        failure = str(reason_code) if getattr(reason_code, "is_failure", False) else None
        self._events.append(("ack", mid, failure))
        self._wake.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        refused = [f"{topic} ({code})" for topic, code in zip(self._commands.topics, reason_codes) if code.is_failure]
        if refused:
            self._record_error(f"the broker refused the command subscription(s) {', '.join(refused)}: triggers, "
                               "product/set and questions on them are not received; check the broker's ACL for this "
                               "client", failure=False)
        self._commands_live = not refused

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._commands.dispatch(message.topic, message.payload, message.retain)

    def _record_error(self, message: str, level: int = logging.ERROR, failure: bool = True) -> None:
        """Remember a connection problem for state() and log it, once per change (or once a minute)."""
        now = time.time()
        self._last_error, self._last_error_at = message, now
        if failure:
            self._counts["connect_failures"] += 1
            self._failures_since_connect += 1
        last_message, last_time = self._last_logged
        if message != last_message or now - last_time >= _LOG_REPEAT_S:
            self._last_logged = (message, now)
            log.log(level, "%s (retrying with back-off up to %g s)", message, self.config.reconnect_max_s)
        else:
            log.debug("%s", message)


@dataclass
class _SenderState:
    """What the sender thread knows; only that thread touches it."""

    window: int  # most rows in flight in this connection
    inflight: dict[int, int] = field(default_factory=dict)  # paho mid -> spool row id
    acked: list[int] = field(default_factory=list)  # mids whose PUBACK arrived, rows not yet deleted
    cursor: int = 0  # highest row id handed to paho in this connection
    generation: int | None = None  # the connection being sent in; None = offline
