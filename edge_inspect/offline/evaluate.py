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

from ..errors import UserError
from ..imageio import read_bgr
from ..scorer.calibrate import CalibrationOptions, calibrate_product, ensure_backbone
from ..scorer.product import Scorer
from .metrics import auroc, best_f1, binary_counts, f1_score
from .mvtec import load_dataset, read_mask

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
) -> dict[str, Any]:
    """Calibrate on shot set `shot_set` (train/good images shot_set*N .. shot_set*N+N-1, in name order)
    and score every other train/good image plus test/*."""


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
        labels, scores, latencies = [], [], []
        pixel_scores, pixel_labels = [], []
        scored: list[ScoredItem] = []
        for path, defect_type, test_item in tqdm(items, desc="evaluate", disable=not progress, leave=False, dynamic_ncols=True):
            bgr = read_bgr(path)
            t0 = time.perf_counter()
            result = scorer.score(bgr)
            latencies.append((time.perf_counter() - t0) * 1000.0)
            labels.append(defect_type != "good")
            scores.append(result.score)
            scored.append(ScoredItem(path, defect_type, result.score))
            if test_item is not None:
                mask = read_mask(test_item, bgr.shape[:2])
                if product.roi:
                    x, y, w, h = product.roi
                    mask = mask[y : y + h, x : x + w]
                mask = cv2.resize(mask.astype(np.uint8), result.anomaly_map.shape[::-1], interpolation=cv2.INTER_NEAREST).astype(bool)
                # Subsample pixels of every image on a fixed grid to bound memory on big sets.
                pixel_scores.append(result.anomaly_map[::2, ::2].ravel())
                pixel_labels.append(mask[::2, ::2].ravel())
        scorer.close()
        evidence = json.loads((product.directory / "threshold.json").read_text())["evidence"]
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
        "pixel_auroc": round(auroc(np.concatenate(pixel_labels), np.concatenate(pixel_scores)), 4) if pixel_labels else None,
        "f1": round(f1_score(labels_a, predicted), 4),
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
    return result


SUMMARISED = ("image_auroc", "pixel_auroc", "f1", "false_reject_rate", "miss_rate", "best_f1", "threshold", "calibration_s")


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
    summary["p50_ms"] = max(r["p50_ms"] for r in runs)
    summary["p99_ms"] = max(r["p99_ms"] for r in runs)
    summary["n_good"] = runs[0]["n_good"]
    summary["n_defect"] = runs[0]["n_defect"]
    summary["runs"] = runs
    return summary
