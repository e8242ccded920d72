"""The on-disk spool: every message is written here before it is published, removed once acknowledged.

SQLite in WAL mode, one file per daemon (an exclusive lock file refuses a second process). Rows are
kept in insertion order (`id`), which is also the order they are (re)published in. The sequence
counters that number results and updates live in the same file and are bumped in the same
transaction as the insert, so they survive restarts; the lock file keeps a copy of the last seqs
(rewritten in place), so a restart on a disk too full to open the database never reuses one.

On a small disk the spool stays inside what it can hold (`spool_capacity`: a bounded write-ahead log,
a byte bound that fits the disk), so an outage fills it up to its policy bound, not the disk. When the
file cannot be used at all (disk full, I/O error) the spool is *unavailable*: appends number the
message and raise SpoolWriteError (the publisher sends it unspooled) and the file is tried again.

Example:
    spool = Spool(SpoolConfig(path="/tmp/s.sqlite3"))
    entry = spool.append("result", "edge-inspect/st1/result", priority=PRIORITY_OK,
                         make_payload=lambda seq: f'{{"seq": {seq}}}'.encode(), origin="run1:1")
    rows = spool.fetch_after(0, limit=10)
    spool.delete([row.id for row in rows])
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..config.mqtt import SpoolConfig
from ..errors import UserError
from .payloads import typical_result_bytes

log = logging.getLogger(__name__)

# What a row is, which is also its eviction priority under the keep_ng policy: lower goes first.
PRIORITY_OK = 0
PRIORITY_UPDATE = 1
PRIORITY_NG = 2
PRIORITY_NAMES = {PRIORITY_OK: "ok", PRIORITY_UPDATE: "update", PRIORITY_NG: "ng"}

RETRY_OPEN_S = 5.0  # a spool its disk refused (full, I/O error) is tried again this often
CAPACITY_REFRESH_S = 30.0  # the disk's free space is looked at again this often
WAL_MIN_BYTES = 256 * 1024  # the write-ahead log's bound: 1/8 of the room the spool has, within these
WAL_MAX_BYTES = 4 * 1024 * 1024
SHM_BYTES = 32 * 1024  # SQLite's shared-memory index beside the log
MIN_HEADROOM_BYTES = 64 * 1024  # never take the last 5 % of a file system, and at least this
MIN_CAPACITY_BYTES = 64 * 1024  # below this the spool keeps this much and a full disk makes writes fail (unspooled)
# File bytes per payload byte: pages, the eviction index, the space evictions leave in pages (measured 1.24-1.27
# after a long keep_ng churn with 500-1400 byte messages).
FILE_OVERHEAD = 1.35
LOCK_RECORD_BYTES = 128
_DELETE_BATCH = 100  # acknowledged rows deleted per transaction
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO}

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


@dataclass(frozen=True)
class SpoolCapacity:
    """How much the spool holds before `spool.policy` drops, on the disk it is on (`doctor` shows it)."""

    max_bytes: int  # payload bytes kept: spool.max_bytes, or less when its file system is smaller
    max_rows: int
    wal_bytes: int  # the write-ahead log's bound (checkpointed every wal_bytes, truncated back to it)
    disk_bytes: int  # what the spool may occupy: its files now + free space, less the file system's headroom
    limited_by: str  # "spool.max_bytes" or "disk"

    def results(self, payload_bytes: int) -> int:
        """About how many messages of `payload_bytes` fit."""
        return min(self.max_rows, self.max_bytes // max(1, payload_bytes))


def spool_capacity(config: SpoolConfig) -> SpoolCapacity:
    """The spool's bounds on the file system it is on, from its configured limits and the space there.

    The spool never takes the last 5 % of its file system (at least 64 KiB), keeps room for its
    write-ahead log twice over, and counts the file overhead of SQLite's pages (FILE_OVERHEAD), so an
    outage fills it up to its policy bound, never the disk.
    """
    path = Path(config.path)
    folder = next((p for p in [path.parent, *path.absolute().parents] if p.exists()), Path("/"))
    usage = shutil.disk_usage(folder)
    own = sum(_allocated(path.with_name(path.name + suffix)) for suffix in ("", "-wal", "-shm"))
    disk = max(0, own + usage.free - max(MIN_HEADROOM_BYTES, usage.total // 20))
    wal = int(min(WAL_MAX_BYTES, max(WAL_MIN_BYTES, disk // 8)))
    by_disk = int((disk - 2 * wal - SHM_BYTES) / FILE_OVERHEAD)
    if by_disk < config.max_bytes:
        return SpoolCapacity(max(MIN_CAPACITY_BYTES, by_disk), config.max_rows, wal, disk, "disk")
    return SpoolCapacity(config.max_bytes, config.max_rows, wal, disk, "spool.max_bytes")


class Spool:
    """A bounded, crash-safe FIFO of MQTT messages with persistent sequence counters. Thread-safe.

    When the file cannot be opened for a reason of the storage (disk full, I/O error), the spool starts
    *unavailable*: `append` numbers the message and raises SpoolWriteError (the publisher sends it
    unspooled), and the file is tried again every RETRY_OPEN_S. Anything a retry cannot fix (a file in
    use by another daemon, not a database, no permission) raises UserError at start.
    """

    def __init__(self, config: SpoolConfig):
        self.config = config
        self.path = Path(config.path)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._rows = 0
        self._bytes = 0
        self._counters: dict[str, int] = {}
        self._protected: set[int] = set()
        self._closed = False
        self._next_try = 0.0
        self._next_checkpoint = 0.0
        self._next_capacity = time.monotonic() + CAPACITY_REFRESH_S
        self.capacity = spool_capacity(config)
        self.unavailable: str | None = None  # why the file cannot be used now; None when it can
        self._open(startup=True)

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
        subscribers see the gap). SpoolWriteError when it cannot be stored: the seq is used up all the
        same, in the lock file's record when the database cannot take it, so a restart never hands it out again.
        """
        counter = counter or f"{kind}_seq"
        with self._lock:
            self._check_open()
            self._retry_open()
            self._refresh_capacity()
            seq = self._counters.get(counter, 0) + 1
            payload = make_payload(seq)
            if self._db is None:
                self._counters[counter] = seq
                self._write_record()
                raise SpoolWriteError(f"the spool is unavailable ({self.unavailable})", seq, payload)
            try:
                dropped, row_id = self._store(kind, topic, priority, origin, counter, seq, payload)
            except sqlite3.Error as exc:
                self._rollback()
                self._recount()
                self._counters[counter] = max(seq, self._counters.get(counter, 0))  # never hand out this seq twice
                self._write_record()
                self._after_write_error()
                raise SpoolWriteError(str(exc), seq, payload) from exc
            except BaseException:
                self._rollback()
                self._recount()
                raise
            self._counters[counter] = seq
            self._write_record()
            return AppendResult(seq=seq, row_id=row_id, dropped=tuple(dropped))

    def _store(self, kind: str, topic: str, priority: int, origin: str, counter: str, seq: int,
               payload: bytes) -> tuple[list[tuple[str, int]], int | None]:
        """One transaction: the counter, the evictions that make room, the row."""
        assert self._db is not None
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (counter, seq),
        )
        dropped, keep_new = self._make_room(len(payload), priority, seq)
        row_id = None
        if keep_new:
            cursor = self._db.execute(
                "INSERT INTO messages (kind, topic, seq, priority, created, origin, payload) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (kind, topic, seq, priority, time.time(), origin, payload),
            )
            row_id = cursor.lastrowid
        for name, _ in dropped:
            self._bump_locked(f"dropped_{name}")
        self._db.execute("COMMIT")
        if keep_new:
            self._rows += 1
            self._bytes += len(payload)
        return dropped, row_id

    def _make_room(self, size: int, priority: int, seq: int) -> tuple[list[tuple[str, int]], bool]:
        """Evict rows until one more of `size` bytes fits. Returns (evicted, whether the new row is kept)."""
        assert self._db is not None
        dropped: list[tuple[str, int]] = []
        order = "priority, id" if self.config.policy == "keep_ng" else "id"
        while self._rows + 1 > self.capacity.max_rows or self._bytes + size > self.capacity.max_bytes:
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
        assert self._db is not None
        value = self._counters.get(key, 0) + amount
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )
        self._counters[key] = value

    def delete(self, row_ids: Iterable[int]) -> int:
        """Remove acknowledged rows, at most _DELETE_BATCH per transaction (so one delete never needs more
        write-ahead log than the spool has room for). Returns how many existed."""
        ids = list(row_ids)
        if not ids:
            return 0
        removed = 0
        with self._lock:
            self._check_open()
            if self._db is None:
                self._protected.difference_update(ids)
                return 0
            for chunk in _chunks(ids, _DELETE_BATCH):
                marks = ",".join("?" * len(chunk))
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    count, size = self._db.execute(
                        f"SELECT count(*), coalesce(sum(length(payload)), 0) FROM messages WHERE id IN ({marks})", chunk
                    ).fetchone()
                    self._db.execute(f"DELETE FROM messages WHERE id IN ({marks})", chunk)
                    self._db.execute("COMMIT")
                except sqlite3.Error:
                    self._rollback()
                    self._after_write_error()
                    raise
                except BaseException:
                    self._rollback()
                    raise
                self._rows -= count
                self._bytes -= size
                removed += count
                self._protected.difference_update(chunk)
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
            self._retry_open()
            if self._db is None:
                return []
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

    def stats(self) -> dict[str, float | int | str | None]:
        """Depth, size, oldest age, drop counts and the spool's state, for state() and the stats topic."""
        with self._lock:
            self._check_open()
            oldest = None
            if self._db is not None:
                oldest = self._db.execute("SELECT created FROM messages ORDER BY id LIMIT 1").fetchone()
            dropped = {name: self._counters.get(f"dropped_{name}", 0) for name in PRIORITY_NAMES.values()}
            return {
                "spool_depth": self._rows,
                "spool_bytes": self._bytes,
                "spool_oldest_age_s": round(max(0.0, time.time() - oldest[0]), 3) if oldest else None,
                "spool_available": self._db is not None,
                "spool_unavailable": self.unavailable,
                "spool_capacity_bytes": self.capacity.max_bytes,
                "dropped": sum(dropped.values()),
                **{f"dropped_{name}": count for name, count in dropped.items()},
            }

    def files_bytes(self) -> dict[str, int]:
        """Bytes the database, its write-ahead log and shared memory take on disk (allocated)."""
        return {suffix or "db": _allocated(self.path.with_name(self.path.name + suffix)) for suffix in ("", "-wal", "-shm")}

    # --- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._db is not None:
                    self._db.close()
            finally:
                self._db = None
                if self._lock_fd is not None:
                    os.close(self._lock_fd)  # releases the flock
                    self._lock_fd = None

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- opening, and what a full disk needs ------------------------------------------------

    def _open(self, startup: bool) -> None:
        """Open (or reopen) the file. At start a problem no retry fixes is a UserError; a storage problem
        leaves the spool unavailable and retried."""
        try:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                if _storage_problem(exc):
                    raise
                raise UserError(f"spool.path {self.config.path!r}: cannot create its folder ({exc}); choose a writable path") from None
            if self._lock_fd is None:
                self._lock_fd = self._acquire_process_lock()
                self._merge_counters(self._read_record())
            self._connect()
        except UserError as exc:
            if startup:
                self._release_lock()
                raise
            self._set_unavailable(str(exc))
            return
        except (OSError, sqlite3.Error) as exc:
            if not _storage_problem(exc):
                if startup:
                    self._release_lock()
                    raise UserError(
                        f"spool.path {self.config.path!r}: not a usable SQLite spool ({exc}); move the file away or fix "
                        "its permissions"
                    ) from None
            self._set_unavailable(f"{exc}")
            return
        self._write_record()  # gives the lock file its block while there is room (see _write_record)
        if self.unavailable is not None:
            log.warning("spool %s is usable again (%s before); results are spooled again", self.path, self.unavailable)
        self.unavailable = None
        if self.capacity.limited_by == "disk":
            log.warning(
                "spool.max_bytes (%d) does not fit on the file system of %s: the spool keeps at most %d bytes of "
                "messages (about %d results) and drops by spool.policy beyond that; give it more room or set "
                "spool.max_bytes to at most %d to silence this",
                self.config.max_bytes, self.path, self.capacity.max_bytes, self.capacity.results(typical_result_bytes()),
                self.capacity.max_bytes,
            )

    def _connect(self) -> None:
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA busy_timeout = 5000")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise UserError(f"spool.path {self.config.path!r}: SQLite refused WAL mode (got {mode}); use a local file system")
            db.execute(f"PRAGMA synchronous = {self.config.synchronous.upper()}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise UserError(
                    f"spool.path {self.config.path!r} was written by a newer edge-inspect (spool schema {version}); "
                    "upgrade, or move the file away (its results are then not replayed)"
                )
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            # A bounded write-ahead log: checkpointed once it holds wal_bytes, and cut back to that size, so the
            # spool's space is its database file (whose freed pages are reused) plus this, never the whole disk.
            self.capacity = spool_capacity(self.config)
            page = db.execute("PRAGMA page_size").fetchone()[0]
            db.execute(f"PRAGMA wal_autocheckpoint = {max(16, self.capacity.wal_bytes // (page + 24))}")
            db.execute(f"PRAGMA journal_size_limit = {self.capacity.wal_bytes}")
            if _allocated(self.path.with_name(self.path.name + "-wal")) > self.capacity.wal_bytes:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # a log left large by an older version
            rows, size = db.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM messages").fetchone()
            stored = dict(db.execute("SELECT key, value FROM meta").fetchall())
        except BaseException:
            db.close()
            raise
        self._db, self._rows, self._bytes = db, rows, size
        self._merge_counters(stored)

    def _retry_open(self) -> None:
        """While unavailable: try the file again, at most every RETRY_OPEN_S (lock held)."""
        if self._db is None and time.monotonic() >= self._next_try:
            self._open(startup=False)

    def _refresh_capacity(self) -> None:
        """Follow the disk (lock held): more room when space was freed, less when other files took it, but
        never below what the spool holds now (evicting hundreds of rows at once needs log space a full disk
        lacks). A disk other files filled up makes writes fail (unspooled, counted) until they free it."""
        now = time.monotonic()
        if self._db is None or now < self._next_capacity:
            return
        self._next_capacity = now + CAPACITY_REFRESH_S
        try:
            fresh = spool_capacity(self.config)
        except OSError:
            return
        floor = min(self.capacity.max_bytes, self._bytes)
        if fresh.max_bytes < floor:
            fresh = dataclasses.replace(fresh, max_bytes=floor)
        self.capacity = fresh

    def _set_unavailable(self, reason: str) -> None:
        first = self.unavailable is None
        self.unavailable = reason
        self._next_try = time.monotonic() + RETRY_OPEN_S
        if first:
            log.error(
                "spool %s cannot be used (%s): results are published without it (lost while the broker is down, "
                "counted in unspooled) until it can; retrying every %g s. Free space on its disk or fix spool.path",
                self.path, reason, RETRY_OPEN_S,
            )

    def _after_write_error(self) -> None:
        """After a failed write: let the log restart from its beginning once the disk has room again (a
        passive checkpoint copies what it can; at most every RETRY_OPEN_S)."""
        now = time.monotonic()
        if self._db is None or now < self._next_checkpoint:
            return
        self._next_checkpoint = now + RETRY_OPEN_S
        try:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error:
            pass

    def _merge_counters(self, counters: dict[str, int]) -> None:
        """Seq counters only ever go up: the highest of the database, the lock file's record and memory."""
        for key, value in counters.items():
            if key.endswith("_seq"):
                self._counters[key] = max(self._counters.get(key, 0), int(value))
            else:
                self._counters[key] = int(value)

    def _recount(self) -> None:
        """Reload sizes and counters from the file after a rolled-back transaction."""
        if self._db is None:
            return
        try:
            self._rows, self._bytes = self._db.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM messages"
            ).fetchone()
            self._merge_counters(dict(self._db.execute("SELECT key, value FROM meta").fetchall()))
        except sqlite3.Error:
            log.exception("cannot recount the spool")

    def _rollback(self) -> None:
        try:
            if self._db is not None:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # SQLite already rolled back (e.g. after SQLITE_FULL)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the spool is closed")

    # --- the lock file: who holds the spool, and the seqs handed out ------------------------

    def _acquire_process_lock(self) -> int:
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)  # not O_APPEND: the record is rewritten in place
        except OSError as exc:
            if _storage_problem(exc):
                raise
            raise UserError(f"spool.path {self.config.path!r}: cannot create {lock_path} ({exc}); choose a writable path") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, LOCK_RECORD_BYTES, 0).decode("utf-8", "replace").split("\n")[0].strip()
            os.close(fd)
            raise UserError(
                f"spool.path {self.config.path!r} is in use by pid {holder or 'another process'}; each daemon needs its "
                "own spool file"
            ) from None
        return fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _read_record(self) -> dict[str, int]:
        assert self._lock_fd is not None
        text = os.pread(self._lock_fd, LOCK_RECORD_BYTES, 0).decode("utf-8", "replace")
        return {key: int(value) for key, value in re.findall(r"\b([a-z_]+_seq)=(\d+)", text)}

    def _write_record(self) -> None:
        """The pid and the last seqs handed out, rewritten in place at the start of the lock file.

        Written at every open and every append (one small pwrite, no fsync: like the database with
        synchronous=normal it survives a crash of the daemon, not a power cut). A fixed-size record
        overwritten in place needs no new disk block once it has one, so it still works when the disk is
        full: a restart on a full disk, where the database cannot even be opened, continues the seqs
        instead of reusing them."""
        if self._lock_fd is None:
            return
        seqs = " ".join(f"{key}={value}" for key, value in sorted(self._counters.items()) if key.endswith("_seq"))
        record = f"{os.getpid()}\n{seqs}\n".encode()
        try:
            os.pwrite(self._lock_fd, record.ljust(LOCK_RECORD_BYTES, b" ")[:LOCK_RECORD_BYTES], 0)
        except OSError as exc:
            log.debug("cannot write the spool's lock record: %s", exc)


def _storage_problem(exc: BaseException) -> bool:
    """A full disk or an I/O error (retry later), as opposed to a wrong path or a file that is not a spool."""
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", "") or ""
        return name.startswith(("SQLITE_FULL", "SQLITE_IOERR")) or "disk is full" in str(exc) or "disk I/O" in str(exc)
    return isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS


def _allocated(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


def _chunks(items: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
