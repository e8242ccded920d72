"""The demo's subscriber: the result stream from the broker, each result judged against what was painted, the console."""

from __future__ import annotations

import json
import queue
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import cv2
import numpy as np

from ...errors import UserError
from ...mqtt.client import new_client
from ...mqtt.payloads import Topics
from ..demo_broker import port_open
from ..report import percentile
from .data import CAMERA, STATION, TOPIC_PREFIX, DemoFrame, DemoSettings


def region_on_defect(regions: list[dict[str, Any]], mask: np.ndarray) -> bool:
    """Whether a reported region box covers any pixel of the defect's mask."""
    h, w = mask.shape[:2]
    for region in regions:
        x0, y0, x1, y1 = (int(v) for v in region.get("box", (0, 0, 0, 0)))
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        if x1 > x0 and y1 > y0 and mask[y0:y1, x0:x1].any():
            return True
    return False


@dataclass
class Outcome:
    """A result set against the truth of its frame."""

    frame: DemoFrame
    payload: dict[str, Any]
    located: bool  # NG with a region on the painted defect

    @property
    def ng(self) -> bool:
        return self.payload.get("verdict") == "NG"

    @property
    def label(self) -> str:
        if self.frame.defective:
            if not self.ng:
                return "MISSED"
            return "found" if self.located else "found, box off the defect"
        return "FALSE REJECT" if self.ng else ""


def judge(payload: dict[str, Any], frame: DemoFrame) -> Outcome:
    located = False
    if frame.defective and payload.get("verdict") == "NG" and frame.mask is not None:
        mask = cv2.imread(str(frame.mask), cv2.IMREAD_GRAYSCALE)
        located = mask is not None and region_on_defect(payload.get("regions") or [], mask)
    return Outcome(frame, payload, located)


def _pct(values: list[float], q: float) -> float | None:
    value = percentile(values, q)
    return None if value is None else round(value, 1)


