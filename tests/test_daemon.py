"""The daemon end to end: `edge-inspect run` as a subprocess, a real mosquitto on a free loopback port,
a real calibrated product (built once per session from a generated dataset), replay and HTTP MJPEG
sources, systemd's notify protocol on a test datagram socket, and real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest
import yaml
from conftest import wait_until
from mqtt_broker import MessageCollector, MosquittoBroker, free_port, mosquitto_binary
from test_capture import MjpegCamera

from edge_inspect import cli
from edge_inspect.mqtt.payloads import load_schema

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "edge-inspect"
STATION = "t1"
RESULT = f"{PREFIX}/{STATION}/result"
STATUS = f"{PREFIX}/{STATION}/status"
STATS = f"{PREFIX}/{STATION}/stats"

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto broker binary not found"),
]


# --- a calibrated product, once per session -----------------------------------------------------


def paint_defect(bgr: np.ndarray) -> np.ndarray:
    out = bgr.copy()
    cv2.rectangle(out, (40, 40), (80, 70), (255, 0, 255), -1)
    return out


@pytest.fixture(scope="session")
def product(tmp_path_factory, pytestconfig):
    """Products `brick` and `brick-b` calibrated by `edge-inspect calibrate` from 4 generated good images,
    plus good frames and frames with a painted defect.

    The good frames are the calibration images themselves: these tests check the daemon's plumbing
    (one result per frame, verdicts, reloads), so every frame must be clearly OK or clearly NG. Held-out
    good parts at 4 shots and 128 px sit close to the threshold; the scorer's own tests and
    `edge-inspect evaluate` measure that."""
    from edge_inspect.calibration.artifacts import BACKBONE_FILE, ensure_backbone
    from edge_inspect.errors import UserError
    from edge_inspect.offline.datasets.generate import generate_dataset

    cache_plugin = getattr(pytestconfig, "cache", None)  # absent under -p no:cacheprovider
    cache = Path(cache_plugin.mkdir("edge-inspect-backbone")) if cache_plugin else tmp_path_factory.mktemp("backbone")
    try:
        backbone = ensure_backbone(cache)  # exported from the pretrained weights once, then cached
    except UserError as exc:
        pytest.skip(f"no backbone: {exc}")
    root = tmp_path_factory.mktemp("product")
    engines = root / "engines"
    (engines / BACKBONE_FILE).parent.mkdir(parents=True)
    os.symlink(backbone, engines / BACKBONE_FILE)
    dataset = generate_dataset(root / "data", "brick", n_train=4, n_test_good=4, n_test_defect=0, size=128, seed=1)
    for name in ("brick", "brick-b"):
        code = cli.main([
            "calibrate", "--product", name, "--images", str(dataset / "train" / "good"),
            "--calibration-dir", str(root / "calibration"), "--engines-dir", str(engines),
            "--size", "128", "--bank-size", "128",
        ])
        assert code == 0
    good = [cv2.imread(str(p)) for p in sorted((dataset / "train" / "good").glob("*.png"))]
    return {"calibration_dir": root / "calibration", "engines_dir": engines, "good": good}


def write_frames(folder: Path, product, count: int, defect_every: int = 4) -> list[bool]:
    """count frames, every `defect_every`-th with a painted defect; returns which ones are defective."""
    folder.mkdir(parents=True, exist_ok=True)
    defective = []
    for i in range(count):
        frame = product["good"][i % len(product["good"])]
        bad = defect_every > 0 and i % defect_every == defect_every - 1
        cv2.imwrite(str(folder / f"{i:04d}.png"), paint_defect(frame) if bad else frame)
        defective.append(bad)
    return defective


def write_config(tmp_path: Path, product, port: int, source: dict, trigger: dict, camera_product="brick", **extra) -> Path:
    config = {
        "station": STATION,
        "cameras": [{
            "name": "cam0", "product": camera_product, "source": source, "trigger": trigger,
            "reconnect": {"initial_delay_s": 0.05, "max_delay_s": 0.2, "stall_timeout_s": 2, "open_timeout_s": 2},
        }],
        "scoring": {"backend": "onnxruntime", "threads": 1, "calibration_dir": str(product["calibration_dir"]),
                    "engines_dir": str(product["engines_dir"])},
        "mqtt": {"host": "127.0.0.1", "port": port, "stats_interval_s": 1, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
        "spool": {"path": str(tmp_path / "spool" / "results.sqlite3")},
        "pipeline": {"drain_timeout_s": 10},
        "evidence": {"dir": str(tmp_path / "evidence")},  # on by default; in-process daemons must not write to the cwd
    }
    for key, value in extra.items():
        config[key] = {**config.get(key, {}), **value}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --- the daemon process, the notify socket ------------------------------------------------------


class Daemon:
    """`edge-inspect -vv run --config FILE` in a subprocess; stderr is read continuously."""

    INSPECTION = re.compile(r"inspection ([0-9a-f]{32}) cam0 frame (\d+)")

    def __init__(self, config: Path, env: dict[str, str] | None = None):
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge_inspect.cli", "-vv", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=config.parent,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def inspections(self) -> list[str]:
        return [m.group(1) for m in self.INSPECTION.finditer(self.log)]

    def wait_log(self, pattern: str, timeout: float = 20.0) -> bool:
        return wait_until(lambda: re.search(pattern, self.log) is not None, timeout)

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def daemons():
    started: list[Daemon] = []

    def start(config: Path, env: dict[str, str] | None = None) -> Daemon:
        daemon = Daemon(config, env)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.close()


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET (abstract name, like systemd uses)."""

    def __init__(self):
        self.address = f"@edge-inspect-test-{os.getpid()}-{time.monotonic_ns()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:])
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except socket.timeout:
                continue
            except OSError:
                return

    def assignments(self) -> list[str]:
        return [line for message in list(self.messages) for line in message.split("\n")]

    def count(self, assignment: str) -> int:
        return sum(1 for line in self.assignments() if line == assignment)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket():
    sock = NotifySocket()
    yield sock
    sock.close()




