"""`edge-inspect listen`'s work: subscribe to a station's results, print them, check the stream for gaps.

The command line is `commands/listen.py`; this module is the subscriber and the gap check.

Example:
    check = StreamCheck(); check.add(payload); check.summary()   # {"distinct": ..., "missing": ..., "gaps": ...}
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ..config import load_config
from ..config.mqtt import MqttConfig
from ..errors import UserError
from .client import make_client, tls_context
from .payloads import load_schema


@dataclass
class StreamCheck:
    """Follows result seqs per station: duplicates (same id again), reused seqs (same seq, other id), gaps."""

    seqs: dict[str, dict[int, str]] = field(default_factory=dict)  # station -> seq -> inspection id
    ids: set[str] = field(default_factory=set)
    received: int = 0
    duplicates: int = 0
    replayed: int = 0
    out_of_order: int = 0
    reused: list[tuple[str, int]] = field(default_factory=list)
    _last: dict[str, int] = field(default_factory=dict)

    def add(self, payload: dict[str, Any]) -> str:
        """Record one result; returns "new", "duplicate" or "reused"."""
        self.received += 1
        station, seq, inspection_id = payload["station"], int(payload["seq"]), payload["inspection_id"]
        self.replayed += bool(payload.get("replayed"))
        if inspection_id in self.ids:
            self.duplicates += 1
            return "duplicate"
        by_seq = self.seqs.setdefault(station, {})
        if seq in by_seq:
            self.reused.append((station, seq))
            self.ids.add(inspection_id)
            return "reused"
        if seq < self._last.get(station, 0):
            self.out_of_order += 1
        self._last[station] = max(seq, self._last.get(station, 0))
        by_seq[seq] = inspection_id
        self.ids.add(inspection_id)
        return "new"

    @property
    def distinct(self) -> int:
        return len(self.ids)

    def gaps(self) -> dict[str, list[tuple[int, int]]]:
        """Missing seq ranges (first, last) between the lowest and highest seq seen, per station."""
        found: dict[str, list[tuple[int, int]]] = {}
        for station, by_seq in self.seqs.items():
            ordered = sorted(by_seq)
            ranges = [(a + 1, b - 1) for a, b in zip(ordered, ordered[1:]) if b > a + 1]
            if ranges:
                found[station] = ranges
        return found

    def summary(self) -> dict[str, Any]:
        gaps = self.gaps()
        return {
            "type": "listen_summary",
            "received": self.received,
            "distinct": self.distinct,
            "duplicates": self.duplicates,
            "replayed": self.replayed,
            "out_of_order": self.out_of_order,
            "stations": {
                station: {"first_seq": min(by_seq), "last_seq": max(by_seq), "count": len(by_seq)}
                for station, by_seq in self.seqs.items()
            },
            "gaps": {station: [list(r) for r in ranges] for station, ranges in gaps.items()},
            "missing": sum(b - a + 1 for ranges in gaps.values() for a, b in ranges),
            "reused_seqs": [list(item) for item in self.reused],
        }


def mqtt_settings(args: argparse.Namespace):
    station = None
    if args.config:
        config = load_config(args.config)
        base, station = config.mqtt, config.station
    else:
        base = MqttConfig()
    overrides = {key: value for key, value in (
        ("host", args.host), ("port", args.port), ("protocol", args.protocol), ("topic_prefix", args.prefix),
    ) if value is not None}
    try:
        mqtt = MqttConfig(**{**base.model_dump(), **overrides})
    except ValueError as exc:
        raise UserError(f"listen: {exc}") from None
    return mqtt, args.station or station or "+"


def _describe(payload: dict[str, Any], topic: str) -> str:
    if payload.get("type") == "result_update":
        vlm = payload.get("vlm") or {}
        detail = f"defect={vlm.get('defect_type', '?')} confidence={vlm.get('confidence', '?')}" if vlm else f"error={payload.get('error')!r}"
        return f"update  {payload['station']} id={payload['inspection_id']} vlm={payload['vlm_status']} {detail}"
    regions = payload.get("regions") or []
    where = f" [{', '.join(regions[0]['grid'])}]" if regions and regions[0].get("grid") else ""
    part = f" part={payload['part_id']}" if payload.get("part_id") else ""
    flag = " replayed" if payload.get("replayed") else ""
    return (
        f"#{payload['seq']:<6} {payload['station']}/{payload['camera']} {payload['timestamp']} "
        f"{payload['product']} {payload['verdict']} score={payload['score']:.4g}/{payload['threshold']:.4g} "
        f"regions={len(regions)}{where} vlm={payload['vlm_status']}{part} id={payload['inspection_id']}{flag}"
    )


def listen(args: argparse.Namespace) -> int:
    """Run `edge-inspect listen` with its parsed arguments; returns the exit code."""
    if args.count is not None and args.count < 1:
        raise UserError(f"--count {args.count}: give a positive number of results")
    if args.timeout is not None and args.timeout <= 0:
        raise UserError(f"--timeout {args.timeout}: give a positive number of seconds")
    if args.persistent and not args.client_id:
        raise UserError("--persistent needs --client-id (the broker keeps the session under that id)")
    validators = _validators() if args.validate else {}
    mqtt, station = mqtt_settings(args)
    prefix = mqtt.topic_prefix
    topics = [f"{prefix}/{station}/result"] + ([f"{prefix}/{station}/result/update"] if args.updates else [])
    inbox: queue.Queue = queue.Queue()
    v5 = mqtt.protocol == "5"
    client = make_client(mqtt, args.client_id or "", password=mqtt.resolve_password()[0] if mqtt.username else None,
                         tls=tls_context(mqtt) if mqtt.tls.enabled else None, clean=not args.persistent)
    client.suppress_exceptions = True
    client.reconnect_delay_set(mqtt.reconnect_min_s, mqtt.reconnect_max_s)

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            inbox.put(("error", f"broker refused the connection: {reason_code}"))
            return
        client.subscribe([(topic, 1) for topic in topics])

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        failed = [str(code) for code in reason_codes if code.is_failure]
        inbox.put(("error", f"subscription refused: {', '.join(failed)}") if failed else ("ready", None))

    def on_connect_fail(client, userdata):
        inbox.put(("error", f"cannot connect to {mqtt.host}:{mqtt.broker_port} ({sys.exc_info()[1] or 'unknown error'})"))

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_connect_fail = on_connect_fail
    client.on_message = lambda c, u, message: inbox.put(("message", message))
    connect_kwargs: dict[str, Any] = {}
    if v5:
        connect_kwargs["clean_start"] = not args.persistent
        if args.persistent:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 7 * 24 * 3600
            connect_kwargs["properties"] = properties
    client.connect_async(mqtt.host, mqtt.broker_port, mqtt.keepalive_s, **connect_kwargs)
    client.loop_start()

    check = StreamCheck()
    invalid = 0
    last_error = None
    deadline = time.monotonic() + args.timeout if args.timeout else None
    try:
        while args.count is None or check.distinct < args.count:
            wait = 0.5 if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                break
            try:
                kind, item = inbox.get(timeout=min(wait, 0.5))
            except queue.Empty:
                continue
            if kind == "ready":
                print(f"listening on {', '.join(topics)} at {mqtt.host}:{mqtt.broker_port}", file=sys.stderr, flush=True)
            elif kind == "error":
                if item != last_error:
                    print(f"error: {item}; retrying", file=sys.stderr, flush=True)
                last_error = item
            else:
                invalid += _handle(item, args, check, validators)
    except KeyboardInterrupt:
        pass
    finally:
        client.disconnect()
        client.loop_stop()

    summary = check.summary()
    summary["invalid"] = invalid
    failed = []
    if args.count is not None and check.distinct < args.count:
        failed.append(f"only {check.distinct} of {args.count} results arrived within {args.timeout} s")
    if args.check_gaps and (summary["missing"] or summary["reused_seqs"]):
        failed.append(f"{summary['missing']} seq(s) missing {summary['gaps']}, reused: {summary['reused_seqs']}")
    if invalid:
        failed.append(f"{invalid} payload(s) failed schema validation")
    summary["ok"] = not failed
    if args.json:
        print(json.dumps(summary), flush=True)
    print(
        f"{check.received} result message(s): {check.distinct} distinct, {check.duplicates} duplicate(s), "
        f"{check.replayed} replayed, {summary['missing']} missing seq(s)",
        file=sys.stderr,
    )
    for problem in failed:
        print(f"check failed: {problem}", file=sys.stderr)
    return 1 if failed else 0


def _handle(message, args: argparse.Namespace, check: StreamCheck, validators: dict) -> int:
    """Print one message and feed the gap check. Returns 1 if it was invalid."""
    try:
        payload = json.loads(message.payload)
        kind = payload["type"]
    except (ValueError, TypeError, KeyError):
        print(f"error: not an edge-inspect payload on {message.topic}: {bytes(message.payload)[:80]!r}", file=sys.stderr)
        return 1
    problem = None
    validator = validators.get(kind)
    if validator is not None:
        errors = sorted(validator.iter_errors(payload), key=lambda e: list(e.path))
        if errors:
            problem = "; ".join(f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors[:3])
            print(f"error: invalid {kind} on {message.topic}: {problem}", file=sys.stderr)
    if kind == "result":
        try:
            check.add(payload)
        except (KeyError, TypeError, ValueError):
            problem = problem or "missing station/seq/inspection_id"
    if args.json:
        print(json.dumps(payload), flush=True)
    else:
        try:
            print(_describe(payload, message.topic), flush=True)
        except (KeyError, TypeError, ValueError, IndexError):
            print(f"{message.topic} {payload}", flush=True)
    return 1 if problem else 0


def _validators() -> dict:
    try:
        import jsonschema  # a dev/optional dependency, only for --validate
    except ImportError:
        raise UserError("--validate needs the jsonschema package: pip install jsonschema") from None

    return {name: jsonschema.Draft202012Validator(load_schema(name)) for name in ("result", "result_update")}