def summarize_demo(
    frames: list[DemoFrame],
    outcomes: dict[int, Outcome],
    arrival_ms: list[float],
    duplicates: int = 0,
    updates: int = 0,
    stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The demo's numbers: what was shown, what came back, what was found, how fast."""
    defective = [f for f in frames if f.defective]
    good = [f for f in frames if not f.defective]
    got = [outcomes[f.frame_id] for f in frames if f.frame_id in outcomes]
    camera = ((stats or {}).get("pipeline", {}).get("cameras") or {}).get(CAMERA) or {}
    scorer = [float(o.payload["latency_ms"]["score"]) for o in got if "score" in (o.payload.get("latency_ms") or {})]
    return {
        "type": "demo_summary",
        "frames": len(frames),
        "results": len(got),
        "no_result": [f.frame_id for f in frames if f.frame_id not in outcomes],
        "dropped_by_capture": camera.get("dropped"),
        "duplicates": duplicates,
        "ng": sum(o.ng for o in got),
        "defects_injected": len(defective),
        "defects_inspected": sum(f.frame_id in outcomes for f in defective),
        "defects_found": sum(outcomes[f.frame_id].ng for f in defective if f.frame_id in outcomes),
        "defects_located": sum(outcomes[f.frame_id].located for f in defective if f.frame_id in outcomes),
        "missed": [{"frame": f.frame_id, "kind": f.kind} for f in defective
                   if f.frame_id in outcomes and not outcomes[f.frame_id].ng],
        "good_frames": len(good),
        "good_inspected": sum(f.frame_id in outcomes for f in good),
        "false_rejects": sum(outcomes[f.frame_id].ng for f in good if f.frame_id in outcomes),
        "latency_ms": {
            "frame_to_subscriber": {"p50": _pct(arrival_ms, 50), "p99": _pct(arrival_ms, 99)},
            "scorer": {"p50": _pct(scorer, 50), "p99": _pct(scorer, 99)},
        },
        "vlm_updates": updates,
    }


def _fmt(value: float) -> str:
    return f"{value:#.4g}".rstrip(".") if abs(value) < 1e4 else f"{value:.0f}"


RESULT_HEADER = f"{'seq':>5} {'frame':>5}  {'score':>8} / {'threshold':<9} {'verdict':<7}  {'where':<24}  injected"


def format_result(outcome: Outcome) -> str:
    p = outcome.payload
    regions = p.get("regions") or []
    where = ", ".join(regions[0].get("grid", [])[:2]) if regions else ""
    if len(regions) > 1:
        where += f" (+{len(regions) - 1})"
    injected = outcome.frame.kind if outcome.frame.defective else "-"
    truth = f"{injected:<13} {outcome.label}".rstrip()
    score = f"{_fmt(float(p['score'])):>8} / {_fmt(float(p['threshold'])):<9}"
    return f"{p['seq']:>5} {p['frame_id']:>5}  {score} {p['verdict']:<7}  {where:<24}  {truth}"


def format_update(payload: dict[str, Any], seq: int | None) -> str:
    which = f"seq {seq}" if seq is not None else f"id {payload.get('inspection_id')}"
    vlm = payload.get("vlm") or {}
    if payload.get("vlm_status") == "done" and vlm:
        what = "defect" if vlm.get("defect") else "no defect"
        detail = f"{what}: {vlm.get('defect_type', '?')} (confidence {vlm.get('confidence', '?')})"
        if vlm.get("description"):
            detail += f" - {vlm['description']}"
    else:
        detail = f"{payload.get('vlm_status')}" + (f": {payload['error']}" if payload.get("error") else "")
    return f"{'':>5} {'':>5}  vlm for {which}: {detail}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def format_summary(summary: dict[str, Any]) -> list[str]:
    lines = ["", "Summary"]
    shown = f"{summary['frames']} replayed, {summary['results']} results received"
    if summary["no_result"]:
        shown += f", {len(summary['no_result'])} without a result"
        if summary.get("dropped_by_capture"):
            shown += f" ({summary['dropped_by_capture']} dropped by the capture: the scorer was slower than --fps)"
    if summary["duplicates"]:
        shown += f" ({summary['duplicates']} delivered twice, counted once)"
    lines.append(f"  frames          {shown}")
    injected, inspected, found = summary["defects_injected"], summary["defects_inspected"], summary["defects_found"]
    rate = f" ({100 * found / inspected:.0f}%)" if inspected else ""
    found_text = f"{found} of {injected} injected defects flagged NG"
    found_text += rate if inspected == injected else ""
    if found:
        found_text += f", {summary['defects_located']} with a region box on the defect"
    if inspected != injected:
        found_text += f"; only {inspected} of the {injected} were inspected"
    lines.append(f"  defects found   {found_text}")
    if summary["missed"]:
        missed = ", ".join(f"{m['kind']} (frame {m['frame']})" for m in summary["missed"])
        lines.append(f"  missed          {missed}")
    good, good_inspected = summary["good_frames"], summary["good_inspected"]
    rejects = f"{summary['false_rejects']} of {good} good frames flagged NG"
    if good_inspected != good:
        rejects += f"; only {good_inspected} of the {good} were inspected"
    lines.append(f"  false rejects   {rejects}")
    arrival, scorer = summary["latency_ms"]["frame_to_subscriber"], summary["latency_ms"]["scorer"]
    lines.append(f"  latency         frame grab -> result here  p50 {_ms(arrival['p50'])}, p99 {_ms(arrival['p99'])}")
    lines.append(f"                  scorer                     p50 {_ms(scorer['p50'])}, p99 {_ms(scorer['p99'])}")
    if summary["vlm_updates"]:
        lines.append(f"  vlm updates     {summary['vlm_updates']}")
    return lines


class Console:
    """Where the demo talks: steps and tables to stdout, or with --json payloads to stdout and
    everything for people to stderr."""

    def __init__(self, as_json: bool, out: TextIO | None = None, err: TextIO | None = None):
        self.as_json = as_json
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.human = self.err if as_json else self.out

    def say(self, text: str = "") -> None:
        print(text, file=self.human, flush=True)

    def data(self, payload: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps(payload), file=self.out, flush=True)

    def step(self, number: int, total: int, name: str, text: str, seconds: float | None = None) -> None:
        took = f"  ({seconds:.1f} s)" if seconds is not None and seconds >= 0.05 else ""
        self.say(f"[{number}/{total}] {name:<10} {text}{took}")


@dataclass(frozen=True)
class Message:
    topic: str
    text: str
    received: float  # wall-clock seconds at arrival


class ResultStream:
    """The demo's subscriber (paho 2, callback API 2): results, updates and stats of one station."""

    def __init__(self, host: str, port: int, protocol: str, prefix: str = TOPIC_PREFIX, station: str = STATION):
        self.host, self.port, self.protocol = host, port, protocol
        self.topics = Topics(prefix, station)
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._ready = threading.Event()
        self._error: str | None = None
        self._client = None

    def start(self, timeout: float = 10.0) -> None:
        """Connect and subscribe; UserError when the broker refuses or does not answer in time."""
        client = new_client(self.protocol)
        topics = [(self.topics.result, 1), (self.topics.result_update, 1), (self.topics.stats, 0)]

        def on_connect(client, userdata, flags, reason_code, properties):
            if reason_code.is_failure:
                self._error = f"the broker refused the connection: {reason_code}"
                self._ready.set()
                return
            client.subscribe(topics)

        def on_subscribe(client, userdata, mid, reason_codes, properties):
            failed = [str(code) for code in reason_codes if code.is_failure]
            if failed:
                self._error = f"the broker refused the subscription: {', '.join(failed)}"
            self._ready.set()

        def on_message(client, userdata, message):
            self._inbox.put(Message(message.topic, bytes(message.payload).decode("utf-8", "replace"), time.time()))

        client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
        try:
            client.connect(self.host, self.port, keepalive=30)
        except OSError as exc:
            raise UserError(f"cannot connect to the MQTT broker at {self.host}:{self.port}: {exc}") from None
        client.loop_start()
        self._client = client
        if not self._ready.wait(timeout) or self._error:
            self.close()
            raise UserError(f"{self._error or 'no answer from the broker'} ({self.host}:{self.port}, MQTT {self.protocol})")

    def get(self, timeout: float) -> Message | None:
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None


def check_broker_choice(settings: DemoSettings) -> None:
    """UserError now, rather than after calibration, when the demo could not get a broker as asked."""

    if port_open(settings.host, settings.port):
        if settings.broker != "auto":
            raise UserError(
                f"a broker already listens on {settings.host}:{settings.port}, so --broker {settings.broker} "
                "cannot start one there: pick a free --port, or leave --broker out to use the running one"
            )
        return
    mosquitto = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None)
    if settings.broker == "mosquitto" and mosquitto is None:
        raise UserError("--broker mosquitto: mosquitto is not installed (apt-get install mosquitto); "
                        "or use --broker amqtt")
    if settings.broker == "amqtt" or (settings.broker == "auto" and mosquitto is None):
        try:
            import amqtt  # noqa: F401
        except ImportError:
            raise UserError(
                "no MQTT broker listens on {}:{} and none can be started: install mosquitto "
                "(apt-get install mosquitto) or the pure-Python amqtt (pip install 'edge-inspect[demo]')"
                .format(settings.host, settings.port)) from None


def broker_protocol(host: str, port: int, timeout: float = 5.0) -> str:
    """The MQTT version a running broker speaks: "5", or "3.1.1" when it refuses MQTT 5 (amqtt)."""
    answer: queue.Queue = queue.Queue()
    client = new_client("5")
    client.on_connect = lambda c, u, f, reason_code, p: answer.put(reason_code)
    try:
        client.connect(host, port, keepalive=10)
    except OSError as exc:
        raise UserError(f"cannot connect to the MQTT broker at {host}:{port}: {exc}") from None
    client.loop_start()
    try:
        reason_code = answer.get(timeout=timeout)
    except queue.Empty:
        raise UserError(f"the MQTT broker at {host}:{port} did not answer within {timeout:g} s") from None
    finally:
        client.disconnect()
        client.loop_stop()
    if not reason_code.is_failure:
        return "5"
    if reason_code.value in (1, 132):  # "unacceptable/unsupported protocol version"
        return "3.1.1"
    raise UserError(f"the MQTT broker at {host}:{port} refused the demo: {reason_code} (does it need a user name?)")
