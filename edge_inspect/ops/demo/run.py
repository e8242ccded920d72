"""Running the demo: broker, daemon subprocess, following the stream, the summary and the report."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

import yaml

from ...errors import UserError
from ...offline.datasets.generate import CATEGORIES
from ..demo_broker import ensure_broker, port_open
from ..report import load_run, parse_time, write_report
from .data import (
    MAX_FRAMES,
    DemoFrame,
    DemoSettings,
    calibrate_demo,
    demo_config,
    ensure_dataset,
    link_backbone,
    plan_frames,
    prepare_workdir,
    write_replay,
)
from .stream import (
    RESULT_HEADER,
    Console,
    Message,
    Outcome,
    ResultStream,
    _fmt,
    broker_protocol,
    check_broker_choice,
    format_result,
    format_summary,
    format_update,
    judge,
    summarize_demo,
)

_STARTUP_ALLOWANCE_S = 120.0  # interpreter, ONNX Runtime session and warm-up on a slow box


_QUIET_AFTER_EXIT_S = 0.5  # the daemon exits once the broker acknowledged everything


_MAX_WAIT_AFTER_EXIT_S = 5.0


def start_daemon(config_path: Path, workdir: Path, log_path: Path) -> subprocess.Popen:
    """`edge-inspect run --config FILE` with this interpreter, its log to `log_path`."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "edge_inspect.cli", "run", "--config", str(config_path)],
            cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C reaches the demo only, which stops the daemon while the broker is still up.
            start_new_session=True,
        )


