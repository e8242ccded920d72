"""`edge-inspect demo` end to end: the real command in a subprocess (generated parts, calibration,
a broker it starts itself, the daemon as its own subprocess), checked against what it recorded.

The slow tests share one workdir: the first run (default broker: mosquitto when installed, else
amqtt; human output) and a second run in it on the forced amqtt broker with --json, which must
reuse the dataset and report only its own results."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mqtt_broker import free_port

from edge_inspect import cli
from edge_inspect.ops.demo import MARKER, region_on_defect

ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\S+) / (\S+)\s+(OK|NG)\s*(.*)$")


@pytest.fixture(scope="module")
def engines(pytestconfig, tmp_path_factory) -> Path:
    """The backbone ONNX, exported once and cached like tests/test_daemon.py does."""
    from edge_inspect.calibration.artifacts import ensure_backbone
    from edge_inspect.errors import UserError

    cache_plugin = getattr(pytestconfig, "cache", None)
    cache = Path(cache_plugin.mkdir("edge-inspect-backbone")) if cache_plugin else tmp_path_factory.mktemp("backbone")
    try:
        ensure_backbone(cache)
    except UserError as exc:
        pytest.skip(f"no backbone: {exc}")
    return cache


def demo(workdir: Path, engines: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_inspect.cli", "demo", "--short", "--workdir", str(workdir),
         "--port", str(free_port()), "--engines-dir", str(engines), *extra],
        capture_output=True, text=True, timeout=300, cwd=workdir.parent,
    )


def replayed(workdir: Path) -> dict[int, str]:
    """frame id -> the kind painted into it, from the replay folder's names (NNN-kind.png)."""
    files = sorted((workdir / "frames").glob("*.png"))
    return {i: f.stem.split("-", 1)[1] for i, f in enumerate(files, start=1)}


def recorded(workdir: Path) -> tuple[dict[int, dict], dict]:
    """(distinct results by frame id, the demo_summary line) from results.jsonl."""
    results, summary = {}, None
    seen_ids = set()
    for line in (workdir / "results.jsonl").read_text().splitlines():
        payload = json.loads(line)
        if payload.get("type") == "result" and payload["inspection_id"] not in seen_ids:
            seen_ids.add(payload["inspection_id"])
            assert payload["frame_id"] not in results, f"two inspections of frame {payload['frame_id']}"
            results[payload["frame_id"]] = payload
        elif payload.get("type") == "demo_summary":
            summary = payload
    assert summary is not None, "results.jsonl has no demo_summary line"
    return results, summary


def expected_numbers(kinds: dict[int, str], results: dict[int, dict]) -> dict:
    defective = [i for i, kind in kinds.items() if kind != "good"]
    good = [i for i, kind in kinds.items() if kind == "good"]
    scorer = [r["latency_ms"]["score"] for r in results.values()]
    return {
        "frames": len(kinds),
        "results": len(results),
        "defects_injected": len(defective),
        "defects_found": sum(results[i]["verdict"] == "NG" for i in defective),
        "good_frames": len(good),
        "false_rejects": sum(results[i]["verdict"] == "NG" for i in good),
        "scorer_p50": round(float(np.percentile(scorer, 50)), 1),
        "scorer_p99": round(float(np.percentile(scorer, 99)), 1),
    }


def assert_self_contained(report: Path) -> None:
    html = report.read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert "<link" not in html and "<script src" not in html and "url(http" not in html
    sources = re.findall(r'src="([^"]*)"', html)
    assert sources, "the report shows no plots or images"
    assert all(s.startswith("data:") for s in sources), [s[:40] for s in sources if not s.startswith("data:")]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, engines):
    workdir = tmp_path_factory.mktemp("demo") / "run"
    return workdir, demo(workdir, engines)


