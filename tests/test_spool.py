"""The SQLite spool: order, persistent seqs, crash safety, bounds and the drop policy."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import pytest

from edge_inspect.config.mqtt import SpoolConfig
from edge_inspect.errors import UserError
from edge_inspect.mqtt.spool import PRIORITY_NG, PRIORITY_OK, PRIORITY_UPDATE, Spool, SpoolWriteError


def _payload(seq: int, size: int = 64) -> bytes:
    return (f'{{"seq":{seq},"pad":"' + "x" * size + '"}').encode()


def _append(spool: Spool, priority: int = PRIORITY_OK, kind: str = "result", size: int = 64):
    return spool.append(kind, f"t/{kind}", priority, lambda seq: _payload(seq, size), origin="test:1")


def test_rows_come_back_in_order_and_seqs_count_up(tmp_path):
    with Spool(SpoolConfig(path=str(tmp_path / "s.sqlite3"))) as spool:
        seqs = [_append(spool).seq for _ in range(5)]
        update = _append(spool, PRIORITY_UPDATE, kind="update")
        assert seqs == [1, 2, 3, 4, 5]
        assert update.seq == 1  # updates have their own counter
        rows = spool.fetch_after(0, 100)
        assert [row.seq for row in rows] == [1, 2, 3, 4, 5, 1]
        assert [row.kind for row in rows] == ["result"] * 5 + ["update"]
        assert rows[0].payload == _payload(1)
        assert [row.seq for row in spool.fetch_after(rows[2].id, 2)] == [4, 5]
        assert spool.delete([rows[0].id, rows[1].id]) == 2
        assert spool.delete([rows[0].id]) == 0  # a second PUBACK for the same row is harmless
        stats = spool.stats()
        assert stats["spool_depth"] == 4
        assert stats["spool_bytes"] == sum(len(row.payload) for row in rows[2:])
        assert stats["spool_oldest_age_s"] is not None and stats["spool_oldest_age_s"] >= 0


def test_seqs_and_rows_survive_reopening_even_when_the_spool_was_emptied(tmp_path):
    config = SpoolConfig(path=str(tmp_path / "s.sqlite3"))
    with Spool(config) as spool:
        for _ in range(3):
            _append(spool)
        spool.delete(row.id for row in spool.fetch_after(0, 10))
        _append(spool)
    with Spool(config) as spool:
        assert [row.seq for row in spool.fetch_after(0, 10)] == [4]
        assert _append(spool).seq == 5
        assert spool.counter("result_seq") == 5


def test_spool_is_in_wal_mode(tmp_path):
    path = tmp_path / "s.sqlite3"
    with Spool(SpoolConfig(path=str(path))):
        assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_second_process_cannot_open_the_same_spool(tmp_path):
    config = SpoolConfig(path=str(tmp_path / "s.sqlite3"))
    with Spool(config):
        with pytest.raises(UserError, match="in use by pid"):
            Spool(config)
    Spool(config).close()  # released on close


def test_a_failing_payload_builder_uses_up_no_seq(tmp_path):
    with Spool(SpoolConfig(path=str(tmp_path / "s.sqlite3"))) as spool:
        def broken(seq: int) -> bytes:
            raise ValueError("NaN score")

        with pytest.raises(ValueError):
            spool.append("result", "t", PRIORITY_OK, broken, origin="x")
        assert _append(spool).seq == 1
        assert spool.stats()["spool_depth"] == 1


def test_committed_rows_survive_sigkill(tmp_path):
    path = tmp_path / "s.sqlite3"
    script = textwrap.dedent(f"""
        import os, signal
        from edge_inspect.config.mqtt import SpoolConfig
        from edge_inspect.mqtt.spool import Spool
        spool = Spool(SpoolConfig(path={str(path)!r}))
        for i in range(50):
            spool.append("result", "t", 0, lambda seq: b'{{"seq": %d}}' % seq, origin="killed")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert result.returncode == -9, result.stderr.decode()
    with Spool(SpoolConfig(path=str(path))) as spool:
        assert [row.seq for row in spool.fetch_after(0, 100)] == list(range(1, 51))
        assert _append(spool).seq == 51


