"""Issue 23: the spool on a full or small disk, on real file systems (a small tmpfs; needs root, skipped
with the reason elsewhere) and a real mosquitto: a full disk at start means publishing unspooled, not
death; the spool never fills its disk by itself; seqs are never handed out twice across restarts."""

from __future__ import annotations

import logging
import os
import re
import signal
import sqlite3

import pytest
from conftest import fill_disk, wait_until
from mqtt_broker import MessageCollector, mosquitto_binary
from publisher_harness import synthetic_inspection

import edge_inspect.mqtt.spool as spool_module
from edge_inspect.config.mqtt import MqttConfig, SpoolConfig
from edge_inspect.mqtt.payloads import Topics, typical_result_bytes
from edge_inspect.mqtt.publisher import ResultPublisher
from edge_inspect.mqtt.spool import PRIORITY_OK, Spool, SpoolWriteError, spool_capacity
from test_daemon import daemons, product  # noqa: F401 - fixtures

STATION = "st1"
TOPICS = Topics("edge-inspect", STATION)


def _append(spool: Spool) -> tuple[int, bool]:
    """(seq, stored) of one 700-byte result."""
    try:
        return spool.append("result", "t/result", PRIORITY_OK, lambda seq: b"x" * 700, origin="test:1").seq, True
    except SpoolWriteError as failure:
        return failure.seq, False


def _used_fraction(folder) -> float:
    stats = os.statvfs(folder)
    return 1.0 - stats.f_bavail / stats.f_blocks


# --- the spool alone -------------------------------------------------------------------------------


def test_the_spool_never_fills_a_2mb_disk_by_itself_and_drops_by_policy_instead(small_disk):
    """Before: the write-ahead log grew to 2,056,192 bytes after about 100 results and was never
    checkpointed back; every later write failed (SQLITE_FULL) and even deleting delivered rows failed."""
    disk = small_disk("2m")
    with Spool(SpoolConfig(path=str(disk / "s.sqlite3"))) as spool:
        capacity = spool.capacity
        assert capacity.limited_by == "disk" and 0 < capacity.max_bytes < 2 * 1024 * 1024
        biggest_log, results = 0, capacity.results(700) + 500  # an outage longer than the spool holds
        for _ in range(results):
            seq, stored = _append(spool)
            assert stored, f"seq {seq}: a write failed on a disk the spool should never fill"
            biggest_log = max(biggest_log, spool.files_bytes()["-wal"])
        stats = spool.stats()
        assert stats["spool_bytes"] <= capacity.max_bytes and stats["dropped_ok"] >= 500
        assert stats["spool_depth"] + stats["dropped"] == results
        assert biggest_log <= capacity.wal_bytes + 128 * 1024, (biggest_log, capacity)
        assert _used_fraction(disk) < 0.95
        # and the broker comes back: deleting what it acknowledged works (it failed on the full disk before)
        assert spool.delete(row.id for row in spool.fetch_after(0, 10_000)) == stats["spool_depth"]


def test_seqs_continue_across_restarts_on_a_full_disk(small_disk):
    """Before: every restart on a full spool numbered from the last stored seq again (82 -> 189, 82 -> 319)."""
    disk = small_disk("2m")
    config = SpoolConfig(path=str(disk / "s.sqlite3"))
    with Spool(config) as spool:
        assert [_append(spool) for _ in range(3)] == [(1, True), (2, True), (3, True)]
        filler = fill_disk(disk)
        unstored = [_append(spool) for _ in range(20)]
        assert [seq for seq, _ in unstored] == list(range(4, 24)) and not any(stored for _, stored in unstored)
    with Spool(config) as spool:  # a restart on the still full disk: the file cannot even be opened
        assert spool.unavailable is not None
        assert _append(spool) == (24, False)
    filler.unlink()
    with Spool(config) as spool:
        assert spool.unavailable is None
        assert _append(spool) == (25, True)
        assert [row.seq for row in spool.fetch_after(0, 100)] == [1, 2, 3, 25]


