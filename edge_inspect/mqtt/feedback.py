"""Operator feedback over MQTT: `<prefix>/<station>/feedback` in, `<prefix>/<station>/feedback/result` out (docs/mqtt.md).

Schemas: `schemas/feedback.json` and `schemas/feedback_result.json` (new in schema 1.2). A feedback message
that cannot be used but names an inspection_id or a request_id is still answered, with status "error";
only a payload that names neither (or is not a JSON object) is dropped, logged and counted as malformed,
like other commands. What applying one does is `edge_inspect.feedback`. `send_feedback` is the client side
(`edge-inspect feedback`): publish one request and wait for its result.

Example:
    request = parse_feedback(b'{"inspection_id": "5f0c...", "verdict": "ok", "operator": "anna"}')
    data = encode(feedback_result_payload("line3-cam1", {"inspection_id": "5f0c...", "status": "applied", ...}))
"""

from __future__ import annotations

import json
import queue
import sys
import time
import unicodedata
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import UserError
from .client import make_client, tls_context
from .payloads import (
    SCHEMA_VERSION,
    Topics,
    encode,
    is_command_id,
    iso_utc,
    json_object,
)

VERDICTS = ("ok", "ng")
STATUSES = ("applied", "duplicate", "error")
# Error codes on the feedback/result topic and in `edge-inspect feedback` (exit code 2).
ERROR_CODES = (
    "invalid_request", "unknown_inspection", "evidence_missing", "product_changed", "conflict",
    "calibration_failed", "disabled", "rate_limited", "queue_full", "stopping", "unavailable", "failed",
)
MAX_FEEDBACK_BYTES = 8192
MAX_DEFECT_TYPE_CHARS = 64
MAX_OPERATOR_CHARS = 128
MAX_NOTE_CHARS = 1000
_KEYS = {"inspection_id", "verdict", "defect_type", "operator", "note", "request_id"}


@dataclass(frozen=True)
class FeedbackRequest:
    """One operator verdict (the parsed feedback payload). `error` is set when the payload was unusable but
    could still be answered (it named an inspection_id or a request_id)."""

    inspection_id: str
    verdict: str  # "ok" | "ng" ("" when unusable)
    defect_type: str | None = None
    operator: str | None = None
    note: str | None = None
    request_id: str | None = None
    received_at: float = 0.0  # time.time() when it arrived
    error: str | None = None


def feedback_topic(topics: Topics) -> str:
    return f"{topics.base}/feedback"


def feedback_result_topic(topics: Topics) -> str:
    return f"{topics.base}/feedback/result"


def _text_problem(name: str, value: Any, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        return f"{name} must be a non-empty string (or left out)"
    if len(value) > limit:
        return f"{name} has {len(value)} characters; at most {limit}"
    allowed = ("\n", "\t") if name == "note" else ()  # a note may have lines
    if any(unicodedata.category(c) == "Cc" and c not in allowed for c in value):
        return f"{name} contains control characters"
    return None


def parse_feedback(payload: bytes, now: float | None = None) -> FeedbackRequest:
    """Parse a feedback payload. ValueError only when no result can be addressed (not a JSON object, or
    neither a usable inspection_id nor a usable request_id); every other problem comes back as a
    FeedbackRequest with `error` set, answered with invalid_request."""
    received_at = time.time() if now is None else now
    data = json_object(payload, "feedback", MAX_FEEDBACK_BYTES)
    inspection_id, request_id = data.get("inspection_id"), data.get("request_id")
    if not is_command_id(inspection_id) and not is_command_id(request_id):
        raise ValueError("feedback payload needs the inspection_id of a result (1-64 letters, digits, _ or -); "
                         "the result on feedback/result carries it")
    verdict = data.get("verdict")
    defect_type, operator, note = data.get("defect_type"), data.get("operator"), data.get("note")
    unknown = sorted(set(data) - _KEYS)
    error = None
    if unknown:
        error = f"unknown keys {unknown}; allowed: {', '.join(sorted(_KEYS))}"
    elif not is_command_id(inspection_id):
        error = "inspection_id must be the inspection_id of a result (1-64 letters, digits, _ or -)"
    elif request_id is not None and not is_command_id(request_id):
        error = "request_id must be 1-64 letters, digits, _ or - (or left out)"
    elif verdict not in VERDICTS:
        error = f'verdict must be "ok" (the part is good) or "ng" (the part is defective), got {verdict!r}'
    elif defect_type is not None and verdict != "ng":
        error = "defect_type goes with verdict \"ng\" only (a good part has no defect type)"
    else:
        error = (_text_problem("defect_type", defect_type, MAX_DEFECT_TYPE_CHARS)
                 or _text_problem("operator", operator, MAX_OPERATOR_CHARS)
                 or _text_problem("note", note, MAX_NOTE_CHARS))
    return FeedbackRequest(
        inspection_id=inspection_id if is_command_id(inspection_id) else "",
        verdict=verdict if verdict in VERDICTS else "",
        defect_type=defect_type.strip() if isinstance(defect_type, str) and not error else None,
        operator=operator.strip() if isinstance(operator, str) and not error else None,
        note=note.strip() if isinstance(note, str) and not error else None,
        request_id=request_id if is_command_id(request_id) else None,
        received_at=received_at,
        error=error,
    )


def feedback_message(request: FeedbackRequest) -> dict[str, Any]:
    """The feedback payload of a request (what `edge-inspect feedback` publishes)."""
    out: dict[str, Any] = {"inspection_id": request.inspection_id, "verdict": request.verdict}
    for key in ("defect_type", "operator", "note", "request_id"):
        value = getattr(request, key)
        if value is not None:
            out[key] = value
    return out


_OPTIONAL = ("request_id", "product", "camera", "error_code", "error", "labelled_defects")
_NULLABLE = ("calibration_version", "previous_version", "threshold")


def feedback_result_payload(station: str, body: Mapping[str, Any], timestamp: float | None = None) -> dict[str, Any]:
    """The `.../feedback/result` message for a result body of `edge_inspect.feedback` (schema: feedback_result.json)."""
    status = body.get("status")
    if status not in STATUSES:
        raise ValueError(f"feedback result status must be one of {STATUSES}, got {status!r}")
    if status == "error" and body.get("error_code") not in ERROR_CODES:
        raise ValueError(f"an error result needs an error_code from {ERROR_CODES}, got {body.get('error_code')!r}")
    if status != "error" and body.get("verdict") not in VERDICTS:
        raise ValueError(f"an {status} result needs the verdict, one of {VERDICTS}")
    inspection_id = body.get("inspection_id")
    verdict = body.get("verdict")
    payload: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "type": "feedback_result",
        "inspection_id": inspection_id if is_command_id(inspection_id) else None,
        "station": station,
        "timestamp": iso_utc(time.time() if timestamp is None else timestamp),
        "status": status,
        "verdict": verdict if verdict in VERDICTS else None,
    }
    for key in _NULLABLE:
        payload[key] = body.get(key)
    for key in _OPTIONAL:
        if body.get(key) is not None:
            payload[key] = body[key]
    return payload


