"""Issue 14 (outside fault audit), the parts that need no broker: config refusals, command payload
bounds, calibration damage, the CLI's exit codes and a closed stdout."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_inspect import cli
from edge_inspect.config import ConfigError, parse_config
from edge_inspect.errors import CalibrationError
from edge_inspect.mqtt.dispatch import CommandDispatcher, Route
from edge_inspect.mqtt.payloads import parse_product_set, parse_trigger
from edge_inspect.scorer.layout import active_directory

BASE = """\
station: s1
cameras:
  - name: cam1
    product: p
    source: {type: replay, path: /tmp, fps: 5, loop: true}
"""


def _check(tmp_path: Path, text: str, *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return subprocess.run([sys.executable, "-m", "edge_inspect.cli", "check-config", str(path), *extra],
                          capture_output=True, text=True, timeout=120)


# --- mqtt.client_id templates ------------------------------------------------------------------


@pytest.mark.parametrize("template", ["{x}", "qa{", "{0}", "{station.__class__}", "{station!r}", "{station:>40}", "a}b"])
def test_client_id_templates_beyond_station_and_hostname_are_refused_naming_the_key(template):
    with pytest.raises(ConfigError) as err:
        parse_config(BASE + f"mqtt: {{client_id: {json.dumps(template)}}}\n")
    assert "mqtt.client_id" in str(err.value) and "{station}" in str(err.value)


def test_client_id_placeholders_and_escaped_braces_resolve():
    config = parse_config(BASE + 'mqtt: {client_id: "ei-{station}-{hostname}-{{x}}"}\n')
    assert config.mqtt.resolved_client_id("s1", hostname="h") == "ei-s1-h-{x}"


# --- strict scalars and clearer messages ------------------------------------------------------


@pytest.mark.parametrize("text, key", [
    (BASE + "mqtt: {port: true}\n", "mqtt.port"),
    (BASE.replace("loop: true", 'loop: "yes"'), "cameras[0].source.loop"),
    (BASE.replace("loop: true", "loop: 1"), "cameras[0].source.loop"),
    (BASE.replace("fps: 5", "fps: .nan"), "cameras[0].source.fps"),
    (BASE.replace("fps: 5", "fps: .inf"), "cameras[0].source.fps"),
    (BASE + 'mqtt: {port: "1883"}\n', "mqtt.port"),
])
def test_booleans_numbers_and_nan_are_taken_as_written(text, key):
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    message = str(err.value)
    assert key in message
    assert "less than or equal" not in message  # nan used to be "not <= 1000"


def test_integers_still_pass_as_floats():
    config = parse_config(BASE + "mqtt: {reconnect_min_s: 1, reconnect_max_s: 2}\n")
    assert config.mqtt.reconnect_max_s == 2.0


def test_duplicate_camera_names_name_the_camera_without_dumping_the_list():
    text = BASE + "  - {name: cam1, product: p, source: {type: replay, path: /tmp}}\n"
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    message = str(err.value)
    assert "camera name 'cam1' is used twice" in message and "'source'" not in message


def test_yaml_alias_bomb_is_refused_quickly():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    with pytest.raises(ConfigError, match="anchors and aliases"):
        parse_config("\n".join(lines) + "\nstation: *a8\n")


def test_small_aliases_still_work():
    text = BASE.replace("    source: {type: replay, path: /tmp, fps: 5, loop: true}",
                        "    source: &src {type: replay, path: /tmp, fps: 5, loop: true}")
    text += "  - {name: cam2, product: p, source: *src}\n"
    assert len(parse_config(text).cameras) == 2


def test_username_without_password_and_missing_ca_fail_check_config(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGE_INSPECT_MQTT_PASSWORD", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    done = _check(tmp_path, BASE + "mqtt: {username: bob}\n", "--syntax-only")
    assert done.returncode == 2 and "mqtt.username" in done.stderr and "EDGE_INSPECT_MQTT_PASSWORD" in done.stderr
    monkeypatch.setenv("EDGE_INSPECT_MQTT_PASSWORD", "secret")
    assert _check(tmp_path, BASE + "mqtt: {username: bob}\n", "--syntax-only").returncode == 0
    done = _check(tmp_path, BASE + f"mqtt: {{tls: {{enabled: true, ca_file: {tmp_path / 'nope.pem'}}}}}\n", "--syntax-only")
    assert done.returncode == 2 and "mqtt.tls.ca_file" in done.stderr


# --- command payloads -------------------------------------------------------------------------


@pytest.mark.parametrize("parse", [parse_trigger, parse_product_set])
def test_deeply_nested_json_is_refused_before_parsing(parse):
    for payload in (b"[" * 2000 + b"]" * 2000, b"{" + b'"a":{' * 600 + b"}" * 601):
        with pytest.raises(ValueError, match="nested"):
            parse(payload)


def test_brackets_inside_strings_are_not_nesting():
    assert parse_trigger(b'{"part_id": "[[[[[[[[[[[[{{{{{{{{{{\\\\\\""}').part_id == '[[[[[[[[[[[[{{{{{{{{{{\\"'


def test_a_blank_part_id_says_it_is_blank():
    with pytest.raises(ValueError, match="blank"):
        parse_trigger(b'{"part_id": "   "}')


def test_a_parser_that_raises_anything_is_counted_never_raised():
    def explode(_payload):
        raise RecursionError("maximum recursion depth exceeded")

    def bug(_payload):
        raise KeyError("x")

    counts = {"malformed_commands": 0, "command_errors": 0, "a": 0, "b": 0}
    dispatcher = CommandDispatcher({"t/a": Route("a", explode, None, "a"), "t/b": Route("b", bug, None, "b")}, counts)
    dispatcher.dispatch("t/a", b"[]")
    dispatcher.dispatch("t/b", b"[]")
    assert counts["malformed_commands"] == 1 and counts["command_errors"] == 1


# --- the CLI ----------------------------------------------------------------------------------


def test_an_uncaught_exception_exits_3_with_the_traceback(monkeypatch, capsys):
    from edge_inspect.commands import check_config

    def boom(_args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(check_config, "run", boom)
    assert cli.main(["check-config", "x.yaml"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug" in err and "internal error" in err


def test_check_config_into_a_closed_pipe_prints_no_traceback(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(BASE)
    for extra in ([], ["--json"]):
        proc = subprocess.Popen([sys.executable, "-m", "edge_inspect.cli", "check-config", str(path), "--syntax-only", *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.read(1)  # `| head -c1`: read one byte, then close the pipe
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(120) == 0, err
        assert "Traceback" not in err and "BrokenPipe" not in err, err


# --- damaged calibrations ---------------------------------------------------------------------


def _damage(kind: str, product_dir: Path, engines: Path) -> str:
    """Damage one copied calibration; returns the file name the error must mention."""
    manifest_path = product_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if kind == "threshold":
        (product_dir / "threshold.json").write_text(json.dumps({"threshold": "high"}))
        return "threshold.json"
    if kind == "roi":
        manifest["roi"] = 5
    elif kind == "no_id":
        del manifest["calibration_id"]
    elif kind == "manifest_not_json":
        manifest_path.write_text("{not json")
        return "manifest.json"
    elif kind == "garbage_onnx":
        (engines / manifest["scorer_onnx"]["file"]).write_bytes(b"\x00garbage" * 100)
        return manifest["scorer_onnx"]["file"]
    elif kind == "truncated_bank":
        bank = product_dir / "memory_bank.npy"
        bank.write_bytes(bank.read_bytes()[:1000])
        return "memory_bank.npy"
    elif kind == "bank_changed":
        bank = np.load(product_dir / "memory_bank.npy")
        bank[0, 0] += 1.0
        np.save(product_dir / "memory_bank.npy", bank)
        return "memory_bank.npy"
    manifest_path.write_text(json.dumps(manifest))
    return "manifest.json"


DAMAGE = ["threshold", "roi", "no_id", "manifest_not_json", "garbage_onnx", "truncated_bank", "bank_changed"]


@pytest.fixture
def damaged_copy(tmp_path, calibrated_product):
    """A fresh copy of the calibrated product and its engines dir, to damage."""
    calibration = tmp_path / "calibration"
    shutil.copytree(calibrated_product["calibration_dir"], calibration)
    engines = tmp_path / "engines"
    shutil.copytree(calibrated_product["engines_dir"], engines, symlinks=True)
    return calibration, engines, calibrated_product["name"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_calibration_is_a_user_error_naming_the_file_and_the_fix(kind, damaged_copy, tmp_path, calibrated_product):
    from edge_inspect.scorer.product import load_product

    calibration, engines, name = damaged_copy
    load_product(calibration, name, engines)  # the undamaged copy loads
    culprit = _damage(kind, active_directory(calibration, name), engines)
    with pytest.raises(CalibrationError) as err:
        load_product(calibration, name, engines)
    assert culprit in str(err.value) and "--force" in str(err.value)

    # check-config --products says the same, exit 2, never "every calibration loads"
    frames = tmp_path / "frames"
    frames.mkdir()
    shutil.copy(calibrated_product["good"][0], frames / "0000.png")
    config = (f"station: s1\nscoring: {{calibration_dir: {calibration}, engines_dir: {engines}}}\n"
              f"cameras:\n  - {{name: cam1, product: {name}, source: {{type: replay, path: {frames}}}}}\n")
    done = _check(tmp_path, config, "--products")
    assert done.returncode == 2, done.stdout + done.stderr
    assert culprit in done.stderr and "Traceback" not in done.stderr


def test_a_scorer_graph_that_does_not_load_is_a_calibration_error(damaged_copy):
    """Even with a matching hash (an older manifest without one), the backend's refusal is a UserError."""
    from edge_inspect.scorer.product import Scorer, load_product

    calibration, engines, name = damaged_copy
    manifest_path = active_directory(calibration, name) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["scorer_onnx"]["sha256"]
    manifest_path.write_text(json.dumps(manifest))
    (engines / manifest["scorer_onnx"]["file"]).write_bytes(b"garbage")
    product = load_product(calibration, name, engines)
    with pytest.raises(CalibrationError, match="does not load"):
        Scorer(product, backend="onnxruntime", threads=1)


