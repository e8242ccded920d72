"""Learning from the line's own unlabeled frames: candidates, guards, a refit, a check, a version.

A line makes thousands of good parts an hour; a product calibrated from four knows four. Its OK frames
well below the threshold are kept as candidates (their patch features, from the scorer graph's features
output), and every so often the product is refitted on its trusted good set plus the candidates that
pass the guards:

    candidates (bounded store on disk, calibration/<product>/stream/)
      -> frame guard: each candidate scored against the others and the trusted images (k folds); only
         the lowest-scoring share and none far above the rest stay (a defect the threshold missed
         scores high against many good parts)
      -> patch guard: of the frames kept, the patches farthest from every other frame leave (SoftPatch:
         a small defect in an otherwise good frame)
      -> bank: greedy k-center coreset of trusted + kept patches to the scorer graph's capacity
      -> threshold: leave-one-out scores of every frame in that bank (its own rows masked), tail model
         at the configured false-reject rate, never below the trusted images' own leave-one-out scores
      -> check: the newest candidates were held back; if they score worse with the new bank and
         threshold than with the old, nothing is committed
      -> a calibration version (change "stream"), which the daemon swaps in without a restart

Frames near an NG result and frames while the drift alarm is on never become candidates (StreamGate),
and an operator's ng on an inspection removes its frame from the store.

The functions over arrays are what `evaluate --stream` measures on real sets; `StreamLearner` is what
the daemon's learning thread and `evaluate --stream` both run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import CalibrationError
from ..files import array_sha256, bytes_sha256, write_atomic
from ..scorer.anomaly_map import anomaly_map_from_distances, image_score
from ..scorer.features import FeatureExtractor
from ..scorer.layout import (
    BANK_FILE,
    THRESHOLD_FILE,
    current_version,
    product_dir,
    read_manifest,
    version_dir,
)
from ..scorer.manifest import migrate
from ..scorer.memory_bank import greedy_coreset_of, nearest_distances, take_rows
from ..scorer.params import ScorerParams
from .artifacts import load_folded
from .fit import feature_transform
from .store import commit_version, copy_version_files, load_good_set
from .threshold import robust_spread, tail_threshold
from .views import augmented

log = logging.getLogger(__name__)

STREAM_DIR = "stream"
INDEX_FILE = "index.json"
LOCK_FILE = ".lock"
CHANGE = "stream"


# --- the numbers: plain functions over arrays ------------------------------------------------------


@dataclass(frozen=True)
class StreamSettings:
    """How a refit guards the bank (the daemon's `stream:` config and `evaluate --stream` fill it)."""

    keep_fraction: float = 0.8  # frame guard: the lowest-scoring share of candidates kept
    spread_cut: float = 4.0  # ... and none above median + spread_cut x robust spread of the candidates
    patch_quantile: float = 0.99  # patch guard: patches of kept frames above this quantile of their distances leave
    patch_top_share: float = 0.0  # patch guard: and each kept frame's own farthest share of patches
    folds: int = 5  # frame guard: candidates scored in this many folds against the rest
    reference_patches: int = 16384  # frame guard: patches of the rest each fold is scored against (a random sample)
    holdback: float = 0.2  # the newest share of candidates kept out of the fit to check it
    min_candidates: int = 10  # fewer: no refit
    false_reject_rate: float = 0.01
    seed: int = 0


def image_scores(patch_dist: np.ndarray, params: ScorerParams) -> float:
    """The scorer's image score of one frame from its [h, w] patch distances."""
    return image_score(anomaly_map_from_distances(patch_dist, params), params)


def mutual_scores(frames: Sequence[np.ndarray], trusted: np.ndarray, grid: tuple[int, int], params: ScorerParams,
                  folds: int, reference_patches: int, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """Each frame [hw, D] scored against the trusted patches and a sample of the other folds' patches:
    (image scores [N], patch distances [hw] per frame). A defect scores high against many good parts;
    a good frame scores like its neighbours."""
    n = len(frames)
    folds = max(2, min(folds, n))
    order = rng.permutation(n)
    fold_of = np.empty(n, int)
    fold_of[order] = np.arange(n) % folds
    scores = np.zeros(n)
    dists: list[np.ndarray] = [np.empty(0)] * n
    for f in range(folds):
        inside = [i for i in range(n) if fold_of[i] == f]
        outside = [i for i in range(n) if fold_of[i] != f]
        reference = np.concatenate([trusted, _sample_rows([frames[i] for i in outside], reference_patches, rng)])
        queries = np.concatenate([frames[i] for i in inside])
        d = nearest_distances(queries, reference)
        start = 0
        for i in inside:
            count = frames[i].shape[0]
            dists[i] = d[start : start + count]
            scores[i] = image_scores(dists[i].reshape(grid), params)
            start += count
    return scores, dists


def _sample_rows(arrays: Sequence[np.ndarray], count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` rows drawn without replacement from the arrays stacked, without stacking them all first
    (the other folds' patches are tens of MB; a daemon refit runs beside the scorer)."""
    total = int(sum(a.shape[0] for a in arrays))
    if total <= count:
        return np.concatenate(arrays)
    return take_rows(arrays, rng.choice(total, count, replace=False))


def frame_guard(scores: np.ndarray, keep_fraction: float, spread_cut: float) -> np.ndarray:
    """Which frames stay: the lowest-scoring keep_fraction, and none above median + spread_cut x spread."""
    scores = np.asarray(scores, np.float64)
    if scores.size == 0:
        return np.zeros(0, bool)
    cut = np.quantile(scores, keep_fraction)
    ceiling = float(np.median(scores)) + spread_cut * robust_spread(scores)
    return (scores <= cut) & (scores <= ceiling)


def patch_guard(dists: Sequence[np.ndarray], keep: np.ndarray, quantile: float, top_share: float = 0.0) -> list[np.ndarray]:
    """Per frame, which patches stay: those no farther from every other frame than `quantile` of the
    kept frames' patch distances, and not among the frame's own farthest `top_share` (a defect the
    threshold missed is small and is where its frame is farthest from the others)."""
    kept = [d for d, k in zip(dists, keep) if k]
    if not kept:
        return [np.zeros(d.shape, bool) for d in dists]
    cut = float(np.quantile(np.concatenate(kept), quantile))
    out = []
    for d, k in zip(dists, keep):
        mask = (d <= cut) & bool(k)
        count = int(round(top_share * d.size))
        if count:
            mask[np.argpartition(d, d.size - count)[d.size - count:]] = False
        out.append(mask)
    return out


def leave_one_out_in_bank(frames: Sequence[np.ndarray], bank: np.ndarray, owner: np.ndarray, grid: tuple[int, int],
                          params: ScorerParams, chunk: int = 1024) -> np.ndarray:
    """Image score of each frame against the bank without its own rows (owner[j] = the frame bank row j
    came from, -1 for none): how a new part of the same kind scores against this bank."""
    bank = np.asarray(bank, np.float32)
    bank_sq = np.einsum("ij,ij->i", bank, bank)
    out = np.zeros(len(frames))
    for i, q in enumerate(frames):
        q = np.asarray(q[: grid[0] * grid[1]], np.float32)  # a trusted image's own view comes before its views
        own = owner == i
        best = np.empty(q.shape[0], np.float32)
        for start in range(0, q.shape[0], chunk):
            part = q[start : start + chunk]
            cross = part @ bank.T
            cross *= -2.0
            cross += bank_sq[None, :]
            cross[:, own] = np.inf
            best[start : start + chunk] = cross.min(axis=1) + np.einsum("ij,ij->i", part, part)
        out[i] = image_scores(np.sqrt(np.maximum(best, 0.0)).reshape(grid), params)
    return out


def stream_threshold(trusted_loo: np.ndarray, stream_loo: np.ndarray, rate: float) -> tuple[float, dict[str, Any]]:
    """The (1 - rate) quantile of a Gumbel tail fitted to every frame's leave-one-out score, never below
    the trusted images' own (an unlabeled frame cannot raise the floor by itself)."""
    trusted = np.asarray(trusted_loo, np.float64)
    good = np.concatenate([trusted, np.asarray(stream_loo, np.float64)])
    threshold, gumbel = tail_threshold(good, float(trusted.max()), rate)
    return threshold, {
        "rule": "max(max(trusted loo), Gumbel(trusted + stream loo) quantile at 1 - false_reject_rate)",
        "false_reject_rate": rate,
        "gumbel": gumbel,
        "trusted_loo_scores": [round(float(s), 5) for s in trusted],
        "loo_scores": [round(float(s), 5) for s in good],
        "loo_max": round(float(good.max()), 5),
        "loo_median": round(float(np.median(good)), 5),
    }


@dataclass
class StreamFit:
    """A refit from the stream, in memory: the new bank and threshold and how they came about."""

    bank: np.ndarray
    threshold: float
    evidence: dict[str, Any]
    used: list[int]  # candidate indices whose patches could join the bank
    dropped_frames: list[int]  # candidate indices the frame guard removed
    patches_dropped: int
    seconds: float


class RefitStopped(Exception):
    """The daemon is stopping: a refit in progress gives up before it writes anything."""


def _never_stop() -> None:
    return None


def refit_from_stream(trusted: Sequence[np.ndarray], candidates: Sequence[np.ndarray], grid: tuple[int, int],
                      params: ScorerParams, capacity: int, settings: StreamSettings, guards: bool = True,
                      held: Sequence[np.ndarray] = (), checkpoint: Callable[[], None] = _never_stop) -> StreamFit:
    """Trusted images' patches (the calibration's good set; [hw, D] each, or [k*hw, D] with its views in the
    bank after the image itself) and candidate frames' patches [hw, D] each -> a new bank of at most `capacity` rows and its threshold. guards=False takes every
    candidate whole (the clean ceiling `evaluate --stream` compares with). `checkpoint` is called between the
    steps; it raises RefitStopped to give up (the daemon is stopping)."""
    started = time.perf_counter()
    rng = np.random.default_rng(settings.seed)
    trusted_all = np.concatenate(trusted) if trusted else np.zeros((0, candidates[0].shape[1]), np.float32)
    n = len(candidates)
    if guards and n:
        scores, dists = mutual_scores(candidates, trusted_all, grid, params, settings.folds, settings.reference_patches, rng)
        keep = frame_guard(scores, settings.keep_fraction, settings.spread_cut)
        patch_keep = patch_guard(dists, keep, settings.patch_quantile, settings.patch_top_share)
        checkpoint()
    else:
        scores = np.zeros(n)
        keep = np.ones(n, bool)
        patch_keep = [np.ones(c.shape[0], bool) for c in candidates]
    frames = list(trusted) + list(candidates)
    eligible = [None] * len(trusted) + list(patch_keep)
    owner_all = np.concatenate([np.full(patches.shape[0], i) for i, patches in enumerate(trusted)]
                               + [np.full(int(mask.sum()), len(trusted) + j) for j, mask in enumerate(patch_keep)])
    # The union of the kept patches is never stacked: the coreset projects frame by frame and the bank
    # takes its rows from the frames (candidates stay float16 as stored).
    chosen = np.sort(greedy_coreset_of(frames, capacity, seed=settings.seed, eligible=eligible))
    bank, owner = take_rows(frames, chosen, eligible), owner_all[chosen]
    union_rows = int(owner_all.size)
    checkpoint()
    kept_frames = list(range(len(trusted))) + [len(trusted) + j for j in range(n) if keep[j]]
    loo = leave_one_out_in_bank([frames[i] for i in kept_frames], bank, _reindex(owner, kept_frames), grid, params)
    trusted_loo, stream_loo = loo[: len(trusted)], loo[len(trusted):]
    # The held-back frames never touched the bank: their scores are the honest sample of a new part. Those
    # far above the others (a defect the threshold missed) are left out like the frame guard leaves them.
    held_scores = np.array([image_scores(nearest_distances(h, bank).reshape(grid), params) for h in held])
    if held_scores.size and guards:
        held_scores = held_scores[frame_guard(held_scores, 1.0, settings.spread_cut)]
    threshold, evidence = stream_threshold(trusted_loo, np.concatenate([stream_loo, held_scores]), settings.false_reject_rate)
    evidence["held_back_scores"] = [round(float(s), 5) for s in held_scores]
    dropped = [j for j in range(n) if not keep[j]]
    patches_dropped = int(sum((~m).sum() for m, k in zip(patch_keep, keep) if k))
    evidence.update({
        "stream": {
            "candidates": n, "frames_used": int(keep.sum()), "frames_dropped": len(dropped),
            "patches_dropped": patches_dropped, "trusted_images": len(trusted), "guards": guards,
            "bank_from_patches": union_rows, "capacity": int(capacity),
            "candidate_scores": [round(float(s), 5) for s in scores] if guards else [],
        },
    })
    return StreamFit(bank=np.ascontiguousarray(bank), threshold=threshold, evidence=evidence,
                     used=[j for j in range(n) if keep[j]], dropped_frames=dropped, patches_dropped=patches_dropped,
                     seconds=time.perf_counter() - started)


def _reindex(owner: np.ndarray, kept: list[int]) -> np.ndarray:
    """Bank row owners renumbered to positions in `kept` (-1: a frame not scored)."""
    mapping = np.full(int(owner.max()) + 2 if owner.size else 1, -1)
    for position, frame in enumerate(kept):
        if frame < mapping.size:
            mapping[frame] = position
    return mapping[owner]


SCORE_SLACK = 0.02  # a refit may move the held-back frames' median score up by this share (coreset noise)


def holdback_check(held: Sequence[np.ndarray], grid: tuple[int, int], params: ScorerParams,
                   old_bank: np.ndarray, old_threshold: float, new_bank: np.ndarray, new_threshold: float) -> dict[str, Any]:
    """The held-back candidates (good frames the fit never saw) under the old and the new calibration:
    commit only when they do not score worse: no more of them flagged, and their median score not higher
    (beyond SCORE_SLACK). A lower threshold is welcome as long as these frames stay below it."""
    def run(bank: np.ndarray, threshold: float) -> tuple[float, int]:
        scores = np.array([image_scores(nearest_distances(h, bank).reshape(grid), params) for h in held])
        return float(np.median(scores)), int((scores >= threshold).sum())

    old_median, old_flagged = run(old_bank, old_threshold)
    new_median, new_flagged = run(new_bank, new_threshold)
    ok = new_median <= old_median * (1.0 + SCORE_SLACK) and new_flagged <= old_flagged
    return {"frames": len(held), "old_median_score": round(old_median, 5), "new_median_score": round(new_median, 5),
            "old_flagged": old_flagged, "new_flagged": new_flagged, "passed": bool(ok)}


# --- which frames may become candidates -------------------------------------------------------------


@dataclass
class StreamGate:
    """Per camera: an OK frame becomes a candidate only once `quiet_frames` frames after it passed without
    an NG, and never within `quiet_frames` after an NG or while the drift alarm is on; only frames whose
    score is at most `max_position` of the way from the calibration's good median to the threshold."""

    quiet_frames: int = 2
    max_position: float = 0.8
    sample_every: int = 1  # keep every n-th eligible frame (bounds disk writes on a fast line)
    _pending: deque = field(default_factory=deque)
    _blocked: int = 0
    _eligible: int = 0

    def offer(self, item: Any, score: float, threshold: float, good_median: float, flagged: bool, alarm: bool) -> list[Any]:
        """One frame of this camera; returns the candidates confirmed by it (older pending frames)."""
        if flagged or alarm:
            self._pending.clear()
            self._blocked = self.quiet_frames
            return []
        if self._blocked > 0:
            self._blocked -= 1
            confirmed: list[Any] = []
        else:
            confirmed = self._release()
            span = max(threshold - good_median, 1e-12)
            if (score - good_median) / span <= self.max_position and item is not None:
                self._eligible += 1
                if (self._eligible - 1) % max(1, self.sample_every) == 0:
                    self._pending.append([item, 0])
        return confirmed

    def _release(self) -> list[Any]:
        out = []
        for entry in self._pending:
            entry[1] += 1
        while self._pending and self._pending[0][1] >= self.quiet_frames:
            out.append(self._pending.popleft()[0])
        return out


# --- the candidate store on disk ---------------------------------------------------------------------


def params_key(params: ScorerParams) -> str:
    """Features of two calibrations are comparable only when their params match."""
    data = params.to_json()
    data.pop("layer_scales", None)  # measured per fit; the features the graph emits are scaled by them
    return bytes_sha256(json.dumps(data, sort_keys=True).encode())[:16]


class CandidateStore:
    """calibration/<product>/stream/: candidate frames' patch features (float16 .npy) and an index, at most
    `max_frames` of them (the oldest leave first). One writer at a time (a file lock); a refit reads a
    snapshot."""

    def __init__(self, calibration_dir: str | Path, product: str, max_frames: int = 200):
        self.folder = product_dir(calibration_dir, product) / STREAM_DIR
        self.max_frames = max_frames

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / LOCK_FILE, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads((self.folder / INDEX_FILE).read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("entries"), list):
                return data
        except FileNotFoundError:
            pass
        except (OSError, ValueError):
            log.warning("stream store %s: index unreadable; starting it over", self.folder)
        return {"params_key": None, "next": 1, "entries": []}

    def _write(self, data: dict[str, Any]) -> None:
        write_atomic(self.folder / INDEX_FILE, json.dumps(data, indent=0), durable=False)

    def entries(self) -> list[dict[str, Any]]:
        with self._locked():
            return list(self._read()["entries"])

    def add(self, features: np.ndarray, meta: dict[str, Any], key: str) -> dict[str, Any]:
        """Keep one candidate; a store of other params (a recalibration) is emptied first."""
        with self._locked():
            data = self._read()
            if data["params_key"] != key:
                self._clear(data)
                data["params_key"] = key
            number = int(data["next"])
            name = f"{number:09d}.npy"
            np.save(self.folder / name, np.asarray(features, np.float16))
            entry = {"file": name, **meta}
            data["entries"].append(entry)
            data["next"] = number + 1
            while len(data["entries"]) > self.max_frames:
                (self.folder / data["entries"].pop(0)["file"]).unlink(missing_ok=True)
            self._write(data)
            return entry

    def remove(self, inspection_id: str) -> int:
        """An operator's ng: that frame never teaches the bank. Returns how many entries left."""
        with self._locked():
            data = self._read()
            gone = [e for e in data["entries"] if e.get("inspection_id") == inspection_id]
            for entry in gone:
                (self.folder / entry["file"]).unlink(missing_ok=True)
            data["entries"] = [e for e in data["entries"] if e.get("inspection_id") != inspection_id]
            if gone:
                self._write(data)
            return len(gone)

    def clear(self) -> None:
        with self._locked():
            data = self._read()
            self._clear(data)
            self._write(data)

    def _clear(self, data: dict[str, Any]) -> None:
        for entry in data["entries"]:
            (self.folder / entry["file"]).unlink(missing_ok=True)
        data["entries"] = []

    def load(self, entries: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], np.ndarray]]:
        """(entry, features [D, h, w] as stored: float16) for the entries whose file is still there. patches_of
        makes the float32 rows; a float32 copy here too would be one more copy of every candidate in memory."""
        out = []
        for entry in entries:
            try:
                out.append((entry, np.load(self.folder / entry["file"], allow_pickle=False)))
            except (OSError, ValueError):
                continue  # removed meanwhile (an operator's ng, the bound)
        return out

    def disk_bytes(self) -> int:
        if not self.folder.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.folder.glob("*.npy"))


def patches_of(features: np.ndarray) -> np.ndarray:
    """[D, h, w] -> [hw, D] rows in the bank's order (image, y, x), in the features' own dtype: stored
    candidates stay float16 (half the memory); every consumer computes in float32 a chunk at a time."""
    d = features.shape[0]
    return np.ascontiguousarray(features.reshape(d, -1).T)


def stream_version_writer(source: Path, bank: np.ndarray, threshold: float, evidence: dict[str, Any],
                          change_block: dict[str, Any]) -> Callable[[Path], dict[str, Any]]:
    """A store.commit_version writer: the active version's files (references, the good set) with the new
    bank and threshold; the graph is the same (the bank is an input)."""

    def write(folder: Path) -> dict[str, Any]:
        manifest = copy_version_files(source, folder)
        np.save(folder / BANK_FILE, bank)
        doc = {"threshold": float(threshold), "false_reject_rate": evidence.get("false_reject_rate"), "evidence": evidence}
        (folder / THRESHOLD_FILE).write_text(json.dumps(doc, indent=1), encoding="utf-8")
        manifest["bank"] = {**manifest["bank"], "patches": int(bank.shape[0]), "sha256": array_sha256(bank),
                            "from_patches": int(evidence["stream"]["bank_from_patches"])}
        manifest["calibration_id"] = f"{manifest['product']}@{manifest['bank']['sha256'][:12]}"
        manifest["threshold"] = float(threshold)
        manifest["stream"] = change_block
        return manifest

    return write


def active_source(calibration_dir: str | Path, product: str) -> tuple[int, Path, dict[str, Any]]:
    number = current_version(calibration_dir, product)
    if number is None:
        raise CalibrationError(f"product {product!r} has no versioned calibration: recalibrate it to learn from the line")
    return number, version_dir(calibration_dir, product, number), migrate(read_manifest(calibration_dir, product, number))


# --- one product's learning: what the daemon's learning thread and evaluate --stream both run ----------


@dataclass(frozen=True)
class StreamCadence:
    """When candidates are taken and refits run (config `stream:`)."""

    refit_every: int = 50  # new candidates since the last refit
    refit_minutes: float = 30.0  # or this long since the last refit, when there are new candidates
    max_frames: int = 200  # candidates kept on disk (float16 patch features; ~300 KB each at 256 px)
    quiet_frames: int = 2
    max_position: float = 0.8
    sample_every: int = 1


@dataclass
class RefitOutcome:
    """What one refit did: committed (a new version), or why not."""

    committed: bool
    version: int | None
    reason: str
    numbers: dict[str, Any]


class StreamLearner:
    """One product's learning from its OK frames. No threads of its own: observe() is cheap bookkeeping
    (the features are written by add_candidate on the caller's thread of choice); refit() takes seconds
    and belongs on a low-priority worker."""

    def __init__(self, calibration_dir: str | Path, engines_dir: str | Path, product: str,
                 settings: StreamSettings = StreamSettings(), cadence: StreamCadence = StreamCadence(),
                 threads: int = 1, keep: int = 10, clock: Callable[[], float] = time.time):
        self.calibration_dir, self.engines_dir, self.product = Path(calibration_dir), Path(engines_dir), product
        self.settings, self.cadence, self.threads, self.keep = settings, cadence, threads, keep
        self.store = CandidateStore(calibration_dir, product, cadence.max_frames)
        self._gates: dict[str, StreamGate] = {}
        self._clock = clock
        self._medians: dict[str, float | None] = {}
        self.new_candidates = 0
        self._trusted: tuple[str, list[np.ndarray]] | None = None  # (good set key, its patches): _trusted_patches
        self.last_refit = clock()
        self.counts = {"candidates": 0, "refits": 0, "committed": 0, "not_committed": 0, "frames_dropped": 0}
        self.last: RefitOutcome | None = None

    def good_median(self, calibration: Any) -> float | None:
        """The calibration's good parts' median score (its threshold evidence), read once per version."""
        key = str(calibration.directory)
        if key not in self._medians:
            try:
                doc = json.loads((Path(calibration.directory) / THRESHOLD_FILE).read_text(encoding="utf-8"))
                ev = doc.get("evidence") or {}
                good = [float(v) for k in ("loo_scores", "view_scores") for v in (ev.get(k) or [])]
                self._medians[key] = float(np.median(good)) if good else None
            except (OSError, ValueError):
                self._medians[key] = None
        return self._medians[key]

    def observe(self, camera: str, calibration: Any, inspection_id: str, score: float, flagged: bool,
                features: np.ndarray | None, alarm: bool = False) -> list[tuple[str, np.ndarray, dict[str, Any]]]:
        """One inspected frame; returns the candidates it confirmed: (inspection id, features, meta) for
        add_candidate. Frames without features (a graph with the bank inside) never become candidates."""
        median = self.good_median(calibration)
        gate = self._gates.setdefault(camera, StreamGate(self.cadence.quiet_frames, self.cadence.max_position,
                                                         self.cadence.sample_every))
        if median is None:
            return []
        item = None
        if features is not None:
            item = (inspection_id, features, {"inspection_id": inspection_id, "camera": camera, "score": round(float(score), 5),
                                              "threshold": round(float(calibration.threshold), 5),
                                              "version": calibration.version, "at": round(self._clock(), 3)})
        return gate.offer(item, float(score), float(calibration.threshold), median, bool(flagged), alarm)

    def add_candidate(self, features: np.ndarray, meta: dict[str, Any], params: ScorerParams) -> None:
        self.store.add(features, meta, params_key(params))
        self.new_candidates += 1
        self.counts["candidates"] += 1

    def request_refit(self) -> None:
        """Refit at the next chance (another writer replaced the bank with one of the good set alone)."""
        self.new_candidates = max(1, self.new_candidates)
        self.last_refit = float("-inf")

    def due(self) -> bool:
        if len(self.store.entries()) < self.settings.min_candidates or self.new_candidates == 0:
            return False
        return (self.new_candidates >= self.cadence.refit_every
                or self._clock() - self.last_refit >= 60.0 * self.cadence.refit_minutes)

    def refit(self, why: str = "", guards: bool = True, check: bool = True,
              checkpoint: Callable[[], None] = _never_stop) -> RefitOutcome:
        """Refit the product from its trusted good set and the stored candidates; commit a version when the
        held-back candidates do not score worse. The caller holds store.product_lock. guards=False takes
        every candidate whole and holds none back (the clean ceiling of `evaluate --stream`); check=False
        commits whatever the held-back frames say (an operator's ng took a frame out of the bank). `checkpoint`
        raises RefitStopped between the steps to give up before anything is written."""
        self.last_refit = self._clock()
        self.new_candidates = 0
        self.counts["refits"] += 1
        number, source, manifest = active_source(self.calibration_dir, self.product)
        if not manifest["scorer_onnx"]["bank_input"]:
            return self._done(False, number, "the product's scorer graph holds its bank: recalibrate it to learn from the line", {})
        params = ScorerParams.from_json(manifest["params"])
        entries = self.store.entries()
        loaded = self.store.load(entries)
        if len(loaded) < (self.settings.min_candidates if check else 1):
            return self._done(False, number, f"{len(loaded)} candidates, fewer than {self.settings.min_candidates}", {})
        grid = tuple(loaded[0][1].shape[1:])
        for i, (entry, features) in enumerate(loaded):
            loaded[i] = (entry, patches_of(features))  # one at a time: the [D, h, w] arrays go as their rows come
        held_count = int(round(self.settings.holdback * len(loaded))) if guards and check else 0
        fit_part, held_part = loaded[: len(loaded) - held_count], loaded[len(loaded) - held_count:]
        trusted = self._trusted_patches(manifest, params, checkpoint)
        capacity = int(manifest["scorer_onnx"]["capacity"])
        held = [patches for _, patches in held_part]
        fit = refit_from_stream(trusted, [patches for _, patches in fit_part], grid, params, capacity,
                                dataclasses.replace(self.settings, false_reject_rate=float(manifest["options"]["false_reject_rate"])),
                                guards=guards, held=held, checkpoint=checkpoint)
        old_bank = np.load(source / manifest["bank"]["file"], allow_pickle=False)
        old_threshold = float(json.loads((source / THRESHOLD_FILE).read_text(encoding="utf-8"))["threshold"])
        check = (holdback_check(held, grid, params, old_bank, old_threshold, fit.bank, fit.threshold)
                 if held_part else {"frames": 0, "passed": True})
        numbers = {"from_version": number, "candidates": len(loaded), "held_back": len(held_part),
                   "frames_used": len(fit.used), "frames_dropped": len(fit.dropped_frames), "patches_dropped": fit.patches_dropped,
                   "threshold": round(fit.threshold, 5), "old_threshold": round(old_threshold, 5), "check": check,
                   "used_ids": [fit_part[j][0].get("inspection_id") for j in fit.used],
                   "seconds": round(fit.seconds, 2)}
        self.counts["frames_dropped"] += len(fit.dropped_frames)
        checkpoint()
        if not check["passed"]:
            return self._done(False, number, "the held-back candidates score worse with the refit", numbers)
        used_ids = [fit_part[j][0].get("inspection_id") for j in fit.used]
        block = {"frames_used": len(fit.used), "frames_dropped": [fit_part[j][0].get("inspection_id") for j in fit.dropped_frames],
                 "inspection_ids": used_ids[-200:], "held_back": len(held_part), "check": check}
        writer = stream_version_writer(source, fit.bank, fit.threshold, fit.evidence, block)
        text = why or (f"{len(fit.used)} of {len(fit_part)} candidate frames joined the bank ({len(fit.dropped_frames)} dropped by "
                       f"the guards); threshold {old_threshold:.5g} -> {fit.threshold:.5g}")
        version = commit_version(self.calibration_dir, self.product, writer,
                                 {"change": CHANGE, "by": "stream", "why": text, "frames_used": len(fit.used)},
                                 keep=self.keep, engines_dir=self.engines_dir)
        return self._done(True, version, text, numbers)

    def _trusted_patches(self, manifest: dict[str, Any], params: ScorerParams, checkpoint: Callable[[], None]) -> list[np.ndarray]:
        """Each trusted good image with its views in the bank (the calibration's --augment), as one frame of
        patches. Kept between refits while the good set, views and params stay: a refit then loads no
        feature graph (its session and arena were most of a refit's memory) and extracts nothing twice."""
        key = json.dumps([manifest.get("good_set"), manifest["options"].get("augment"), manifest["options"].get("seed"),
                          manifest["params"]], sort_keys=True, default=str)
        if self._trusted is not None and self._trusted[0] == key:
            return self._trusted[1]
        self._trusted = None
        folded, _ = load_folded(self.engines_dir)
        extractor = FeatureExtractor(folded, dataclasses.replace(params, layer_scales=(), projection_dim=0), self.threads)
        transform = feature_transform(params)
        trusted = []
        rng = np.random.default_rng(int(manifest["options"]["seed"]))
        for good in load_good_set(self.calibration_dir, self.product, manifest):
            views = [good.bgr] + augmented(good.bgr, manifest["options"]["augment"], rng)
            trusted.append(np.concatenate([patches_of(transform(extractor(v)[0])) for v in views]))
            checkpoint()
        self._trusted = (key, trusted)
        return trusted

    def _done(self, committed: bool, version: int | None, reason: str, numbers: dict[str, Any]) -> RefitOutcome:
        self.counts["committed" if committed else "not_committed"] += 1
        self.last = RefitOutcome(committed, version, reason, numbers)
        return self.last

    def state(self) -> dict[str, Any]:
        last = self.last
        return {**self.counts, "stored": len(self.store.entries()), "store_mb": round(self.store.disk_bytes() / 2**20, 1),
                "new_since_refit": self.new_candidates,
                "last_refit": None if last is None else {"committed": last.committed, "version": last.version,
                                                         "reason": last.reason}}

