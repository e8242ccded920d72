"""Runs a ResultPublisher in its own process and publishes N synthetic inspections (for kill/restart tests).

Prints one line per result once publish_result has returned (i.e. it is in the spool):
    spooled <inspection_id>
and, after a clean stop, one line `state <json>` with the publisher's state().

    python tests/publisher_harness.py --port 1883 --spool /tmp/s.sqlite3 --count 400 --rate 200 --id-prefix run1
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_inspect import records  # noqa: E402
from edge_inspect.config.mqtt import MqttConfig, SpoolConfig  # noqa: E402
from edge_inspect.mqtt.publisher import ResultPublisher  # noqa: E402


def synthetic_inspection(index: int, id_prefix: str, station: str) -> records.Inspection:
    """An inspection as the daemon would build it; every 5th one NG with a region."""
    ng = index % 5 == 0
    return records.Inspection(
        inspection_id=f"{id_prefix}-{index:06d}",
        station=station,
        camera="cam0",
        product="bracket-a",
        frame_id=index,
        timestamp=time.time(),
        score=0.9 if ng else 0.1,
        threshold=0.5,
        verdict="NG" if ng else "OK",
        regions=(records.Region((10, 20, 40, 60), 1.25, 0.93, ("top left",)),) if ng else (),
        part_id=f"P{index}",
        latency_ms={"score": 12.5, "total": 20.0},
        calibration_id="cal-test",
        model_id="model-test",
        vlm_status="pending" if ng else "skipped",
        evidence_path=None,
    )


def kill_network_thread(client, times: int = 1) -> None:
    """Make paho's network thread die `times` times, the way a bug inside paho (or a clock jump it does not
    survive) ends it: an exception out of its loop. Each time it is restarted, it dies again."""
    original = client._loop
    left = [times]

    def dying(timeout: float = 1.0):
        if left[0] > 0:
            left[0] -= 1
            raise RuntimeError("injected: paho's network thread dies")
        return original(timeout)

    client._loop = dying


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--protocol", default="5")
    parser.add_argument("--spool", required=True)
    parser.add_argument("--station", default="harness")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--rate", type=float, default=200.0, help="results per second")
    parser.add_argument("--id-prefix", default="run")
    parser.add_argument("--max-inflight", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    mqtt = MqttConfig(
        host=args.host, port=args.port, protocol=args.protocol, reconnect_min_s=0.2, reconnect_max_s=1.0,
        max_inflight=args.max_inflight, keepalive_s=5,
    )
    publisher = ResultPublisher(mqtt, SpoolConfig(path=args.spool), station=args.station)
    publisher.start()
    publisher.wait_connected(10.0)
    interval = 1.0 / args.rate
    next_at = time.monotonic()
    for index in range(args.count):
        inspection = synthetic_inspection(index, args.id_prefix, args.station)
        publisher.publish_result(inspection)
        print(f"spooled {inspection.inspection_id}", flush=True)
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))
    publisher.stop(timeout=10.0)
    print(f"state {json.dumps(publisher.state())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