# --- frames: size cap before decode, conversions said, tiny frames refused --------------------


def _replay(folder: Path):
    from edge_inspect.capture.sources import ReplaySource
    from edge_inspect.config import ReplaySourceConfig

    source = ReplaySource(ReplaySourceConfig(type="replay", path=str(folder)))
    source.open()
    return source


def test_replay_refuses_a_huge_image_from_its_header_without_decoding(tmp_path, monkeypatch):
    import cv2

    from edge_inspect.capture.sources import EndOfStream

    header = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + (8000).to_bytes(4, "big") * 2 + b"\x08\x02\x00\x00\x00"
    (tmp_path / "a.png").write_bytes(header + b"\x00" * 64)
    decoded = []
    monkeypatch.setattr(cv2, "imdecode", lambda *a: decoded.append(a))
    with pytest.raises(EndOfStream):  # skipped (issue 23), and nothing else is in the folder
        (source := _replay(tmp_path)).read()
    assert not decoded and source.skipped == 1


def test_replay_converts_16_bit_grey_and_rgba_saying_so_and_skips_a_1x1_frame(tmp_path, caplog):
    import re

    import cv2

    from edge_inspect.capture.sources import EndOfStream

    cv2.imwrite(str(tmp_path / "0_grey16.png"), np.full((40, 40), 40000, np.uint16))
    cv2.imwrite(str(tmp_path / "1_rgba.png"), np.full((40, 40, 4), 200, np.uint8))
    cv2.imwrite(str(tmp_path / "2_tiny.png"), np.zeros((1, 1, 3), np.uint8))
    source = _replay(tmp_path)
    with caplog.at_level("WARNING"):
        grey = source.read()
        rgba = source.read()
    assert grey.dtype == np.uint8 and grey.shape == (40, 40, 3) and int(grey[0, 0, 0]) == 40000 // 257
    assert rgba.shape == (40, 40, 3)
    assert "uint16 samples scaled to 8 bit" in caplog.text and "alpha channel dropped" in caplog.text
    with caplog.at_level("WARNING"), pytest.raises(EndOfStream):
        source.read()  # the 1x1 frame is skipped (issue 23: at once, no reconnect); nothing follows it
    assert re.search(r"2_tiny\.png.*1x1.*smaller than", caplog.text) and source.skipped == 1


