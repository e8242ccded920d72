"""`evaluate --stream`: a product calibrated from k shots learns from an unlabeled stream, as on the line.

    shots (train/good images k*s .. k*s+k-1)            -> calibrate             -> "start" on the test split
    stream: the other train goods + a share of defective test images (they leave the test), shuffled
            -> scored frame by frame by the live scorer, through the daemon's learning code
               (calibration/stream.StreamLearner: gate, candidate store, refits, checks, versions)
                                                                                 -> "after" on the test split
    the same shots + every other train good, no defect, no guard                 -> "ceiling"
    anomaly's PatchCore on the shots                                              -> "floor"

Each phase: image/pixel AUROC, and F1, false rejects and misses at its own automatic threshold.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from ..calibration.artifacts import ensure_backbone
from ..calibration.calibrate import calibrate_product
from ..calibration.fit import CalibrationOptions
from ..calibration.store import product_lock
from ..calibration.stream import StreamCadence, StreamLearner, StreamSettings
from ..errors import UserError
from ..imageio import crop_roi, read_bgr
from ..scorer.product import Scorer, load_product
from .datasets.mvtec import TestItem, load_dataset, read_mask
from .metrics import auroc, binary_counts, f1_score

log = logging.getLogger(__name__)

PRODUCT = "eval"
# evaluate's cadence: refits every 25 candidates, so a stream of a few dozen frames refits more than once.
EVAL_CADENCE = StreamCadence(refit_every=25, refit_minutes=1e9, max_frames=400)
PHASE_KEYS = ("image_auroc", "pixel_auroc", "f1", "false_reject_rate", "miss_rate")


def _phase(scores: Sequence[float], labels: Sequence[bool], threshold: float, pixel_scores: list, pixel_labels: list) -> dict[str, Any]:
    scores_a, labels_a = np.asarray(scores), np.asarray(labels, bool)
    predicted = scores_a >= threshold
    counts = binary_counts(labels_a, predicted)
    pixel = None
    if pixel_labels and any(lab.any() for lab in pixel_labels):
        pixel = round(auroc(np.concatenate(pixel_labels), np.concatenate(pixel_scores)), 4)
    return {
        "image_auroc": round(auroc(labels_a, scores_a), 4),
        "pixel_auroc": pixel,
        "f1": round(f1_score(labels_a, predicted), 4),
        "false_reject_rate": round(counts["fp"] / max(int((~labels_a).sum()), 1), 4),
        "miss_rate": round(counts["fn"] / max(int(labels_a.sum()), 1), 4),
        "threshold": round(float(threshold), 5),
    }


def _score_test(score_fn, test: Sequence[TestItem], roi, threshold: float, progress: bool, desc: str) -> dict[str, Any]:
    """score_fn(bgr) -> (score, map at the input size) on every test item."""
    scores, labels, pixel_scores, pixel_labels = [], [], [], []
    for item in tqdm(test, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        bgr = read_bgr(item.path)
        score, amap = score_fn(bgr)
        scores.append(score)
        labels.append(not item.is_good)
        if item.has_pixel_truth:
            mask = read_mask(item, bgr.shape[:2])
            if roi:
                x, y, w, h = roi
                mask = mask[y : y + h, x : x + w]
            mask = cv2.resize(mask.astype(np.uint8), amap.shape[::-1], interpolation=cv2.INTER_NEAREST).astype(bool)
            pixel_scores.append(amap[::2, ::2].ravel())
            pixel_labels.append(mask[::2, ::2].ravel())
    return _phase(scores, labels, threshold, pixel_scores, pixel_labels)


def _scorer_phase(calib_dir: Path, engines: Path, test, backend: str, threads: int, progress: bool, desc: str) -> dict[str, Any]:
    product = load_product(calib_dir, PRODUCT, engines)
    scorer = Scorer(product, backend=backend, threads=threads)
    try:
        def run(bgr):
            result = scorer.score(bgr)
            return result.score, result.anomaly_map
        out = _score_test(run, test, product.roi, product.threshold, progress, desc)
    finally:
        scorer.close()
    out["calibration_version"] = product.version
    return out


def stream_items(dataset, shots: int, shot_set: int, contamination: float, single_type: bool) -> tuple[list[Path], list[Path], list[Path], list[TestItem], list[Path]]:
    """(shots, stream goods, stream defects, test items without those defects, all other train goods)."""
    if not 0.0 <= contamination < 1.0:
        raise UserError(f"--contamination {contamination}: give a share of the stream between 0 and 1 (0.1 = 10 %)")
    first = shot_set * shots
    shot_paths = dataset.train_good[first : first + shots]
    goods = dataset.train_good[:first] + dataset.train_good[first + shots:]
    rng = np.random.default_rng(1000 + shot_set)
    defects = [t for t in dataset.test if not t.is_good]
    if single_type and defects:
        types = sorted({t.defect_type for t in defects}, key=lambda k: (-sum(t.defect_type == k for t in defects), k))
        defects = [t for t in defects if t.defect_type == types[0]]
    wanted = int(round(contamination / (1.0 - contamination) * len(goods))) if contamination else 0
    chosen = [defects[i] for i in rng.permutation(len(defects))[:wanted]]
    chosen_paths = {t.path for t in chosen}
    test = [t for t in dataset.test if t.path not in chosen_paths]
    return shot_paths, goods, [t.path for t in chosen], test, goods


def evaluate_stream(
    root: str | Path,
    shots: int = 4,
    shot_set: int = 0,
    contamination: float = 0.1,
    single_type: bool = False,
    options: CalibrationOptions | None = None,
    engines_dir: str | Path = "engines",
    backend: str = "onnxruntime",
    threads: int = 0,
    progress: bool = True,
    floor: bool = True,
    settings: StreamSettings = StreamSettings(),
    cadence: StreamCadence = EVAL_CADENCE,
    ceiling: bool = True,
) -> dict[str, Any]:
    dataset = load_dataset(root)
    if len(dataset.train_good) < (shot_set + 1) * shots + 2:
        raise UserError(f"{root}: {len(dataset.train_good)} train/good images; a stream after {shots} shots (shot set "
                        f"{shot_set}) needs more")
    shot_paths, goods, contaminants, test, clean = stream_items(dataset, shots, shot_set, contamination, single_type)
    stream = [(p, False) for p in goods] + [(p, True) for p in contaminants]
    order = np.random.default_rng(shot_set).permutation(len(stream))
    stream = [stream[i] for i in order]
    result: dict[str, Any] = {"dataset": str(root), "shots": shots, "shot_set": shot_set, "contamination": contamination,
                              "single_type": single_type, "n_test_good": sum(t.is_good for t in test),
                              "n_test_defect": sum(not t.is_good for t in test)}
    with tempfile.TemporaryDirectory() as tmp:
        engines = Path(tmp) / "engines"
        engines.mkdir()
        ensure_backbone(engines_dir)
        (engines / "backbone").symlink_to((Path(engines_dir) / "backbone").resolve(), target_is_directory=True)
        calib = Path(tmp) / "calibration"
        calibrate_product(shot_paths, PRODUCT, calib, engines, options, progress=False, threads=threads)
        result["start"] = _scorer_phase(calib, engines, test, backend, threads, progress, "stream: start")
        result["stream"] = _run_stream(calib, engines, stream, backend, threads, settings, cadence, progress)
        result["after"] = _scorer_phase(calib, engines, test, backend, threads, progress, "stream: after")
        if ceiling:
            ceil = Path(tmp) / "ceiling"
            calibrate_product(shot_paths, PRODUCT, ceil, engines, options, progress=False, threads=threads)
            _run_stream(ceil, engines, [(p, False) for p in clean], backend, threads, settings, cadence, progress, guards=False)
            result["ceiling"] = _scorer_phase(ceil, engines, test, backend, threads, progress, "stream: ceiling")
    if floor:
        from .anomalib_floor import AnomalibPatchCore

        model = AnomalibPatchCore(threads)
        model.fit([read_bgr(p) for p in shot_paths])
        result["floor"] = _score_test(model.score, test, None, float("inf"), progress, "stream: floor")
        for key in ("f1", "false_reject_rate", "miss_rate", "threshold"):
            result["floor"].pop(key, None)  # the floor has no automatic threshold
    return result


def _run_stream(calib: Path, engines: Path, stream: Sequence[tuple[Path, bool]], backend: str, threads: int,
                settings: StreamSettings, cadence: StreamCadence, progress: bool, guards: bool = True) -> dict[str, Any]:
    """Feed the stream through the daemon's learning code; refits swap the scorer as the daemon does."""
    if not guards:  # the ceiling: every frame is a candidate, one refit at the end
        cadence = StreamCadence(refit_every=10**9, refit_minutes=1e9, max_frames=10**6)
    learner = StreamLearner(calib, engines, PRODUCT, settings, cadence, threads=threads)
    product = load_product(calib, PRODUCT, engines)
    scorer = Scorer(product, backend=backend, threads=threads)
    defect_ids: set[str] = set()
    outcomes = []
    started = time.perf_counter()
    try:
        for index, (path, defective) in enumerate(tqdm(stream, desc="stream", disable=not progress, leave=False, dynamic_ncols=True)):
            inspection_id = f"s{index:05d}"
            if defective:
                defect_ids.add(inspection_id)
            bgr = crop_roi(read_bgr(path), scorer.product.roi)
            res = scorer.score(bgr, features=True)
            if not guards:
                learner.add_candidate(res.patch_features, {"inspection_id": inspection_id}, scorer.product.params)
                continue
            for _id, features, meta in learner.observe("cam", scorer.product, inspection_id, res.score, res.flagged, res.patch_features):
                learner.add_candidate(features, {**meta, "defective": _id in defect_ids}, scorer.product.params)
            if guards and learner.due():
                scorer = _refit(learner, calib, engines, scorer, backend, threads, outcomes, guards)
        for _ in range(cadence.quiet_frames if guards else 0):  # the last frames pass their quiet period
            for _id, features, meta in learner.observe("cam", scorer.product, "end", 0.0, False, None):
                learner.add_candidate(features, {**meta, "defective": _id in defect_ids}, scorer.product.params)
        if learner.new_candidates or not guards:
            scorer = _refit(learner, calib, engines, scorer, backend, threads, outcomes, guards)
    finally:
        scorer.close()
    stored = learner.store.entries()
    return {
        "frames": len(stream), "defects": len(defect_ids), "candidates": learner.counts["candidates"],
        "defects_as_candidates": sum(bool(e.get("defective")) for e in stored),
        "refits": len(outcomes), "committed": sum(o["committed"] for o in outcomes),
        "outcomes": outcomes, "seconds": round(time.perf_counter() - started, 1),
    }