def test_a_spool_whose_disk_was_full_at_start_is_used_once_there_is_room(small_disk, monkeypatch):
    disk = small_disk("2m")
    filler = fill_disk(disk)
    monkeypatch.setattr(spool_module, "RETRY_OPEN_S", 0.0)
    with Spool(SpoolConfig(path=str(disk / "spool" / "s.sqlite3"))) as spool:  # no exception: unavailable
        assert spool.unavailable is not None and not spool.stats()["spool_available"]
        assert _append(spool) == (1, False)
        filler.unlink()
        assert _append(spool) == (2, True)
        assert spool.stats()["spool_available"] and spool.stats()["spool_depth"] == 1


def test_capacity_follows_the_disk_and_the_config():
    big = spool_capacity(SpoolConfig(path="/tmp/edge-inspect-capacity/s.sqlite3", max_bytes=1024 * 1024))
    assert big.limited_by == "spool.max_bytes" and big.max_bytes == 1024 * 1024
    assert big.results(typical_result_bytes()) == 1024 * 1024 // typical_result_bytes()
    assert spool_module.WAL_MIN_BYTES <= big.wal_bytes <= spool_module.WAL_MAX_BYTES


def test_a_spool_that_fails_every_write_logs_one_line_per_interval_with_the_count(tmp_path, caplog):
    """Before: one ERROR line per result (1,115 lines in 2 minutes). A real SQLITE_FULL: the file is capped."""
    publisher = ResultPublisher(MqttConfig(host="127.0.0.1", port=1), SpoolConfig(path=str(tmp_path / "s.sqlite3")), STATION)
    database = publisher._spool._db
    database.execute(f"PRAGMA max_page_count = {database.execute('PRAGMA page_count').fetchone()[0]}")
    with caplog.at_level(logging.ERROR, logger="edge_inspect.mqtt.publisher"):
        for index in range(500):  # never started: not connected, so each one is lost, and counted
            publisher.publish_result(synthetic_inspection(index, "full", STATION))
        state = publisher.state()
        publisher.stop(timeout=0.0)
    failed = state["spool_errors"]
    assert failed > 450 and state["unspooled"] == state["unspooled_lost"] == failed  # all after the first page
    assert state["spool_depth"] + failed == 500
    lines = [r.getMessage() for r in caplog.records if "spool write failed" in r.getMessage()]
    assert 1 <= len(lines) <= 3, lines
    assert "LOST" in lines[0] and f"{failed} in total" in lines[-1], lines


# --- with a broker -----------------------------------------------------------------------------------


pytestmark_broker = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto broker binary not found")


@pytest.mark.mosquitto
@pytestmark_broker
def test_a_2mb_spool_holds_a_broker_outage_of_its_capacity(small_disk, mosquitto_factory, tmp_path):
    """Before: 81 results filled the log, and a 40 s broker stop then lost 415 results."""
    disk = small_disk("2m")
    broker = mosquitto_factory(persistence_dir=tmp_path / "broker")  # the historian's session survives the stop
    config = SpoolConfig(path=str(disk / "spool.sqlite3"))
    mqtt = MqttConfig(host="127.0.0.1", port=broker.port, reconnect_min_s=0.2, reconnect_max_s=1.0, keepalive_s=5)
    publisher = ResultPublisher(mqtt, config, STATION)
    outage = int(0.9 * publisher._spool.capacity.results(typical_result_bytes()))
    assert outage > 800  # about 1,500 typical results fit in the 2 MB
    with MessageCollector(broker.port, [TOPICS.result], client_id="historian", persistent=True) as collector:
        collector.wait_subscribed()
        publisher.start()
        assert publisher.wait_connected(10)
        broker.stop()
        assert wait_until(lambda: not publisher.state()["connected"], 30)
        ids = []
        for index in range(outage):
            inspection = synthetic_inspection(index, "outage", STATION)
            publisher.publish_result(inspection)
            ids.append(inspection.inspection_id)
        state = publisher.state()
        assert state["spool_depth"] == outage and state["dropped"] == 0 and state["spool_errors"] == 0, state
        assert _used_fraction(disk) < 0.95
        broker.start()
        assert wait_until(lambda: {m.json()["inspection_id"] for m in collector.on(TOPICS.result)} >= set(ids), 120)
    assert wait_until(lambda: publisher.state()["spool_depth"] == 0, 30)
    publisher.stop()
    seqs = sorted({m.json()["seq"] for m in collector.on(TOPICS.result)})
    assert seqs == list(range(1, outage + 1))