def test_read_bgr_refuses_tiny_and_huge_images(tmp_path):
    import cv2

    from edge_inspect.errors import UserError
    from edge_inspect.imageio import read_bgr

    cv2.imwrite(str(tmp_path / "tiny.png"), np.zeros((1, 1), np.uint8))
    with pytest.raises(UserError, match="1x1"):
        read_bgr(tmp_path / "tiny.png")
    header = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + (9000).to_bytes(4, "big") * 2 + b"\x08\x02\x00\x00\x00"
    (tmp_path / "huge.png").write_bytes(header + b"\x00" * 64)
    with pytest.raises(UserError, match="9000x9000"):
        read_bgr(tmp_path / "huge.png")


def test_the_stall_watcher_never_runs_a_second_reader_beside_a_stuck_one():
    import threading

    from edge_inspect.capture.reader import Capture
    from edge_inspect.capture.sources import FrameSource
    from edge_inspect.config import ReconnectConfig, ReplaySourceConfig

    release = threading.Event()
    opened = []
    active = []
    most = [0]

    class Stuck(FrameSource):
        type_key = "stuck"
        lossless = False

        def open(self):
            opened.append(self)

        def read(self):
            active.append(self)
            most[0] = max(most[0], len(active))
            try:
                if len(opened) == 1:
                    release.wait(30)  # the first reader hangs inside its "driver call"
                else:
                    self.stop_event.wait(0.05)
                return np.zeros((32, 32, 3), np.uint8)
            finally:
                active.remove(self)

        def close(self):
            pass

        def describe(self):
            return "stuck"

    config = ReplaySourceConfig(type="replay", path="/nonexistent")
    capture = Capture("cam", config, ReconnectConfig(stall_timeout_s=0.5), source_factory=lambda c, r: Stuck(c))
    capture.start()
    try:
        deadline = __import__("time").monotonic() + 20
        while capture.reconnects < 1 and __import__("time").monotonic() < deadline:
            release.wait(0.05)
        assert capture.reconnects >= 1
        release.wait(1.5)  # several watcher ticks while the first reader is stuck
        assert len(opened) == 1, "a second source was opened beside the stuck one"
        release.set()
        deadline = __import__("time").monotonic() + 20
        while len(opened) < 2 and __import__("time").monotonic() < deadline:
            release.wait(0.05)
        assert len(opened) == 2 and most[0] == 1
    finally:
        release.set()
        capture.stop()
        assert capture.join(10)


