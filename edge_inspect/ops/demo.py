"""`edge-inspect demo`: the whole product on one machine in under a minute, with nothing to install.

A simulated line: good and defective parts rendered from real photos (with the defect's pixel
mask known), a product calibrated from a few good parts, an MQTT broker, the real daemon
(`edge-inspect run` in a subprocess, replaying the frames like a camera), and a subscriber that
prints every result as it arrives and checks it against what was painted into the frame.

Example::

    settings = DemoSettings(workdir=Path("demo-run"), engines_dir=Path("engines"))
    exit_code = run_demo(settings)          # prints the stream, a summary, writes report.html

Everything the demo writes goes to its workdir (marked with a `.edge-inspect-demo` file, so a
folder that is not a demo workdir is never cleared). The one exception is the pretrained backbone
ONNX, which is shared through `engines_dir` (the `engines/` folder every other command uses), so
only the first demo on a machine pays for exporting it. The generated dataset is cached in the
workdir; calibration, spool, evidence, results and report are redone on every run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

import cv2
import numpy as np
import yaml

from ..config import AppConfig, parse_config
from ..errors import UserError
from ..mqtt.client import new_client
from ..mqtt.payloads import Topics
from ..scorer.calibrate import CalibrationOptions, backbone_path, calibrate_product, ensure_backbone
from ..scorer.params import ScorerParams
from ..scorer.synth import CATEGORIES, DEFECT_KINDS, generate_dataset
from .demo_broker import ensure_broker, port_open
from .report import load_run, parse_time, percentile, write_report

STATION = "demo"
CAMERA = "cam0"
TOPIC_PREFIX = "edge-inspect"
DEFAULT_CATEGORY = "coin"  # an object with a plain background: the clearest demo
DEFAULT_FRAMES, DEFAULT_FPS = 28, 4.0
SHORT_FRAMES, SHORT_FPS = 14, 10.0  # one defect of each kind; CI and `make demo`
CALIBRATION_IMAGES = 8
INPUT_SIZE = 256
MARKER = ".edge-inspect-demo"
DATASET_MARKER = "demo-dataset.json"
MAX_FRAMES = 2000

_STARTUP_ALLOWANCE_S = 120.0  # interpreter, ONNX Runtime session and warm-up on a slow box
_QUIET_AFTER_EXIT_S = 0.5  # the daemon exits once the broker acknowledged everything
_MAX_WAIT_AFTER_EXIT_S = 5.0


@dataclass(frozen=True)
class DemoSettings:
    workdir: Path
    engines_dir: Path  # shared cache of the backbone ONNX
    category: str = DEFAULT_CATEGORY
    frames: int = DEFAULT_FRAMES
    fps: float = DEFAULT_FPS
    host: str = "127.0.0.1"
    port: int = 1883
    broker: str = "auto"  # auto | mosquitto | amqtt: which broker to start when none listens
    seed: int = 0
    json: bool = False
    keep_broker: bool = False


@dataclass(frozen=True)
class DemoFrame:
    """One replayed frame and the truth about it."""

    frame_id: int  # the replay's frame seq: 1-based position in name order
    file: Path
    kind: str  # "good" or the defect kind painted into it
    mask: Path | None  # ground-truth mask of the defect

    @property
    def defective(self) -> bool:
        return self.kind != "good"


# --------------------------------------------------------------------------- workdir, data, product


def prepare_workdir(path: Path) -> Path:
    """Create the workdir, or accept an existing one only if an earlier demo made it (or it is empty)."""
    path = path.expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise UserError(f"--workdir {path} is a file; give a folder for the demo's files")
    if path.is_dir() and any(path.iterdir()) and not (path / MARKER).is_file():
        raise UserError(
            f"--workdir {path} already holds files that the demo did not write (no {MARKER} in it); "
            "the demo clears folders in its workdir, so give a new or empty folder, e.g. --workdir demo-run"
        )
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("made by `edge-inspect demo`; everything in this folder can be deleted\n")
    return path


def link_backbone(shared_engines: Path, engines: Path) -> tuple[Path, bool]:
    """The backbone from the shared engines folder (exported there when missing), visible in `engines`.

    Returns (path in `engines`, whether it had to be exported now).
    """

    shared_engines = shared_engines.expanduser().resolve()
    exported = not backbone_path(shared_engines).is_file()
    source = ensure_backbone(shared_engines)
    target = backbone_path(engines)
    if target.resolve() == source.resolve():
        return target, exported
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    try:
        target.symlink_to(source)
    except OSError:  # a file system without symlinks
        shutil.copy2(source, target)
    return target, exported


def dataset_needs(frames: int, kinds: tuple[str, ...]) -> tuple[int, int]:
    """(good test frames, defective frames per kind) for `frames` replayed frames, half of them defective."""
    defects = frames // 2
    return frames - defects, math.ceil(defects / len(kinds)) if defects else 0


def ensure_dataset(root: Path, category: str, frames: int, seed: int) -> tuple[Path, bool]:
    """The generated dataset for `category` under `root`, reused when it holds enough images.

    Returns (the category folder, whether it was cached).
    """

    good, per_kind = dataset_needs(frames, DEFECT_KINDS)
    folder = root / category
    marker = folder / DATASET_MARKER
    wanted = {"category": category, "size": INPUT_SIZE, "seed": seed, "n_train": CALIBRATION_IMAGES,
              "kinds": list(DEFECT_KINDS)}
    try:
        have = json.loads(marker.read_text())
    except (OSError, ValueError):
        have = {}
    same = all(have.get(key) == value for key, value in wanted.items())
    if same and have.get("n_test_good", -1) >= good and have.get("n_test_defect", -1) >= per_kind:
        return folder, True
    if same:  # grow it: generation is deterministic per image, so the first images stay the same
        good, per_kind = max(good, have.get("n_test_good", 0)), max(per_kind, have.get("n_test_defect", 0))
    marker.unlink(missing_ok=True)
    generate_dataset(root, category, n_train=CALIBRATION_IMAGES, n_test_good=good, n_test_defect=per_kind,
                     size=INPUT_SIZE, seed=seed)
    marker.write_text(json.dumps({**wanted, "n_test_good": good, "n_test_defect": per_kind}, indent=1))
    return folder, False


def plan_frames(dataset: Path, count: int, seed: int) -> list[tuple[str, Path, Path | None]]:
    """Which test images the line shows, in order: (kind, image, mask). Half of them (rounded down)
    defective, the kinds taking turns, shuffled by `seed`."""

    good, _ = dataset_needs(count, DEFECT_KINDS)
    chosen: list[tuple[str, Path, Path | None]] = [
        ("good", dataset / "test" / "good" / f"{i:03d}.png", None) for i in range(good)
    ]
    for i in range(count - good):
        kind, index = DEFECT_KINDS[i % len(DEFECT_KINDS)], i // len(DEFECT_KINDS)
        chosen.append((kind, dataset / "test" / kind / f"{index:03d}.png",
                       dataset / "ground_truth" / kind / f"{index:03d}_mask.png"))
    missing = [str(path) for _, path, _ in chosen if not path.is_file()]
    if missing:
        raise UserError(
            f"the demo dataset in {dataset} is incomplete ({missing[0]} is missing); delete that folder and run again"
        )
    order = np.random.default_rng(seed).permutation(len(chosen))
    return [chosen[i] for i in order]


def write_replay(plan: list[tuple[str, Path, Path | None]], folder: Path) -> list[DemoFrame]:
    """Copy the planned images into `folder`, named so that name order is the planned order."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    width = max(3, len(str(len(plan))))
    frames = []
    for position, (kind, image, mask) in enumerate(plan, start=1):
        target = folder / f"{position:0{width}d}-{kind}{image.suffix}"
        shutil.copyfile(image, target)
        frames.append(DemoFrame(position, target, kind, mask))
    return frames