DEFAULT_TIMEOUT_S = 120.0  # a refit takes seconds to a minute on a small box, behind other feedback


class FeedbackFailed(UserError):
    """Feedback that was not applied (exit code 2); the message has the error code and the reason."""


def make_request(inspection_id: str, verdict: str, defect_type: str | None = None, operator: str | None = None,
                 note: str | None = None) -> FeedbackRequest:
    """The request the CLI sends, checked by the same parser the daemon uses."""
    message = {"inspection_id": inspection_id, "verdict": verdict, "request_id": f"cli-{uuid.uuid4().hex[:16]}"}
    message.update({k: v for k, v in (("defect_type", defect_type), ("operator", operator), ("note", note)) if v is not None})
    try:
        request = parse_feedback(json.dumps(message).encode("utf-8"))
    except ValueError as exc:
        raise FeedbackFailed(f"invalid_request: {exc}") from None
    if request.error:
        raise FeedbackFailed(f"invalid_request: {request.error}")
    return request


def send_feedback(config: Any, request: FeedbackRequest, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Publish the feedback at the station's broker and wait for its result (matched by request_id)."""
    mqtt = config.mqtt
    topics = Topics(mqtt.topic_prefix, config.station)
    result_topic = feedback_result_topic(topics)
    inbox: queue.Queue = queue.Queue()
    client = make_client(mqtt, "", password=mqtt.resolve_password()[0] if mqtt.username else None,
                         tls=tls_context(mqtt) if mqtt.tls.enabled else None)
    client.suppress_exceptions = True
    client.reconnect_delay_set(mqtt.reconnect_min_s, mqtt.reconnect_max_s)
    sent = {"done": False}

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            inbox.put(("error", f"broker {mqtt.host}:{mqtt.broker_port} refused the connection: {reason_code}"))
            return
        client.subscribe([(result_topic, 1)])

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        if any(code.is_failure for code in reason_codes):
            inbox.put(("error", f"subscribing to {result_topic} was refused (broker ACL?)"))
        elif not sent["done"]:  # subscribed first, so the result cannot be missed
            sent["done"] = True
            client.publish(feedback_topic(topics), encode(feedback_message(request)), qos=1)

    def on_connect_fail(client, userdata):
        inbox.put(("error", f"cannot connect to {mqtt.host}:{mqtt.broker_port} ({sys.exc_info()[1] or 'unknown error'})"))

    def on_message(client, userdata, message):
        try:
            payload = json.loads(message.payload)
        except ValueError:
            return
        if isinstance(payload, dict) and payload.get("request_id") == request.request_id:
            inbox.put(("result", payload))

    client.on_connect, client.on_subscribe = on_connect, on_subscribe
    client.on_connect_fail, client.on_message = on_connect_fail, on_message
    client.connect_async(mqtt.host, mqtt.broker_port, mqtt.keepalive_s)
    client.loop_start()
    last_error = None
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                where = "no connection to the broker" if not sent["done"] else "the feedback was sent"
                raise FeedbackFailed(
                    f"timeout: no feedback result within {timeout_s:g} s ({where}{'; last error: ' + last_error if last_error else ''}); "
                    f"is `edge-inspect run` up for station {config.station}? With the daemon stopped use --local"
                )
            try:
                kind, item = inbox.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if kind == "result":
                return item
            if item != last_error:
                print(f"error: {item}; retrying", file=sys.stderr, flush=True)
            last_error = item
    finally:
        client.disconnect()
        client.loop_stop()
