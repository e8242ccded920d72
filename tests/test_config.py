"""The daemon config: one schema, validated at load, every error names file:line, key, value and fix."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from edge_inspect import cli
from edge_inspect.config import AppConfig, ConfigProblem, config_json_schema, load_config, parse_config
from edge_inspect.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
station: line1
cameras:
  - name: cam0
    product: widget
    source:
      type: replay
      path: /tmp/frames
      fps: 10
    trigger:
      mode: free_run
      fps: 5
mqtt:
  host: 127.0.0.1
  port: 1883
pipeline:
  score_queue_size: 2
"""


def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


# (id, config text, expected line, expected key, words the message must contain)
BROKEN = [
    ("unknown-top-level", GOOD + "vlm_model: x\n", 17, "vlm_model", ["unknown key", "allowed here"]),
    ("typo-suggests", edit(GOOD, "      fps: 10", "      fsp: 10"), 8, "cameras[0].source.fsp", ["did you mean `fps`"]),
    ("negative-fps", edit(GOOD, "      fps: 5", "      fps: -5"), 11, "cameras[0].trigger.fps", ["-5", "greater than 0"]),
    ("bad-trigger-mode", edit(GOOD, "mode: free_run", "mode: freerun"), 10, "cameras[0].trigger.mode", ["'freerun'", "every_frame"]),
    ("unknown-source-type", edit(GOOD, "type: replay", "type: webcam"), 6, "cameras[0].source.type", ["'webcam'", "v4l2, url, gstreamer, replay"]),
    ("source-without-type", edit(GOOD, "      type: replay\n", ""), 5, "cameras[0].source", ["needs a `type:` key"]),
    ("missing-product", edit(GOOD, "    product: widget\n", ""), 3, "cameras[0].product", ["required key is missing", "add `product:`"]),
    ("missing-station", GOOD.replace("station: line1\n", ""), 1, "station", ["required key is missing"]),
    ("no-cameras", "station: line1\ncameras: []\n", 2, "cameras", ["at least 1 item"]),
    ("bad-station-name", edit(GOOD, "station: line1", "station: line/1"), 1, "station", ["'line/1'", "pattern"]),
    ("port-out-of-range", edit(GOOD, "port: 1883", "port: 70000"), 14, "mqtt.port", ["70000", "65535"]),
    ("password-in-yaml", edit(GOOD, "  port: 1883", "  port: 1883\n  password: hunter2"), 15, "mqtt.password", ["unknown key", "password_env"]),
    ("queue-size-zero", edit(GOOD, "score_queue_size: 2", "score_queue_size: 0"), 16, "pipeline.score_queue_size", ["0 is not valid", "greater than or equal to 1"]),
    ("wrong-type-string-for-int", edit(GOOD, "score_queue_size: 2", "score_queue_size: many"), 16, "pipeline.score_queue_size", ["'many'", "integer"]),
    ("duplicate-key", edit(GOOD, "      fps: 10", "      fps: 10\n      fps: 20"), 9, "cameras[0].source.fps", ["duplicate key", "line 8"]),
    ("yaml-syntax", edit(GOOD, "  host: 127.0.0.1", "  host: [127.0.0.1"), 14, "", ["not valid YAML"]),
    ("bad-indentation", edit(GOOD, "    product: widget", "   product: widget"), 4, "", ["not valid YAML"]),
    ("top-level-list", "- station: line1\n", 1, "", ["top level must be a mapping"]),
    ("empty-file", "", None, "", ["empty"]),
    ("duplicate-camera-name", GOOD.replace("mqtt:", "  - name: cam0\n    product: other\n    source: {type: v4l2}\nmqtt:"), 2, "cameras", ["'cam0' is used twice"]),
    ("fourcc-length", edit(GOOD, "type: replay\n      path: /tmp/frames\n      fps: 10", "type: v4l2\n      fourcc: MJPEG"), 7, "cameras[0].source.fourcc", ["'MJPEG'", "four characters"]),
    ("gstreamer-without-appsink", edit(GOOD, "type: replay\n      path: /tmp/frames\n      fps: 10", "type: gstreamer\n      pipeline: videotestsrc ! autovideosink"), 7, "cameras[0].source.pipeline", ["appsink"]),
    ("url-without-scheme", edit(GOOD, "type: replay\n      path: /tmp/frames\n      fps: 10", "type: url\n      url: 10.0.0.5/stream"), 7, "cameras[0].source.url", ["rtsp://"]),
    ("resize-one-number", edit(GOOD, "    trigger:", "    resize: [640]\n    trigger:"), 9, "cameras[0].resize[1]", ["needs more items"]),
    ("roi-zero-width", edit(GOOD, "    trigger:", "    roi: {x: 0, y: 0, width: 0, height: 10}\n    trigger:"), 9, "cameras[0].roi.width", ["greater than 0"]),
    ("backoff-order", edit(GOOD, "    trigger:", "    reconnect: {initial_delay_s: 10, max_delay_s: 1}\n    trigger:"), 9, "cameras[0].reconnect", ["max_delay_s", ">= initial_delay_s"]),
    ("bad-backend", GOOD + "scoring:\n  backend: cuda\n", 18, "scoring.backend", ["'cuda'", "onnxruntime"]),
    ("vlm-without-model", GOOD + "vlm:\n  enabled: true\n", 17, "vlm", ["vlm.model is empty", "GGUF"]),
    ("evidence-quality", GOOD + "evidence:\n  jpeg_quality: 10\n", 18, "evidence.jpeg_quality", ["10", "greater than or equal to 30"]),
]


