"""Few-shot evaluation on any MVTec-AD-layout folder: calibrate on the first N train/good images,
score the rest of train/good plus test/*, report detection and localisation quality and latency.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from ..calibration.artifacts import ensure_backbone
from ..calibration.calibrate import REFIT_EVIDENCE, calibrate_product, refit_product
from ..calibration.fit import CalibrationOptions
from ..calibration.store import GoodImage, product_lock
from ..errors import UserError
from ..imageio import crop_roi, read_bgr
from ..localize import find_regions, grid_cells_touched
from ..scorer.product import Scorer, load_product
from .datasets.mvtec import load_dataset, read_mask
from .metrics import auroc, best_f1, binary_counts, f1_score
from .anomalib_floor import NAME as FLOOR_NAME
from .anomalib_floor import AnomalibPatchCore

log = logging.getLogger(__name__)


@dataclass
class ScoredItem:
    path: Path
    defect_type: str  # "good" for good parts
    score: float


def evaluate_dataset(
    root: str | Path,
    shots: int = 4,
    options: CalibrationOptions | None = None,
    engines_dir: str | Path = "engines",
    backend: str = "onnxruntime",
    threads: int = 0,
    progress: bool = True,
    max_test: int | None = None,
    work_dir: str | Path | None = None,
    shot_set: int = 0,
    floor: bool = True,
    feedback: int = 0,
    feedback_evidence: str = REFIT_EVIDENCE,
) -> dict[str, Any]:
    """Calibrate on shot set `shot_set` (train/good images shot_set*N .. shot_set*N+N-1, in name order)
    and score every other train/good image plus test/*. With `floor`, anomalib's own PatchCore on the same
    weights (offline/anomalib_floor.py: code this project did not write) is fitted on the same shots and
    scores the same images, so the result carries its AUROCs and the ratio beside the scorer's (`floor`).

    feedback K: then an operator overrules the first K false rejects of the test stream (shuffled with
    the shot set as seed), each a refit as on the line (scorer/calibrate.refit_product); the result's
    `feedback` block has false-reject and miss rates before and after on the parts not overruled."""


    dataset = load_dataset(root)
    needed = (shot_set + 1) * shots + 1
    if len(dataset.train_good) < needed:
        what = f"--shots {shots}" if shot_set == 0 else f"--shots {shots} with {shot_set + 1} shot sets"
        raise UserError(f"{root}: {len(dataset.train_good)} train/good images; {what} needs at least {needed}")
    first = shot_set * shots
    shots_paths = dataset.train_good[first : first + shots]
    held_out = dataset.train_good[:first] + dataset.train_good[first + shots :]
    items = [(p, "good", None) for p in held_out] + [(t.path, t.defect_type, t) for t in dataset.test]
    if max_test:
        items = items[:max_test]
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        calib_dir = Path(tmp) / "calibration"
        engines = Path(tmp) / "engines"
        engines.mkdir()
        shared_backbone = Path(engines_dir) / "backbone"

        ensure_backbone(engines_dir)
        (engines / "backbone").symlink_to(shared_backbone.resolve(), target_is_directory=True)
        started = time.perf_counter()
        product = calibrate_product(shots_paths, "eval", calib_dir, engines, options, progress=progress, threads=threads)
        calibration_s = time.perf_counter() - started
        scorer = Scorer(product, backend=backend, threads=threads)
        plain = None
        if floor:
            plain = AnomalibPatchCore(threads)
            plain.fit([crop_roi(read_bgr(p), product.roi) for p in shots_paths])
        labels, scores, latencies = [], [], []
        pixel_scores, pixel_labels = [], []
        ref_scores, ref_pixel_scores = [], []
        localised: list[bool] = []  # per flagged defective part with a mask: reported cells overlap the truth
        scored: list[ScoredItem] = []
        for path, defect_type, test_item in tqdm(items, desc="evaluate", disable=not progress, leave=False, dynamic_ncols=True):
            bgr = read_bgr(path)
            t0 = time.perf_counter()
            result = scorer.score(bgr)
            latencies.append((time.perf_counter() - t0) * 1000.0)
            labels.append(defect_type != "good")
            scores.append(result.score)
            scored.append(ScoredItem(path, defect_type, result.score))
            ref_map = None
            if plain is not None:
                ref_score, ref_map = plain.score(crop_roi(bgr, product.roi))
                ref_scores.append(ref_score)
            if test_item is not None and test_item.has_pixel_truth:
                mask = read_mask(test_item, bgr.shape[:2])
                if product.roi:
                    x, y, w, h = product.roi
                    mask = mask[y : y + h, x : x + w]
                mask = cv2.resize(mask.astype(np.uint8), result.anomaly_map.shape[::-1], interpolation=cv2.INTER_NEAREST).astype(bool)
                # Subsample pixels of every image on a fixed grid to bound memory on big sets.
                pixel_scores.append(result.anomaly_map[::2, ::2].ravel())
                pixel_labels.append(mask[::2, ::2].ravel())
                if ref_map is not None:
                    ref_pixel_scores.append(cv2.resize(ref_map, mask.shape[::-1], interpolation=cv2.INTER_LINEAR)[::2, ::2].ravel())
                if not test_item.is_good and mask.any() and result.score >= product.threshold:
                    cells = {w for r in find_regions(result.anomaly_map, product.threshold) for w in r.grid_words}
                    localised.append(bool(cells & grid_cells_touched(mask)))
        scorer.close()
        evidence = json.loads((product.directory / "threshold.json").read_text())["evidence"]
        feedback_result = None
        if feedback:
            feedback_result = simulate_feedback(
                calib_dir, engines, "eval", items, scores, product.threshold, feedback, seed=shot_set,
                backend=backend, threads=threads, evidence_from=feedback_evidence, progress=progress,
            )
    labels_a, scores_a = np.array(labels), np.array(scores)
    threshold = product.threshold
    predicted = scores_a >= threshold
    counts = binary_counts(labels_a, predicted)
    n_good, n_defect = int((~labels_a).sum()), int(labels_a.sum())
    oracle_f1, oracle_t = best_f1(labels_a, scores_a)
    per_type = {}
    for t in sorted({s.defect_type for s in scored}):
        sel = np.array([s.defect_type == t for s in scored])
        per_type[t] = {"n": int(sel.sum()), "flagged": round(float(predicted[sel].mean()), 4)}
    result = {
        "dataset": str(root),
        "shots": shots,
        "shot_set": shot_set,
        "shot_images": [p.name for p in shots_paths],
        "image_auroc": round(auroc(labels_a, scores_a), 4),
        "pixel_auroc": _pixel_auroc(pixel_labels, pixel_scores),
        "f1": round(f1_score(labels_a, predicted), 4),
        # MMAD's two questions, at the automatic threshold: is the part defective (accuracy over all
        # parts), and, for the defective parts flagged, do the reported 3x3 cells overlap the truth.
        "detection_accuracy": round(float((predicted == labels_a).mean()), 4),
        "localisation_accuracy": round(float(np.mean(localised)), 4) if localised else None,
        "localised_parts": len(localised),
        "false_reject_rate": round(counts["fp"] / max(n_good, 1), 4),
        "miss_rate": round(counts["fn"] / max(n_defect, 1), 4),
        "threshold": round(threshold, 5),
        "best_f1": round(oracle_f1, 4),
        "best_f1_threshold": round(oracle_t, 5),
        "p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "p99_ms": round(float(np.percentile(latencies, 99)), 2),
        "n_good": n_good,
        "n_defect": n_defect,
        "calibration_s": round(calibration_s, 2),
        "per_type": per_type,
        "counts": counts,
        "good_scores": {
            "max": round(float(scores_a[~labels_a].max()), 5) if n_good else None,
            "p95": round(float(np.percentile(scores_a[~labels_a], 95)), 5) if n_good else None,
            "median": round(float(np.median(scores_a[~labels_a])), 5) if n_good else None,
        },
        "defect_score_median": round(float(np.median(scores_a[labels_a])), 5) if n_defect else None,
        "threshold_evidence": evidence,
    }
    if feedback_result is not None:
        result["feedback"] = feedback_result
    if plain is not None:
        result["floor"] = _with_ratios(result, {
            "name": FLOOR_NAME,
            "image_auroc": round(auroc(labels_a, np.array(ref_scores)), 4),
            "pixel_auroc": _pixel_auroc(pixel_labels, ref_pixel_scores),
        })
    return result


def _with_ratios(result: dict[str, Any], floor: dict[str, Any]) -> dict[str, Any]:
    """The floor's block with the scorer / floor ratios of image and pixel AUROC."""
    for key in FLOOR_KEYS:
        mine, theirs = result.get(key), floor.get(key)
        floor[f"{key}_ratio"] = round(mine / theirs, 4) if mine is not None and theirs else None
    return floor


def _rates(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    predicted = scores >= threshold
    good, bad = ~labels, labels
    return {
        "false_reject_rate": round(float(predicted[good].mean()) if good.any() else 0.0, 4),
        "miss_rate": round(float((~predicted[bad]).mean()) if bad.any() else 0.0, 4),
        "false_rejects": int(predicted[good].sum()),
        "misses": int((~predicted[bad]).sum()),
        "threshold": round(float(threshold), 5),
    }


def simulate_feedback(
    calib_dir: Path,
    engines: Path,
    product_name: str,
    items: list[tuple[Path, str, Any]],
    scores_before: list[float],
    threshold_before: float,
    k: int,
    seed: int = 0,
    backend: str = "onnxruntime",
    threads: int = 0,
    evidence_from: str = REFIT_EVIDENCE,
    progress: bool = False,
) -> dict[str, Any]:
    """An operator on the line: the stream is `items` in a seeded order; each false reject (a good part
    flagged) is overruled as ok, up to k, each one a refit and a scorer swap as in the daemon. Before and
    after are measured on the same parts: every item except the overruled ones (they are in the bank)."""
    order = np.random.default_rng(1000 + seed).permutation(len(items))
    product = load_product(calib_dir, product_name, engines)
    scorer = Scorer(product, backend=backend, threads=threads)
    overruled: list[int] = []
    refit_s: list[float] = []
    try:
        for index in tqdm(order, desc="feedback stream", disable=not progress, leave=False, dynamic_ncols=True):
            if len(overruled) >= k:
                break
            path, defect_type, _item = items[index]
            if defect_type != "good":
                continue
            bgr = read_bgr(path)
            if scorer.score(bgr).score < scorer.product.threshold:
                continue
            started = time.perf_counter()
            with product_lock(calib_dir, product_name):
                refit_product(
                    calib_dir, product_name, engines,
                    add=[GoodImage(crop_roi(bgr, scorer.product.roi), str(path), "feedback", f"eval-{index}")],
                    change={"change": "feedback_ok", "by": "evaluate --feedback", "why": f"false reject {path.name}"},
                    threads=threads, evidence_from=evidence_from, keep=k + 2,
                )
            scorer.close()
            scorer = Scorer(load_product(calib_dir, product_name, engines), backend=backend, threads=threads)
            refit_s.append(time.perf_counter() - started)
            overruled.append(int(index))
        kept = [i for i in range(len(items)) if i not in set(overruled)]
        labels = np.array([items[i][1] != "good" for i in kept])
        before = np.array([scores_before[i] for i in kept])
        after = np.array([scorer.score(read_bgr(items[i][0])).score for i in kept]) if overruled else before
        threshold_after = scorer.product.threshold
    finally:
        scorer.close()
    return {
        "k": k,
        "overruled": len(overruled),
        "overruled_images": [items[i][0].name for i in overruled],
        "evidence_from": evidence_from,
        "parts": len(kept),
        "before": _rates(labels, before, threshold_before),
        "after": _rates(labels, after, threshold_after),
        "refit_s_mean": round(float(np.mean(refit_s)), 2) if refit_s else None,
    }


def merge_feedback(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """Feedback results of several runs (or sets) together: counts summed, rates the mean of the runs' rates."""
    out: dict[str, Any] = {"k": blocks[0]["k"], "evidence_from": blocks[0]["evidence_from"], "runs": len(blocks),
                           "overruled": sum(b["overruled"] for b in blocks)}
    for when in ("before", "after"):
        fr = sum(b[when]["false_rejects"] for b in blocks)
        misses = sum(b[when]["misses"] for b in blocks)
        out[when] = {"false_rejects": fr, "misses": misses,
                     # mean of the runs' rates (each run: the same parts before and after)
                     "false_reject_rate": round(float(np.mean([b[when]["false_reject_rate"] for b in blocks])), 4),
                     "miss_rate": round(float(np.mean([b[when]["miss_rate"] for b in blocks])), 4)}
    return out


def _pixel_auroc(labels: list[np.ndarray], scores: list[np.ndarray]) -> float | None:
    """None where the set has no defect pixels to find (image-level labels only, e.g. ELPV)."""
    if not labels or not any(l.any() for l in labels):
        return None
    return round(auroc(np.concatenate(labels), np.concatenate(scores)), 4)


SUMMARISED = (
    "image_auroc", "pixel_auroc", "f1", "false_reject_rate", "miss_rate", "detection_accuracy", "localisation_accuracy",
    "best_f1", "threshold", "calibration_s",
)
FLOOR_KEYS = ("image_auroc", "pixel_auroc")


def evaluate_shot_sets(root: str | Path, shots: int, sets: int, **kwargs) -> dict[str, Any]:
    """Evaluate `sets` disjoint shot sets in turn and summarise them.

    Why: with four shots the result depends on which four good images they are (image AUROC moved by
    up to 0.09 between shot sets of one dataset), so one run can mislead a comparison. The summary keeps
    the single-run keys (as means; latency as the worst run's) and adds each key's min/max and every
    run in `runs`.
    """
    if sets < 1:
        raise UserError("--shot-sets must be at least 1")
    runs = [evaluate_dataset(root, shots, shot_set=k, **kwargs) for k in range(sets)]
    if sets == 1:
        return runs[0]
    summary: dict[str, Any] = {"dataset": str(root), "shots": shots, "shot_sets": sets}
    for key in SUMMARISED:
        values = [r[key] for r in runs if r[key] is not None]
        summary[key] = round(float(np.mean(values)), 5) if values else None
        summary[f"{key}_min"] = min(values) if values else None
        summary[f"{key}_max"] = max(values) if values else None
    if all("floor" in r for r in runs):
        summary["floor"] = {"name": runs[0]["floor"]["name"]}
        for key in FLOOR_KEYS:
            values = [r["floor"][key] for r in runs if r["floor"][key] is not None]
            summary["floor"][key] = round(float(np.mean(values)), 5) if values else None
        _with_ratios(summary, summary["floor"])
    if all("feedback" in r for r in runs):
        summary["feedback"] = merge_feedback([r["feedback"] for r in runs])
    summary["p50_ms"] = max(r["p50_ms"] for r in runs)
    summary["p99_ms"] = max(r["p99_ms"] for r in runs)
    summary["n_good"] = runs[0]["n_good"]
    summary["n_defect"] = runs[0]["n_defect"]
    summary["runs"] = runs
    return summary


def dataset_roots(paths: list[str | Path]) -> list[Path]:
    """Each path is one MVTec-layout set (it has train/) or a folder of such sets (its subfolders
    that have train/, in name order)."""
    roots: list[Path] = []
    for text in paths:
        path = Path(text)
        if (path / "train").is_dir():
            roots.append(path)
            continue
        children = sorted(c for c in path.iterdir() if (c / "train").is_dir()) if path.is_dir() else []
        if not children:
            raise UserError(f"{path}: neither an MVTec-layout set (no train/ folder) nor a folder of such sets")
        roots += children
    names = [r.name for r in roots]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"two sets are both named {duplicates[0]!r}: rename one so the table rows can be told apart")
    return roots


MEAN_KEYS = ("image_auroc", "pixel_auroc", "f1", "false_reject_rate", "miss_rate", "detection_accuracy", "localisation_accuracy")


def evaluate_many(roots: list[Path], shots: int, sets: int, **kwargs) -> dict[str, Any]:
    """One result per set (as evaluate_shot_sets) and their mean, the floor's mean beside it.

    A mean skips sets where a metric does not exist (no masks: no pixel AUROC), and says how many it
    averaged."""
    results = [evaluate_shot_sets(root, shots, sets, **kwargs) for root in roots]
    mean: dict[str, Any] = {}
    for key in MEAN_KEYS:
        values = [r[key] for r in results if r.get(key) is not None]
        mean[key] = round(float(np.mean(values)), 4) if values else None
        mean[f"{key}_sets"] = len(values)
    if all("floor" in r for r in results):
        mean["floor"] = {"name": results[0]["floor"]["name"]}
        for key in FLOOR_KEYS:
            values = [r["floor"][key] for r in results if r["floor"][key] is not None]
            mean["floor"][key] = round(float(np.mean(values)), 4) if values else None
        _with_ratios(mean, mean["floor"])
        mean["sets_at_or_above_floor"] = sum(r["image_auroc"] >= r["floor"]["image_auroc"] for r in results)
        with_masks = [r for r in results if r["pixel_auroc"] is not None and r["floor"]["pixel_auroc"] is not None]
        mean["sets_at_or_above_floor_pixel"] = sum(r["pixel_auroc"] >= r["floor"]["pixel_auroc"] for r in with_masks)
        mean["sets_with_masks"] = len(with_masks)
    if all("feedback" in r for r in results):
        mean["feedback"] = merge_feedback([r["feedback"] for r in results])
    return {"shots": shots, "shot_sets": sets, "datasets": results, "mean": mean}
