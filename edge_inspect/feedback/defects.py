"""Labelled defects: frames operators confirmed as ng, kept per product, and what they say about the threshold.

    calibration/<product>/defects/<inspection_id>.png   the ROI-cropped view the scorer saw (lossless)
    calibration/<product>/defects/defects.jsonl         one line each: inspection_id, defect_type, operator,
                                                        note, score, threshold, calibration_version, received_utc

Why: the automatic threshold is set from good parts only (scorer/threshold.py). With a few real defects the
evidence can say how many of them a version catches, per defect type, and at what precision against the
good parts' leave-one-out scores. The defects are scored with each version's own graph, so the report of
a new version is measured, not carried over.

Example:
    store = DefectStore(calibration_dir, "bracket-a")
    store.add(inspection_id, crop_bgr, {"defect_type": "scratch", ...})
    scores = DefectScorer().scores(product, store)              # {"scratch": [3.1, 2.7], ...}
    labelled_defect_report(scores, good_loo_scores(product), product.threshold)
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from ..files import write_atomic
from ..scorer.layout import product_dir
from ..scorer.product import ProductCalibration, Scorer
from .ledger import append_jsonl, read_jsonl

log = logging.getLogger(__name__)

DEFECTS_DIR = "defects"
DEFECTS_FILE = "defects.jsonl"
UNSPECIFIED = "unspecified"  # the defect type of an ng without one


class DefectStore:
    """The labelled defects of one product. Writers hold versions.product_lock."""

    def __init__(self, calibration_dir: str | Path, product: str):
        self.product = product
        self.folder = product_dir(calibration_dir, product) / DEFECTS_DIR

    def image_path(self, inspection_id: str) -> Path:
        return self.folder / f"{inspection_id}.png"

    def entries(self) -> list[dict[str, Any]]:
        """One entry per inspection id (the first), only those whose image is still there."""
        seen: dict[str, dict[str, Any]] = {}
        for entry in read_jsonl(self.folder / DEFECTS_FILE):
            inspection_id = entry.get("inspection_id")
            if isinstance(inspection_id, str) and inspection_id not in seen and self.image_path(inspection_id).is_file():
                seen[inspection_id] = entry
        return list(seen.values())

    def find(self, inspection_id: str) -> dict[str, Any] | None:
        return next((e for e in self.entries() if e.get("inspection_id") == inspection_id), None)

    def add(self, inspection_id: str, crop_bgr: np.ndarray, entry: dict[str, Any]) -> None:
        """The image first (written whole, then renamed), then its line: a line always has its image."""
        self.folder.mkdir(parents=True, exist_ok=True)
        ok, png = cv2.imencode(".png", crop_bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
        if not ok:
            raise ValueError(f"could not encode the frame of {inspection_id} (shape {np.shape(crop_bgr)}) as PNG")
        write_atomic(self.image_path(inspection_id), png.tobytes())
        append_jsonl(self.folder / DEFECTS_FILE, {"inspection_id": inspection_id, **entry})


def labelled_defect_report(
    defect_scores_by_type: dict[str, list[float]], good_loo_scores: Sequence[float], threshold: float
) -> dict[str, Any]:
    """Recall and precision of a threshold on labelled defects, per defect type and overall.

    A defect is detected when its score is at or above the threshold (the scorer's NG rule). False positives
    are the good leave-one-out scores at or above it; each type's precision is TP_type / (TP_type + FP), so
    it says how clean an alarm for that type would be on the good parts seen. recall / precision are None
    when undefined (no defects of a type; nothing flagged at all)."""
    threshold = float(threshold)
    false_positives = sum(1 for s in good_loo_scores if float(s) >= threshold)

    def counts(scores: Sequence[float]) -> dict[str, Any]:
        detected = sum(1 for s in scores if float(s) >= threshold)
        return {
            "n": len(scores),
            "detected": detected,
            "recall": round(detected / len(scores), 4) if scores else None,
            "precision": round(detected / (detected + false_positives), 4) if detected + false_positives else None,
        }

    types = {name: counts(list(scores)) for name, scores in sorted(defect_scores_by_type.items())}
    every = [s for scores in defect_scores_by_type.values() for s in scores]
    return {
        "threshold": round(threshold, 6),
        "good_scores": len(good_loo_scores),
        "false_positives": false_positives,
        "types": types,
        "overall": counts(every),
    }


def good_loo_scores(product: ProductCalibration) -> list[float]:
    """The good parts' leave-one-out scores of a version (threshold.json evidence: loo_scores + view_scores)."""
    try:
        evidence = json.loads((product.directory / "threshold.json").read_text(encoding="utf-8")).get("evidence") or {}
    except (OSError, ValueError, AttributeError):
        return []
    return [float(s) for key in ("loo_scores", "view_scores") for s in evidence.get(key) or ()]


class DefectScorer:
    """Scores a product's labelled defects with one version's graph, on its own ONNX Runtime session (one
    thread: never a pipeline's scorer, which is not thread-safe and must not be slowed). Scores are cached
    per version and inspection id, so a report after every feedback costs only the new defects."""

    def __init__(self, threads: int = 1):
        self.threads = threads
        self._cache: dict[str, tuple[tuple[str, str], dict[str, float]]] = {}  # product -> (version key, id -> score)

    def scores(self, product: ProductCalibration, store: DefectStore) -> dict[str, list[float]]:
        entries = store.entries()
        key = (product.calibration_id, str(product.version))
        cached = self._cache.get(product.name)
        if cached is None or cached[0] != key:  # a new version scores every defect again
            cached = self._cache[product.name] = (key, {})
        known = cached[1]
        todo = [e for e in entries if e["inspection_id"] not in known]
        if todo:
            # The stored images are ROI-cropped already: score them without cropping again.
            scorer = Scorer(dataclasses.replace(product, roi=None), backend="onnxruntime", threads=self.threads)
            try:
                for entry in todo:
                    bgr = cv2.imread(str(store.image_path(entry["inspection_id"])), cv2.IMREAD_COLOR)
                    if bgr is None:
                        log.warning("labelled defect %s of %s cannot be read; left out of the report",
                                    entry["inspection_id"], product.name)
                        continue
                    known[entry["inspection_id"]] = float(scorer.score(bgr).score)
            finally:
                scorer.close()
        out: dict[str, list[float]] = {}
        for entry in entries:
            score = known.get(entry["inspection_id"])
            if score is not None:
                out.setdefault(str(entry.get("defect_type") or UNSPECIFIED), []).append(score)
        return out

    def report(self, product: ProductCalibration, store: DefectStore) -> dict[str, Any] | None:
        """The labelled-defect report of a version, None when the product has no labelled defect."""
        scores = self.scores(product, store)
        if not scores:
            return None
        return {"calibration_version": product.version,
                **labelled_defect_report(scores, good_loo_scores(product), product.threshold)}


def record_report(version_dir: Path, report: dict[str, Any]) -> None:
    """Add the labelled-defect report to a version's threshold evidence (threshold.json "labelled_defects"),
    rewritten whole and renamed, so a reader sees the old file or the new one."""
    path = Path(version_dir) / "threshold.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc.setdefault("evidence", {})["labelled_defects"] = report
    write_atomic(path, json.dumps(doc, indent=1))