def stop_daemon(process: subprocess.Popen, timeout: float = 15.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # drains in-flight inspections, then exits
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


@dataclass
class _Stream:
    """What the subscriber has seen so far."""

    outcomes: dict[int, Outcome] = field(default_factory=dict)
    seq_by_id: dict[str, int] = field(default_factory=dict)
    arrival_ms: list[float] = field(default_factory=list)
    duplicates: int = 0
    updates: int = 0
    stats: dict[str, Any] | None = None
    unexpected: int = 0  # results for frames the demo did not replay (another publisher on the station)
    last_message: float = 0.0


def run_demo(settings: DemoSettings, console: Console | None = None) -> int:
    """Run the demo end to end; returns the exit code (0: every frame's result arrived)."""

    console = console or Console(settings.json)
    if settings.category not in CATEGORIES:
        raise UserError(f"--category {settings.category!r}: choose one of {', '.join(CATEGORIES)}")
    if not 1 <= settings.frames <= MAX_FRAMES:
        raise UserError(f"--frames {settings.frames}: give 1 to {MAX_FRAMES}")
    if not 0 <= settings.fps <= 1000:
        raise UserError(f"--fps {settings.fps:g}: give 0 (as fast as the scorer goes) to 1000")
    if not 1 <= settings.port <= 65535:
        raise UserError(f"--port {settings.port}: give a TCP port 1-65535")
    check_broker_choice(settings)  # before the slow steps: a broker problem should not wait for calibration
    workdir = prepare_workdir(settings.workdir)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("edge_inspect.broker").setLevel(logging.WARNING)  # step 4 says the same
    product = f"demo-{settings.category}"
    say, step, total = console.say, console.step, 6
    pace = f"{settings.fps:g} fps" if settings.fps else "as fast as the scorer takes them"
    defects = settings.frames // 2
    say(f"edge-inspect demo: a simulated {settings.category} line, {settings.frames} parts at {pace}, "
        f"{defects} of them with a painted-in defect")
    say(f"workdir {workdir}")
    say()

    started = time.perf_counter()
    backbone, exported = link_backbone(settings.engines_dir, workdir / "engines")
    shared = (settings.engines_dir.expanduser().resolve() / backbone.relative_to(workdir / "engines"))
    step(1, total, "backbone", f"{shared} ({'exported from the pretrained weights' if exported else 'cached'})",
         time.perf_counter() - started)

    started = time.perf_counter()
    dataset, cached = ensure_dataset(workdir / "dataset", settings.category, settings.frames, settings.seed)
    frames = write_replay(plan_frames(dataset, settings.frames, settings.seed), workdir / "frames")
    step(2, total, "dataset", f"{len(frames) - defects} good + {defects} defective {settings.category} frames from a real "
         f"photo, defects painted in with known masks ({'cached' if cached else 'generated'})",
         time.perf_counter() - started)

    started = time.perf_counter()
    calibration, n_good = calibrate_demo(dataset, product, workdir / "calibration", workdir / "engines", settings.seed)
    step(3, total, "calibrate", f"product {product} from {n_good} good parts: threshold {_fmt(calibration.threshold)}",
         time.perf_counter() - started)

    for folder in ("spool", "evidence"):  # nothing from an earlier run may leak into this one
        shutil.rmtree(workdir / folder, ignore_errors=True)
    results_path, report_path, log_path = workdir / "results.jsonl", workdir / "report.html", workdir / "daemon.log"
    results_path.unlink(missing_ok=True)
    report_path.unlink(missing_ok=True)

    broker = None
    check_broker_choice(settings)
    if port_open(settings.host, settings.port):
        protocol = broker_protocol(settings.host, settings.port)
        broker_text = f"using the broker already running on {settings.host}:{settings.port} (MQTT {protocol})"
        broker_kind = "external"
    else:
        broker = ensure_broker(settings.host, settings.port, kind=settings.broker)  # type: ignore[arg-type]
        if broker is None:  # it appeared between the check and the start
            protocol, broker_kind = broker_protocol(settings.host, settings.port), "external"
            broker_text = f"using the broker that just started on {settings.host}:{settings.port}"
        else:
            protocol = "5" if broker.supports_mqtt5 else "3.1.1"
            broker_kind = broker.kind
            broker_text = f"started {broker.kind} on {settings.host}:{settings.port} (MQTT {protocol})"
    try:
        step(4, total, "broker", broker_text)
        config_path = workdir / "config.yaml"

        config = demo_config(settings, workdir, product, protocol)
        config_path.write_text("# written by `edge-inspect demo`: the daemon config of this run\n"
                               + yaml.safe_dump(config, sort_keys=False))
        stream = ResultStream(settings.host, settings.port, protocol)
        stream.start()
        try:
            run_started = time.time()
            process = start_daemon(config_path, workdir, log_path)
            step(5, total, "daemon", f"edge-inspect run --config {_short(config_path)}  (pid {process.pid}, "
                 f"log {_short(log_path)})")
            step(6, total, "results", f"subscribed to {stream.topics.result} and .../update; "
                 f"recording to {_short(results_path)}")
            if not console.as_json:
                say()
                say("A frame is NG when its anomaly score reaches the threshold; 'injected' is what was painted into it.")
                say()
                say(RESULT_HEADER)
            seen = _follow(stream, process, frames, settings, console, results_path, run_started, parse_time)
        finally:
            stream.close()
        code = process.returncode
        if code != 0:
            raise UserError(f"the daemon exited with code {code}; the end of {log_path}:\n{log_tail(log_path)}")

        summary = summarize_demo(frames, seen.outcomes, seen.arrival_ms, seen.duplicates, seen.updates, seen.stats)
        evidence = workdir / "evidence"
        run = load_run(evidence_dir=evidence if evidence.is_dir() else None, results_file=results_path)
        write_report(run, report_path, title=f"edge-inspect demo: {settings.category} line")
        summary.update({
            "product": product, "threshold": calibration.threshold, "broker": broker_kind,
            "results_file": str(results_path), "report": str(report_path), "daemon_log": str(log_path),
        })
        for line in format_summary(summary):
            say(line)
        say(f"  results         {_short(results_path)}")
        say(f"  report          {_short(report_path)}")
        with open(results_path, "a", encoding="utf-8") as record:  # like `listen --json`: the report skips it
            record.write(json.dumps(summary) + "\n")
        console.data(summary)
        failed = bool(summary["no_result"]) and not summary.get("dropped_by_capture")
        if failed:
            say(f"error: {len(summary['no_result'])} frame(s) got no result (frames {summary['no_result'][:10]}); "
                f"see {log_path}")
        elif settings.keep_broker:
            _keep_running(broker, settings, console)
        return 1 if failed else 0
    finally:
        if broker is not None:
            broker.stop()


def _short(path: Path) -> str:
    """A path relative to the working directory when it is below it (shorter to read)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _follow(stream: ResultStream, process: subprocess.Popen, frames: list[DemoFrame], settings: DemoSettings,
            console: Console, results_path: Path, run_started: float, parse_time: Callable) -> _Stream:
    """Print and record messages until the daemon has exited and the stream went quiet."""
    by_id = {f.frame_id: f for f in frames}
    seen = _Stream()
    replay_s = len(frames) / settings.fps if settings.fps else 2.0 * len(frames)
    allowed_s = _STARTUP_ALLOWANCE_S + 2 * replay_s
    deadline = time.monotonic() + allowed_s
    exited_at: float | None = None
    with open(results_path, "w", encoding="utf-8") as record:
        try:
            while True:
                message = stream.get(0.1)
                now = time.monotonic()
                if message is not None:
                    seen.last_message = now
                    _take(message, seen, by_id, record, console, run_started, parse_time, stream.topics)
                if exited_at is None and process.poll() is not None:
                    exited_at = now
                if exited_at is not None:
                    if len(seen.outcomes) >= len(frames) and message is None:
                        break
                    quiet = now - max(seen.last_message, exited_at) > _QUIET_AFTER_EXIT_S
                    if quiet or now - exited_at > _MAX_WAIT_AFTER_EXIT_S:
                        break
                if now > deadline:
                    stop_daemon(process)
                    raise UserError(
                        f"the daemon did not finish the replay within {allowed_s:.0f} s "
                        f"({len(seen.outcomes)} of {len(frames)} results arrived); see its log for why"
                    )
        except KeyboardInterrupt:
            console.say("stopping the daemon (it finishes the frames it holds first)")
            raise
        finally:
            stop_daemon(process)
    return seen


def _take(message: Message, seen: _Stream, by_id: dict[int, DemoFrame], record: TextIO, console: Console,
          run_started: float, parse_time: Callable, topics) -> None:
    try:
        payload = json.loads(message.text)
    except ValueError:
        console.say(f"  (not JSON on {message.topic}: {message.text[:60]!r})")
        return
    if not isinstance(payload, dict):
        return
    if message.topic == topics.stats:
        moment = parse_time(payload.get("timestamp"))
        if moment is None or moment < run_started - 1.0:
            return  # retained from an earlier run on a broker that outlives the demo
        seen.stats = payload
        record.write(message.text + "\n")
        return
    record.write(message.text + "\n")
    record.flush()
    console.data(payload)
    if payload.get("type") == "result_update":
        seen.updates += 1
        if not console.as_json:
            console.say(format_update(payload, seen.seq_by_id.get(str(payload.get("inspection_id")))))
        return
    if payload.get("type") != "result":
        return
    inspection_id = str(payload.get("inspection_id"))
    if inspection_id in seen.seq_by_id:
        seen.duplicates += 1  # QoS 1 is at-least-once
        return
    seen.seq_by_id[inspection_id] = int(payload.get("seq", 0))
    frame = by_id.get(int(payload.get("frame_id", -1)))
    if frame is None:
        seen.unexpected += 1
        console.say(f"  (a result for frame {payload.get('frame_id')} that the demo did not replay)")
        return
    outcome = judge(payload, frame)
    seen.outcomes[frame.frame_id] = outcome
    grabbed = parse_time(payload.get("timestamp"))
    if grabbed is not None:
        seen.arrival_ms.append(max(0.0, (message.received - grabbed) * 1000.0))
    if not console.as_json:
        console.say(format_result(outcome))


def _keep_running(broker, settings: DemoSettings, console: Console) -> None:
    if broker is None:
        console.say(f"\n--keep-broker: the broker on {settings.host}:{settings.port} was already running; it stays up")
        return
    console.say(f"\nThe {broker.kind} broker keeps running on {settings.host}:{settings.port}: try "
                f"`edge-inspect listen --port {settings.port}"
                f"{' --protocol 3.1.1' if not broker.supports_mqtt5 else ''} --updates`. Ctrl-C stops it.")
    try:
        while broker.running():
            time.sleep(0.5)
    except KeyboardInterrupt:
        console.say("stopping the broker")
