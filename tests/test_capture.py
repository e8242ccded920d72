"""Capture: sources, the newest-frame mailbox, reconnect with back-off, stall detection, triggers,
the camera view, sd_notify and the stats helpers. All real parts: files, an HTTP MJPEG server on
loopback read by OpenCV's FFmpeg backend, unix datagram sockets."""

from __future__ import annotations

import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import wait_until

from edge_inspect.capture.geometry import camera_view, view_to_frame_box
from edge_inspect.capture.reader import Capture, CaptureState, Grabbed, LatestFrame
from edge_inspect.capture.sources import EndOfStream, ReplaySource, SourceError, UrlSource, create_source, redact_url
from edge_inspect.capture.triggers import EveryFrameTrigger, FreeRunTrigger, MqttTrigger, create_trigger
from edge_inspect.config.capture import ReconnectConfig, ReplaySourceConfig, TriggerConfig, UrlSourceConfig
from edge_inspect.daemon.runtime_stats import CameraStats, LatencyWindow, RateMeter
from edge_inspect.daemon.sdnotify import Notifier
from edge_inspect.errors import UserError


def numbered_frame(value: int, shape=(48, 64)) -> np.ndarray:
    """A frame whose pixel value encodes its number (survives PNG exactly, JPEG within a few levels)."""
    return np.full((*shape, 3), value, np.uint8)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(6):
        cv2.imwrite(str(folder / f"{i:03d}.png"), numbered_frame(i * 10))
    (folder / "notes.txt").write_text("not an image")
    return folder




# --- LatestFrame -------------------------------------------------------------------------------


def grabbed(seq: int) -> Grabbed:
    return Grabbed(seq, time.time(), time.monotonic(), numbered_frame(seq))


def test_latest_frame_keeps_only_the_newest_and_counts_the_replaced():
    slot = LatestFrame()
    for seq in (1, 2, 3):
        slot.put(grabbed(seq))
    got = slot.take(after_seq=0, timeout=0)
    assert got is not None and got.seq == 3
    assert slot.dropped == 2
    assert slot.take(after_seq=3, timeout=0.01) is None  # nothing newer yet
    slot.put(grabbed(4))
    assert slot.dropped == 2  # 3 was taken before 4 replaced it
    assert slot.take(after_seq=3, timeout=0).seq == 4


def test_latest_frame_take_waits_for_a_newer_frame():
    slot = LatestFrame()
    slot.put(grabbed(1))
    threading.Timer(0.05, lambda: slot.put(grabbed(2))).start()
    got = slot.take(after_seq=1, timeout=5)
    assert got is not None and got.seq == 2


def test_lossless_latest_frame_waits_for_the_taker():
    slot = LatestFrame(lossless=True)
    slot.put(grabbed(1))
    done = threading.Event()

    def producer():
        slot.put(grabbed(2))  # must wait until 1 was taken
        done.set()

    threading.Thread(target=producer, daemon=True).start()
    assert not done.wait(0.1)
    assert slot.take(after_seq=0, timeout=1).seq == 1
    assert done.wait(2)
    assert slot.take(after_seq=1, timeout=1).seq == 2
    assert slot.dropped == 0


def test_closed_latest_frame_hands_out_the_last_frame_then_none():
    slot = LatestFrame()
    slot.put(grabbed(1))
    slot.close()
    assert not slot.put(grabbed(2))
    assert slot.take(after_seq=0, timeout=1).seq == 1
    assert slot.closed
    assert slot.take(after_seq=1, timeout=1) is None


# --- sources -----------------------------------------------------------------------------------


def test_replay_folder_reads_images_in_name_order_then_ends(image_folder):
    source = ReplaySource(ReplaySourceConfig(type="replay", path=str(image_folder)))
    source.check()
    assert source.lossless
    source.open()
    values = [int(source.read()[0, 0, 0]) for _ in range(6)]
    assert values == [0, 10, 20, 30, 40, 50]
    with pytest.raises(EndOfStream):
        source.read()


def test_replay_loop_starts_again(image_folder):
    source = ReplaySource(ReplaySourceConfig(type="replay", path=str(image_folder), loop=True))
    source.open()
    values = [int(source.read()[0, 0, 0]) for _ in range(8)]
    assert values == [0, 10, 20, 30, 40, 50, 0, 10]