def results(collector: MessageCollector) -> list[dict]:
    return [m.json() for m in collector.on(RESULT)]


def latest_stats(collector: MessageCollector) -> dict | None:
    stats = collector.on(STATS)
    return stats[-1].json() if stats else None


# --- the tests ----------------------------------------------------------------------------------


def test_every_frame_yields_exactly_one_result(tmp_path, product, mosquitto_broker, daemons, notify_socket):
    defective = write_frames(tmp_path / "frames", product, 16)
    config = write_config(
        tmp_path, product, mosquitto_broker.port,
        source={"type": "replay", "path": str(tmp_path / "frames"), "fps": 0},
        trigger={"mode": "every_frame"},
    )
    with MessageCollector(mosquitto_broker.port, [RESULT, STATUS]) as collector:
        collector.wait_subscribed()
        daemon = daemons(config, {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "10000000"})
        assert daemon.wait(60) == 0, daemon.log  # a replay without loop ends the run by itself
        assert collector.wait_for(lambda msgs: sum(m.topic == RESULT for m in msgs) >= 16, 10)
        collector.barrier()  # the daemon is gone: anything extra (a duplicate) has arrived by now
        got = results(collector)
    assert sorted(r["frame_id"] for r in got) == list(range(1, 17)), daemon.log
    assert len({r["inspection_id"] for r in got}) == 16
    assert set(daemon.inspections()) == {r["inspection_id"] for r in got}
    schema = load_schema("result")
    for result in got:
        jsonschema.validate(result, schema)
        bad = defective[result["frame_id"] - 1]
        assert result["verdict"] == ("NG" if bad else "OK"), result
        assert result["camera"] == "cam0" and result["product"] == "brick" and result["station"] == STATION
        assert {"queue", "preprocess", "score", "total"} <= set(result["latency_ms"])
        if bad:
            assert result["regions"] and result["vlm_status"] == "skipped"
            x0, y0, x1, y1 = result["regions"][0]["box"]
            assert x0 <= 60 <= x1 and y0 <= 55 <= y1  # the painted rectangle, in frame pixels
    # systemd: READY once the models loaded, the watchdog fed from the frame loop, STOPPING at the end.
    assert notify_socket.assignments()[0] == "READY=1"
    assert notify_socket.count("WATCHDOG=1") >= 1
    assert "STOPPING=1" in notify_socket.assignments()
    assert any(line.startswith("STATUS=") for line in notify_socket.assignments())
    assert [m.payload for m in collector.on(STATUS)][-1] == b"stopped"


