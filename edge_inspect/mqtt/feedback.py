"""Operator feedback over MQTT: `<prefix>/<station>/feedback` in, `<prefix>/<station>/feedback/result` out (docs/mqtt.md).

Schemas: `schemas/feedback.json` and `schemas/feedback_result.json` (new in schema 1.2). A feedback message
that cannot be used but names an inspection_id or a request_id is still answered, with status "error";
only a payload that names neither (or is not a JSON object) is dropped, logged and counted as malformed,
like other commands. What applying one does is `edge_inspect.feedback`.

Example:
    request = parse_feedback(b'{"inspection_id": "5f0c...", "verdict": "ok", "operator": "anna"}')
    data = encode(feedback_result_payload("line3-cam1", {"inspection_id": "5f0c...", "status": "applied", ...}))
"""

from __future__ import annotations

import time
import unicodedata
from dataclasses import dataclass
from typing import Any, Mapping

from .payloads import SCHEMA_VERSION, Topics, is_command_id, iso_utc, json_object

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
