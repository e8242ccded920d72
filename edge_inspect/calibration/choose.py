"""Choosing a product's views from its good parts alone (`calibrate --augment auto`).

The views in the bank (hflip, vflip, rot90) suit parts that really appear flipped or turned on the line
(tiles, cells, fabric) and hide defects that are a mirror image of a good part. `auto` measures, for each
candidate, how far realistic synthetic defects painted into the shots (calibration/defects.py: scratch,
crack, hole, stain, foreign material, missing material, colour) stand from the good parts' leave-one-out
and nuisance-view scores (AUROC of the two), and takes the best; a tie keeps the first candidate.

Measured on the real sets (docs/scorer.md): this choice lost to the fixed default (flips, 0.818 mean
image AUROC) at 0.812; the synthetic separation ranked candidates like the real tests on the solar
cells but not on the tiles or the spindles. So `auto` is offered, with its evidence in the manifest,
and the default is fixed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import cv2
import numpy as np

from ..scorer.anomaly_map import score_patches
from ..scorer.features import FeatureExtractor
from ..scorer.memory_bank import features_to_patches
from ..scorer.params import ScorerParams
from .defects import DEFECT_KINDS, inject_defect
from .fit import (
    feature_transform,
    good_features,
    leave_one_out_banks,
    leave_one_out_scores,
)

CANDIDATES: tuple[tuple[str, ...], ...] = (("hflip", "vflip"), ())  # the default first: it wins ties
RULE = "AUROC of the good parts' leave-one-out and nuisance-view scores against painted synthetic defects"


def _auroc(good: Sequence[float], bad: Sequence[float]) -> float:
    """P(a defect scores above a good part), ties half (Mann-Whitney)."""
    g, b = np.asarray(good, np.float64), np.asarray(bad, np.float64)
    return float(((b[:, None] > g[None, :]).sum() + 0.5 * (b[:, None] == g[None, :]).sum()) / (g.size * b.size))


def painted_defects(images: Sequence[np.ndarray], size: tuple[int, int], seed: int) -> list[list[np.ndarray]]:
    """For each shot, one defect of every kind painted into it (at the scorer's input size), made once so
    every candidate is judged on the same defects."""
    resized = [cv2.resize(b, (size[1], size[0]), interpolation=cv2.INTER_AREA) for b in images]
    out = []
    for i, base in enumerate(resized):
        rng = np.random.default_rng([seed, i])
        donors = [b for j, b in enumerate(resized) if j != i] or [base]
        made = []
        for k, kind in enumerate(DEFECT_KINDS):
            try:
                made.append(inject_defect(base, rng, kind, donor=donors[k % len(donors)])[0])
            except ValueError:  # too little contrast for that kind
                continue
        out.append(made)
    return out


def separation(images: Sequence[np.ndarray], extractor: FeatureExtractor, params: ScorerParams, augment: Sequence[str],
               defects: Sequence[Sequence[np.ndarray]], seed: int) -> dict[str, Any]:
    per_image, own, _ = good_features(images, extractor, augment, np.random.default_rng(seed), lambda: None)
    transform = feature_transform(params)
    own = [transform(f) for f in own]
    patches = [features_to_patches(transform(p)) for p in per_image]
    others_of = leave_one_out_banks(patches, len(images))
    loo, views = leave_one_out_scores(own, images, others_of, extractor, transform, params, lambda: None)
    bad = [score_patches(transform(extractor(d)[0]), others_of[i], params)[0] for i, shot in enumerate(defects) for d in shot]
    good = loo + views
    value = _auroc(good, bad) if bad else 0.5
    return {"separation": round(float(value), 4), "good_scores": len(good), "defects": len(bad)}


def choose_views(images: Sequence[np.ndarray], folded: dict[str, np.ndarray], params: ScorerParams, seed: int = 0,
                 threads: int = 0, candidates: Sequence[tuple[str, ...]] = CANDIDATES) -> tuple[tuple[str, ...], dict[str, Any]]:
    """(the views with the best separation, the evidence for the manifest)."""
    extractor = FeatureExtractor(folded, dataclasses.replace(params, layer_scales=(), projection_dim=0), threads)
    defects = painted_defects(images, params.input_size, seed)
    measured = {",".join(c) or "none": separation(images, extractor, params, c, defects, seed) for c in candidates}
    best = max(range(len(candidates)), key=lambda i: (measured[",".join(candidates[i]) or "none"]["separation"], -i))
    return tuple(candidates[best]), {"rule": RULE, "candidates": measured, "chosen": ",".join(candidates[best]) or "none"}