def test_sighup_reload_product_switch_and_sigterm_drain(tmp_path, product, mosquitto_broker, daemons, notify_socket):
    write_frames(tmp_path / "frames", product, 8)
    source = {"type": "replay", "path": str(tmp_path / "frames"), "fps": 25, "loop": True}
    config = write_config(tmp_path, product, mosquitto_broker.port, source=source, trigger={"mode": "every_frame"})
    with MessageCollector(mosquitto_broker.port, [RESULT, STATUS, STATS]) as collector:
        collector.wait_subscribed()
        daemon = daemons(config, {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "10000000"})
        assert wait_until(lambda: notify_socket.count("READY=1") >= 1), daemon.log
        assert wait_until(lambda: notify_socket.count("WATCHDOG=1") >= 2), daemon.log
        assert wait_until(lambda: len(results(collector)) >= 5), daemon.log

        # SIGHUP with a new product in the file: results switch, the MQTT session stays.
        write_config(tmp_path, product, mosquitto_broker.port, source=source, trigger={"mode": "every_frame"},
                     camera_product="brick-b")
        daemon.send(signal.SIGHUP)
        assert wait_until(lambda: notify_socket.count("RELOADING=1") == 1 and notify_socket.count("READY=1") == 2), daemon.log
        assert wait_until(lambda: any(r["product"] == "brick-b" for r in results(collector))), daemon.log

        # SIGHUP with a broken file: refused, the daemon keeps running the previous config.
        config.write_text(config.read_text().replace("every_frame", "sometimes"))
        daemon.send(signal.SIGHUP)
        assert daemon.wait_log(r"(?s)reload refused.*config\.yaml:\d+: cameras\[0\]\.trigger\.mode"), daemon.log
        count = len(results(collector))
        assert wait_until(lambda: len(results(collector)) >= count + 5), daemon.log
        assert daemon.proc.poll() is None

        # product/set over MQTT switches at run time, without a restart.
        collector.client.publish(f"{PREFIX}/{STATION}/product/set", b"brick", qos=1)
        assert wait_until(lambda: results(collector)[-1]["product"] == "brick"), daemon.log
        collector.client.publish(f"{PREFIX}/{STATION}/product/set", b"no-such-product", qos=1)
        assert daemon.wait_log(r"product switch to 'no-such-product' refused"), daemon.log

        assert wait_until(lambda: (latest_stats(collector) or {}).get("pipeline", {}).get("reload_errors") == 1)
        stats = latest_stats(collector)
        jsonschema.validate(stats, load_schema("stats"))
        assert stats["mqtt"]["connects"] == 1  # reloads never dropped the MQTT session
        assert stats["pipeline"]["reloads"] == 1 and stats["pipeline"]["product_switches"] == 1
        camera = stats["pipeline"]["cameras"]["cam0"]
        assert camera["state"] == "streaming" and camera["inspected"] > 0 and camera["latency_ms"]["score"]["n"] > 0
        assert {"fps_in", "fps_out", "dropped", "reconnects", "flagged_rate", "queue_depth"} <= set(camera)
        assert stats["pipeline"]["rss_mb"] > 0
        status = [line for line in notify_socket.assignments() if line.startswith("STATUS=cam0: streaming")]
        assert status and "fps in" in status[-1] and "broker connected" in status[-1]

        # SIGTERM: drains, every logged inspection reaches the broker, status "stopped", exit 0.
        daemon.send(signal.SIGTERM)
        assert daemon.wait(30) == 0, daemon.log
        ids = daemon.inspections()
        assert wait_until(lambda: {r["inspection_id"] for r in results(collector)} >= set(ids), 10)
    assert "STOPPING=1" in notify_socket.assignments()
    assert collector.on(STATUS)[-1].payload == b"stopped"
    assert len(ids) == len(set(ids)) and len(results(collector)) == len(ids)


