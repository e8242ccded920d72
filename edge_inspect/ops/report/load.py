"""Reading a run: the evidence folder and/or a JSON-lines log of the MQTT stream, merged by inspection id."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ...errors import UserError


@dataclass
class ResultRow:
    """One inspection: its result payload (with any update merged in) and its evidence files."""

    payload: dict[str, Any]
    time: float  # UTC seconds since the epoch
    files: dict[str, Path] = field(default_factory=dict)  # frame / overlay / map that exist on disk
    conversations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # follow-up Q&A by conversation id

    @property
    def inspection_id(self) -> str:
        return str(self.payload.get("inspection_id", ""))

    @property
    def flagged(self) -> bool:
        """The scorer flagged it (NG), whatever the VLM said later."""
        return self.payload.get("verdict") == "NG"

    @property
    def final_verdict(self) -> str:
        """The verdict that counts: the update's final_verdict (vlm.allow_downgrade) or the scorer's."""
        return str(self.payload.get("final_verdict") or self.payload.get("verdict") or "?")

    @property
    def downgraded(self) -> bool:
        """The VLM downgraded the scorer's NG to OK (decided_by: vlm)."""
        return self.payload.get("decided_by") == "vlm" and self.final_verdict == "OK"


@dataclass
class RunData:
    """Everything a report shows, in time order."""

    rows: list[ResultRow]
    sources: list[str]
    skipped_lines: int = 0  # JSONL lines that were not a result or update payload
    duplicates: int = 0  # results received more than once (QoS 1 is at-least-once)
    orphan_updates: int = 0  # updates whose result is not in the sources
    stats: dict[str, Any] | None = None  # the last stats payload of the stream, when recorded


def parse_time(value: Any) -> float | None:
    """An ISO-8601 timestamp ('...Z', offset, or naive = UTC) or epoch seconds -> epoch seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def parse_since(text: str, now: float | None = None) -> float:
    """`--since`: a duration back from now ('90s', '30m', '2h', '7d') or a date/time (local time
    when it has no offset: '2025-01-14', '2025-01-14 06:00', '2025-01-14T06:00:00Z')."""
    now = time.time() if now is None else now
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if match:
        seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
        return now - float(match.group(1)) * seconds
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UserError(
            f"--since {text!r}: expected a duration like 30m, 2h, 7d or a date/time like 2025-01-14 06:00"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # a person types local wall-clock time
    return moment.timestamp()


def load_run(
    evidence_dir: str | Path | None = None,
    results_file: str | Path | None = None,
    since: float | None = None,
    until: float | None = None,
) -> RunData:
    """Read results from an evidence folder and/or a JSONL stream log, joined by inspection id."""
    if evidence_dir is None and results_file is None:
        raise UserError("nothing to report on: give --evidence DIR and/or --results FILE")
    rows: dict[str, ResultRow] = {}
    run = RunData(rows=[], sources=[])
    if results_file is not None:
        _read_stream(Path(results_file), rows, run)
    if evidence_dir is not None:
        _read_evidence(Path(evidence_dir), rows, run, since)
    selected = [
        row for row in rows.values()
        if (since is None or row.time >= since) and (until is None or row.time <= until)
    ]
    run.rows = sorted(selected, key=lambda row: (row.time, row.payload.get("seq") or 0))
    return run


def _read_stream(path: Path, rows: dict[str, ResultRow], run: RunData) -> None:
    try:
        handle = open(path, encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UserError(f"--results {path}: cannot read it ({exc.strerror or exc})") from None
    run.sources.append(f"stream log {path}")
    updates: list[dict[str, Any]] = []
    with handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                payload = json.loads(line)
            except json.JSONDecodeError:
                run.skipped_lines += 1
                continue
            kind = payload.get("type") if isinstance(payload, dict) else None
            if kind == "result":
                inspection_id = payload.get("inspection_id")
                moment = parse_time(payload.get("timestamp"))
                if not isinstance(inspection_id, str) or moment is None:
                    run.skipped_lines += 1
                elif inspection_id in rows:
                    run.duplicates += 1
                else:
                    rows[inspection_id] = ResultRow(dict(payload), moment)
            elif kind == "result_update":
                updates.append(payload)
            elif kind == "stats":
                run.stats = payload
            elif not isinstance(payload, dict) or "inspection_id" in payload:
                run.skipped_lines += 1  # meant to be a result, but is not one
            # other JSON objects (e.g. the summary line of `edge-inspect listen --json`) are not results
    for update in updates:  # after the whole log: an update may arrive before a replayed result
        row = rows.get(update.get("inspection_id"))
        if row is None:
            run.orphan_updates += 1
            continue
        _merge_update(row.payload, update)


def _merge_update(payload: dict[str, Any], update: dict[str, Any]) -> None:
    for key in ("vlm_status", "vlm", "error", "final_verdict", "decided_by"):
        if key in update:
            payload[key] = update[key]


def _read_evidence(root: Path, rows: dict[str, ResultRow], run: RunData, since: float | None) -> None:
    if not root.is_dir():
        raise UserError(f"--evidence {root}: no such folder (evidence.dir in the config)")
    run.sources.append(f"evidence folder {root}")
    first_day = time.strftime("%Y%m%d", time.gmtime(since - 86400)) if since is not None else ""
    for day in sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"\d{8}", p.name)):
        if day.name < first_day:
            continue  # whole days before --since are not read at all
        for json_path in sorted(day.glob("*.json")):
            try:
                body = json.loads(json_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                run.skipped_lines += 1
                continue
            if not isinstance(body, dict):
                run.skipped_lines += 1
                continue
            inspection_id = body.get("inspection_id") or json_path.name.split(".", 1)[0]
            block = body.pop("evidence", None) or {}
            files = {
                kind: day / name
                for kind in ("frame", "overlay", "map")
                if isinstance(name := block.get(kind), str) and (day / name).is_file()
            }
            row = rows.get(inspection_id)
            if row is None:
                moment = parse_time(body.get("timestamp"))
                if moment is None:
                    run.skipped_lines += 1
                    continue
                row = rows[inspection_id] = ResultRow(body, moment)
            else:  # the stream has the result; the evidence adds pictures and a verdict it may lack
                if row.payload.get("vlm_status") in (None, "pending") and body.get("vlm_status") not in (None, "pending"):
                    _merge_update(row.payload, body)
                row.payload.setdefault("evidence_path", body.get("evidence_path"))
            row.files = files
            row.conversations = read_conversations(json_path.with_name(f"{inspection_id}.chat.jsonl"))


def read_conversations(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The follow-up questions of one inspection (vlm/followup.py's JSON lines), by conversation id, in order."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return {}
    conversations: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        try:
            turn = json.loads(line)
        except ValueError:
            continue
        if isinstance(turn, dict) and isinstance(turn.get("answer"), dict) and isinstance(turn.get("question"), str):
            conversations.setdefault(str(turn.get("conversation_id", "default")), []).append(turn)
    return conversations