@pytest.mark.parametrize("name, text, line, key, words", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_config_gives_a_located_error_and_exit_code_2(tmp_path, capsys, name, text, line, key, words):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    assert cli.main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    where = f"{path}:{line}:" if line else f"{path}:"
    expected_start = f"{where} {key}:" if key else where
    lines = [l.strip() for l in err.splitlines()]
    matching = [l for l in lines if l.startswith(expected_start)]
    assert matching, f"no line starting with {expected_start!r} in:\n{err}"
    for word in words:
        assert any(word in l for l in matching), f"{word!r} missing from {matching}"


def test_at_least_fifteen_broken_files_are_covered():
    assert len(BROKEN) >= 15


def test_every_problem_is_reported_not_just_the_first(tmp_path):
    text = edit(edit(GOOD, "fps: 10", "fps: -1"), "port: 1883", "port: 0")
    with pytest.raises(ConfigError) as info:
        parse_config(text, "many.yaml")
    problems = info.value.problems
    assert {(p.line, p.key) for p in problems} == {(8, "cameras[0].source.fps"), (14, "mqtt.port")}
    assert str(info.value).startswith("many.yaml: 2 problems in the config")


def test_good_config_loads_with_defaults(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    config = load_config(path)
    assert isinstance(config, AppConfig)
    camera = config.cameras[0]
    assert camera.source.type == "replay" and camera.source.fps == 10 and not camera.source.loop
    assert camera.trigger.mode == "free_run" and camera.reconnect.stall_timeout_s == 5
    assert config.scoring.backend == "auto" and config.pipeline.score_queue_size == 2
    assert config.mqtt.broker_port == 1883
    # Evidence is kept by default (relative dir: under the working directory); the VLM is off.
    assert config.evidence.enabled and config.evidence.dir == "evidence"
    assert not config.vlm.enabled


def test_v4l2_device_forms():
    config = parse_config(edit(GOOD, "type: replay\n      path: /tmp/frames\n      fps: 10", "type: v4l2\n      device: '2'"))
    assert config.cameras[0].source.device == 2
    with pytest.raises(ConfigError, match="under /dev/"):
        parse_config(edit(GOOD, "type: replay\n      path: /tmp/frames\n      fps: 10", "type: v4l2\n      device: video2"))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="folder"):
        load_config(tmp_path)


def test_the_example_config_validates_and_check_config_prints_a_summary(capsys):
    example = ROOT / "examples" / "config.yaml"
    config = load_config(example)
    assert config.cameras[0].source.type == "v4l2"
    assert cli.main(["check-config", str(example), "--syntax-only"]) == 0  # its camera and product are not here
    out = capsys.readouterr().out
    assert "OK" in out and "camera cam1" in out and "password: " in out
    # The JSON Schema of the config (what docs/config.md is generated from) accepts it too.
    jsonschema.validate(yaml.safe_load(example.read_text()), config_json_schema())


def test_check_config_json_prints_the_filled_in_config_never_the_secret(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDGE_INSPECT_MQTT_PASSWORD", "s3cr3t-value")
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    assert cli.main(["check-config", str(path), "--json", "--syntax-only"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    assert data["cameras"][0]["reconnect"]["max_delay_s"] == 30.0
    assert "s3cr3t-value" not in out
    assert cli.main(["check-config", str(path), "--syntax-only"]) == 0
    out = capsys.readouterr().out
    assert "password: env EDGE_INSPECT_MQTT_PASSWORD" in out and "s3cr3t-value" not in out


def test_check_config_products_reports_a_missing_calibration(tmp_path, capsys):
    frames = tmp_path / "frames"
    frames.mkdir()
    import cv2
    import numpy as np

    cv2.imwrite(str(frames / "0.png"), np.zeros((8, 8, 3), np.uint8))
    path = tmp_path / "good.yaml"
    path.write_text(edit(GOOD, "/tmp/frames", str(frames)) + f"scoring:\n  calibration_dir: {tmp_path / 'cal'}\n")
    assert cli.main(["check-config", str(path), "--products"]) == 2
    assert "edge-inspect calibrate --product widget" in capsys.readouterr().err


def test_run_with_a_broken_config_exits_2_before_starting_anything(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(edit(GOOD, "fps: 5", "fps: fast"))
    proc = subprocess.run(
        [sys.executable, "-m", "edge_inspect.cli", "run", "--config", str(path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode == 2
    assert f"{path}:11: cameras[0].trigger.fps: 'fast' is not valid" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_problem_render_without_line():
    assert ConfigProblem(None, "", "the file is empty").render("a.yaml") == "a.yaml: the file is empty"


def _load_docs_tool():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "tools" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_config_docs_match_the_schema():
    tool = _load_docs_tool()
    committed = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert committed == tool.generate(), "docs/config.md is stale: run python tools/gen_config_docs.py"


def test_config_docs_mention_every_key():
    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    schema = config_json_schema()
    for model in [schema, *schema["$defs"].values()]:
        for key in model.get("properties", {}):
            assert f"| `{key}` |" in text, key


# --- systemd units --------------------------------------------------------------------------------


def _unit(name: str) -> dict[str, list[str]]:
    """key -> values of a unit file (comments dropped)."""
    values: dict[str, list[str]] = {}
    for line in (ROOT / "systemd" / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        values.setdefault(key, []).append(value)
    return values


@pytest.mark.parametrize("name", ["edge-inspect.service", "edge-inspect@.service"])
def test_units_have_notify_watchdog_reload_restart_and_hardening(name):
    unit = _unit(name)
    expected = {
        "Type": "notify", "Restart": "on-failure", "ExecReload": "/bin/kill -HUP $MAINPID", "User": "edge-inspect",
        "ProtectSystem": "strict", "PrivateTmp": "true", "NoNewPrivileges": "true", "SupplementaryGroups": "video",
        "WorkingDirectory": "/var/lib/edge-inspect", "RestartPreventExitStatus": "2",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], (key, unit.get(key))
    assert int(unit["WatchdogSec"][0]) >= 10
    assert int(unit["TimeoutStopSec"][0]) > 10  # above pipeline.drain_timeout_s' default
    read_write = unit["ReadWritePaths"][0]
    for folder in ("calibration", "engines", "spool", "evidence"):
        assert f"/var/lib/edge-inspect/{folder}" in read_write
    config = "/etc/edge-inspect/%i.yaml" if "@" in name else "/etc/edge-inspect/config.yaml"
    assert unit["ExecStart"] == [f"/opt/edge-inspect/venv/bin/edge-inspect run --config {config}"]


@pytest.mark.parametrize("name", ["edge-inspect.service", "edge-inspect@.service"])
def test_units_pass_systemd_analyze_verify(tmp_path, name):
    import shutil

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify needs ExecStart's binary to exist: point it at this interpreter.
    text = (ROOT / "systemd" / name).read_text().replace("/opt/edge-inspect/venv/bin/edge-inspect", sys.executable)
    target = tmp_path / (name.replace("@", "@cam1") if "@" in name else name)
    target.write_text(text)
    proc = subprocess.run([analyze, "verify", str(target)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if str(target) in line]
    assert not problems, problems


def test_run_without_the_calibrated_product_exits_2_with_the_fix(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    import cv2
    import numpy as np

    cv2.imwrite(str(frames / "0.png"), np.zeros((8, 8, 3), np.uint8))
    path = tmp_path / "config.yaml"
    path.write_text(edit(GOOD, "/tmp/frames", str(frames)) + f"scoring:\n  calibration_dir: {tmp_path / 'cal'}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "edge_inspect.cli", "run", "--config", str(path)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "edge-inspect calibrate --product widget" in proc.stderr and "Traceback" not in proc.stderr


def test_deprecated_vlm_queue_size_is_read_as_the_one_flagged_frame_queue(caplog):
    """vlm.queue_size (a second queue behind the flagged-frame queue) became pipeline.flagged_queue_size:
    N frames waiting + the one being explained."""
    import json

    from edge_inspect.config import parse_config

    base = {"station": "s1", "cameras": [{"name": "cam0", "product": "p", "source": {"type": "replay", "path": "f"}}]}
    with caplog.at_level("WARNING"):
        config = parse_config(json.dumps({**base, "vlm": {"queue_size": 3}}))
    assert config.pipeline.flagged_queue_size == 4 and "vlm.queue_size is deprecated" in caplog.text
    both = parse_config(json.dumps({**base, "vlm": {"queue_size": 3}, "pipeline": {"flagged_queue_size": 7}}))
    assert both.pipeline.flagged_queue_size == 7
    assert parse_config(json.dumps(base)).pipeline.flagged_queue_size == 5


def test_check_config_reads_the_files_run_would_refuse(tmp_path, capsys):
    """Issue 23. Before: an unwritable spool path, a missing calibration and a missing replay folder passed
    check-config with exit 0; only `run` and `doctor` refused them."""
    (tmp_path / "a-file").write_text("not a folder")
    path = tmp_path / "config.yaml"
    path.write_text(
        edit(GOOD, "/tmp/frames", str(tmp_path / "missing-frames"))
        + f"scoring:\n  calibration_dir: {tmp_path / 'calibration'}\n"
        + f"spool:\n  path: {tmp_path / 'a-file' / 'results.sqlite3'}\n"
        + f"evidence:\n  dir: {tmp_path / 'evidence'}\n"
    )
    assert cli.main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "3 problems to fix before `run`" in err, err
    assert "cameras[cam0].source.path" in err and "missing-frames" in err and "does not exist" in err
    assert "edge-inspect calibrate --product widget" in err
    assert "spool.path" in err and "a-file is not a folder" in err
    assert err.count("fix: ") == 3 and "Traceback" not in err
    assert cli.main(["check-config", str(path), "--syntax-only"]) == 0
    assert "files: not checked" in capsys.readouterr().out


def test_check_config_names_a_spool_folder_the_user_cannot_write(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(GOOD + "spool:\n  path: /proc/edge-inspect-test/results.sqlite3\n")  # not writable, even for root
    assert cli.main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"spool\.path: /proc/edge-inspect-test .*cannot write there", err), err


def test_check_config_passes_a_config_whose_files_are_all_there(tmp_path, capsys, calibrated_product):
    frames = tmp_path / "frames"
    frames.mkdir()
    shutil.copy(calibrated_product["good"][0], frames / "0000.png")
    path = tmp_path / "config.yaml"
    path.write_text(
        edit(edit(GOOD, "/tmp/frames", str(frames)), "product: widget", f"product: {calibrated_product['name']}")
        + f"scoring:\n  calibration_dir: {calibrated_product['calibration_dir']}\n"
        + f"  engines_dir: {calibrated_product['engines_dir']}\n"
        + f"spool:\n  path: {tmp_path / 'spool' / 'results.sqlite3'}\nevidence:\n  dir: {tmp_path / 'evidence'}\n"
    )
    assert cli.main(["check-config", str(path)]) == 0, capsys.readouterr().err
    assert "files: every calibration loads" in capsys.readouterr().out
    assert not (tmp_path / "spool").exists()  # checked, not created