def test_mqtt_trigger_echoes_part_ids_and_ignores_malformed(tmp_path, product, mosquitto_broker, daemons):
    write_frames(tmp_path / "frames", product, 4, defect_every=0)
    config = write_config(
        tmp_path, product, mosquitto_broker.port,
        source={"type": "replay", "path": str(tmp_path / "frames"), "fps": 30, "loop": True},
        trigger={"mode": "mqtt", "frame_timeout_s": 2},
    )
    trigger = f"{PREFIX}/{STATION}/trigger"
    with MessageCollector(mosquitto_broker.port, [RESULT, STATS]) as collector:
        collector.wait_subscribed()
        daemon = daemons(config)
        assert daemon.wait_log("capture streaming"), daemon.log
        assert wait_until(lambda: latest_stats(collector) is not None), daemon.log  # connected and subscribed
        for payload in (b'{"part_id": "A-1001"}', b"{not json", b'{"part_id": "A-1002"}', b'{"serial": 5}', b"{}", b""):
            collector.client.publish(trigger, payload, qos=1)
        assert wait_until(lambda: len(results(collector)) >= 3), daemon.log
        # Every command was handled (3 triggers taken, 3 malformed) and the daemon stopped: no result can follow.
        assert wait_until(lambda: (latest_stats(collector) or {}).get("mqtt", {}).get("malformed_commands") == 3)
        assert wait_until(lambda: latest_stats(collector)["pipeline"]["cameras"]["cam0"]["triggers"] == 3)
        daemon.send(signal.SIGTERM)
        assert daemon.wait(30) == 0
        collector.barrier()
        got = results(collector)
        assert sorted((r["part_id"] or "") for r in got) == ["", "A-1001", "A-1002"]


def test_source_failing_mid_run_reconnects(tmp_path, product, mosquitto_broker, daemons):
    with MjpegCamera(frames_per_connection=6, after="close", interval=0.03) as camera:
        config = write_config(
            tmp_path, product, mosquitto_broker.port,
            source={"type": "url", "url": camera.url}, trigger={"mode": "every_frame"},
        )
        with MessageCollector(mosquitto_broker.port, [RESULT, STATS]) as collector:
            collector.wait_subscribed()
            daemon = daemons(config)
            assert wait_until(lambda: camera.connections >= 3 and len(results(collector)) >= 8, 30), daemon.log
            assert wait_until(lambda: ((latest_stats(collector) or {}).get("pipeline", {}).get("cameras", {})
                                       .get("cam0", {}).get("reconnects", 0)) >= 2, 10), daemon.log
            daemon.send(signal.SIGTERM)
            assert daemon.wait(30) == 0
    assert "capture reconnecting" in daemon.log
    frame_ids = [r["frame_id"] for r in results(collector)]
    assert frame_ids == sorted(frame_ids) and max(frame_ids) > 6  # frames from after the reconnects


def test_sigkill_mid_stream_then_restart_loses_nothing(tmp_path, product, daemons):
    write_frames(tmp_path / "frames", product, 8)
    port = free_port()
    config = write_config(
        tmp_path, product, port,
        source={"type": "replay", "path": str(tmp_path / "frames"), "fps": 50, "loop": True},
        trigger={"mode": "every_frame"},
    )
    # Broker down: every result can only be in the spool when the daemon is killed.
    first = daemons(config)
    assert wait_until(lambda: len(first.inspections()) >= 10, 30), first.log
    first.proc.kill()
    first.wait(10)
    spooled = first.inspections()
    with MosquittoBroker(port=port) as broker, MessageCollector(broker.port, [RESULT]) as collector:
        collector.wait_subscribed()
        second = daemons(config)
        assert wait_until(lambda: {r["inspection_id"] for r in results(collector)} >= set(spooled), 30), second.log
        replayed = {r["inspection_id"]: r for r in results(collector) if r["inspection_id"] in spooled}
        assert all(r["replayed"] for r in replayed.values())
        second.send(signal.SIGTERM)
        assert second.wait(30) == 0


