"""Benchmark the MQTT publish path: what the spool costs against plain paho, measured in the same run.

    .venv/bin/python tools/bench_mqtt.py                 # starts its own mosquitto on a free loopback port
    .venv/bin/python tools/bench_mqtt.py --host broker.local --port 1883 --spool-dir /var/lib/edge-inspect --json

Modes (same payloads, same broker, same subscriber in this process):
  reference  build the result JSON and paho publish() it at QoS 1 (no spool)
  spool      ResultPublisher.publish_result(): SQLite insert (WAL) first, then QoS 1, row deleted on PUBACK
Measured: the time publish returns to the caller, publish -> subscriber latency at --rate results/s,
the throughput of a burst, and the spool alone (append; append+fetch+delete) with synchronous=normal and =full.
Targets (issue 6): end-to-end p99 <= 10 ms at 50 results/s; spool overhead <= 1 ms per result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the mosquitto runner the tests use

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from edge_inspect import records  # noqa: E402
from edge_inspect.config.mqtt import MqttConfig, SpoolConfig  # noqa: E402
from edge_inspect.mqtt.payloads import encode, result_payload  # noqa: E402
from edge_inspect.mqtt.publisher import ResultPublisher  # noqa: E402
from edge_inspect.mqtt.spool import PRIORITY_OK, Spool  # noqa: E402

STATION = "bench"


def inspection(index: int, run: str) -> records.Inspection:
    ng = index % 10 == 0
    return records.Inspection(
        inspection_id=f"{run}-{index:07d}", station=STATION, camera="cam0", product="bracket-a", frame_id=index,
        timestamp=time.time(), score=0.9 if ng else 0.1, threshold=0.5, verdict="NG" if ng else "OK",
        regions=(records.Region((10, 20, 40, 60), 1.25, 0.93, ("top left",)),) if ng else (),
        part_id=f"P{index}", latency_ms={"capture": 1.0, "score": 30.0, "localize": 2.0, "total": 35.0},
        calibration_id="cal-bench", model_id="model-bench", vlm_status="pending" if ng else "skipped",
    )


class Arrivals:
    """A QoS 1 subscriber that notes when each inspection id first arrives (perf_counter)."""

    def __init__(self, host: str, port: int, topics: list[str]):
        self.times: dict[str, float] = {}
        self._ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{os.getpid()}", protocol=paho.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *a: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._ready.wait(10):
            raise SystemExit(f"no SUBACK from {host}:{port}")

    def _on_message(self, client, userdata, message) -> None:
        now = time.perf_counter()
        inspection_id = json.loads(message.payload)["inspection_id"]
        self.times.setdefault(inspection_id, now)

    def wait_for(self, ids: list[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(i in self.times for i in ids):
                return True
            time.sleep(0.005)
        return False

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def paced(publish, items: list[records.Inspection], rate: float) -> dict[str, float]:
    """Call publish(item) at `rate` per second; returns id -> perf_counter at the call and the call durations."""
    started: dict[str, float] = {}
    calls: list[float] = []
    interval = 1.0 / rate if rate > 0 else 0.0
    next_at = time.perf_counter()
    for item in items:
        if interval:
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            next_at += interval
        t0 = time.perf_counter()
        publish(item)
        calls.append(time.perf_counter() - t0)
        started[item.inspection_id] = t0
    return {"started": started, "calls": calls}


def reference_publisher(host: str, port: int):
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-ref-{os.getpid()}", protocol=paho.MQTTv5)
    client.max_inflight_messages_set(20)
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.connect(host, port)
    client.loop_start()
    connected.wait(10)
    seq = iter(range(1, 10**9))
    topic = f"edge-inspect-ref/{STATION}/result"

    def publish(item: records.Inspection) -> None:
        client.publish(topic, encode(result_payload(item, next(seq))), qos=1)

    return client, publish, topic


def measure(mode: str, publish, arrivals: Arrivals, items: list[records.Inspection], rate: float) -> dict[str, float]:
    run = paced(publish, items, rate)
    ids = [i.inspection_id for i in items]
    if not arrivals.wait_for(ids, timeout=60):
        missing = sum(1 for i in ids if i not in arrivals.times)
        raise SystemExit(f"{mode}: {missing} of {len(ids)} results never arrived")
    latency = np.array([arrivals.times[i] - run["started"][i] for i in ids]) * 1000
    calls = np.array(run["calls"]) * 1000
    return {
        "call_mean_ms": float(calls.mean()), "call_p50_ms": float(np.percentile(calls, 50)),
        "call_p99_ms": float(np.percentile(calls, 99)),
        "e2e_p50_ms": float(np.percentile(latency, 50)), "e2e_p99_ms": float(np.percentile(latency, 99)),
        "e2e_max_ms": float(latency.max()),
    }


def burst(publish, arrivals: Arrivals, items: list[records.Inspection]) -> float:
    t0 = time.perf_counter()
    for item in items:
        publish(item)
    ids = [i.inspection_id for i in items]
    if not arrivals.wait_for(ids, timeout=120):
        raise SystemExit("burst: results never arrived")
    return len(items) / (max(arrivals.times[i] for i in ids) - t0)


def spool_costs(folder: Path, synchronous: str, count: int) -> dict[str, float]:
    """Spool.append alone, and the whole life of a row (append, fetch for sending, delete on PUBACK)."""
    payloads = [encode(result_payload(inspection(i, "append"), i + 1)) for i in range(count)]
    path = folder / f"append-{synchronous}.sqlite3"
    appends, cycles = [], []
    with Spool(SpoolConfig(path=str(path), synchronous=synchronous)) as spool:
        for payload in payloads:
            t0 = time.perf_counter()
            spool.append("result", "t", PRIORITY_OK, lambda seq, p=payload: p, origin="bench")
            appends.append(time.perf_counter() - t0)
        spool.delete(row.id for row in spool.fetch_after(0, count))
        last = 0
        for payload in payloads:
            t0 = time.perf_counter()
            spool.append("result", "t", PRIORITY_OK, lambda seq, p=payload: p, origin="bench")
            row = spool.fetch_after(last, 1)[0]
            spool.delete([row.id])
            cycles.append(time.perf_counter() - t0)
            last = row.id
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    append_ms, cycle_ms = np.array(appends) * 1000, np.array(cycles) * 1000
    return {
        "append_p50_ms": float(np.percentile(append_ms, 50)), "append_p99_ms": float(np.percentile(append_ms, 99)),
        "append_mean_ms": float(append_ms.mean()),
        "cycle_p50_ms": float(np.percentile(cycle_ms, 50)), "cycle_p99_ms": float(np.percentile(cycle_ms, 99)),
        "cycle_mean_ms": float(cycle_ms.mean()),
    }


def filesystem_of(path: Path) -> str:
    best, kind = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype, *_ = line.split()
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", help="use this broker instead of starting mosquitto")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--count", type=int, default=500, help="results per paced run (default 500)")
    parser.add_argument("--rate", type=float, default=50.0, help="results per second in the paced runs (default 50)")
    parser.add_argument("--burst", type=int, default=1000, help="results in the throughput burst (default 1000)")
    parser.add_argument("--appends", type=int, default=2000, help="spool rows per synchronous mode in the spool-only runs (default 2000)")
    parser.add_argument("--spool-dir", help="folder for the spool files (default: a temp folder); measure on the target disk")
    parser.add_argument("--synchronous", choices=["normal", "full"], default="normal", help="spool mode of the paced/burst runs")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON instead of a table")
    args = parser.parse_args()

    broker = None
    host, port = args.host, args.port
    if host is None:
        from mqtt_broker import MosquittoBroker

        broker = MosquittoBroker().start()
        host, port = broker.host, broker.port
    folder = Path(args.spool_dir or tempfile.mkdtemp(prefix="bench-mqtt-"))
    folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {
        "count": args.count, "rate": args.rate, "burst": args.burst, "synchronous": args.synchronous,
        "spool_dir": str(folder), "spool_fs": filesystem_of(folder), "broker": f"{host}:{port}",
        "cpus": os.cpu_count(),
    }
    publisher = None
    arrivals = Arrivals(host, port, [f"edge-inspect-ref/{STATION}/result", f"edge-inspect/{STATION}/result"])
    try:
        ref_client, ref_publish, _ = reference_publisher(host, port)
        publisher = ResultPublisher(
            MqttConfig(host=host, port=port, max_inflight=20),
            SpoolConfig(path=str(folder / "bench.sqlite3"), synchronous=args.synchronous), STATION,
        )
        publisher.start()
        if not publisher.wait_connected(10):
            raise SystemExit(f"publisher could not connect: {publisher.state()['last_error']}")
        warm = [inspection(i, "warm") for i in range(50)]
        measure("warm-up", ref_publish, arrivals, warm[:25], 0)
        measure("warm-up", publisher.publish_result, arrivals, warm[25:], 0)
        results["reference"] = measure("reference", ref_publish, arrivals, [inspection(i, "ref") for i in range(args.count)], args.rate)
        results["spool"] = measure("spool", publisher.publish_result, arrivals, [inspection(i, "spool") for i in range(args.count)], args.rate)
        results["reference"]["burst_per_s"] = burst(ref_publish, arrivals, [inspection(i, "refburst") for i in range(args.burst)])
        results["spool"]["burst_per_s"] = burst(publisher.publish_result, arrivals, [inspection(i, "spoolburst") for i in range(args.burst)])
        ref_client.disconnect()
        ref_client.loop_stop()
        publisher.stop()
        publisher = None
        results["spool_normal"] = spool_costs(folder, "normal", args.appends)
        results["spool_full"] = spool_costs(folder, "full", args.appends)
    finally:
        arrivals.close()
        if publisher is not None:
            publisher.stop(timeout=1)
        if broker is not None:
            broker.close()
    ref, spool = results["reference"], results["spool"]
    # The spool's own work per result: insert, read back for sending, delete on PUBACK (synchronous mode of the runs).
    results["spool_overhead_ms"] = results[f"spool_{args.synchronous}"]["cycle_mean_ms"]
    results["targets"] = {
        "e2e_p99_le_10ms": spool["e2e_p99_ms"] <= 10.0,
        "spool_overhead_le_1ms": results["spool_overhead_ms"] <= 1.0,
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"broker {results['broker']}, {args.count} results at {args.rate:g}/s per mode, burst {args.burst}, "
          f"spool in {folder} ({results['spool_fs']}, synchronous={args.synchronous}), {results['cpus']} CPUs")
    rows = [
        ("publish call mean [ms]", "call_mean_ms"), ("publish call p50 [ms]", "call_p50_ms"),
        ("publish call p99 [ms]", "call_p99_ms"), ("publish->subscriber p50 [ms]", "e2e_p50_ms"),
        ("publish->subscriber p99 [ms]", "e2e_p99_ms"), ("publish->subscriber max [ms]", "e2e_max_ms"),
        ("burst throughput [results/s]", "burst_per_s"),
    ]
    print(f"{'metric':<32}{'reference (paho)':>18}{'with spool':>14}{'ratio':>8}")
    for label, key in rows:
        print(f"{label:<32}{ref[key]:>18.3f}{spool[key]:>14.3f}{spool[key] / ref[key]:>8.2f}")
    for mode in ("normal", "full"):
        n = results[f"spool_{mode}"]
        print(f"spool synchronous={mode:<7} append p50 {n['append_p50_ms']:.3f} / p99 {n['append_p99_ms']:.3f} / "
              f"mean {n['append_mean_ms']:.3f} ms; append+fetch+delete p50 {n['cycle_p50_ms']:.3f} / "
              f"p99 {n['cycle_p99_ms']:.3f} / mean {n['cycle_mean_ms']:.3f} ms")
    print(f"spool overhead per result (append+fetch+delete mean, synchronous={args.synchronous}): "
          f"{results['spool_overhead_ms']:.3f} ms [target <= 1 ms: "
          f"{'met' if results['targets']['spool_overhead_le_1ms'] else 'MISSED'}]")
    print(f"end-to-end p99 with spool: {spool['e2e_p99_ms']:.3f} ms "
          f"[target <= 10 ms: {'met' if results['targets']['e2e_p99_le_10ms'] else 'MISSED'}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
