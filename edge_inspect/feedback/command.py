"""`edge-inspect feedback`'s work: send one operator verdict to the station's daemon, or apply it locally.

Default: publish it on `<prefix>/<station>/feedback` at the config's broker and wait for the
`feedback/result` with the same request_id. `--local`: apply it to the config's calibration and evidence
folders directly (the same FeedbackApplier as the daemon, under the same product lock), for when the
daemon is stopped. The command line is `commands/feedback.py`.

Example:
    run_cli(load_config("line3.yaml"), "5f0c...", "ok", operator="anna", local=True)   # exit code
"""

from __future__ import annotations

import json
import queue
import sys
import time
import uuid
from typing import Any

from ..errors import UserError
from ..mqtt.feedback import FeedbackRequest, feedback_message, feedback_result_payload, feedback_result_topic, feedback_topic, parse_feedback

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


def run_cli(config: Any, inspection_id: str, verdict: str, defect_type: str | None = None, operator: str | None = None,
            note: str | None = None, local: bool = False, evidence_dir: str | None = None,
            timeout_s: float = DEFAULT_TIMEOUT_S, as_json: bool = False, out: Any = None) -> int:
    """Returns 0 for applied or duplicate; raises FeedbackFailed (exit code 2) for an error or no result in time."""
    out = out or sys.stdout
    request = make_request(inspection_id, verdict, defect_type, operator, note)
    if local:
        body = apply_local(config, request, evidence_dir)
    else:
        body = send(config, request, timeout_s)
    payload = feedback_result_payload(config.station, body) if "schema_version" not in body else body
    if as_json:
        print(json.dumps(payload, ensure_ascii=False), file=out, flush=True)
    if payload["status"] == "error":
        raise FeedbackFailed(f"{payload['error_code']}: {payload['error']}")
    if not as_json:
        print(describe(payload), file=out, flush=True)
    if local and payload["status"] == "applied" and payload["calibration_version"] != payload["previous_version"]:
        print(f"a running daemon scores with version {payload['calibration_version']} after `systemctl reload "
              "edge-inspect` (SIGHUP) or its next product switch", file=sys.stderr)
    return 0


def apply_local(config: Any, request: FeedbackRequest, evidence_dir: str | None = None) -> dict[str, Any]:
    """Apply on the folders of the config (no daemon): the camera runs the product the config gives it."""
    from .apply import FeedbackApplier

    cameras = {camera.name: camera for camera in config.cameras}
    applier = FeedbackApplier(
        config.scoring.calibration_dir, config.scoring.engines_dir, evidence_dir or config.evidence.dir, config.feedback,
        camera=cameras.get, running_product=lambda name: cameras[name].product if name in cameras else None,
    )
    return applier.apply(request).body


def send(config: Any, request: FeedbackRequest, timeout_s: float) -> dict[str, Any]:
    """Publish the feedback at the station's broker and wait for its result (matched by request_id)."""
    from ..mqtt.client import make_client, tls_context
    from ..mqtt.payloads import Topics, encode

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


def describe(payload: dict[str, Any]) -> str:
    """One or more lines for a person: what happened, the versions, and the labelled-defect report."""
    product = payload.get("product", "?")
    head = {"applied": "applied", "duplicate": "already applied (duplicate)"}[payload["status"]]
    version, previous = payload.get("calibration_version"), payload.get("previous_version")
    if payload["verdict"] == "ok" and version != previous:
        what = f"product {product} calibration version {version} (was {previous}), threshold {payload['threshold']:.4g}"
    elif payload["verdict"] == "ok":
        what = f"product {product}: no new version (the scorer said OK already, or it was applied before)"
    else:
        what = f"product {product}: kept as a labelled defect (calibration version {version} unchanged)"
    lines = [f"{head}: {payload['verdict']} on inspection {payload['inspection_id']}; {what}"]
    report = payload.get("labelled_defects")
    if report:
        lines.append(f"labelled defects at threshold {report['threshold']:.4g} ({report['false_positives']} of "
                     f"{report['good_scores']} good scores above it):")
        for name, row in [*report["types"].items(), ("overall", report["overall"])]:
            recall = "-" if row["recall"] is None else f"{row['recall']:.0%}"
            precision = "-" if row["precision"] is None else f"{row['precision']:.0%}"
            lines.append(f"  {name:<16} n={row['n']:<4} detected={row['detected']:<4} recall={recall:<5} precision={precision}")
    return "\n".join(lines)
