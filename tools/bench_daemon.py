#!/usr/bin/env python3
"""Run the real daemon on a paced replay and measure what the line sees: frame -> broker latency,
backlog growth and memory.

    python tools/bench_daemon.py --duration 300             # 5 minutes at 10 fps, the release check
    python tools/bench_daemon.py --duration 30 --json       # quick look, machine-readable
    python tools/bench_daemon.py --duration 120 --stream 10 # the same while learning from the line refits all the time

The daemon runs as a subprocess (`edge-inspect run`) against a mosquitto broker (started here on a
free loopback port unless --broker is given). A subscriber stamps every result on arrival; latency
is arrival time minus the frame's grab time in the payload. Backlog = frames captured but neither
inspected nor dropped, plus the MQTT spool depth, sampled every second from the daemon's stats.
RSS is read from /proc every second. Without --calibration-dir a product is calibrated first from
a generated dataset (`edge_inspect.offline.datasets.generate`), and frames are that dataset's test images placed in a
--frame-size scene (the camera ROI crops them back out), a quarter of them with a painted defect.

Targets (exit 1 when one is missed): OK-frame latency p99 <= 60 ms, no backlog growth, RSS <= 400 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TARGET_P99_MS = 60.0
TARGET_RSS_MB = 400.0
STATION = "bench"
PREFIX = "edge-inspect"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=300.0, help="seconds of measurement after warm-up (default 300)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds ignored at the start (default 5)")
    p.add_argument("--fps", type=float, default=10.0, help="replay pace (default 10)")
    p.add_argument("--frames", type=Path, help="folder of frames to replay (default: generated)")
    p.add_argument("--frame-size", default="1280x720", help="size of generated frames, WxH (default 1280x720)")
    p.add_argument("--calibration-dir", type=Path, help="calibrated products (default: calibrate one now)")
    p.add_argument("--engines-dir", type=Path, help="ONNX graphs (default: beside --calibration-dir)")
    p.add_argument("--product", default="bench")
    p.add_argument("--size", type=int, default=256, help="scorer input size when calibrating here (default 256)")
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"])
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = all cores)")
    p.add_argument("--broker", help="host:port of a running broker (default: start mosquitto here)")
    p.add_argument("--workdir", type=Path, help="keep config, spool and logs here (default: a temp folder, removed)")
    p.add_argument("--stream", type=int, metavar="N", default=0,
                   help="learn from the line with a refit every N candidates (at least 5; every OK frame is a candidate), "
                        "so that refits run nearly all the time and the latency targets hold during refits")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.stream and args.stream < 5:
        p.error(f"--stream {args.stream}: a refit needs at least 5 new candidates")
    return args


# --- inputs -------------------------------------------------------------------------------------


def prepare_product(args: argparse.Namespace, work: Path) -> tuple[Path, Path, list[np.ndarray]]:
    """(calibration_dir, engines_dir, good frames at scorer-ish size)."""
    import cv2

    from edge_inspect.calibration.artifacts import BACKBONE_FILE, ensure_backbone
    from edge_inspect.offline.datasets.generate import generate_dataset

    dataset = generate_dataset(work / "data", "brick", n_train=8, n_test_good=8, n_test_defect=0, size=args.size, seed=7)
    good = [cv2.imread(str(p)) for p in sorted((dataset / "test" / "good").glob("*.png"))]
    if args.calibration_dir:
        engines = args.engines_dir or args.calibration_dir.resolve().parent / "engines"
        return args.calibration_dir, engines, good
    engines = work / "engines"
    cached = ROOT / "engines" / BACKBONE_FILE
    (engines / BACKBONE_FILE).parent.mkdir(parents=True, exist_ok=True)
    if cached.is_file():
        os.symlink(cached, engines / BACKBONE_FILE)
    else:
        ensure_backbone(engines)
    import contextlib

    from edge_inspect import cli

    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the report (--json)
        code = cli.main([
            "calibrate", "--product", args.product, "--images", str(dataset / "train" / "good"),
            "--calibration-dir", str(work / "calibration"), "--engines-dir", str(engines), "--size", str(args.size),
        ])
    if code != 0:
        raise SystemExit(f"calibration failed with exit code {code}")
    return work / "calibration", engines, good


def write_frames(folder: Path, good: list[np.ndarray], size: tuple[int, int]) -> dict[str, int]:
    """Camera-sized frames with the part in the middle (the camera ROI crops it back); every 4th has a
    painted defect. Returns the ROI."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    ph, pw = good[0].shape[:2]
    if pw > width or ph > height:
        raise SystemExit(f"--frame-size {width}x{height} is smaller than the part images ({pw}x{ph})")
    x0, y0 = (width - pw) // 2, (height - ph) // 2
    rng = np.random.default_rng(0)
    for i in range(2 * len(good)):
        frame = rng.integers(90, 110, (height, width, 3), dtype=np.uint8)  # the scene around the part
        part = good[i % len(good)].copy()
        if i % 4 == 3:
            cv2.rectangle(part, (pw * 3 // 10, ph * 3 // 10), (pw * 5 // 10, ph * 5 // 10), (255, 0, 255), -1)
        frame[y0:y0 + ph, x0:x0 + pw] = part
        cv2.imwrite(str(folder / f"{i:04d}.png"), frame)
    return {"x": x0, "y": y0, "width": pw, "height": ph}


# --- measurement --------------------------------------------------------------------------------


class Subscriber:
    """Records every result with its arrival time, and every stats message."""

    def __init__(self, host: str, port: int):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.results: list[tuple[float, dict]] = []
        self.stats: list[tuple[float, dict]] = []
        self._subscribed = threading.Event()
        base = f"{PREFIX}/{STATION}"
        self._result_topic, self._stats_topic = f"{base}/result", f"{base}/stats"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{os.getpid()}", protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *a: c.subscribe([(self._result_topic, 1), (self._stats_topic, 0)])
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port, 30)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise SystemExit(f"could not subscribe on {host}:{port}")

    def _on_message(self, client, userdata, message) -> None:
        now = time.time()
        payload = json.loads(message.payload)
        (self.results if message.topic == self._result_topic else self.stats).append((now, payload))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def frame_time(payload: dict) -> float:
    return datetime.fromisoformat(payload["timestamp"].replace("Z", "+00:00")).timestamp()


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    arr = np.asarray(values)
    return {"n": int(arr.size), "p50": round(float(np.percentile(arr, 50)), 2),
            "p99": round(float(np.percentile(arr, 99)), 2), "max": round(float(arr.max()), 2)}


def backlog_of(stats: dict) -> float:
    camera = stats["pipeline"]["cameras"]["cam0"]
    in_flight = camera["frames"] - camera["inspected"] - camera["dropped"]
    return float(max(0, in_flight) + (stats["mqtt"].get("spool_depth") or 0))


def slope_per_minute(samples: list[tuple[float, float]]) -> float:
    if len(samples) < 3:
        return 0.0
    t = np.array([s[0] for s in samples])
    y = np.array([s[1] for s in samples])
    return float(np.polyfit(t - t[0], y, 1)[0] * 60.0)


def run(args: argparse.Namespace) -> dict:
    import yaml

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    work.mkdir(parents=True, exist_ok=True)
    broker = None
    daemon = None
    subscriber = None
    try:
        calibration_dir, engines_dir, good = prepare_product(args, work)
        frames, roi = args.frames, None
        if frames is None:
            w, h = (int(v) for v in args.frame_size.lower().split("x"))
            frames = work / "frames"
            roi = write_frames(frames, good, (w, h))
        if args.broker:
            host, port = args.broker.rsplit(":", 1)
            port = int(port)
        else:
            from mqtt_broker import MosquittoBroker

            broker = MosquittoBroker().start()
            host, port = broker.host, broker.port
        config = {
            "station": STATION,
            "cameras": [{"name": "cam0", "product": args.product,
                         "source": {"type": "replay", "path": str(frames), "fps": args.fps, "loop": True},
                         "trigger": {"mode": "every_frame"}, "roi": roi}],
            "scoring": {"backend": args.backend, "threads": args.threads,
                        "calibration_dir": str(calibration_dir), "engines_dir": str(engines_dir)},
            "mqtt": {"host": host, "port": port, "stats_interval_s": 1},
            "spool": {"path": str(work / "spool" / "results.sqlite3")},
        }
        if args.stream:
            config["stream"] = {"enabled": True, "refit_every": args.stream, "quiet_frames": 0, "max_position": 1.0}
        config_path = work / "config.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        subscriber = Subscriber(host, port)
        log_file = open(work / "daemon.log", "w")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "edge_inspect.cli", "run", "--config", str(config_path)],
            stdout=log_file, stderr=subprocess.STDOUT, cwd=work,
        )
        started = time.time()
        measure_from = started + args.warmup
        end = measure_from + args.duration
        rss: list[tuple[float, float]] = []
        while time.time() < end:
            if daemon.poll() is not None:
                raise SystemExit(f"the daemon exited with {daemon.returncode}; see {work / 'daemon.log'}")
            now = time.time()
            if now >= measure_from:
                rss.append((now, rss_mb(daemon.pid)))
            time.sleep(1.0)
        daemon.send_signal(signal.SIGTERM)
        exit_code = daemon.wait(60)
        time.sleep(0.5)
        log_file.close()

        window = [(t, p) for t, p in subscriber.results if measure_from <= frame_time(p) <= end]
        ok_latency = [(t - frame_time(p)) * 1000 for t, p in window if p["verdict"] == "OK"]
        ng_latency = [(t - frame_time(p)) * 1000 for t, p in window if p["verdict"] == "NG"]
        stats_window = [(t, s) for t, s in subscriber.stats if measure_from <= t <= end]
        backlog = [(t, backlog_of(s)) for t, s in stats_window]
        first_stats = stats_window[0][1]["pipeline"]["cameras"]["cam0"] if stats_window else {}
        last = stats_window[-1][1] if stats_window else {"pipeline": {"cameras": {"cam0": {}}}, "mqtt": {}}
        camera = last["pipeline"]["cameras"]["cam0"]
        fifth = max(1, len(backlog) // 5)
        growth = (float(np.mean([b for _, b in backlog[-fifth:]])) - float(np.mean([b for _, b in backlog[:fifth]]))) if backlog else 0.0
        captured = camera.get("frames", 0) - first_stats.get("frames", 0)
        dropped = camera.get("dropped", 0) - first_stats.get("dropped", 0)
        report = {
            "duration_s": args.duration,
            "fps_target": args.fps,
            "results": len(window),
            "fps_out": round(len(window) / args.duration, 2),
            "frames_captured": captured,
            "frames_dropped": dropped,
            "latency_ok_ms": percentiles(ok_latency),
            "latency_ng_ms": percentiles(ng_latency),
            "backlog": {
                "max": max((b for _, b in backlog), default=0.0),
                "growth": round(growth, 2),
                "slope_per_min": round(slope_per_minute(backlog), 3),
                "samples": len(backlog),
            },
            "rss_mb": {"max": round(max((r for _, r in rss), default=0.0), 1), "last": round(rss[-1][1], 1) if rss else 0.0},
            "stage_latency_ms": {k: v for k, v in camera.get("latency_ms", {}).items()},
            "daemon_exit_code": exit_code,
            "spool_depth_at_end": last["mqtt"].get("spool_depth"),
            "stream": (last["pipeline"].get("stream") or {}).get("products", {}).get(args.product) if args.stream else None,
            "workdir": str(work) if args.workdir else None,
        }
        p99 = report["latency_ok_ms"]["p99"]
        report["targets"] = {
            "latency_ok_p99_le_60ms": p99 is not None and p99 <= TARGET_P99_MS,
            "no_backlog_growth": report["backlog"]["growth"] <= 1.0 and report["backlog"]["max"] <= 10,
            "rss_le_400mb": report["rss_mb"]["max"] <= TARGET_RSS_MB,
            "clean_exit": exit_code == 0,
        }
        report["pass"] = all(report["targets"].values())
        return report
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
        if subscriber is not None:
            subscriber.close()
        if broker is not None:
            broker.close()
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def print_table(report: dict) -> None:
    ok, ng = report["latency_ok_ms"], report["latency_ng_ms"]
    rows = [
        ("results / duration", f"{report['results']} in {report['duration_s']:g} s ({report['fps_out']} fps, target {report['fps_target']:g})"),
        ("frames captured / dropped", f"{report['frames_captured']} / {report['frames_dropped']}"),
        ("frame->broker OK p50 / p99 / max", f"{ok['p50']} / {ok['p99']} / {ok['max']} ms (n={ok['n']}; target p99 <= {TARGET_P99_MS:g})"),
        ("frame->broker NG p50 / p99 / max", f"{ng['p50']} / {ng['p99']} / {ng['max']} ms (n={ng['n']})"),
        ("backlog max / growth / slope", f"{report['backlog']['max']:g} / {report['backlog']['growth']:g} / {report['backlog']['slope_per_min']:g} per min"),
        ("RSS max / last", f"{report['rss_mb']['max']} / {report['rss_mb']['last']} MB (target <= {TARGET_RSS_MB:g})"),
    ]
    for stage, values in report["stage_latency_ms"].items():
        rows.append((f"stage {stage} p50 / p99", f"{values['p50']} / {values['p99']} ms"))
    if report.get("stream"):
        learned = report["stream"]
        rows.append(("stream refits committed / not / stored", f"{learned.get('committed', 0)} / {learned.get('not_committed', 0)} / "
                                                               f"{learned.get('stored', 0)} candidates"))
    rows.append(("daemon exit code / spool at end", f"{report['daemon_exit_code']} / {report['spool_depth_at_end']}"))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for name, passed in report["targets"].items():
        print(f"{'PASS' if passed else 'FAIL'}  {name}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