@pytest.mark.mosquitto
@pytestmark_broker
@pytest.mark.slow
def test_run_on_a_full_spool_disk_publishes_unspooled_and_keeps_its_seqs(small_disk, mosquitto_broker, tmp_path, daemons,
                                                                        product):
    """Before: `run` died with a traceback and exit 3 (the lock file's pid write: No space left on device),
    a restart loop under systemd; and restarts on a full spool reused seqs. (A spool whose disk was full
    before it ever had room has no record to keep seqs in: documented in docs/mqtt.md.)"""
    from test_daemon import RESULT, STATS, latest_stats, results, write_config, write_frames

    disk = small_disk("2m")
    write_frames(tmp_path / "frames", product, 4)
    spool_path = disk / "spool" / "results.sqlite3"
    config = write_config(tmp_path, product, mosquitto_broker.port,
                          source={"type": "replay", "path": str(tmp_path / "frames"), "fps": 20, "loop": True},
                          trigger={"mode": "every_frame"}, spool={"path": str(spool_path)})
    seqs_by_run = []
    with MessageCollector(mosquitto_broker.port, [RESULT, STATS]) as collector:
        collector.wait_subscribed()
        for run in range(3):  # the first with room, then twice on the disk filled meanwhile
            if run == 1:
                filler = fill_disk(disk)
            before = len(results(collector))
            daemon = daemons(config)
            assert wait_until(lambda: len(results(collector)) >= before + 5, 120), daemon.log
            if run:
                assert wait_until(lambda: (latest_stats(collector) or {}).get("mqtt", {}).get("unspooled", 0) > 0, 30)
                assert (latest_stats(collector) or {})["mqtt"]["spool_available"] is False
            daemon.send(signal.SIGTERM)
            assert daemon.wait(60) == 0, daemon.log
            assert "Traceback" not in daemon.log and ("cannot be used" in daemon.log) == bool(run), daemon.log
            seqs_by_run.append([r["seq"] for r in results(collector)[before:]])
        for earlier, later in zip(seqs_by_run, seqs_by_run[1:]):
            assert min(later) > max(earlier), seqs_by_run  # not numbered from the same seq again
        # room again: the running daemon spools once more (tried every RETRY_OPEN_S)
        daemon = daemons(config)
        assert wait_until(lambda: len(results(collector)) > sum(map(len, seqs_by_run)) + 2, 120), daemon.log
        filler.unlink()
        assert wait_until(lambda: (latest_stats(collector) or {}).get("mqtt", {}).get("spool_available") is True, 60), daemon.log
        daemon.send(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.log
    assert re.search(r"spool .* is usable again", daemon.log), daemon.log
    ids_by_seq: dict[int, set[str]] = {}
    for result in results(collector):
        ids_by_seq.setdefault(result["seq"], set()).add(result["inspection_id"])
    assert all(len(ids) == 1 for ids in ids_by_seq.values()), "a seq was handed out twice"
    stored = sqlite3.connect(spool_path).execute("SELECT value FROM meta WHERE key = 'result_seq'").fetchone()[0]
    assert stored == max(ids_by_seq)


def test_the_capacity_follows_other_files_and_freeing_them_lets_a_full_spool_write_again(small_disk, monkeypatch):
    """Before: the spool's own log held the space, so freeing other files did not help."""
    disk = small_disk("2m")
    other = disk / "other.bin"
    other.write_bytes(b"\0" * 1024 * 1024)  # evidence, logs: another user of the disk
    monkeypatch.setattr(spool_module, "CAPACITY_REFRESH_S", 0.0)
    with Spool(SpoolConfig(path=str(disk / "s.sqlite3"))) as spool:
        crowded = spool.capacity.max_bytes
        other.unlink()
        assert _append(spool)[1]
        assert spool.capacity.max_bytes > crowded + 512 * 1024  # the freed space is the spool's now
        for _ in range(300):
            assert _append(spool)[1]
        filler = fill_disk(disk)  # the rest of the disk taken by another program
        failed = [stored for _, stored in (_append(spool) for _ in range(300))].count(False)
        assert failed > 0  # counted by the publisher as unspooled
        filler.unlink()
        assert _append(spool)[1] and spool.capacity.max_bytes >= spool.stats()["spool_bytes"]