def test_ffmpeg_options_are_not_locked_through_an_open():
    import threading

    from edge_inspect.capture.sources import _FfmpegOptions

    options = _FfmpegOptions()
    inside = threading.Event()
    release = threading.Event()

    def slow_open():
        with options.using("rtsp_transport;tcp"):
            inside.set()
            release.wait(30)  # a camera that takes its whole open timeout

    thread = threading.Thread(target=slow_open)
    thread.start()
    assert inside.wait(10)
    entered = threading.Event()

    def other(value):
        with options.using(value):
            assert __import__("os").environ.get(_FfmpegOptions.VARIABLE) in (None, "rtsp_transport;tcp")
            entered.set()

    for value in (None, "rtsp_transport;tcp"):  # an http camera, a second tcp camera: neither waits
        entered.clear()
        other_thread = threading.Thread(target=other, args=(value,))
        other_thread.start()
        assert entered.wait(10)
        other_thread.join(10)
    release.set()
    thread.join(10)
    assert _FfmpegOptions.VARIABLE not in __import__("os").environ


def test_spool_full_logs_the_running_total_including_drops_a_quiet_interval_hid(tmp_path, caplog):
    from publisher_harness import synthetic_inspection

    from edge_inspect.config import MqttConfig, SpoolConfig
    from edge_inspect.mqtt.publisher import ResultPublisher

    publisher = ResultPublisher(MqttConfig(host="127.0.0.1", port=1), SpoolConfig(path=str(tmp_path / "s.sqlite3"), max_rows=100), "s1")
    with caplog.at_level("WARNING"):
        for index in range(700):  # never started: every result waits in the spool, as in an outage
            publisher.publish_result(synthetic_inspection(index, "full", "s1"))
        publisher.stop(timeout=0.0)
    lines = [r.getMessage() for r in caplog.records if "spool full" in r.getMessage()]
    assert lines and "1 dropped in total" in lines[0]
    assert "600 dropped in total" in lines[-1], lines  # not "1 dropped in total" for 600 drops
    assert sum(int(line.split(" dropped since")[0].rsplit("; ", 1)[1]) for line in lines) == 600


