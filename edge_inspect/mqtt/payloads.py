"""The MQTT topic layout and every payload edge-inspect publishes or accepts (docs/mqtt.md).

Published payloads are versioned JSON objects described by the JSON Schemas in
`edge_inspect/mqtt/schemas/` (`load_schema("result")`); the tests validate every message against them.
Incoming commands (trigger, product/set) are parsed strictly: anything malformed raises ValueError
with a reason, which the publisher logs and counts.

Example:
    topics = Topics("edge-inspect", "station-1")
    data = encode(result_payload(inspection, seq=42))   # bytes for topics.result
    command = parse_trigger(b'{"part_id": "A-1001"}')    # TriggerCommand(part_id='A-1001', ...)
"""

from __future__ import annotations

import json
import math
import time
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from typing import Any, Mapping

from .. import records

# Major changes break subscribers (a field renamed or removed); minor ones only add optional fields.
SCHEMA_VERSION = "1.3"  # 1.1: optional final_verdict / decided_by in result updates; 1.2: calibration_version, feedback; 1.3: stats pipeline.stream, mqtt.commands_subscribed
SCHEMA_NAMES = ("result", "result_update", "stats", "trigger", "product_set", "ask", "answer",  # ask/answer: mqtt/ask.py
                "feedback", "feedback_result")  # mqtt/feedback.py

STATUS_ONLINE = "online"
STATUS_OFFLINE = "offline"  # the last will: the broker publishes it when the daemon vanishes
STATUS_STOPPED = "stopped"  # clean shutdown

MAX_COMMAND_BYTES = 4096
MAX_PART_ID_CHARS = 128
_VLM_STATUSES = ("pending", "done", "failed", "skipped")
_UPDATE_KEYS = ("vlm_status", "vlm", "error", "final_verdict", "decided_by")
_DECIDERS = ("scorer", "vlm")


@dataclass(frozen=True)
class Topics:
    """Every topic of one station: `<prefix>/<station>/...`."""

    prefix: str
    station: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.station}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def result(self) -> str:
        return f"{self.base}/result"

    @property
    def result_update(self) -> str:
        return f"{self.base}/result/update"

    @property
    def stats(self) -> str:
        return f"{self.base}/stats"

    @property
    def trigger(self) -> str:
        return f"{self.base}/trigger"

    @property
    def product_set(self) -> str:
        return f"{self.base}/product/set"

    def image(self, inspection_id: str) -> str:
        return f"{self.base}/image/{inspection_id}"


def check_station(station: str) -> str:
    """Stations become a topic level; reject anything that is not a plain name."""
    if not records.is_plain_name(station):
        raise ValueError(
            f"station {station!r} is not a valid name (letters, digits, _ . -, 1-64 characters, no '/', '+' or '#')"
        )
    return station


def iso_utc(timestamp: float) -> str:
    """Seconds since the epoch -> '2025-03-01T12:00:00.123Z'."""
    moment = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode(payload: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON; NaN and infinities are refused (they are not JSON)."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


@lru_cache(maxsize=1)
def typical_result_bytes() -> int:
    """Size of a typical result message (NG, two regions, a part id, an evidence path): how the spool's
    capacity is told in results rather than bytes."""
    inspection = records.Inspection(
        inspection_id="5f0c2a9e8d7b4c1a9e3f6b2d4c8a1e07", station="line3-cam1", camera="top", product="bracket-a",
        frame_id=123456, timestamp=1_750_000_000.123, score=0.8123, threshold=0.5, verdict="NG",
        regions=(records.Region((10, 20, 60, 90), 2.5, 0.93, ("top left", "top")),
                 records.Region((200, 200, 220, 230), 0.31, 0.61, ("center",))),
        part_id="A-1001", latency_ms={"capture": 1.2, "score": 35.712, "localize": 2.0, "total": 40.1},
        calibration_id="cal-3f2a", calibration_version=3, model_id="effnet-lite0-9c1d", vlm_status="pending",
        evidence_path="20250615/5f0c2a9e8d7b4c1a9e3f6b2d4c8a1e07.jpg",
    )
    return len(encode(result_payload(inspection, 4711)))


def mark_replayed(data: bytes) -> bytes:
    """The same message with `replayed: true` (sent from the spool after an outage or a restart)."""
    payload = json.loads(data)
    payload["replayed"] = True
    return encode(payload)


def _finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} is {value}; a result needs a finite number (a scorer bug upstream?)")
    return value