def test_replay_skips_a_broken_image_at_once_and_a_reopen_resumes_where_it_stopped(image_folder, caplog):
    """Issue 23: a bad file is skipped inside read() (logged, counted), not a SourceError and a reconnect."""
    (image_folder / "002.png").write_bytes(b"not a png")
    source = ReplaySource(ReplaySourceConfig(type="replay", path=str(image_folder)))
    source.open()
    with caplog.at_level("WARNING"):
        assert [int(source.read()[0, 0, 0]) for _ in range(3)] == [0, 10, 30]
    assert source.skipped == 1 and "002.png" in caplog.text
    source.close()
    source.open()
    assert int(source.read()[0, 0, 0]) == 40


def test_replay_with_nothing_readable_is_a_source_error_naming_the_last_problem(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"not a png")
    source = ReplaySource(ReplaySourceConfig(type="replay", path=str(tmp_path), loop=True))
    source.open()
    with pytest.raises(SourceError, match=r"no readable image .*2 skipped.*b\.png"):
        source.read()


def test_replay_video_file_and_resume_position(tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert writer.isOpened()
    for i in range(5):
        writer.write(numbered_frame(40 * i))
    writer.release()
    source = ReplaySource(ReplaySourceConfig(type="replay", path=str(path)))
    source.check()
    source.open()
    first = [int(source.read()[10, 10, 0]) for _ in range(2)]
    source.close()
    source.open()  # a reconnect resumes, it does not start over
    rest = [int(source.read()[10, 10, 0]) for _ in range(3)]
    values = first + rest
    assert all(abs(v - 40 * i) <= 6 for i, v in enumerate(values)), values
    with pytest.raises(EndOfStream):
        source.read()


def test_replay_paced_source_spaces_frames_by_its_fps(image_folder):
    # Pacing is checked on the source's own schedule (the deadline it keeps), not on wall-clock asserts.
    source = ReplaySource(ReplaySourceConfig(type="replay", path=str(image_folder), fps=50))
    assert not source.lossless
    assert source.expected_interval_s == pytest.approx(0.02)
    source.open()
    source.read()
    due_after_first = source._next_due
    source.read()
    assert source._next_due == pytest.approx(due_after_first + 0.02)


@pytest.mark.parametrize(
    "config, message",
    [
        (ReplaySourceConfig(type="replay", path="/nonexistent/frames"), "does not exist"),
        (ReplaySourceConfig(type="replay", path="EMPTY"), "holds no images"),
    ],
)
def test_replay_check_names_what_is_wrong(tmp_path, config, message):
    if config.path == "EMPTY":
        config = ReplaySourceConfig(type="replay", path=str(tmp_path))
    with pytest.raises(UserError, match=message):
        create_source(config).check()


def test_url_with_password_is_redacted():
    assert redact_url("rtsp://admin:s3cret@10.0.0.5:554/s1") == "rtsp://admin:***@10.0.0.5:554/s1"
    assert redact_url("http://10.0.0.6/video.mjpg") == "http://10.0.0.6/video.mjpg"


# --- an HTTP MJPEG camera on loopback -----------------------------------------------------------


class MjpegCamera:
    """Serves multipart MJPEG like an IP camera. Each connection sends `frames_per_connection` frames
    (numbered across connections) and then either closes (`after='close'`) or goes silent with the
    connection open (`after='hang'`)."""

    def __init__(self, frames_per_connection: int, after: str = "close", interval: float = 0.01):
        self.frames_per_connection = frames_per_connection
        self.after = after
        self.interval = interval
        self.connections = 0
        self.sent = 0
        self._stop = threading.Event()
        camera = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                camera.connections += 1
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    for _ in range(camera.frames_per_connection):
                        camera.sent += 1
                        ok, buf = cv2.imencode(".jpg", numbered_frame(min(250, camera.sent * 5)))
                        data = buf.tobytes()
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(data))
                        self.wfile.write(data + b"\r\n")
                        self.wfile.flush()
                        time.sleep(camera.interval)
                    if camera.after == "hang":
                        camera._stop.wait(30)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/video.mjpg"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()


def test_url_source_reads_an_http_mjpeg_stream():
    with MjpegCamera(frames_per_connection=5) as camera:
        source = UrlSource(UrlSourceConfig(type="url", url=camera.url), ReconnectConfig(stall_timeout_s=2))
        source.open()
        frames = [source.read() for _ in range(3)]
        source.close()
    assert frames[0].shape == (48, 64, 3) and frames[0].dtype == np.uint8


