"""Evidence store: flagged frames kept on disk so a person can see what the scorer saw.

One inspection is four files in a folder per UTC day of the frame::

    <dir>/20250114/<inspection_id>.jpg          the frame as captured
    <dir>/20250114/<inspection_id>.overlay.jpg  heatmap overlay with region boxes
    <dir>/20250114/<inspection_id>.map.png      anomaly map, 8-bit; values = lo + png/255*(hi-lo)
    <dir>/20250114/<inspection_id>.json         the result payload, an "evidence" block, VLM update merged in

The JSON is written last, so a folder entry without it is a write cut off by a crash (removed at
start-up). Every file is written to a temporary name and renamed, so a reader never sees half a JPEG.

Example::

    store = EvidenceStore(EvidenceConfig(dir="/var/lib/edge-inspect/evidence"))
    path = store.save(inspection, frame.pixels, anomaly_map=score.anomaly_map, overlay=overlay_bgr)
    inspection = inspection.replace(evidence_path=path)   # "20250114/<id>.jpg", or None
    ...
    store.update(inspection.inspection_id, {"vlm_status": "done", "vlm": verdict.to_json()})
    store.close()

`save` only decides, names and queues; a background thread encodes and writes, so the pipeline
never waits on a slow SD card. A full queue, a full disk or any write error is logged and counted
(`stats()`), never raised: losing a picture must not stop inspection.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .config.evidence import EvidenceConfig
from .files import TMP_SUFFIX, write_atomic
from .localize import overlay
from .mqtt.payloads import result_payload
from .records import Inspection, is_inspection_id

log = logging.getLogger(__name__)

FRAME_SUFFIX = ".jpg"
OVERLAY_SUFFIX = ".overlay.jpg"
MAP_SUFFIX = ".map.png"
JSON_SUFFIX = ".json"
CHAT_SUFFIX = ".chat.jsonl"  # follow-up questions and answers (vlm/followup.py), deleted with the entry
SUFFIXES = (FRAME_SUFFIX, OVERLAY_SUFFIX, MAP_SUFFIX, JSON_SUFFIX, CHAT_SUFFIX)

_DAY_RE = re.compile(r"^\d{8}$")
# Frames waiting for the writer are bounded in bytes too: 32 queued 1080p frames with maps are ~200 MB.
QUEUE_MAX_BYTES = 64 * 2**20
OVERLAY_MAX_SIDE = 2048  # px: overlays of larger frames are made (and saved) at this size
_IDLE_RETENTION_S = 60.0  # age-based deletion also runs when no frame is flagged for a while


def day_folder(timestamp: float) -> str:
    """The UTC day folder name (YYYYMMDD) of a frame timestamp."""
    return time.strftime("%Y%m%d", time.gmtime(timestamp))


def evidence_files(root: str | Path, evidence_path: str) -> dict[str, Path]:
    """The files of one entry from the `evidence_path` of a result payload ("YYYYMMDD/<id>.jpg")."""
    frame = Path(root) / evidence_path
    stem = frame.name[: -len(FRAME_SUFFIX)] if frame.name.endswith(FRAME_SUFFIX) else frame.stem
    return {
        "frame": frame.with_name(stem + FRAME_SUFFIX),
        "overlay": frame.with_name(stem + OVERLAY_SUFFIX),
        "map": frame.with_name(stem + MAP_SUFFIX),
        "json": frame.with_name(stem + JSON_SUFFIX),
    }


class EvidenceMissing(LookupError):
    """An inspection the evidence folder does not (or no longer) hold; `what` is "entry" (no JSON: an unknown
    id, an OK result, or deleted by retention) or "frame" (the JSON is there, the frame is gone or unreadable)."""

    def __init__(self, what: str, message: str):
        super().__init__(message)
        self.what = what


@dataclass(frozen=True)
class StoredEvidence:
    """One inspection read back from the evidence folder: its JSON (the result payload + "evidence" block +
    merged VLM update) and the frame as captured."""

    inspection_id: str
    json_path: Path
    body: dict[str, Any]
    frame_bgr: np.ndarray


def find_evidence_json(root: str | Path, inspection_id: str) -> Path | None:
    """The JSON of an inspection in the evidence folder (<root>/<YYYYMMDD>/<id>.json), newest day first."""
    if not is_inspection_id(inspection_id):
        return None
    try:
        days = sorted((e.name for e in os.scandir(root) if e.is_dir() and _DAY_RE.match(e.name)), reverse=True)
    except OSError:
        return None
    for day in days:
        path = Path(root) / day / f"{inspection_id}{JSON_SUFFIX}"
        if path.is_file():
            return path
    return None


def read_evidence(root: str | Path, inspection_id: str) -> StoredEvidence:
    """Read an inspection's evidence back by id (follow-up questions, operator feedback); EvidenceMissing
    when it is not kept."""
    path = find_evidence_json(root, inspection_id)
    if path is None:
        raise EvidenceMissing(
            "entry",
            f"inspection {inspection_id!r} has no evidence in {root} (unknown id, an OK result, or deleted by the "
            "evidence retention: evidence.max_count / max_mb / max_age_days)",
        )
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EvidenceMissing("entry", f"evidence of {inspection_id} cannot be read ({exc})") from None
    if not isinstance(body, dict):
        raise EvidenceMissing("entry", f"evidence of {inspection_id} is damaged ({path} is not a JSON object)")
    frame_name = (body.get("evidence") or {}).get("frame") or f"{inspection_id}{FRAME_SUFFIX}"
    frame = cv2.imread(str(path.with_name(Path(str(frame_name)).name)), cv2.IMREAD_COLOR)
    if frame is None:
        raise EvidenceMissing("frame", f"the frame of inspection {inspection_id} is missing from {path.parent} "
                                       "(deleted, or the disk was full when it was saved)")
    return StoredEvidence(inspection_id, path, body, frame)


def encode_map_png(anomaly_map: np.ndarray) -> tuple[bytes, tuple[float, float]]:
    """An anomaly map as 8-bit PNG bytes plus the (lo, hi) range that maps 0..255 back to scores.

    8 bits over the map's own range keep the shape of every region (what a person looks at) at a
    tenth of the size of a float32 .npy; the exact image score is in the JSON anyway.
    """

    values = np.nan_to_num(np.asarray(anomaly_map, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(values.min(initial=0.0)), float(values.max(initial=0.0))
    span = hi - lo if hi > lo else 1.0
    pixels = np.clip(np.rint((values - lo) * (255.0 / span)), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError(f"could not encode an anomaly map of shape {values.shape} as PNG")
    return buf.tobytes(), (lo, hi)


def decode_map_png(png: bytes | Path, value_range: tuple[float, float]) -> np.ndarray:
    """Inverse of `encode_map_png` (to 1/255 of the range): float32 anomaly map."""

    data = Path(png).read_bytes() if isinstance(png, Path) else png
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ValueError("not a PNG anomaly map")
    lo, hi = value_range
    return (lo + pixels.astype(np.float32) * ((hi - lo) / 255.0)).astype(np.float32)


def inspection_payload(inspection: Inspection) -> dict[str, Any]:
    """The result payload of an inspection as the publisher sends it (without the stream's seq)."""

    payload = dict(result_payload(inspection, seq=1))
    for stream_only in ("seq", "replayed"):  # properties of one MQTT delivery, not of the inspection
        payload.pop(stream_only, None)
    return payload


def _scaled_box(box: tuple[int, int, int, int], scale: float) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return int(x0 * scale), int(y0 * scale), max(int(x0 * scale) + 1, round(x1 * scale)), max(int(y0 * scale) + 1, round(y1 * scale))


def map_in_frame(anomaly_map: np.ndarray, frame_hw: tuple[int, int],
                 map_box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The anomaly map resized into the frame box it covers (x0, y0, x1, y1; None = whole frame), 0 elsewhere."""

    height, width = frame_hw
    x0, y0, x1, y1 = map_box if map_box is not None else (0, 0, width, height)
    x0, y0 = max(0, min(x0, width)), max(0, min(y0, height))
    x1, y1 = max(x0, min(x1, width)), max(y0, min(y1, height))
    full = np.zeros((height, width), np.float32)
    if x1 > x0 and y1 > y0:
        full[y0:y1, x0:x1] = cv2.resize(np.asarray(anomaly_map, np.float32), (x1 - x0, y1 - y0),
                                        interpolation=cv2.INTER_LINEAR)
    return full


@dataclass
class _Entry:
    day: str
    saved_at: float  # when written (mtime): what retention by age measures
    size: int


@dataclass(frozen=True)
class _SaveJob:
    inspection_id: str
    day: str
    frame: np.ndarray
    anomaly_map: np.ndarray | None
    overlay: np.ndarray | None
    payload: dict[str, Any]
    inspection: Inspection
    map_box: tuple[int, int, int, int] | None

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (self.frame, self.anomaly_map, self.overlay) if a is not None)


@dataclass(frozen=True)
class _UpdateJob:
    inspection_id: str
    update: dict[str, Any]


class EvidenceStore:
    """Writes evidence in the background and keeps the folder within its count, size and age limits.

    Retention works on an in-memory index built by one scan at start-up and kept current by every
    save and delete, so no save walks the tree.
    """

    def __init__(self, config: EvidenceConfig, background: bool = True) -> None:
        self.config = config
        self.root = Path(config.dir)
        self._background = background
        self._lock = threading.RLock()  # guards the index and counters
        self._index: OrderedDict[str, _Entry] = OrderedDict()  # oldest first
        self._bytes = 0
        self._queued_bytes = 0  # pixels waiting for the writer (bounded by QUEUE_MAX_BYTES as well as by count)
        self._ok_seen = 0
        self._counters = dict(saved=0, updated=0, deleted=0, dropped=0, failed=0, skipped_low_disk=0,
                              rejected=0)
        self._last_error = ""
        self._queue: queue.Queue[_SaveJob | _UpdateJob | None] = queue.Queue(maxsize=config.queue_size)
        self._thread: threading.Thread | None = None
        self._closed = False
        if not config.enabled:
            return
        if background:
            self._thread = threading.Thread(target=self._run, name="evidence-writer", daemon=True)
            self._thread.start()
        else:
            self._scan()

    # ---------------------------------------------------------------- caller side

    def wants(self, inspection: Inspection) -> bool:
        """Whether this inspection's evidence is kept: every NG, and every Nth OK when sampling."""
        if not self.config.enabled or self._closed:
            return False
        if inspection.verdict == "NG":
            return True
        every = self.config.save_ok_sample_every
        if not every:
            return False
        with self._lock:
            self._ok_seen += 1
            return (self._ok_seen - 1) % every == 0

    def save(
        self,
        inspection: Inspection,
        frame: np.ndarray,
        anomaly_map: np.ndarray | None = None,
        overlay: np.ndarray | None = None,
        payload: dict[str, Any] | None = None,
        map_box: tuple[int, int, int, int] | None = None,
    ) -> str | None:
        """Queue the evidence of one inspection; returns its `evidence_path` or None when not kept.

        `frame` is the BGR image the inspection's region boxes refer to; `anomaly_map` the scorer's
        map, covering `map_box` (x0, y0, x1, y1 in frame pixels: the ROI; None = the whole frame).
        `overlay` is made in the writer thread with `localize.overlay` when not given. `payload` is
        the result payload (built from the inspection when not given). Arrays must not be modified
        after this call.
        """
        if not self.wants(inspection):
            return None
        inspection_id = inspection.inspection_id
        if not is_inspection_id(inspection_id):
            self._count("rejected", f"inspection id {inspection_id!r} is not a safe file name")
            return None
        day = day_folder(inspection.timestamp)
        relative = f"{day}/{inspection_id}{FRAME_SUFFIX}"
        try:
            body = dict(payload) if payload is not None else inspection_payload(inspection)
        except ValueError as exc:  # e.g. a NaN score: the publisher reports it; evidence just skips
            self._count("rejected", f"evidence for {inspection_id} not saved: {exc}")
            return None
        body["evidence_path"] = relative
        job = _SaveJob(inspection_id, day, frame, anomaly_map, overlay, body, inspection, map_box)
        if not self._background:
            return relative if self._write_entry(job) else None
        with self._lock:
            if self._queued_bytes and self._queued_bytes + job.nbytes > QUEUE_MAX_BYTES:
                full = True
            else:
                full = False
                self._queued_bytes += job.nbytes
        if full:
            self._count("dropped", f"evidence queue holds {QUEUE_MAX_BYTES // 2**20} MiB of frames (disk slower than the "
                                   "flag rate); frame not saved")
            return None
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._lock:
                self._queued_bytes -= job.nbytes
            self._count("dropped", "evidence queue full (disk slower than the flag rate); frame not saved")
            return None
        return relative

    def update(self, inspection_id: str, update: dict[str, Any]) -> None:
        """Merge a later result update (the VLM verdict) into the entry's JSON, after its save."""
        if not self.config.enabled or self._closed:
            return
        job = _UpdateJob(inspection_id, dict(update))
        if not self._background:
            self._apply_update(job)
            return
        try:
            self._queue.put(job, timeout=2.0)  # the VLM worker may wait a little; a verdict is worth it
        except queue.Full:
            self._count("dropped", f"evidence queue full; update of {inspection_id} not saved")

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is on disk; False on timeout."""
        if self._thread is None:
            return True
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._queue.all_tasks_done.wait(remaining)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer thread."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                log.warning("evidence writer did not drain in %.0f s; %d entries not saved", timeout,
                            self._queue.qsize())
                return
            self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        """Counters for the daemon's stats message and `doctor`."""
        with self._lock:
            return dict(
                self._counters,
                count=len(self._index),
                mb=round(self._bytes / 1e6, 3),
                queued=self._queue.qsize(),
                last_error=self._last_error,
            )

    def __enter__(self) -> "EvidenceStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- writer side

    def _run(self) -> None:
        try:
            self._scan()
        except Exception as exc:  # noqa: BLE001 - the writer must outlive a bad scan; later evidence still counts
            log.exception("evidence: the start-up scan of %s failed; writing on without its index", self.root)
            self._count("failed", f"scan failed: {type(exc).__name__}: {exc}", logged=True)
        last_retention = time.monotonic()
        while True:
            try:
                job = self._queue.get(timeout=_IDLE_RETENTION_S)
            except queue.Empty:
                self._enforce_retention()
                last_retention = time.monotonic()
                continue
            try:
                if job is None:
                    return
                if isinstance(job, _SaveJob):
                    self._write_entry(job)
                else:
                    self._apply_update(job)
                if time.monotonic() - last_retention > _IDLE_RETENTION_S:
                    self._enforce_retention()
                    last_retention = time.monotonic()
            except Exception as exc:  # a bug here must not kill the writer; count it and go on
                log.exception("evidence writer error")
                self._count("failed", f"{type(exc).__name__}: {exc}", logged=True)
            finally:
                if isinstance(job, _SaveJob):
                    with self._lock:
                        self._queued_bytes -= job.nbytes
                self._queue.task_done()

    def _write_entry(self, job: _SaveJob) -> bool:
        if self._low_disk():
            return False
        folder = self.root / job.day
        stem = folder / job.inspection_id
        quality = [cv2.IMWRITE_JPEG_QUALITY, self.config.jpeg_quality]
        written: list[Path] = []
        try:
            folder.mkdir(parents=True, exist_ok=True)
            ok, frame_jpeg = cv2.imencode(".jpg", job.frame, quality)
            if not ok:
                raise ValueError(f"could not encode frame of shape {np.shape(job.frame)} as JPEG")
            written.append(write_atomic(stem.with_name(stem.name + FRAME_SUFFIX), frame_jpeg.tobytes(), durable=False))
            overlay = job.overlay if job.overlay is not None else self._make_overlay(job)
            evidence: dict[str, Any] = {"frame": job.inspection_id + FRAME_SUFFIX, "saved_at": round(time.time(), 3)}
            if overlay is not None:
                ok, overlay_jpeg = cv2.imencode(".jpg", overlay, quality)
                if ok:
                    written.append(write_atomic(stem.with_name(stem.name + OVERLAY_SUFFIX), overlay_jpeg.tobytes(), durable=False))
                    evidence["overlay"] = job.inspection_id + OVERLAY_SUFFIX
            if job.anomaly_map is not None:
                png, (lo, hi) = encode_map_png(job.anomaly_map)
                written.append(write_atomic(stem.with_name(stem.name + MAP_SUFFIX), png, durable=False))
                evidence["map"] = job.inspection_id + MAP_SUFFIX
                evidence["map_range"] = [lo, hi]
            body = dict(job.payload, evidence=evidence)
            written.append(write_atomic(stem.with_name(stem.name + JSON_SUFFIX), _json_bytes(body), durable=False))
        except (OSError, ValueError) as exc:
            for path in written:
                _unlink(path)
            reason = "disk full" if isinstance(exc, OSError) and exc.errno == errno.ENOSPC else str(exc)
            self._count("failed", f"evidence for {job.inspection_id} not saved: {reason}")
            return False
        size = sum(_size(path) for path in written)
        with self._lock:
            previous = self._index.pop(job.inspection_id, None)
            if previous is not None:
                self._bytes -= previous.size
            self._index[job.inspection_id] = _Entry(job.day, time.time(), size)
            self._bytes += size
            self._counters["saved"] += 1
        self._enforce_retention()
        return True

    def _make_overlay(self, job: _SaveJob) -> np.ndarray | None:
        """The heatmap over the frame, at most OVERLAY_MAX_SIDE px on its long side: a picture for people,
        made at a size whose float map and blend stay small whatever the camera's resolution (a full-size
        overlay of a 40 MP frame took about 600 MB)."""
        if job.anomaly_map is None:
            return None
        frame, regions, box = job.frame, job.inspection.regions, job.map_box
        height, width = frame.shape[:2]
        scale = min(1.0, OVERLAY_MAX_SIDE / max(height, width))
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            frame = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
            regions = tuple(dataclasses.replace(r, box=_scaled_box(r.box, scale)) for r in regions)
            box = _scaled_box(box, scale) if box is not None else None
        heat = map_in_frame(job.anomaly_map, frame.shape[:2], box)
        return overlay(frame, heat, job.inspection.threshold, regions)

    def _apply_update(self, job: _UpdateJob) -> None:
        with self._lock:
            entry = self._index.get(job.inspection_id)
        if entry is None:
            log.debug("evidence update for %s: no saved entry (not flagged, or already deleted)", job.inspection_id)
            return
        path = self.root / entry.day / (job.inspection_id + JSON_SUFFIX)
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
            body.update(job.update)
            body.setdefault("evidence", {})["updated_at"] = round(time.time(), 3)
            data = _json_bytes(body)
            old_size = _size(path)
            write_atomic(path, data, durable=False)
        except (OSError, ValueError) as exc:
            self._count("failed", f"evidence update of {job.inspection_id} not saved: {exc}")
            return
        with self._lock:
            if job.inspection_id in self._index:
                self._index[job.inspection_id].size += len(data) - old_size
                self._bytes += len(data) - old_size
            self._counters["updated"] += 1

    def _low_disk(self) -> bool:
        if not self.config.min_free_mb:
            return False
        try:
            probe = self.root if self.root.exists() else _existing_parent(self.root)
            free_mb = shutil.disk_usage(probe).free / 1e6
        except OSError:
            return False  # the write itself will report the real problem
        if free_mb >= self.config.min_free_mb:
            return False
        self._count("skipped_low_disk",
                    f"only {free_mb:.0f} MB free on {self.root} (< evidence.min_free_mb={self.config.min_free_mb:g}); "
                    "frame not saved")
        return True

    def _scan(self) -> None:
        """Index what earlier runs left (one walk at start-up); drop cut-off writes."""
        groups: dict[str, _Entry] = {}
        complete: set[str] = set()
        try:
            days = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir() and _DAY_RE.match(entry.name))
        except FileNotFoundError:
            days = []
        except OSError as exc:
            self._count("failed", f"cannot read evidence folder {self.root}: {exc}")
            days = []
        for day in days:
            try:
                items = list(os.scandir(self.root / day))
            except OSError as exc:  # one unreadable day folder: index the others, keep writing
                self._count("failed", f"cannot read evidence folder {self.root / day} ({exc}); it is left out of retention")
                continue
            for item in items:
                try:
                    if not item.is_file():
                        continue
                    if item.name.endswith(TMP_SUFFIX):
                        _unlink(Path(item.path))
                        continue
                    stat = item.stat()
                except OSError:
                    continue  # vanished or unreadable meanwhile
                inspection_id = item.name.split(".", 1)[0]
                entry = groups.setdefault(inspection_id, _Entry(day, stat.st_mtime, 0))
                entry.size += stat.st_size
                entry.saved_at = min(entry.saved_at, stat.st_mtime)  # the JSON is rewritten by updates
                if item.name.endswith(JSON_SUFFIX):
                    complete.add(inspection_id)
        for inspection_id in [i for i in groups if i not in complete]:
            self._delete_files(inspection_id, groups.pop(inspection_id).day)
        with self._lock:
            for inspection_id, entry in sorted(groups.items(), key=lambda item: item[1].saved_at):
                self._index[inspection_id] = entry
                self._bytes += entry.size
        if groups:
            log.info("evidence: %d entries (%.1f MB) in %s", len(groups), self._bytes / 1e6, self.root)
        self._enforce_retention()

    def _enforce_retention(self) -> None:
        max_count = self.config.max_count
        max_bytes = self.config.max_mb * 1e6
        oldest_allowed = time.time() - self.config.max_age_days * 86400.0
        while True:
            with self._lock:
                if not self._index:
                    return
                inspection_id, entry = next(iter(self._index.items()))
                over = (
                    (max_count and len(self._index) > max_count)
                    or (max_bytes and self._bytes > max_bytes)
                    or (self.config.max_age_days and entry.saved_at < oldest_allowed)
                )
                if not over:
                    return
                del self._index[inspection_id]
                self._bytes -= entry.size
                self._counters["deleted"] += 1
            self._delete_files(inspection_id, entry.day)

    def _delete_files(self, inspection_id: str, day: str) -> None:
        folder = self.root / day
        for suffix in SUFFIXES:
            _unlink(folder / (inspection_id + suffix))
        try:
            folder.rmdir()  # only succeeds once the day is empty
        except OSError:
            pass

    def _count(self, counter: str, message: str, logged: bool = False) -> None:
        with self._lock:
            self._counters[counter] += 1
            count = self._counters[counter]
            self._last_error = message
        if not logged and (count == 1 or count % 100 == 0):
            log.warning("%s (%s #%d)", message, counter, count)


def _json_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, indent=1, default=_json_default).encode("utf-8")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _existing_parent(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path(".")