def check_inspection_id(inspection_id: str) -> str:
    if not records.is_inspection_id(inspection_id):
        raise ValueError(f"inspection_id {inspection_id!r} must be 1-64 letters, digits, _ or - (records.new_inspection_id())")
    return inspection_id


def result_payload(inspection: records.Inspection, seq: int, replayed: bool = False) -> dict[str, Any]:
    """The `.../result` message for one inspection (schema: result.json)."""
    check_inspection_id(inspection.inspection_id)
    if seq < 1:
        raise ValueError(f"seq must be >= 1, got {seq}")
    if inspection.verdict not in ("OK", "NG"):
        raise ValueError(f"verdict must be 'OK' or 'NG', got {inspection.verdict!r}")
    if inspection.vlm_status not in _VLM_STATUSES:
        raise ValueError(f"vlm_status must be one of {_VLM_STATUSES}, got {inspection.vlm_status!r}")
    return {
        "schema_version": SCHEMA_VERSION,
        "type": "result",
        "inspection_id": inspection.inspection_id,
        "seq": int(seq),
        "timestamp": iso_utc(inspection.timestamp),
        "station": inspection.station,
        "camera": inspection.camera,
        "product": inspection.product,
        "frame_id": int(inspection.frame_id),
        "part_id": inspection.part_id,
        "score": _finite("score", inspection.score),
        "threshold": _finite("threshold", inspection.threshold),
        "verdict": inspection.verdict,
        "regions": [region.to_json() for region in inspection.regions],
        "latency_ms": {stage: round(_finite(f"latency_ms.{stage}", ms), 3) for stage, ms in inspection.latency_ms.items()},
        "model_id": inspection.model_id,
        "calibration_id": inspection.calibration_id,
        "calibration_version": inspection.calibration_version,
        "vlm_status": inspection.vlm_status,
        "evidence_path": inspection.evidence_path,
        "replayed": bool(replayed),
    }


def vlm_update(status: str, verdict: records.Verdict | None = None, error: str | None = None) -> dict[str, Any]:
    """The `update` argument of ResultPublisher.publish_update, built from the VLM stage's outcome.

    Example: publisher.publish_update(inspection_id, vlm_update("done", verdict))
    """
    update: dict[str, Any] = {"vlm_status": status}
    if verdict is not None:
        update["vlm"] = verdict.to_json()
    if error is not None:
        update["error"] = error
    return update


def update_payload(
    inspection_id: str, station: str, seq: int, update: Mapping[str, Any],
    timestamp: float | None = None, replayed: bool = False,
) -> dict[str, Any]:
    """The `.../result/update` message: the VLM's verdict for an earlier result (schema: result_update.json).

    `final_verdict` and `decided_by` come together, only when the VLM may change the verdict
    (vlm.allow_downgrade): "OK"/"vlm" is a downgrade, otherwise the scorer's verdict stands.
    """
    check_inspection_id(inspection_id)
    unknown = set(update) - set(_UPDATE_KEYS)
    if unknown:
        raise ValueError(f"update has unknown keys {sorted(unknown)}; allowed: {', '.join(_UPDATE_KEYS)} (see vlm_update())")
    status = update.get("vlm_status")
    if status not in ("done", "failed", "skipped"):
        raise ValueError(f"update vlm_status must be 'done', 'failed' or 'skipped', got {status!r}")
    vlm = update.get("vlm")
    if status == "done" and not isinstance(vlm, Mapping):
        raise ValueError("an update with vlm_status 'done' needs the verdict in 'vlm' (Verdict.to_json())")
    error = update.get("error")
    if error is not None and not isinstance(error, str):
        raise ValueError(f"update error must be a string, got {type(error).__name__}")
    decision = _decision(update, status)
    return {
        "schema_version": SCHEMA_VERSION,
        "type": "result_update",
        "inspection_id": inspection_id,
        "seq": int(seq),
        "timestamp": iso_utc(time.time() if timestamp is None else timestamp),
        "station": station,
        "vlm_status": status,
        "vlm": dict(vlm) if vlm is not None else None,
        "error": error,
        **decision,
        "replayed": bool(replayed),
    }