def test_capture_reconnects_when_the_stream_breaks():
    reconnect = ReconnectConfig(initial_delay_s=0.05, max_delay_s=0.2, stall_timeout_s=2, open_timeout_s=2)
    with MjpegCamera(frames_per_connection=4, after="close") as camera:
        capture = Capture("cam", UrlSourceConfig(type="url", url=camera.url), reconnect)
        capture.start()
        try:
            seen = []
            deadline = time.monotonic() + 15
            while camera.connections < 3 and time.monotonic() < deadline:
                got = capture.frames.take(after_seq=seen[-1] if seen else 0, timeout=0.5)
                if got is not None:
                    seen.append(got.seq)
            assert camera.connections >= 3, capture.stats()
            assert capture.reconnects >= 2
            assert "no frame" in capture.last_error
            assert seen == sorted(set(seen))  # frame ids keep increasing across reconnects
        finally:
            capture.stop()
    assert capture.state == CaptureState.STOPPED


def test_capture_detects_a_stalled_stream_and_reopens_it():
    reconnect = ReconnectConfig(initial_delay_s=0.05, max_delay_s=0.2, stall_timeout_s=0.5, open_timeout_s=2)
    states: list[CaptureState] = []
    with MjpegCamera(frames_per_connection=3, after="hang") as camera:
        capture = Capture(
            "cam", UrlSourceConfig(type="url", url=camera.url), reconnect,
            on_state=lambda name, state, detail: states.append(state),
        )
        capture.start()
        try:
            assert wait_until(lambda: camera.connections >= 2, timeout=15), capture.stats()
            assert capture.reconnects >= 1
        finally:
            capture.stop()
    assert CaptureState.STREAMING in states
    assert CaptureState.RECONNECTING in states or CaptureState.STALLED in states


def test_failed_opens_back_off_exponentially():
    # A port nobody listens on: every open fails; the retry delays double up to the maximum.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    details: list[str] = []
    reconnect = ReconnectConfig(initial_delay_s=0.01, max_delay_s=0.08, multiplier=2, open_timeout_s=1)
    capture = Capture(
        "cam", UrlSourceConfig(type="url", url=f"http://127.0.0.1:{port}/video.mjpg"), reconnect,
        on_state=lambda name, state, detail: details.append(detail) if state == CaptureState.RECONNECTING else None,
    )
    capture.start()
    try:
        assert wait_until(lambda: len(details) >= 6, timeout=20)
    finally:
        capture.stop()
    delays = [float(d.split("retry in ")[1].split("s")[0]) for d in details[:6]]
    assert delays == [0.01, 0.02, 0.04, 0.08, 0.08, 0.08]
    assert capture.reconnects >= 6
    assert "cannot open" in capture.last_error


def test_capture_of_a_lossless_replay_delivers_every_frame_then_finishes(image_folder):
    capture = Capture("cam", ReplaySourceConfig(type="replay", path=str(image_folder)), ReconnectConfig())
    capture.check()
    capture.start()
    values, last = [], 0
    while True:
        got = capture.frames.take(after_seq=last, timeout=5)
        if got is None:
            break
        last = got.seq
        values.append(int(got.pixels[0, 0, 0]))
    capture.stop()
    assert values == [0, 10, 20, 30, 40, 50]
    assert capture.frames.dropped == 0
    assert capture.state == CaptureState.FINISHED
    assert capture.stats()["frames"] == 6


