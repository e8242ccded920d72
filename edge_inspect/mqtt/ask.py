"""Follow-up questions over MQTT: `<prefix>/<station>/ask` in, `<prefix>/<station>/answer` out (docs/mqtt.md).

Schemas: `schemas/ask.json` and `schemas/answer.json` (versioned like every payload). A question that
cannot be used but names a request_id is still answered, with an error (status "error"); only a
payload without a usable request_id is dropped (logged and counted as malformed, like other commands).

Example:
    request = parse_ask(b'{"inspection_id": "5f0c...", "question": "Which side?", "request_id": "r-1"}')
    data = encode(answer_payload("line3-cam1", {"request_id": "r-1", ..., "status": "answered", "answer": "..."}))
"""

from __future__ import annotations

import time
from typing import Any, Mapping

from dataclasses import dataclass

from .. import records
from .payloads import SCHEMA_VERSION, Topics, is_command_id, iso_utc, json_object

# Error codes on the answer topic and in `edge-inspect ask` (exit code 2).
ERROR_CODES = (
    "invalid_request", "unknown_inspection", "question_too_long", "conversation_full", "vlm_disabled",
    "vlm_unavailable", "rate_limited", "queue_full", "busy", "failed", "stopping",
)
ANSWER_KINDS = ("open", "yes_no", "location")
MAX_ASK_BYTES = 16384
MAX_QUESTION_CHARS = 4000  # the schema's bound; vlm.ask.max_question_chars is the configured one
_KEYS = {"inspection_id", "question", "conversation_id", "request_id"}


@dataclass(frozen=True)
class AskRequest:
    """One question (the parsed ask payload). `error` is set when the payload was unusable but had a request_id."""

    inspection_id: str
    question: str
    request_id: str
    conversation_id: str | None = None
    received_at: float = 0.0  # time.time() when it arrived
    error: str | None = None


def ask_topic(topics: Topics) -> str:
    return f"{topics.base}/ask"


def answer_topic(topics: Topics) -> str:
    return f"{topics.base}/answer"


def parse_ask(payload: bytes, now: float | None = None) -> AskRequest:
    """Parse an ask payload. ValueError only when no answer can be addressed (no usable request_id);
    every other problem comes back as an AskRequest with `error` set, answered with invalid_request."""
    received_at = time.time() if now is None else now
    data = json_object(payload, "ask", MAX_ASK_BYTES)
    request_id = data.get("request_id")
    if not is_command_id(request_id):
        raise ValueError("ask payload needs a request_id of 1-64 letters, digits, _ . : or - (the answer carries it)")
    inspection_id = data.get("inspection_id")
    question = data.get("question")
    conversation_id = data.get("conversation_id")
    error = None
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        error = f"unknown keys {unknown}; allowed: {', '.join(sorted(_KEYS))}"
    elif not is_command_id(inspection_id):
        error = "inspection_id must be the inspection_id of a result (1-64 letters, digits, _ . : or -)"
    elif not isinstance(question, str):
        error = "question must be a string"
    elif len(question) > MAX_QUESTION_CHARS:
        error = f"question has {len(question)} characters; at most {MAX_QUESTION_CHARS}"
    elif conversation_id is not None and not is_command_id(conversation_id):
        error = "conversation_id must be 1-64 letters, digits, _ . : or - (or left out)"
    return AskRequest(
        inspection_id=inspection_id if isinstance(inspection_id, str) and len(inspection_id) <= 256 else "",
        question=question if isinstance(question, str) else "",
        request_id=request_id,
        conversation_id=conversation_id if is_command_id(conversation_id) else None,
        received_at=received_at,
        error=error,
    )


_OPTIONAL = ("kind", "turn", "yes_no", "location", "model", "latency_ms", "prompt_tokens", "generated_tokens",
             "dropped_turns", "error_code", "error")


def answer_payload(station: str, body: Mapping[str, Any], timestamp: float | None = None) -> dict[str, Any]:
    """The `.../answer` message for an Asker body (schema: answer.json)."""
    status = body.get("status")
    if status not in ("answered", "error"):
        raise ValueError(f"answer status must be 'answered' or 'error', got {status!r}")
    if status == "error" and body.get("error_code") not in ERROR_CODES:
        raise ValueError(f"an error answer needs an error_code from {ERROR_CODES}, got {body.get('error_code')!r}")
    if status == "answered" and (body.get("kind") not in ANSWER_KINDS or not isinstance(body.get("answer"), str)):
        raise ValueError(f"an answer needs the answer text and a kind from {ANSWER_KINDS}")
    answer = body.get("answer")
    inspection_id = str(body.get("inspection_id") or "")
    payload: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "type": "answer",
        "request_id": body["request_id"],
        "inspection_id": inspection_id if records.is_inspection_id(inspection_id) else None,
        "conversation_id": body.get("conversation_id"),
        "station": station,
        "timestamp": iso_utc(time.time() if timestamp is None else timestamp),
        "status": status,
        "answer": answer if status == "answered" else None,
    }
    for key in _OPTIONAL:
        if body.get(key) is not None:
            payload[key] = body[key]
    return payload