def _decision(update: Mapping[str, Any], status: str) -> dict[str, str]:
    """The optional final_verdict / decided_by pair of an update, checked ({} when absent)."""
    if "final_verdict" not in update and "decided_by" not in update:
        return {}
    final, decided_by = update.get("final_verdict"), update.get("decided_by")
    if final not in ("OK", "NG") or decided_by not in _DECIDERS:
        raise ValueError(
            f"an update with a decision needs final_verdict 'OK' or 'NG' and decided_by 'scorer' or 'vlm', "
            f"got {final!r} / {decided_by!r} (vlm.stage.build_update(..., decision=...))"
        )
    if decided_by == "vlm" and (status != "done" or final != "OK"):
        raise ValueError(
            f"decided_by 'vlm' means the VLM downgraded NG to OK: it needs vlm_status 'done' and final_verdict "
            f"'OK', got {status!r} / {final!r}"
        )
    return {"final_verdict": final, "decided_by": decided_by}


def stats_payload(station: str, pipeline: Mapping[str, Any], mqtt: Mapping[str, Any], timestamp: float | None = None) -> dict[str, Any]:
    """The `.../stats` message: the daemon's own counters (`pipeline`) and the publisher's (`mqtt`)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "type": "stats",
        "station": station,
        "timestamp": iso_utc(time.time() if timestamp is None else timestamp),
        "pipeline": _plain_json(dict(pipeline), "stats"),
        "mqtt": _plain_json(dict(mqtt), "state"),
    }


def _plain_json(value: Any, where: str) -> Any:
    """numpy scalars and tuples -> plain JSON types; anything else unserialisable is a ValueError."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _plain_json(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_json(v, f"{where}[]") for v in value]
    item = getattr(value, "item", None)  # numpy scalar
    if callable(item):
        return _plain_json(item(), where)
    raise ValueError(f"{where}: {type(value).__name__} is not JSON; pass numbers, strings, lists or dicts")


# --- incoming commands ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TriggerCommand:
    """A request to inspect the next frame, from a PLC/MES (`.../trigger`)."""

    part_id: str | None = None  # echoed in the result
    received_at: float = 0.0  # UTC seconds since the epoch when the message arrived


# Commands are flat objects; a deeper payload is refused before json.loads (which recurses per level).
MAX_COMMAND_NESTING = 8


def _check_nesting(text: str, what: str) -> None:
    """Refuse JSON nested deeper than MAX_COMMAND_NESTING, counting brackets outside strings."""
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_COMMAND_NESTING:
                raise ValueError(f"{what} payload is nested more than {MAX_COMMAND_NESTING} levels deep; send a flat JSON object")
        elif char in "]}":
            depth -= 1


COMMAND_ID_CHARS = 64


def is_command_id(value: Any) -> bool:
    """An inspection_id, request_id or conversation_id a command may carry (the records' id alphabet, 1-64)."""
    return isinstance(value, str) and len(value) <= COMMAND_ID_CHARS and records.is_inspection_id(value)