# --- the evidence writer ----------------------------------------------------------------------


def _evidence_store(tmp_path, **config):
    from edge_inspect.config.evidence import EvidenceConfig
    from edge_inspect.evidence import EvidenceStore

    config.setdefault("min_free_mb", 0)
    return EvidenceStore(EvidenceConfig(dir=str(tmp_path / "evidence"), **config), background=True)


def _ng(timestamp=None):
    import time
    import uuid

    from edge_inspect.records import Inspection, Region

    return Inspection(
        inspection_id=uuid.uuid4().hex, station="line1", camera="cam0", product="cup", frame_id=7,
        timestamp=time.time() if timestamp is None else timestamp, score=2.5, threshold=1.0, verdict="NG",
        regions=(Region(box=(10, 10, 20, 20), area_pct=2.1, peak=2.5, grid_words=("center",)),), latency_ms={"score": 1.0},
    )


def test_one_unreadable_day_folder_does_not_kill_the_evidence_writer(tmp_path, monkeypatch):
    import os

    bad_day = tmp_path / "evidence" / "20250101"
    bad_day.mkdir(parents=True)
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == bad_day:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    store = _evidence_store(tmp_path)
    try:
        frame = np.zeros((64, 64, 3), np.uint8)
        path = store.save(_ng(), frame, anomaly_map=np.zeros((8, 8), np.float32))
        assert path is not None and store.flush(20), "the writer died in its start-up scan"
        assert store.stats()["saved"] == 1 and store.stats()["failed"] >= 1
    finally:
        store.close()


def test_the_evidence_queue_is_bounded_in_bytes_not_only_in_frames(tmp_path):
    from edge_inspect.evidence import QUEUE_MAX_BYTES

    store = _evidence_store(tmp_path, queue_size=1000)
    try:
        assert store.flush(10)
        frame = np.zeros((1080, 1920, 3), np.uint8)  # 6.2 MB each
        with store._lock:  # hold the writer at its bookkeeping: nothing drains
            paths = [store.save(_ng(), frame) for _ in range(40)]
            assert store._queued_bytes <= QUEUE_MAX_BYTES
        kept = [p for p in paths if p]
        assert 0 < len(kept) <= QUEUE_MAX_BYTES // frame.nbytes + 1
        assert store.flush(60)
        assert store.stats()["dropped"] == 40 - len(kept) and store._queued_bytes == 0
    finally:
        store.close()


# --- the run report ---------------------------------------------------------------------------