def test_flagged_frames_reach_the_sink_without_ever_blocking_the_scorer(tmp_path, product, mosquitto_broker):
    """The FlaggedSink hook (where the VLM stage plugs in), in-process with a real broker: a slow sink
    never holds up results, a full queue means vlm_status skipped, every pending result gets exactly
    one update, also when the daemon stops while the sink is busy."""
    from edge_inspect.config import load_config
    from edge_inspect.daemon.daemon import Daemon as InProcessDaemon
    from edge_inspect.mqtt.payloads import vlm_update
    from edge_inspect.records import Verdict

    write_frames(tmp_path / "frames", product, 1, defect_every=1)  # one flagged frame, looped: equal scores
    config = load_config(write_config(
        tmp_path, product, mosquitto_broker.port,
        source={"type": "replay", "path": str(tmp_path / "frames"), "fps": 20, "loop": True},
        trigger={"mode": "every_frame"}, pipeline={"flagged_queue_size": 2, "drain_timeout_s": 1},
    ))
    gate = threading.Event()
    received: list = []

    def sink(item):
        received.append(item)
        if gate.wait(10):
            item.publish_update(vlm_update("done", Verdict(True, "stain", ("center",), "a magenta patch", 0.9, "test")))

    update_topic = f"{PREFIX}/{STATION}/result/update"
    with MessageCollector(mosquitto_broker.port, [RESULT, update_topic]) as collector:
        collector.wait_subscribed()
        daemon = InProcessDaemon(config, flagged_sink=sink)
        runner = threading.Thread(target=daemon.run, daemon=True)
        runner.start()
        # Phase 1: the sink is stuck on the first item; results keep coming, two pending, the rest skipped.
        assert wait_until(lambda: len(results(collector)) >= 8)
        first = results(collector)[:8]
        assert [r["verdict"] for r in first] == ["NG"] * 8
        assert [r["vlm_status"] for r in first] == ["pending", "pending"] + ["skipped"] * 6
        assert received[0].inspection.inspection_id == first[0]["inspection_id"]
        assert received[0].score.flagged and received[0].view.shape == (128, 128, 3)
        assert daemon.stats()["flagged_queue"]["skipped"] >= 6
        # Phase 2: the sink catches up; each pending result gets its update.
        gate.set()
        pending_ids = lambda: {r["inspection_id"] for r in results(collector) if r["vlm_status"] == "pending"}
        update_ids = lambda: [m.json()["inspection_id"] for m in collector.on(update_topic)]
        assert wait_until(lambda: set(first[i]["inspection_id"] for i in (0, 1)) <= set(update_ids()))
        # Phase 3: stuck again, then stop: the busy and the queued item still get one update each.
        gate.clear()
        assert wait_until(lambda: daemon.flagged.depth() == 2)
        daemon.request_stop()
        runner.join(20)
        assert not runner.is_alive()
        assert wait_until(lambda: set(update_ids()) == pending_ids(), 10)
    updates = [m.json() for m in collector.on(update_topic)]
    assert len(update_ids()) == len(set(update_ids()))  # exactly one update per pending result
    schema = load_schema("result_update")
    for update in updates:
        jsonschema.validate(update, schema)
    assert {u["vlm_status"] for u in updates} == {"done", "skipped"}
    assert any(u["error"] == "the daemon stopped during the explanation" for u in updates)
    assert any(u["error"] == "the daemon stopped before the explanation stage ran" for u in updates)
    gate.set()  # let the abandoned sink call return; its late update is ignored