def json_object(payload: bytes, what: str, max_bytes: int = MAX_COMMAND_BYTES) -> dict[str, Any]:
    """A command payload as a flat JSON object; ValueError naming `what` for anything else (too big, not
    UTF-8 JSON, nested too deep, a repeated key, NaN/Infinity, not an object)."""
    if len(payload) > max_bytes:
        raise ValueError(f"{what} payload is {len(payload)} bytes; at most {max_bytes}")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} payload is not JSON (not UTF-8 text)") from None
    _check_nesting(text, what)

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if len(keys) != len(set(keys)):
            raise ValueError(f"{what} payload repeats a key")
        return dict(pairs)

    def no_constant(name: str) -> Any:
        raise ValueError(f"{what} payload contains {name}, which is not JSON")

    try:
        data = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} payload is not JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} payload must be a JSON object, got {type(data).__name__}")
    return data


def _has_control_chars(text: str) -> bool:
    return any(unicodedata.category(char) == "Cc" for char in text)


def parse_trigger(payload: bytes, now: float | None = None) -> TriggerCommand:
    """Parse a trigger: `{}` (no part id) or `{"part_id": "..."}`. Raises ValueError when malformed.

    An empty payload is refused: it is also what subscribers receive when someone clears a
    retained trigger, which must not start an inspection.
    """
    received_at = time.time() if now is None else now
    if not payload.strip():
        raise ValueError("trigger payload is empty (a cleared retained message?); send {} for a trigger without part id")
    data = json_object(payload, "trigger")
    unknown = set(data) - {"part_id"}
    if unknown:
        raise ValueError(f"trigger has unknown keys {sorted(unknown)}; allowed: part_id")
    part_id = data.get("part_id")
    if part_id is not None:
        if not isinstance(part_id, str):
            raise ValueError(f"trigger part_id must be a string, got {type(part_id).__name__}")
        if not part_id.strip():
            raise ValueError(f"trigger part_id {part_id!r} is blank (only whitespace); send a part id with visible "
                             "characters, or leave part_id out")
        if len(part_id) > MAX_PART_ID_CHARS:
            raise ValueError(f"trigger part_id must have 1-{MAX_PART_ID_CHARS} characters, got {len(part_id)}")
        if _has_control_chars(part_id):
            raise ValueError("trigger part_id contains control characters")
    return TriggerCommand(part_id, received_at)


def parse_product_set(payload: bytes) -> str:
    """Parse a product switch: a bare name (`bracket-a`), a JSON string or `{"product": "bracket-a"}`. Raises ValueError."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise ValueError(f"product/set payload is {len(payload)} bytes; at most {MAX_COMMAND_BYTES}")
    stripped = payload.strip()
    if stripped.startswith(b'"'):
        try:
            name = json.loads(stripped.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("product/set payload starts with '\"' but is not a JSON string") from None
        if not isinstance(name, str):
            raise ValueError("product/set payload is not a JSON string")
    elif stripped.startswith((b"{", b"[")) or stripped in (b"null", b"true", b"false"):
        data = json_object(stripped, "product/set")
        unknown = set(data) - {"product"}
        if unknown or "product" not in data:
            raise ValueError(f'product/set object must be {{"product": NAME}}, got keys {sorted(data)}')
        name = data["product"]
        if not isinstance(name, str):
            raise ValueError(f"product/set product must be a string, got {type(name).__name__}")
    else:
        try:
            name = stripped.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("product/set payload is not UTF-8 text") from None
    if not records.is_product_name(name):
        raise ValueError(
            f"product/set name {name[:80]!r} is not a product name (letters, digits, _ . -, 1-64 characters)"
        )
    return name


# --- schemas -------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _schema_text(name: str) -> str:
    if name not in SCHEMA_NAMES:
        raise ValueError(f"no schema {name!r}; known: {', '.join(SCHEMA_NAMES)}")
    return resources.files(__package__).joinpath("schemas", f"{name}.json").read_text(encoding="utf-8")


def load_schema(name: str) -> dict[str, Any]:
    """The JSON Schema of one payload type (a fresh dict; see SCHEMA_NAMES)."""
    return json.loads(_schema_text(name))