def test_the_report_merges_vlm_downgrades(tmp_path):
    from edge_inspect.ops.report.html import render_report
    from edge_inspect.ops.report.load import load_run
    from edge_inspect.ops.report.summary import summarize

    lines = []
    for i, verdict in enumerate(("NG", "NG", "OK")):
        lines.append({"type": "result", "inspection_id": f"{i:032x}", "timestamp": f"2026-01-01T00:00:0{i}Z", "seq": i + 1,
                      "station": "s1", "camera": "cam0", "product": "p", "frame_id": i, "score": 2.0 if verdict == "NG" else 0.1,
                      "threshold": 1.0, "verdict": verdict, "regions": [], "vlm_status": "pending" if verdict == "NG" else "skipped"})
    vlm = {"defect": False, "defect_type": None, "location": [], "description": "a reflection", "confidence": 0.95}
    lines.append({"type": "result_update", "inspection_id": f"{0:032x}", "vlm_status": "done", "vlm": vlm,
                  "final_verdict": "OK", "decided_by": "vlm"})
    lines.append({"type": "result_update", "inspection_id": f"{1:032x}", "vlm_status": "done", "vlm": {**vlm, "defect": True},
                  "final_verdict": "NG", "decided_by": "scorer"})
    log = tmp_path / "results.jsonl"
    log.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    run = load_run(results_file=log)
    rows = {row.inspection_id: row for row in run.rows}
    assert rows[f"{0:032x}"].downgraded and rows[f"{0:032x}"].final_verdict == "OK"
    assert not rows[f"{1:032x}"].downgraded and rows[f"{1:032x}"].final_verdict == "NG"
    summary = summarize(run.rows)
    assert (summary["ng"], summary["vlm_downgraded"], summary["final_ng"]) == (2, 1, 1)
    html = render_report(run)
    assert "downgraded to OK by the VLM" in html and "Final verdict: OK" in html


# --- the demo's replay: paced, yet no frame dropped on a busy machine -------------------------


def test_a_paced_lossless_replay_waits_for_a_slow_pipeline_instead_of_dropping(tmp_path):
    import time

    import cv2

    from edge_inspect.capture.reader import Capture
    from edge_inspect.config import ReconnectConfig, ReplaySourceConfig

    for i in range(8):
        cv2.imwrite(str(tmp_path / f"{i:03d}.png"), np.full((32, 32, 3), i * 20, np.uint8))
    config = ReplaySourceConfig(type="replay", path=str(tmp_path), fps=50, lossless=True)
    capture = Capture("cam", config, ReconnectConfig())
    capture.start()
    seen, last = [], 0
    try:
        while True:
            grabbed = capture.frames.take(after_seq=last, timeout=30)
            if grabbed is None:
                break
            last = grabbed.seq
            seen.append(int(grabbed.pixels[0, 0, 0]))
            time.sleep(0.1)  # a scorer 5x slower than the pace (a loaded CI box)
    finally:
        capture.stop()
    assert seen == [i * 20 for i in range(8)] and capture.frames.dropped == 0


def test_the_demo_config_replays_losslessly():
    from edge_inspect.config import parse_config
    from edge_inspect.ops.demo.data import DemoSettings, demo_config

    settings = DemoSettings(workdir=Path("/tmp/demo"), engines_dir=Path("/tmp/engines"))
    data = demo_config(settings, Path("/tmp/demo"), "demo-coin", "5")
    source = parse_config(json.dumps(data)).cameras[0].source
    assert source.lossless is True and source.fps == settings.fps


# --- TensorRT plumbing (fakes: no GPU here; the real thing is in tests/test_tensorrt.py) ------


class _FakeContext:
    def __init__(self, log):
        self.log = log

    def push(self):
        self.log.append("push")

    def detach(self):
        self.log.append("detach")


def _fake_cuda(monkeypatch):
    import types

    log: list[str] = []

    class Device:
        @staticmethod
        def count():
            return 1

        def __init__(self, index):
            self.index = index

        def retain_primary_context(self):
            log.append("retain")
            return _FakeContext(log)

    class Context:
        @staticmethod
        def pop():
            log.append("pop")

    driver = types.SimpleNamespace(init=lambda: None, Device=Device, Context=Context)
    package = types.ModuleType("pycuda")
    package.driver = driver
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    return log


def test_the_cuda_primary_context_is_retained_once_per_process_and_only_pushed_and_popped(monkeypatch):
    from edge_inspect.scorer.backends.trt_backend import CudaDevice

    log = _fake_cuda(monkeypatch)
    monkeypatch.setattr(CudaDevice, "_shared", {})
    first, second = CudaDevice.shared(0), CudaDevice.shared(0)
    assert first is second
    with first.active():
        pass
    first.release()  # a backend closing (product swap) must not release the process's retain
    with second.active():
        pass
    assert log == ["retain", "push", "pop", "push", "pop"]


