"""The on-disk spool: every message is written here before it is published, removed once acknowledged.

SQLite in WAL mode, one file per daemon (an exclusive lock file refuses a second process). Rows are
kept in insertion order (`id`), which is also the order they are (re)published in. The sequence
counters that number results and updates live in the same file and are bumped in the same
transaction as the insert, so they survive restarts and never run ahead of what was spooled.

Example:
    spool = Spool(SpoolConfig(path="/tmp/s.sqlite3"))
    entry = spool.append("result", "edge-inspect/st1/result", priority=PRIORITY_OK,
                         make_payload=lambda seq: f'{{"seq": {seq}}}'.encode(), origin="run1:1")
    rows = spool.fetch_after(0, limit=10)
    spool.delete([row.id for row in rows])
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..config.mqtt import SpoolConfig
from ..errors import UserError

log = logging.getLogger(__name__)

# What a row is, which is also its eviction priority under the keep_ng policy: lower goes first.
PRIORITY_OK = 0
PRIORITY_UPDATE = 1
PRIORITY_NG = 2
PRIORITY_NAMES = {PRIORITY_OK: "ok", PRIORITY_UPDATE: "update", PRIORITY_NG: "ng"}

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    seq INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    created REAL NOT NULL,
    origin TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_eviction ON messages (priority, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class SpoolRow:
    """One spooled message. `origin` names the process run and connection it was spooled during."""

    id: int
    kind: str
    topic: str
    seq: int
    priority: int
    created: float
    origin: str
    payload: bytes


@dataclass(frozen=True)
class AppendResult:
    """What append did: the seq it assigned, the row id (None when the message itself was dropped)."""

    seq: int
    row_id: int | None
    dropped: tuple[tuple[str, int], ...] = ()  # ("ok" | "update" | "ng", seq) of every message dropped


class SpoolWriteError(Exception):
    """The spool could not store a message (disk full, I/O error). Carries the numbered payload."""

    def __init__(self, reason: str, seq: int, payload: bytes):
        super().__init__(reason)
        self.seq = seq
        self.payload = payload


class Spool:
    """A bounded, crash-safe FIFO of MQTT messages with persistent sequence counters. Thread-safe."""

    def __init__(self, config: SpoolConfig):
        self.config = config
        self.path = Path(config.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"spool.path {config.path!r}: cannot create its folder ({exc}); choose a writable path") from None
        self._lock_file = self._acquire_process_lock()
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout = 5000")
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise UserError(f"spool.path {config.path!r}: SQLite refused WAL mode (got {mode}); use a local file system")
            self._db.execute(f"PRAGMA synchronous = {config.synchronous.upper()}")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise UserError(
                    f"spool.path {config.path!r} was written by a newer edge-inspect (spool schema {version}); "
                    "upgrade, or move the file away (its results are then not replayed)"
                )
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._rows, self._bytes = self._db.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM messages"
            ).fetchone()
            self._counters = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            if hasattr(self, "_db"):
                self._db.close()
            self._lock_file.close()
            raise UserError(
                f"spool.path {config.path!r}: not a usable SQLite spool ({exc}); move the file away or fix its permissions"
            ) from None
        self._protected: set[int] = set()
        self._closed = False

    # --- writing ----------------------------------------------------------------------------

    def append(
        self,
        kind: str,
        topic: str,
        priority: int,
        make_payload: Callable[[int], bytes],
        origin: str,
        counter: str | None = None,
    ) -> AppendResult:
        """Number the message from `counter` (default: `<kind>_seq`), build it and store it in one transaction.

        When the spool is full, rows are evicted by the configured policy; under keep_ng a message with a
        lower priority than everything evictable is itself dropped (its seq is still used up, so
        subscribers see the gap).
        """
        counter = counter or f"{kind}_seq"
        with self._lock:
            self._check_open()
            seq = self._counters.get(counter, 0) + 1
            payload = make_payload(seq)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (counter, seq),
                )
                dropped, keep_new = self._make_room(len(payload), priority, seq)
                row_id = None
                if keep_new:
                    cursor = self._db.execute(
                        "INSERT INTO messages (kind, topic, seq, priority, created, origin, payload) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (kind, topic, seq, priority, time.time(), origin, payload),
                    )
                    row_id = cursor.lastrowid
                for name, _ in dropped:
                    self._bump_locked(f"dropped_{name}")
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                self._recount()
                self._counters[counter] = seq  # never hand out this seq twice in this process
                raise SpoolWriteError(str(exc), seq, payload) from exc
            except BaseException:
                self._rollback()
                self._recount()
                raise
            self._counters[counter] = seq
            if keep_new:
                self._rows += 1
                self._bytes += len(payload)
            return AppendResult(seq=seq, row_id=row_id, dropped=tuple(dropped))

    def _make_room(self, size: int, priority: int, seq: int) -> tuple[list[tuple[str, int]], bool]:
        """Evict rows until one more of `size` bytes fits. Returns (evicted, whether the new row is kept)."""
        dropped: list[tuple[str, int]] = []
        order = "priority, id" if self.config.policy == "keep_ng" else "id"
        while self._rows + 1 > self.config.max_rows or self._bytes + size > self.config.max_bytes:
            marks = ",".join("?" * len(self._protected))
            victim = self._db.execute(
                f"SELECT id, seq, priority, length(payload) FROM messages WHERE id NOT IN ({marks}) ORDER BY {order} LIMIT 1",
                tuple(self._protected),
            ).fetchone()
            if victim is None or (self.config.policy == "keep_ng" and victim[2] > priority):
                dropped.append((PRIORITY_NAMES[priority], seq))
                return dropped, False
            victim_id, victim_seq, victim_priority, victim_size = victim
            self._db.execute("DELETE FROM messages WHERE id = ?", (victim_id,))
            self._rows -= 1
            self._bytes -= victim_size
            dropped.append((PRIORITY_NAMES[victim_priority], victim_seq))
        return dropped, True

    def _bump_locked(self, key: str, amount: int = 1) -> None:
        value = self._counters.get(key, 0) + amount
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )
        self._counters[key] = value

    def delete(self, row_ids: Iterable[int]) -> int:
        """Remove acknowledged rows (one transaction). Returns how many existed."""
        ids = list(row_ids)
        if not ids:
            return 0
        with self._lock:
            self._check_open()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                removed = removed_bytes = 0
                for chunk in _chunks(ids, 500):
                    marks = ",".join("?" * len(chunk))
                    count, size = self._db.execute(
                        f"SELECT count(*), coalesce(sum(length(payload)), 0) FROM messages WHERE id IN ({marks})", chunk
                    ).fetchone()
                    self._db.execute(f"DELETE FROM messages WHERE id IN ({marks})", chunk)
                    removed += count
                    removed_bytes += size
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            self._rows -= removed
            self._bytes -= removed_bytes
            self._protected.difference_update(ids)
            return removed

    # --- in-flight protection ----------------------------------------------------------------

    def protect(self, row_id: int) -> None:
        """Exempt a row from eviction while it is in flight (sent, PUBACK pending)."""
        with self._lock:
            self._protected.add(row_id)

    def unprotect(self, row_ids: Iterable[int] | None = None) -> None:
        """Make rows evictable again (all of them when row_ids is None, e.g. after a disconnect)."""
        with self._lock:
            if row_ids is None:
                self._protected.clear()
            else:
                self._protected.difference_update(row_ids)

    # --- reading ----------------------------------------------------------------------------

    def fetch_after(self, after_id: int, limit: int) -> list[SpoolRow]:
        """Up to `limit` rows with id > after_id, oldest first (the publish order)."""
        with self._lock:
            self._check_open()
            rows = self._db.execute(
                "SELECT id, kind, topic, seq, priority, created, origin, payload FROM messages "
                "WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [SpoolRow(*row[:7], bytes(row[7])) for row in rows]

    def counter(self, name: str) -> int:
        """Current value of a persistent counter (the last seq handed out, or a drop count)."""
        with self._lock:
            return self._counters.get(name, 0)

    def stats(self) -> dict[str, float | int | None]:
        """Depth, size, oldest age and drop counts, for state() and the stats topic."""
        with self._lock:
            self._check_open()
            oldest = self._db.execute("SELECT created FROM messages ORDER BY id LIMIT 1").fetchone()
            dropped = {name: self._counters.get(f"dropped_{name}", 0) for name in PRIORITY_NAMES.values()}
            return {
                "spool_depth": self._rows,
                "spool_bytes": self._bytes,
                "spool_oldest_age_s": round(max(0.0, time.time() - oldest[0]), 3) if oldest else None,
                "dropped": sum(dropped.values()),
                **{f"dropped_{name}": count for name, count in dropped.items()},
            }

    # --- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._db.close()
            finally:
                self._lock_file.close()

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recount(self) -> None:
        """Reload sizes and counters from the file after a rolled-back transaction."""
        try:
            self._rows, self._bytes = self._db.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM messages"
            ).fetchone()
            self._counters = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.Error:
            log.exception("cannot recount the spool")

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # SQLite already rolled back (e.g. after SQLITE_FULL)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the spool is closed")

    def _acquire_process_lock(self):
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            handle = open(lock_path, "a+")
        except OSError as exc:
            raise UserError(f"spool.path {self.config.path!r}: cannot create {lock_path} ({exc}); choose a writable path") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(
                f"spool.path {self.config.path!r} is in use by pid {holder}; each daemon needs its own spool file"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        return handle


def _chunks(items: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
