#!/usr/bin/env python3
"""Soak the real daemon: product switches, broker restarts and a replay folder with corrupt files.

    python tools/soak.py                                  # 30 minutes, 500 switches, a broker restart every 5 min
    python tools/soak.py --duration 180 --switches 50 --restart-every 60 --json    # a 3-minute look

`edge-inspect run` runs as a subprocess against a mosquitto on a free loopback port (with persistence,
so a restart keeps the subscriber's session). The replay folder holds good frames plus a truncated
PNG, a zero-byte file, text named .png and an 8000x8000 PNG header. A persistent subscriber records
every result; at the end the daemon gets SIGTERM and the tool reports RSS growth (after a warm-up),
results lost (result seqs never received), spool drops, tracebacks in the log and the exit code.

Targets (exit 1 when one is missed): RSS growth < 20 MB, 0 results lost, 0 tracebacks, exit code 0.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

STATION = "soak"
PREFIX = "edge-inspect"
TARGET_RSS_GROWTH_MB = 20.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=1800.0, help="seconds of soak after warm-up (default 1800)")
    p.add_argument("--warmup", type=float, default=20.0, help="seconds before the first RSS sample (default 20)")
    p.add_argument("--switches", type=int, default=500, help="product/set messages over the soak (default 500)")
    p.add_argument("--restart-every", type=float, default=300.0, help="broker restart period in s (default 300)")
    p.add_argument("--fps", type=float, default=10.0, help="replay pace (default 10)")
    p.add_argument("--workdir", type=Path, help="keep config, spool and logs here (default: a temp folder, removed)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p.parse_args(argv)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def prepare(workdir: Path) -> tuple[Path, Path, Path]:
    """Two calibrated products (soak-a, soak-b) and the replay folder with its corrupt files."""
    import cv2
    import numpy as np

    from edge_inspect import cli
    from edge_inspect.calibration.artifacts import ensure_backbone
    from edge_inspect.offline.datasets.generate import generate_dataset

    engines = workdir / "engines"
    engines.mkdir(parents=True, exist_ok=True)
    ensure_backbone(engines)
    dataset = generate_dataset(workdir / "data", "brick", n_train=4, n_test_good=4, n_test_defect=0, size=128, seed=1)
    calibration = workdir / "calibration"
    for name in ("soak-a", "soak-b"):
        code = cli.main(["calibrate", "--product", name, "--images", str(dataset / "train" / "good"), "--calibration-dir",
                         str(calibration), "--engines-dir", str(engines), "--size", "128", "--bank-size", "128", "--force"])
        if code:
            raise SystemExit(f"calibrating {name} failed ({code})")
    frames = workdir / "frames"
    frames.mkdir(exist_ok=True)
    goods = sorted((dataset / "train" / "good").glob("*.png"))
    for i in range(12):
        image = cv2.imread(str(goods[i % len(goods)]))
        if i % 4 == 3:
            cv2.rectangle(image, (40, 40), (80, 70), (255, 0, 255), -1)
        cv2.imwrite(str(frames / f"{i:04d}.png"), image)
    good = (frames / "0000.png").read_bytes()
    (frames / "0003a_truncated.png").write_bytes(good[: len(good) // 3])
    (frames / "0005a_empty.png").write_bytes(b"")
    (frames / "0007a_text.png").write_text("not an image\n")
    header = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + (8000).to_bytes(4, "big") * 2 + b"\x08\x02\x00\x00\x00"
    (frames / "0009a_huge.png").write_bytes(header + np.zeros(64, np.uint8).tobytes())
    return calibration, engines, frames


def main(argv: list[str] | None = None) -> int:
    import yaml
    from mqtt_broker import MessageCollector, MosquittoBroker

    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="edge-inspect-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    calibration, engines, frames = prepare(workdir)
    broker = MosquittoBroker(persistence_dir=workdir / "broker").start()
    config = {
        "station": STATION,
        "cameras": [{"name": "cam0", "product": "soak-a", "trigger": {"mode": "every_frame"},
                     "source": {"type": "replay", "path": str(frames), "fps": args.fps, "loop": True},
                     "reconnect": {"initial_delay_s": 0.05, "max_delay_s": 0.2}}],
        "scoring": {"backend": "onnxruntime", "threads": 1, "calibration_dir": str(calibration), "engines_dir": str(engines)},
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "stats_interval_s": 5},
        "spool": {"path": str(workdir / "spool.sqlite3")},
        "evidence": {"dir": str(workdir / "evidence"), "max_count": 200},
    }
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    result_topic = f"{PREFIX}/{STATION}/result"
    collector = MessageCollector(broker.port, [result_topic], client_id=f"soak-{os.getpid()}", persistent=True)
    collector.wait_subscribed()
    log_path = workdir / "daemon.log"
    with open(log_path, "w") as log_file:
        daemon = subprocess.Popen([sys.executable, "-m", "edge_inspect.cli", "run", "--config", str(config_path)],
                                  stdout=subprocess.DEVNULL, stderr=log_file, cwd=workdir)
    summary: dict = {"workdir": str(workdir)}
    try:
        time.sleep(args.warmup)
        rss_start = rss_mb(daemon.pid)
        started = time.monotonic()
        switch_every = args.duration / max(1, args.switches)
        next_switch, next_restart, switches, restarts = started, started + args.restart_every, 0, 0
        while time.monotonic() - started < args.duration and daemon.poll() is None:
            now = time.monotonic()
            if now >= next_switch and switches < args.switches:
                product = "soak-b" if switches % 2 == 0 else "soak-a"
                collector.client.publish(f"{PREFIX}/{STATION}/product/set", product.encode(), qos=1)
                switches += 1
                next_switch += switch_every
            if now >= next_restart:
                broker.stop()
                time.sleep(2.0)
                broker.start()
                restarts += 1
                next_restart += args.restart_every
            time.sleep(0.05)
        rss_end = rss_mb(daemon.pid) if daemon.poll() is None else float("nan")
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(120)
        time.sleep(3.0)  # the last results reach the subscriber
        seqs = {m.json()["seq"] for m in collector.on(result_topic)}
        last = max(seqs) if seqs else 0
        text = log_path.read_text(errors="replace")
        summary.update(
            seconds=round(time.monotonic() - started, 1), switches=switches, broker_restarts=restarts,
            results=len(seqs), last_seq=last, lost=len(set(range(1, last + 1)) - seqs),
            rss_start_mb=round(rss_start, 1), rss_end_mb=round(rss_end, 1), rss_growth_mb=round(rss_end - rss_start, 1),
            tracebacks=text.count("Traceback"), switch_errors=text.count("product switch to"),
            skipped_files=text.count("(skipped)"), exit_code=code,
        )
    finally:
        if daemon.poll() is None:
            daemon.kill()
        collector.close()
        broker.close()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    ok = (summary["rss_growth_mb"] < TARGET_RSS_GROWTH_MB and summary["lost"] == 0 and summary["tracebacks"] == 0
          and summary["exit_code"] == 0)
    summary["ok"] = ok
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:16} {value}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