def _refit(learner: StreamLearner, calib: Path, engines: Path, scorer: Scorer, backend: str, threads: int,
           outcomes: list, guards: bool) -> Scorer:
    with product_lock(calib, PRODUCT):
        outcome = learner.refit(guards=guards)
    defect_ids = {e["inspection_id"] for e in learner.store.entries() if e.get("defective")}
    used = outcome.numbers.get("frames_used")
    outcomes.append({"committed": outcome.committed, "version": outcome.version, "reason": outcome.reason,
                     "frames_used": used, "frames_dropped": outcome.numbers.get("frames_dropped"),
                     "defects_in_store": len(defect_ids),
                     "defects_used": len(defect_ids & set(outcome.numbers.get("used_ids") or ())),
                     "threshold": outcome.numbers.get("threshold"),
                     "check": outcome.numbers.get("check")})
    if not outcome.committed:
        return scorer
    scorer.close()
    return Scorer(load_product(calib, PRODUCT, engines), backend=backend, threads=threads)


def summarise_stream(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over shot sets of each phase's numbers."""
    out: dict[str, Any] = {"dataset": runs[0]["dataset"], "shot_sets": len(runs), "contamination": runs[0]["contamination"],
                           "single_type": runs[0]["single_type"]}
    for phase in ("start", "after", "ceiling", "floor"):
        if not all(phase in r for r in runs):
            continue
        out[phase] = {}
        for key in PHASE_KEYS:
            values = [r[phase][key] for r in runs if r[phase].get(key) is not None]
            out[phase][key] = round(float(np.mean(values)), 4) if values else None
    out["defects_as_candidates"] = sum(r["stream"]["defects_as_candidates"] for r in runs)
    out["defects"] = sum(r["stream"]["defects"] for r in runs)
    out["refits"] = sum(r["stream"]["refits"] for r in runs)
    out["committed"] = sum(r["stream"]["committed"] for r in runs)
    out["runs"] = runs
    return out


def evaluate_stream_many(roots: Sequence[Path], shots: int, shot_sets: int, **kwargs: Any) -> dict[str, Any]:
    """Every set's stream summary (means over its shot sets) and the mean over the sets; `stream` holds the
    means of the start, after and ceiling phases (image AUROC, F1, false rejects, misses)."""
    if shot_sets < 1:
        raise UserError("--shot-sets must be at least 1")
    results = [summarise_stream([evaluate_stream(root, shots, k, **kwargs) for k in range(shot_sets)]) for root in roots]
    mean: dict[str, Any] = {}
    for phase in ("start", "after", "ceiling", "floor"):
        if all(phase in r for r in results):
            mean[phase] = {}
            for key in PHASE_KEYS:
                values = [r[phase][key] for r in results if r[phase].get(key) is not None]
                mean[phase][key] = round(float(np.mean(values)), 4) if values else None
    mean["sets_below_start"] = sum(r["after"]["image_auroc"] < r["start"]["image_auroc"] for r in results)
    stream = {phase: {k: mean[phase][k] for k in ("image_auroc", "f1", "false_reject_rate", "miss_rate")}
              for phase in ("start", "after", "ceiling") if phase in mean}
    return {"shots": shots, "shot_sets": shot_sets, "contamination": kwargs.get("contamination", 0.1),
            "single_type": kwargs.get("single_type", False), "datasets": results, "mean": mean, "stream": stream}