def test_one_engine_per_plan_is_shared_and_freed_with_its_last_user(monkeypatch, tmp_path):
    import types

    from edge_inspect.scorer.backends import trt_backend

    made = {"runtimes": 0, "engines": 0}

    class Runtime:
        def __init__(self, logger):
            made["runtimes"] += 1

        def deserialize_cuda_engine(self, data):
            made["engines"] += 1
            return object()

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(Runtime=Runtime))
    monkeypatch.setattr(trt_backend, "_trt_logger", lambda: None)
    monkeypatch.setattr(trt_backend, "_ENGINES", {})
    plan = tmp_path / "p.plan"
    plan.write_bytes(b"plan")
    key_a, engine_a = trt_backend._acquire_engine(0, plan)
    key_b, engine_b = trt_backend._acquire_engine(0, plan)  # a second camera on the same product
    assert engine_a is engine_b and key_a == key_b and made == {"runtimes": 1, "engines": 1}
    trt_backend._release_engine(key_a)
    assert key_a in trt_backend._ENGINES
    trt_backend._release_engine(key_b)
    assert key_a not in trt_backend._ENGINES


def test_two_tensorrt_cameras_on_one_product_share_the_engine(calibrated_product):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (JetPack or the tensorrt wheel on a CUDA machine)")
    from edge_inspect.scorer.backends import trt_backend
    from edge_inspect.scorer.product import Scorer, load_product

    ok, reason = trt_backend.tensorrt_available()
    if not ok:
        pytest.skip(f"TensorRT unusable here: {reason}")
    product = load_product(calibrated_product["calibration_dir"], calibrated_product["name"], calibrated_product["engines_dir"])
    a = Scorer(product, backend="tensorrt", precision="fp32")
    b = Scorer(product, backend="tensorrt", precision="fp32")
    try:
        assert a.backend._engine is b.backend._engine and a.backend._context is not b.backend._context
    finally:
        a.close()
        b.close()
    assert not trt_backend._ENGINES


# --- issue 23: repeated log lines -----------------------------------------------------------------


def test_log_limiter_logs_the_first_at_once_then_one_line_per_interval_with_the_count(caplog):
    import logging

    from edge_inspect.log_limit import LogLimiter

    now = [0.0]
    limiter = LogLimiter(logging.getLogger("t23"), interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t23"):
        for i in range(100):  # 25 s of one problem, four times a second
            limiter.log(logging.WARNING, "bad", "bad thing %d", i)
            now[0] += 0.25
        limiter.log(logging.WARNING, "other", "another problem")  # its own key: logged at once
        limiter.flush()
    assert [r.getMessage() for r in caplog.records] == [
        "bad thing 0",
        "bad thing 40 (39 more like this in the last 10 s, 41 in total)",
        "bad thing 80 (39 more like this in the last 10 s, 81 in total)",
        "another problem",
        "bad thing 99 (19 more like this in the last 5 s, 100 in total)",
    ]
    assert limiter.total("bad") == 100


def test_a_39_7_mp_image_is_refused_naming_the_limit_and_the_fix_and_24_mp_passes():
    """Issue 23: a 39.7 MP image was accepted (RSS to 426 MB, 937 MB with NG frames); the cap is 25 MP now."""
    from edge_inspect.errors import UserError
    from edge_inspect.imageio import MAX_DECODE_PIXELS, check_decode_size

    def jpeg_head(width: int, height: int) -> bytes:  # SOI, then a baseline SOF0 segment with the size
        return b"\xff\xd8\xff\xc0\x00\x11\x08" + height.to_bytes(2, "big") + width.to_bytes(2, "big") + b"\x03" + b"\x00" * 64

    with pytest.raises(UserError, match=r"7720x5140 \(39\.7 MP\), more than the 25 MP .*scale it down"):
        check_decode_size("big.jpg", jpeg_head(7720, 5140))
    check_decode_size("ok.jpg", jpeg_head(6000, 4000))  # a 24 MP sensor
    assert MAX_DECODE_PIXELS == 25_000_000