@pytest.mark.slow
def test_demo_prints_every_result_once_and_its_summary_matches_the_record(first_run):
    workdir, done = first_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    kinds = replayed(workdir)
    assert len(kinds) == 14
    results, summary = recorded(workdir)

    rows = [ROW.match(line) for line in out.splitlines()]
    rows = [m for m in rows if m]
    printed = sorted(int(m.group(2)) for m in rows)
    assert printed == sorted(kinds), f"frames printed: {printed}"  # every frame exactly once
    for m in rows:
        frame = int(m.group(2))
        payload = results[frame]
        assert int(m.group(1)) == payload["seq"]
        assert m.group(5) == payload["verdict"]
        assert float(m.group(3)) == pytest.approx(payload["score"], rel=1e-3)
        assert float(m.group(4)) == pytest.approx(payload["threshold"], rel=1e-3)
        rest = m.group(6)  # where (grid words), then what was injected and how it went
        if kinds[frame] == "good":
            truth = re.search(r"(?:^|\s)-(\s+FALSE REJECT)?$", rest)
            assert truth and bool(truth.group(1)) == (payload["verdict"] == "NG"), rest
        else:
            truth = re.search(r"(\S+)\s+(found.*|MISSED)$", rest)
            assert truth and truth.group(1) == kinds[frame], rest
            assert (truth.group(2) == "MISSED") == (payload["verdict"] == "OK"), rest

    want = expected_numbers(kinds, results)
    for key in ("frames", "results", "defects_injected", "defects_found", "good_frames", "false_rejects"):
        assert summary[key] == want[key], key
    assert summary["latency_ms"]["scorer"] == {"p50": want["scorer_p50"], "p99": want["scorer_p99"]}
    assert summary["no_result"] == []
    assert f"{want['frames']} replayed, {want['results']} results received" in out
    assert f"{want['defects_found']} of {want['defects_injected']} injected defects flagged NG" in out
    assert f"{want['false_rejects']} of {want['good_frames']} good frames flagged NG" in out

    report = workdir / "report.html"
    assert re.search(r"report\s+\S*report\.html", out)
    assert_self_contained(report)


@pytest.mark.slow
def test_demo_reruns_on_the_amqtt_broker_with_json_lines(first_run, engines):
    """The pure-Python broker path (a machine without mosquitto), MQTT 3.1.1, in the same workdir."""
    pytest.importorskip("amqtt")
    workdir, first = first_run
    assert first.returncode == 0, first.stderr[-3000:]
    done = demo(workdir, engines, "--broker", "amqtt", "--json")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "started amqtt" in done.stderr and "(cached)" in done.stderr  # the dataset was reused
    assert "protocol: 3.1.1" in (workdir / "config.yaml").read_text()

    lines = [json.loads(line) for line in done.stdout.splitlines()]
    results = [p for p in lines if p.get("type") == "result"]
    summary = lines[-1]
    assert summary["type"] == "demo_summary" and summary["broker"] == "amqtt"
    kinds = replayed(workdir)
    assert sorted({p["frame_id"] for p in results}) == sorted(kinds)
    assert len({p["inspection_id"] for p in results}) == len(kinds)
    # A fresh stream: the first run's spool and results are gone, nothing is replayed from it.
    assert sorted(p["seq"] for p in results)[0] == 1 and not any(p["replayed"] for p in results)

    recorded_results, recorded_summary = recorded(workdir)
    assert recorded_summary == summary
    assert {p["inspection_id"] for p in recorded_results.values()} == {p["inspection_id"] for p in results}
    want = expected_numbers(kinds, recorded_results)
    assert (summary["defects_found"], summary["false_rejects"]) == (want["defects_found"], want["false_rejects"])
    assert_self_contained(workdir / "report.html")


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "spool").mkdir()
    assert cli.main(["demo", "--workdir", str(tmp_path), "--port", str(free_port())]) == 2
    assert "did not write" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me" and (tmp_path / "spool").is_dir()
    assert not (tmp_path / MARKER).exists()


def test_forced_broker_on_a_busy_port_fails_before_any_work(tmp_path, capsys):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        code = cli.main(["demo", "--workdir", str(tmp_path / "w"), "--port", str(port), "--broker", "amqtt"])
    assert code == 2
    assert f"already listens on 127.0.0.1:{port}" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_region_on_defect_needs_a_box_over_mask_pixels():
    mask = np.zeros((64, 64), np.uint8)
    mask[40:44, 10:20] = 255
    assert region_on_defect([{"box": [0, 0, 30, 30]}, {"box": [15, 38, 25, 50]}], mask)
    assert not region_on_defect([{"box": [0, 0, 30, 30]}], mask)
    assert not region_on_defect([{"box": [20, 40, 30, 44]}], mask)  # x1 is exclusive: touches, no overlap
    assert not region_on_defect([], mask)