def calibrate_demo(dataset: Path, product: str, calibration_dir: Path, engines: Path, seed: int):
    """Calibrate `product` from the dataset's good training images (replacing an earlier one);
    remove the graphs of earlier demo calibrations of it from `engines`."""

    images = sorted((dataset / "train" / "good").glob("*.png"))
    options = CalibrationOptions(params=ScorerParams(input_size=(INPUT_SIZE, INPUT_SIZE)), seed=seed)
    calibration = calibrate_product(images, product, calibration_dir, engines, options, force=True, progress=False)
    keep = {calibration.scorer_onnx.name, calibration.features_onnx.name}
    for old in engines.glob(f"{product}-*.onnx"):
        if old.name not in keep:
            old.unlink()
    return calibration, len(images)


def demo_config(settings: DemoSettings, workdir: Path, product: str, protocol: str) -> dict[str, Any]:
    """The daemon config of the demo, validated against the real schema."""

    config: dict[str, Any] = {
        "station": STATION,
        "cameras": [{
            "name": CAMERA,
            "product": product,
            "source": {"type": "replay", "path": str(workdir / "frames"), "fps": settings.fps, "loop": False},
            "trigger": {"mode": "every_frame"},
        }],
        # ONNX Runtime even where TensorRT exists: a plan build would take minutes.
        "scoring": {"backend": "onnxruntime", "calibration_dir": str(workdir / "calibration"),
                    "engines_dir": str(workdir / "engines")},
        "mqtt": {"host": settings.host, "port": settings.port, "protocol": protocol, "topic_prefix": TOPIC_PREFIX,
                 "client_id": "edge-inspect-demo-{hostname}", "stats_interval_s": 2},
        "spool": {"path": str(workdir / "spool" / "results.sqlite3")},
        "pipeline": {"drain_timeout_s": 10},
    }
    if "evidence" in AppConfig.model_fields:  # keep flagged frames for the report's pictures
        config["evidence"] = {"dir": str(workdir / "evidence"), "min_free_mb": 50}
    parse_config(json.dumps(config), source="demo config")
    return config


# --------------------------------------------------------------------------- truth and numbers


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


# --------------------------------------------------------------------------- what the user reads


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


# --------------------------------------------------------------------------- MQTT (the subscriber edge)


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


# --------------------------------------------------------------------------- the daemon (subprocess)


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


# --------------------------------------------------------------------------- the whole demo


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
