"""edge-inspect doctor: each broken prerequisite gives FAIL with a fix and exit code 1; a healthy setup
passes. Real brokers (amqtt in-process, mosquitto with a password file), real images, a real calibration."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from skimage import data as skdata

from edge_inspect import cli
from edge_inspect.ops.doctor import (
    CheckResult,
    DoctorContext,
    exit_code,
    format_table,
    read_gguf_header,
    run_checks,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("frames")
    for i, photo in enumerate((skdata.coffee(), skdata.chelsea(), skdata.astronaut())):
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    return folder


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, pytestconfig) -> dict[str, Path]:
    """Product `cup` calibrated with `edge-inspect calibrate` from four real photos of the same cup."""
    from edge_inspect.calibration.artifacts import BACKBONE_FILE, ensure_backbone
    from edge_inspect.errors import UserError

    cache_plugin = getattr(pytestconfig, "cache", None)
    cache = Path(cache_plugin.mkdir("edge-inspect-backbone")) if cache_plugin else tmp_path_factory.mktemp("backbone")
    try:
        backbone = ensure_backbone(cache)
    except UserError as exc:
        pytest.skip(f"no backbone: {exc}")
    root = tmp_path_factory.mktemp("calibrated")
    engines = root / "engines"
    (engines / BACKBONE_FILE).parent.mkdir(parents=True)
    os.symlink(backbone, engines / BACKBONE_FILE)
    good = root / "good"
    good.mkdir()
    cup = cv2.cvtColor(skdata.coffee(), cv2.COLOR_RGB2BGR)
    rng = np.random.default_rng(0)
    for i in range(4):
        noisy = np.clip(cup.astype(np.int16) + rng.normal(0, 3, cup.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(good / f"{i}.png"), noisy)
    code = cli.main(["calibrate", "--product", "cup", "--images", str(good), "--calibration-dir",
                     str(root / "calibration"), "--engines-dir", str(engines), "--size", "128", "--bank-size", "128"])
    assert code == 0
    return {"calibration_dir": root / "calibration", "engines_dir": engines}


def _config(tmp_path: Path, frames: Path, port: int, calibration: dict[str, Path] | None = None,
            source: dict | None = None, **sections) -> Path:
    calibration = calibration or {"calibration_dir": tmp_path / "calibration", "engines_dir": tmp_path / "engines"}
    for folder in calibration.values():
        Path(folder).mkdir(parents=True, exist_ok=True)
    config = {
        "station": "line1",
        "cameras": [{
            "name": "cam0", "product": "cup",
            "source": source or {"type": "replay", "path": str(frames), "fps": 0},
            "reconnect": {"open_timeout_s": 2, "stall_timeout_s": 2},
        }],
        "scoring": {"backend": "onnxruntime", "threads": 1, "calibration_dir": str(calibration["calibration_dir"]),
                    "engines_dir": str(calibration["engines_dir"])},
        "mqtt": {"host": "127.0.0.1", "port": port, "protocol": "3.1.1"},
        "spool": {"path": str(tmp_path / "spool" / "results.sqlite3")},
        "evidence": {"dir": str(tmp_path / "evidence")},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _doctor(config: Path, capsys) -> tuple[int, dict[str, dict]]:
    code = cli.main(["doctor", "--config", str(config), "--json", "--timeout", "5"])
    report = json.loads(capsys.readouterr().out)
    assert report["exit_code"] == code
    return code, {check["name"]: check for check in report["checks"]}


@pytest.fixture
def broker():
    pytest.importorskip("amqtt")
    from edge_inspect.ops.demo_broker import ensure_broker

    port = _free_port()
    handle = ensure_broker("127.0.0.1", port, kind="amqtt")
    yield port
    handle.stop()


def test_stopped_broker_fails_with_a_fix(tmp_path, frames, capsys):
    code, checks = _doctor(_config(tmp_path, frames, _free_port()), capsys)
    assert code == 1
    assert checks["broker"]["status"] == "fail"
    assert "refused" in checks["broker"]["detail"]
    assert "start the broker" in checks["broker"]["fix"] and "mqtt.port" in checks["broker"]["fix"]
    assert checks["source cam0"]["status"] == "ok"  # the rest is still checked
    assert "600x400" in checks["source cam0"]["detail"]


def test_missing_calibration_fails_with_the_calibrate_command(tmp_path, frames, broker, capsys):
    code, checks = _doctor(_config(tmp_path, frames, broker), capsys)
    assert code == 1
    assert checks["broker"]["status"] == "ok", checks["broker"]
    assert checks["calibration cup"]["status"] == "fail"
    assert "not calibrated" in checks["calibration cup"]["detail"]
    assert checks["calibration cup"]["fix"].startswith("edge-inspect calibrate --product cup")
    assert checks["engine cup"]["status"] == "skip"


def test_bad_sources_fail_with_a_fix(tmp_path, frames, capsys):
    code, checks = _doctor(_config(tmp_path, frames, _free_port(),
                                   source={"type": "replay", "path": str(tmp_path / "no-such-folder")}), capsys)
    assert code == 1
    assert checks["source cam0"]["status"] == "fail"
    assert "does not exist" in checks["source cam0"]["detail"] and checks["source cam0"]["fix"]

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "000.png").write_bytes(b"this is not a PNG")
    (tmp_path / "config.yaml").unlink()
    code, checks = _doctor(_config(tmp_path, frames, _free_port(), source={"type": "replay", "path": str(broken)}), capsys)
    assert code == 1 and checks["source cam0"]["status"] == "fail"
    assert "cannot read image" in checks["source cam0"]["detail"]

    (tmp_path / "config.yaml").unlink()
    code, checks = _doctor(_config(tmp_path, frames, _free_port(),
                                   source={"type": "v4l2", "device": "/dev/video-edge-inspect-missing"}), capsys)
    assert code == 1 and checks["source cam0"]["status"] == "fail"
    assert "video" in checks["source cam0"]["fix"]


def test_invalid_config_fails_and_skips_the_rest(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text("station: line1\ncameras: []\nmqtt: {hots: x}\n")
    code, checks = _doctor(path, capsys)
    assert code == 1
    assert checks["config"]["status"] == "fail" and "hots" in checks["config"]["detail"]
    assert checks["config"]["fix"]
    assert {c["status"] for name, c in checks.items() if name != "config"} == {"skip"}


@pytest.mark.slow
def test_healthy_setup_passes_and_prints_a_table(tmp_path, frames, calibrated, broker, capsys):
    config = _config(tmp_path, frames, broker, calibration=calibrated)
    code, checks = _doctor(config, capsys)
    assert code == 0, checks
    assert checks["calibration cup"]["status"] == "ok" and "threshold" in checks["calibration cup"]["detail"]
    assert checks["engine cup"]["status"] == "ok" and "ONNX Runtime" in checks["engine cup"]["detail"]
    assert checks["disk spool"]["status"] in ("ok", "warn")
    assert checks["disk evidence"]["status"] in ("ok", "warn") and str(tmp_path / "evidence") in checks["disk evidence"]["detail"]
    assert checks["vlm"]["status"] == "skip"

    assert cli.main(["doctor", "--config", str(config)]) == 0
    table = capsys.readouterr().out
    assert "calibration cup" in table and "FAIL" not in table
    assert table.strip().splitlines()[-1].startswith(f"{sum(c['status'] == 'ok' for c in checks.values())} ok")


@pytest.mark.mosquitto
def test_wrong_password_is_reported_in_words(tmp_path, frames, mosquitto_factory, capsys, monkeypatch):
    from mqtt_broker import make_password_file

    passwords = make_password_file(tmp_path / "passwd", {"line1": "right-secret"})
    broker = mosquitto_factory(password_file=passwords)
    monkeypatch.setenv("EDGE_INSPECT_MQTT_PASSWORD", "wrong-secret")
    config = _config(tmp_path, frames, broker.port, mqtt={"username": "line1", "protocol": "5"})
    code, checks = _doctor(config, capsys)
    assert code == 1
    assert checks["broker"]["status"] == "fail"
    assert "Bad user name or password" in checks["broker"]["detail"] or "Not authorized" in checks["broker"]["detail"]
    assert "mqtt.username" in checks["broker"]["fix"] and "env EDGE_INSPECT_MQTT_PASSWORD" in checks["broker"]["fix"]

    monkeypatch.setenv("EDGE_INSPECT_MQTT_PASSWORD", "right-secret")
    code, checks = _doctor(config, capsys)
    assert checks["broker"]["status"] == "ok" and "user line1" in checks["broker"]["detail"]


def test_gguf_header_check(tmp_path):
    gguf = pytest.importorskip("gguf", reason="gguf package (dev extra) writes the test file")
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    version, tensors = read_gguf_header(path)
    assert version == 3 and tensors == 1
    page = tmp_path / "model.gguf"
    page.write_text("<!DOCTYPE html><html>Rate limit exceeded</html>")
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf_header(page)


def test_a_check_that_crashes_is_a_failure_not_a_traceback(tmp_path):
    def check_explodes(ctx: DoctorContext):
        yield CheckResult("first", "ok", "fine")
        raise RuntimeError("boom")

    def check_after(ctx: DoctorContext):
        yield CheckResult("after", "warn", "slow disk", "buy a faster card")

    results = run_checks(tmp_path / "none.yaml", checks=(check_explodes, check_after))
    assert [(r.name, r.status) for r in results] == [("first", "ok"), ("explodes", "fail"), ("after", "warn")]
    assert "boom" in results[1].detail
    assert exit_code(results) == 1 and exit_code(results[2:]) == 0
    table = format_table(results, width=80)
    assert "fix: buy a faster card" in table and table.splitlines()[-1] == "1 ok, 1 warning, 1 failed"


def test_vlm_section_is_checked_when_enabled(tmp_path, frames, capsys):
    """The config's vlm section reaches the doctor: GGUF files are checked, an HTML page is named as such."""
    pytest.importorskip("gguf", reason="the gguf package writes the tiny test model")
    from tiny_gguf import build_tiny_vlm

    tiny = build_tiny_vlm(tmp_path / "models")
    code, checks = _doctor(_config(tmp_path, frames, _free_port(),
                                   vlm={"enabled": True, "model": str(tiny.model), "mmproj": str(tiny.mmproj)}), capsys)
    assert checks["vlm model"]["status"] == "ok" and "GGUF v3" in checks["vlm model"]["detail"]
    assert checks["vlm projector"]["status"] == "ok"
    assert checks["disk evidence"]["status"] in ("ok", "warn")

    page = tmp_path / "model.gguf"
    page.write_text("<!DOCTYPE html><html>Rate limit exceeded</html>")
    (tmp_path / "config.yaml").unlink()
    code, checks = _doctor(_config(tmp_path, frames, _free_port(),
                                   vlm={"enabled": True, "mode": "text", "model": str(page)}), capsys)
    assert code == 1 and checks["vlm model"]["status"] == "fail"
    assert "not a GGUF file" in checks["vlm model"]["detail"] and "vlm.model" in checks["vlm model"]["fix"]
    assert "vlm projector" not in checks  # text mode has none


def test_doctor_states_how_many_results_the_spool_holds_on_its_disk(tmp_path, frames, capsys, small_disk):
    """Issue 23: the spool's capacity through a broker outage, from its disk and its limits."""
    disk = small_disk("2m")
    config = _config(tmp_path, frames, _free_port(), spool={"path": str(disk / "spool" / "results.sqlite3")})
    _, checks = _doctor(config, capsys)
    detail = checks["disk spool"]["detail"]
    match = re.search(r"holds about ([\d,]+) results of (\d+) B through an outage \(limited by its disk", detail)
    assert match, detail
    assert 1000 < int(match.group(1).replace(",", "")) < 2 * 1024 * 1024 / int(match.group(2))
    (tmp_path / "config.yaml").unlink()
    _, checks = _doctor(_config(tmp_path, frames, _free_port()), capsys)
    assert "limited by spool.max_bytes, 256 MiB" in checks["disk spool"]["detail"], checks["disk spool"]