def test_keep_ng_drops_oldest_ok_then_updates_then_ng(tmp_path):
    with Spool(SpoolConfig(path=str(tmp_path / "s.sqlite3"), max_rows=100)) as spool:
        for index in range(100):  # seq 1..100, every 4th NG (25 NG, 75 OK); then 5 updates
            _append(spool, PRIORITY_NG if index % 4 == 0 else PRIORITY_OK)
        for _ in range(5):
            _append(spool, PRIORITY_UPDATE, kind="update")
        # 105 messages, 100 rows: the 5 oldest OK results (seq 2, 3, 4, 6, 7) went
        kept = {row.seq for row in spool.fetch_after(0, 1000) if row.kind == "result"}
        assert {2, 3, 4, 6, 7}.isdisjoint(kept) and 1 in kept and 5 in kept and 8 in kept
        stats = spool.stats()
        assert (stats["spool_depth"], stats["dropped"], stats["dropped_ok"]) == (100, 5, 5)

        for _ in range(75):  # fill with NG results: the 70 OK go, then the 5 updates
            _append(spool, PRIORITY_NG)
        rows = spool.fetch_after(0, 1000)
        assert all(row.priority == PRIORITY_NG for row in rows)
        stats = spool.stats()
        assert (stats["dropped_ok"], stats["dropped_update"], stats["dropped_ng"]) == (75, 5, 0)

        dropped = _append(spool, PRIORITY_OK)  # full of NG: a new OK result is itself dropped
        assert dropped.row_id is None and dropped.dropped == (("ok", dropped.seq),)
        oldest_ng = rows[0].seq
        _append(spool, PRIORITY_NG)  # a new NG evicts the oldest NG
        assert oldest_ng not in {row.seq for row in spool.fetch_after(0, 1000)}
        stats = spool.stats()
        assert (stats["spool_depth"], stats["dropped_ok"], stats["dropped_ng"]) == (100, 76, 1)
    with Spool(SpoolConfig(path=str(tmp_path / "s.sqlite3"), max_rows=100)) as spool:
        assert spool.stats()["dropped"] == 82  # drop counts are persistent


def test_drop_oldest_ignores_the_verdict(tmp_path):
    with Spool(SpoolConfig(path=str(tmp_path / "s.sqlite3"), max_rows=100, policy="drop_oldest")) as spool:
        for index in range(100):
            _append(spool, PRIORITY_NG if index < 50 else PRIORITY_OK)
        _append(spool, PRIORITY_OK)
        assert spool.fetch_after(0, 1)[0].seq == 2
        assert spool.stats()["dropped_ng"] == 1


def test_byte_bound_and_in_flight_rows_are_never_evicted(tmp_path):
    with Spool(SpoolConfig(path=str(tmp_path / "s.sqlite3"), max_bytes=1024 * 1024)) as spool:
        first = _append(spool, size=200_000)
        spool.protect(first.row_id)
        for _ in range(6):
            _append(spool, size=200_000)
        stats = spool.stats()
        assert stats["spool_bytes"] <= 1024 * 1024
        seqs = [row.seq for row in spool.fetch_after(0, 100)]
        assert seqs[0] == 1  # protected (in flight) although oldest
        assert stats["dropped_ok"] == 7 - len(seqs)
        spool.unprotect()
        _append(spool, size=200_000)
        assert spool.fetch_after(0, 1)[0].seq != 1


def test_unusable_files_are_user_errors(tmp_path):
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(UserError, match="not a usable SQLite spool"):
        Spool(SpoolConfig(path=str(garbage)))
    newer = tmp_path / "newer.sqlite3"
    sqlite3.connect(newer).execute("PRAGMA user_version = 99").connection.close()
    with pytest.raises(UserError, match="newer edge-inspect"):
        Spool(SpoolConfig(path=str(newer)))
    with pytest.raises(UserError, match="spool.path"):
        Spool(SpoolConfig(path=str(garbage / "sub" / "s.sqlite3")))


def test_a_full_disk_raises_spool_write_error_with_the_numbered_payload(tmp_path):
    with Spool(SpoolConfig(path=str(tmp_path / "s.sqlite3"))) as spool:
        _append(spool)
        # A real SQLITE_FULL: cap the file at the pages it has now.
        pages = spool._db.execute("PRAGMA page_count").fetchone()[0]
        spool._db.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(SpoolWriteError) as failure:
            for _ in range(100):
                _append(spool, size=3000)
        assert failure.value.payload == _payload(failure.value.seq, 3000)
        depth = spool.stats()["spool_depth"]
        assert depth == failure.value.seq - 1  # the failed one is not stored, the earlier ones are
        spool._db.execute("PRAGMA max_page_count = 1000000")
        assert _append(spool).seq == failure.value.seq + 1  # its seq is not handed out again