def test_a_replay_of_good_and_unreadable_files_skips_the_bad_ones_without_a_reconnect(tmp_path):
    """Issue 23. Before: each unreadable file was a SourceError, so a reconnect and its back-off (129 results
    in 30 s instead of 300)."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(12):
        if i % 2:
            (folder / f"{i:03d}.png").write_bytes(b"truncated" if i % 4 == 1 else b"")
        else:
            cv2.imwrite(str(folder / f"{i:03d}.png"), numbered_frame(i * 10))
    capture = Capture("cam", ReplaySourceConfig(type="replay", path=str(folder)), ReconnectConfig())
    capture.start()
    values, seq = [], 0
    try:
        while (grabbed := capture.frames.take(seq, timeout=10)) is not None:
            seq = grabbed.seq
            values.append(int(grabbed.pixels[0, 0, 0]))
    finally:
        capture.stop()
    assert values == [0, 20, 40, 60, 80, 100]
    assert capture.reconnects == 0 and capture.stats()["skipped_unreadable"] == 6 and capture.finished


def test_an_emptied_replay_folder_is_retried_at_most_every_second_and_plays_again(tmp_path, image_folder):
    """Issue 23. Before: the back-off doubled to 16 s, so frames resumed 11 s after the files came back."""
    capture = Capture("cam", ReplaySourceConfig(type="replay", path=str(image_folder), fps=50, loop=True),
                      ReconnectConfig(initial_delay_s=0.05, max_delay_s=30))
    away = tmp_path / "away"
    away.mkdir()
    capture.start()
    try:
        assert wait_until(lambda: capture.frames_total >= 3, 30)
        for file in image_folder.glob("*.png"):
            file.rename(away / file.name)
        assert wait_until(lambda: capture.reconnects >= 8, 60)  # 0.05 s doubling would be 6.4 s by now
        assert 0 < capture.stats()["retry_delay_s"] <= 1.0
        for file in away.iterdir():
            file.rename(image_folder / file.name)
        seen = capture.frames_total
        assert wait_until(lambda: capture.frames_total > seen + 3, 30)
    finally:
        capture.stop()


def test_a_looping_replay_of_unreadable_files_logs_a_few_lines_not_one_per_file_and_retry(tmp_path, caplog):
    """Issue 23. Before: 15,667 lines in 20 minutes (a line per file, per reconnect and per state change)."""
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.png").write_bytes(b"not an image")
    capture = Capture("cam", ReplaySourceConfig(type="replay", path=str(folder), fps=50, loop=True),
                      ReconnectConfig(initial_delay_s=0.05))
    started = time.monotonic()
    with caplog.at_level("INFO", logger="edge_inspect.capture"):
        capture.start()
        try:
            assert wait_until(lambda: capture.reconnects >= 12, 60)
        finally:
            capture.stop()
        elapsed = time.monotonic() - started
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("edge_inspect.capture")]
    assert len(lines) <= 5 + 6 * (2 + elapsed / 30), "\n".join(lines)  # 5 files named once, 6 kinds limited
    assert capture.stats()["skipped_unreadable"] >= 12 * 5  # every skip counted, though not every one logged


def test_capture_of_a_paced_replay_drops_what_a_slow_pipeline_misses(image_folder):
    config = ReplaySourceConfig(type="replay", path=str(image_folder), fps=200, loop=True)
    capture = Capture("cam", config, ReconnectConfig())
    capture.start()
    taken, last = 0, 0
    try:
        for _ in range(5):
            got = capture.frames.take(after_seq=last, timeout=5)
            assert got is not None
            last = got.seq
            taken += 1
            time.sleep(0.05)  # a pipeline slower than the camera
    finally:
        capture.stop()
    stats = capture.stats()
    assert stats["dropped"] > 0
    assert stats["dropped"] + taken + capture.frames.pending == stats["frames"]


# --- triggers ----------------------------------------------------------------------------------


def test_mqtt_trigger_asks_for_a_frame_grabbed_after_the_trigger():
    slot = LatestFrame()
    slot.put(grabbed(7))
    trigger = MqttTrigger(TriggerConfig(mode="mqtt", queue_size=2))
    trigger.attach(slot)
    assert trigger.next_request(slot, timeout=0.01) is None
    assert trigger.fire("A-1", received_at=123.0)
    request = trigger.next_request(slot, timeout=1)
    assert request.after_seq == 7 and request.part_id == "A-1" and request.trigger_time == 123.0 and request.external
    assert slot.take(after_seq=request.after_seq, timeout=0.01) is None  # frame 7 predates the trigger
    slot.put(grabbed(8))
    assert slot.take(after_seq=request.after_seq, timeout=0.01).seq == 8


def test_mqtt_trigger_queue_overflow_is_counted():
    trigger = MqttTrigger(TriggerConfig(mode="mqtt", queue_size=2))
    assert trigger.fire("a") and trigger.fire("b")
    assert not trigger.fire("c")
    assert trigger.counters.get("triggers_dropped") == 1
    assert trigger.pending() == 2


def test_free_run_trigger_keeps_its_rate_schedule():
    now = [100.0]
    trigger = FreeRunTrigger(TriggerConfig(mode="free_run", fps=4), clock=lambda: now[0])
    slot = LatestFrame()
    assert trigger.next_request(slot, timeout=1) is not None  # first tick at once
    assert trigger._next_due == pytest.approx(100.25)
    now[0] = 100.25
    assert trigger.next_request(slot, timeout=1) is not None
    assert trigger._next_due == pytest.approx(100.5)
    now[0] = 103.0  # the pipeline fell far behind: no burst of catch-up ticks
    assert trigger.next_request(slot, timeout=1) is not None
    assert trigger._next_due == pytest.approx(103.25)


def test_every_frame_and_factory():
    assert isinstance(create_trigger(TriggerConfig(mode="every_frame")), EveryFrameTrigger)
    assert isinstance(create_trigger(TriggerConfig(mode="mqtt")), MqttTrigger)
    assert not create_trigger(TriggerConfig(mode="free_run")).fire("x")


# --- camera view -------------------------------------------------------------------------------


def test_camera_view_crops_and_resizes_and_boxes_map_back():
    frame = np.zeros((100, 200, 3), np.uint8)
    frame[20:60, 50:150] = 255
    view = camera_view(frame, (50, 20, 100, 40), (50, 20))
    assert view.shape == (20, 50, 3) and view.min() == 255
    assert view_to_frame_box((0, 0, 50, 20), (20, 50), (50, 20, 100, 40), (100, 200)) == (50, 20, 150, 60)
    assert view_to_frame_box((10, 5, 20, 10), (20, 50), (50, 20, 100, 40), (100, 200)) == (70, 30, 90, 40)
    assert camera_view(frame, None, None).shape == frame.shape
    with pytest.raises(SourceError, match="outside"):
        camera_view(frame, (300, 0, 10, 10), None)


# --- sd_notify ---------------------------------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True])
def test_notifier_sends_datagrams_to_path_and_abstract_sockets(tmp_path, abstract):
    address = f"@edge-inspect-test-{os.getpid()}-{time.monotonic_ns()}" if abstract else str(tmp_path / "notify")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + address[1:] if abstract else address)
    receiver.settimeout(2)
    try:
        notifier = Notifier(address)
        assert notifier.ready(status="models loaded")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=models loaded"
        assert notifier.watchdog()
        assert receiver.recv(4096) == b"WATCHDOG=1"
        assert notifier.status("cam0 streaming\n9.9 fps")
        assert receiver.recv(4096) == b"STATUS=cam0 streaming 9.9 fps"
        notifier.close()
    finally:
        receiver.close()


def test_notifier_without_systemd_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_environment()
    assert not notifier.enabled and not notifier.ready() and notifier.watchdog_interval_s() is None


def test_notifier_watchdog_interval_honours_watchdog_pid(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "s"))
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier.from_environment().watchdog_interval_s() == pytest.approx(10.0)
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert Notifier.from_environment().watchdog_interval_s() is None


def test_notifier_to_a_missing_socket_does_not_raise(tmp_path):
    assert not Notifier(str(tmp_path / "nobody-listens")).ready()


# --- stats -------------------------------------------------------------------------------------


def test_latency_window_percentiles_over_the_last_values():
    window = LatencyWindow(size=100)
    values = np.arange(250, dtype=float)
    for v in values:
        window.add(v)
    got = window.percentiles()
    assert got["n"] == 100
    assert got["p50"] == pytest.approx(np.percentile(values[-100:], 50))
    assert got["p99"] == pytest.approx(np.percentile(values[-100:], 99), abs=0.01)
    assert LatencyWindow(4).percentiles()["n"] == 0


def test_rate_meter_counts_events_in_its_window():
    now = [0.0]
    meter = RateMeter(window_s=10, clock=lambda: now[0])
    for i in range(50):
        now[0] = 10 + i * 0.1  # 10 per second
        meter.tick()
    now[0] = 15.0
    assert meter.rate() == pytest.approx(5.0)  # 50 events in the last 10 s
    now[0] = 40.0
    assert meter.rate() == 0


def test_camera_stats_flagged_rate():
    stats = CameraStats(latency_window=16)
    for i in range(10):
        stats.record({"score": 5.0, "total": 8.0}, score=0.1 * i, flagged=i >= 8)
    snap = stats.snapshot()
    assert snap["inspected"] == 10 and snap["flagged"] == 2 and snap["flagged_rate"] == 0.2
    assert snap["latency_ms"]["score"]["p50"] == 5.0 and snap["last_verdict"] == "NG"


def test_url_password_comes_from_the_environment(monkeypatch):
    config = UrlSourceConfig(type="url", url="rtsp://admin:${EI_TEST_CAMERA_PASSWORD}@10.0.0.5/s1")
    source = create_source(config)
    monkeypatch.delenv("EI_TEST_CAMERA_PASSWORD", raising=False)
    with pytest.raises(UserError, match="EI_TEST_CAMERA_PASSWORD"):
        source.check()
    monkeypatch.setenv("EI_TEST_CAMERA_PASSWORD", "s3cret")
    source.check()
    from edge_inspect.capture.sources import expand_env

    assert expand_env(config.url) == "rtsp://admin:s3cret@10.0.0.5/s1"
    assert "s3cret" not in source.describe()