# --- with the VLM stage and the evidence store --------------------------------------------------


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """The tiny random-weight LLaVA-style pair (real llama.cpp, answers mean nothing)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (tools/ensure_llama_wheel.sh)")
    pytest.importorskip("gguf", reason="the gguf package writes the tiny test model")
    from tiny_gguf import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"))


@pytest.mark.vlm
def test_ng_results_carry_evidence_and_get_exactly_one_vlm_update(tmp_path, product, tiny_vlm, mosquitto_broker, daemons):
    """`edge-inspect run` with vlm.enabled and evidence on: every NG result is published pending with its
    evidence_path (the files exist), then exactly one schema-valid update per NG id follows, also merged
    into the evidence JSON; a finished replay waits for the VLM before it stops."""
    from edge_inspect.evidence import evidence_files
    from edge_inspect.records import Verdict
    from edge_inspect.vlm.stage import decide

    defective = write_frames(tmp_path / "frames", product, 8, defect_every=2)
    config = write_config(
        tmp_path, product, mosquitto_broker.port,
        source={"type": "replay", "path": str(tmp_path / "frames"), "fps": 0},
        trigger={"mode": "every_frame"},
        pipeline={"flagged_queue_size": 9, "drain_timeout_s": 25},
        evidence={"dir": "evidence"},  # relative: under the daemon's working directory (tmp_path)
        vlm={"enabled": True, "model": str(tiny_vlm.model), "mmproj": str(tiny_vlm.mmproj), "n_ctx": 8192,
             "n_threads": 1, "max_tokens": 1500, "timeout_s": 30, "restart_backoff_s": 0.1,
             "allow_downgrade": True, "downgrade_min_confidence": 0.0},
    )
    update_topic = f"{PREFIX}/{STATION}/result/update"
    with MessageCollector(mosquitto_broker.port, [RESULT, update_topic, STATS]) as collector:
        collector.wait_subscribed()
        daemon = daemons(config)
        assert daemon.wait(60) == 0, daemon.log  # the replay ends the run once the VLM has answered
        ng_count = sum(defective)
        assert collector.wait_for(lambda msgs: sum(m.topic == update_topic for m in msgs) >= ng_count, 10), daemon.log
        collector.barrier()  # the daemon is gone: anything extra (a duplicate) has arrived by now
        messages = [m for m in collector.messages if m.topic in (RESULT, update_topic)]

    got = [m.json() for m in messages if m.topic == RESULT]
    updates = [m.json() for m in messages if m.topic == update_topic]
    assert sorted(r["frame_id"] for r in got) == list(range(1, 9)), daemon.log
    result_schema, update_schema = load_schema("result"), load_schema("result_update")
    ng_ids = set()
    root = tmp_path / "evidence"
    for result in got:
        jsonschema.validate(result, result_schema)
        assert result["verdict"] == ("NG" if defective[result["frame_id"] - 1] else "OK"), result
        if result["verdict"] == "OK":
            assert (result["vlm_status"], result["evidence_path"]) == ("skipped", None)
            continue
        ng_ids.add(result["inspection_id"])
        assert result["vlm_status"] == "pending" and result["evidence_path"], result
        files = evidence_files(root, result["evidence_path"])
        assert all(path.is_file() and path.stat().st_size > 0 for path in files.values()), files
        assert cv2.imread(str(files["frame"])).shape == product["good"][0].shape
    assert len(ng_ids) == sum(defective)

    assert sorted(u["inspection_id"] for u in updates) == sorted(ng_ids), daemon.log  # exactly one each
    order = [(m.topic, m.json()["inspection_id"]) for m in messages]
    for update in updates:
        jsonschema.validate(update, update_schema)
        assert update["vlm_status"] in ("done", "failed"), update
        assert order.index((RESULT, update["inspection_id"])) < order.index((update_topic, update["inspection_id"]))
        if update["vlm_status"] == "done":
            verdict = Verdict(**{k: tuple(v) if k == "location" else v for k, v in update["vlm"].items()})
            expected = decide("NG", verdict, allow_downgrade=True, min_confidence=0.0)
            assert (update["final_verdict"], update["decided_by"]) == (expected.final_verdict, expected.decided_by)
        result = next(r for r in got if r["inspection_id"] == update["inspection_id"])
        saved = json.loads(evidence_files(root, result["evidence_path"])["json"].read_text())
        assert saved["inspection_id"] == update["inspection_id"] and saved["evidence_path"] == result["evidence_path"]
        assert (saved["vlm_status"], saved.get("vlm")) == (update["vlm_status"], update["vlm"])  # the update merged in

    stats = latest_stats(collector)
    jsonschema.validate(stats, load_schema("stats"))
    vlm = stats["pipeline"]["vlm"]
    assert (vlm["submitted"], vlm["done"] + vlm["failed"], vlm["skipped"]) == (len(ng_ids), len(ng_ids), 0), vlm
    assert stats["pipeline"]["evidence"]["enabled"] is True and stats["pipeline"]["evidence"]["failed"] == 0


@pytest.mark.vlm
def test_sighup_with_the_vlm_on_keeps_the_stage_and_every_pending_result_gets_one_update(
        tmp_path, product, tiny_vlm, mosquitto_broker, daemons):
    """A reload swaps the product but keeps the loaded model and the evidence store (their sections apply
    at the next restart); results flagged after it are still explained, and SIGTERM leaves no pending
    result without its update."""
    write_frames(tmp_path / "frames", product, 4, defect_every=2)
    source = {"type": "replay", "path": str(tmp_path / "frames"), "fps": 8, "loop": True}
    vlm = {"enabled": True, "model": str(tiny_vlm.model), "mmproj": str(tiny_vlm.mmproj), "n_ctx": 8192,
           "n_threads": 1, "max_tokens": 1500, "timeout_s": 30, "restart_backoff_s": 0.1}
    settings = dict(source=source, trigger={"mode": "every_frame"}, evidence={"dir": "evidence"}, vlm=vlm)
    config = write_config(tmp_path, product, mosquitto_broker.port, **settings)
    update_topic = f"{PREFIX}/{STATION}/result/update"
    with MessageCollector(mosquitto_broker.port, [RESULT, update_topic]) as collector:
        collector.wait_subscribed()
        daemon = daemons(config)
        updates = lambda: [m.json() for m in collector.on(update_topic)]
        assert wait_until(lambda: any(u["vlm_status"] == "done" for u in updates()), 30), daemon.log

        write_config(tmp_path, product, mosquitto_broker.port, camera_product="brick-b",
                     **{**settings, "vlm": {**vlm, "max_tokens": 1400}})
        daemon.send(signal.SIGHUP)
        assert daemon.wait_log(r"vlm changes take effect at the next restart"), daemon.log
        after = lambda: {r["inspection_id"] for r in results(collector) if r["product"] == "brick-b" and r["verdict"] == "NG"}
        assert wait_until(lambda: any(u["inspection_id"] in after() and u["vlm_status"] == "done" for u in updates()), 30), daemon.log
        daemon.send(signal.SIGTERM)
        assert daemon.wait(30) == 0, daemon.log
        pending = {r["inspection_id"] for r in results(collector) if r["vlm_status"] == "pending"}
        assert wait_until(lambda: {u["inspection_id"] for u in updates()} >= pending, 10), daemon.log
    got = results(collector)
    assert all(r["evidence_path"] for r in got if r["verdict"] == "NG")
    ids = [u["inspection_id"] for u in updates()]
    assert sorted(ids) == sorted(pending), daemon.log  # exactly one update per pending result, no other
    schema = load_schema("result_update")
    for update in updates():
        jsonschema.validate(update, schema)
    assert "reload refused" not in daemon.log and daemon.log.count("vlm worker pid") == 1  # one model load


def test_a_missing_vlm_model_stops_the_start_with_exit_code_2(tmp_path, product, daemons):
    write_frames(tmp_path / "frames", product, 2)
    missing = tmp_path / "models" / "no-such-model.gguf"
    config = write_config(
        tmp_path, product, free_port(),  # the start fails before any connection
        source={"type": "replay", "path": str(tmp_path / "frames"), "fps": 0}, trigger={"mode": "every_frame"},
        vlm={"enabled": True, "mode": "text", "model": str(missing)},
    )
    daemon = daemons(config)
    assert daemon.wait(60) == 2, daemon.log
    assert "vlm.model" in daemon.log and str(missing) in daemon.log and "Traceback" not in daemon.log
