"""Fitting a product from its good images, as named steps over arrays (no files, no versions).

    features -> (layer scales, projection) -> memory bank (greedy coreset of every good patch)
    -> leave-one-out and nuisance-view scores (how a new good part will score)
    -> synthetic-anomaly scores (how a flaw would score) -> automatic threshold

Each step is a function of its inputs; `fit_calibration` runs them in order with one progress bar.
Writing the result is calibration/calibrate.py's job.

    fitted = fit_calibration(images, folded, CalibrationOptions())
    fitted.bank, fitted.threshold, fitted.evidence
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from ..errors import CalibrationError
from ..scorer.anomaly_map import score_many, score_patches
from ..scorer.backbone import tap_channels
from ..scorer.features import FeatureExtractor
from ..scorer.memory_bank import features_to_patches, greedy_coreset, nearest_distances
from ..scorer.params import ScorerParams, projection_matrix
from .defects import synthetic_anomaly
from .threshold import DEFAULT_FALSE_REJECT_RATE, automatic_threshold
from .views import (
    DEFAULT_AUGMENT,
    NUISANCE,
    NUISANCE_SAMPLES,
    augmented,
    nuisance_views,
)

log = logging.getLogger(__name__)

MIN_IMAGES = 2


@dataclass(frozen=True)
class CalibrationOptions:
    params: ScorerParams = field(default_factory=ScorerParams)
    roi: tuple[int, int, int, int] | None = None
    augment: tuple[str, ...] = DEFAULT_AUGMENT
    # Most patches kept; beyond it the greedy coreset picks them. 4096 holds every patch of 4 shots at
    # 256 x 256 (a full bank is what few shots want); more shots or pixels are thinned to bound the kNN cost.
    bank_size: int = 4096
    # Divide each tapped layer by its mean patch norm. Helped on generated textures, not on real parts.
    layer_scales: bool = False
    false_reject_rate: float = DEFAULT_FALSE_REJECT_RATE  # the one threshold knob (threshold.py)
    synthetic_per_image: int = 2
    seed: int = 0


@dataclass
class Fitted:
    """A calibration fitted in memory: what a version's files are written from."""

    params: ScorerParams
    bank: np.ndarray
    from_patches: int
    threshold: float
    evidence: dict[str, Any]
    embeddings: np.ndarray  # [N, E], L2-normalised: the good references' retrieval keys
    seconds: float


def layer_channels(params: ScorerParams) -> list[int]:
    return [tap_channels(t) for t in params.taps]


def with_layer_scales(params: ScorerParams, features: np.ndarray) -> ScorerParams:
    """Per tapped layer 1 / (mean L2 norm of its patch features) over the good images [N, D, h, w]
    (raw, unprojected features)."""
    scales, start = [], 0
    for c in layer_channels(params):
        norms = np.sqrt((features[:, start : start + c].astype(np.float64) ** 2).sum(axis=1))
        scales.append(float(1.0 / max(norms.mean(), 1e-6)))
        start += c
    return dataclasses.replace(params, layer_scales=tuple(scales))


def channel_scales(params: ScorerParams) -> np.ndarray:
    """The layer scales expanded to one factor per feature channel."""
    return np.concatenate([np.full(c, s, np.float32) for c, s in zip(layer_channels(params), params.layer_scales)])


def feature_transform(params: ScorerParams) -> Callable[[np.ndarray], np.ndarray]:
    """Raw features [..., D, h, w] -> what the scorer graph compares: layer-scaled, then projected."""
    projection = projection_matrix(params)
    if projection is None and not params.layer_scales:  # the default: the graph compares raw features
        return lambda f: np.asarray(f, np.float32)
    weights = (channel_scales(params) if params.layer_scales else np.ones(sum(layer_channels(params)), np.float32))[:, None]  # [D, 1]
    if projection is not None:
        weights = (projection * weights.T).T  # [D, P]: scale each input channel, then project
        return lambda f: np.einsum("...dhw,dp->...phw", f, weights, optimize=True).astype(np.float32)
    return lambda f: (f * weights[:, 0, None, None]).astype(np.float32)


def good_features(images: Sequence[np.ndarray], extractor: FeatureExtractor, augment: Sequence[str],
                  rng: np.random.Generator, tick: Callable[[], None]) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Raw features of each good image: ([V, D, h, w] per image with its augmented views, [D, h, w] of the
    image itself, [N, C] embeddings L2-normalised for reference retrieval)."""
    per_image: list[np.ndarray] = []
    own: list[np.ndarray] = []
    embeddings: list[np.ndarray] = []
    for bgr in images:
        feats = []
        for i, view in enumerate([bgr] + augmented(bgr, augment, rng)):
            f, e = extractor(view)
            feats.append(f)
            if i == 0:
                own.append(f)
                embeddings.append(e)
        per_image.append(np.stack(feats))
        tick()
    emb = np.stack(embeddings).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12
    return per_image, own, emb


def build_bank(per_image: Sequence[np.ndarray], bank_size: int, seed: int) -> tuple[np.ndarray, int]:
    """(bank, patches it was chosen from): every good patch, thinned by the greedy coreset beyond bank_size."""
    all_patches = np.concatenate(per_image)
    keep = greedy_coreset(all_patches, bank_size, seed=seed)
    return np.ascontiguousarray(all_patches[np.sort(keep)]), int(all_patches.shape[0])


def leave_one_out_banks(per_image: Sequence[np.ndarray], n: int) -> list[np.ndarray]:
    """For each of the first n images, the bank of every *other* image's patches."""
    return [np.concatenate([p for j, p in enumerate(per_image) if j != i]) for i in range(n)]


def leave_one_out_scores(own: Sequence[np.ndarray], images: Sequence[np.ndarray], others_of: Sequence[np.ndarray],
                         extractor: FeatureExtractor, transform: Callable[[np.ndarray], np.ndarray],
                         params: ScorerParams, tick: Callable[[], None]) -> tuple[list[float], list[float]]:
    """(leave-one-out scores, nuisance-view scores): each good image, and its shifted and re-lit views,
    against the bank of the others: how a new good part will score. One nearest-neighbour pass per image."""
    n = len(others_of)
    loo, view_scores = [], []
    views_per_image = max(1, min(len(NUISANCE), round(NUISANCE_SAMPLES / n)))
    for i in range(n):
        views = [transform(extractor(v)[0]) for v in nuisance_views(images[i], i, views_per_image)]
        scores = score_many([own[i], *views], others_of[i], params)
        loo.append(scores[0])
        view_scores += scores[1:]
        tick()
    return loo, view_scores


def synthetic_scores(images: Sequence[np.ndarray], others_of: Sequence[np.ndarray], extractor: FeatureExtractor,
                     transform: Callable[[np.ndarray], np.ndarray], params: ScorerParams, per_image: int,
                     rng: np.random.Generator, tick: Callable[[], None]) -> list[float]:
    """Synthetic anomalies in good image i, scored against the same leave-one-out bank as image i, so
    their scores compare with the good parts' leave-one-out scores like for like."""
    synthetic = []
    size_wh = (params.input_size[1], params.input_size[0])
    resized = [cv2.resize(b, size_wh, interpolation=cv2.INTER_AREA) for b in images]
    for i, base in enumerate(resized[: len(others_of)]):
        donors = [b for j, b in enumerate(resized) if j != i][:3]
        for _ in range(per_image):
            try:
                anomalous, _mask = synthetic_anomaly(base, rng, donors)
            except ValueError as exc:  # a flat image offers no structure to paste
                log.debug("no synthetic anomaly for image %d: %s", i, exc)
                tick()
                continue
            f, _ = extractor(anomalous)
            synthetic.append(score_patches(transform(f), others_of[i], params)[0])
            tick()
    return synthetic


def fit_calibration(
    images: Sequence[np.ndarray],
    folded: dict[str, np.ndarray],
    options: CalibrationOptions,
    threads: int = 0,
    progress: bool = True,
    on_step: Callable[[str], None] | None = None,
    desc: str = "calibrate",
    evidence_images: int | None = None,
    novel_only: bool = False,
) -> Fitted:
    """Memory bank, leave-one-out and nuisance-view scores, synthetic anomalies and the automatic
    threshold, for good images already ROI-cropped (the steps above, in order).

    evidence_images: only the first N images give threshold evidence (leave-one-out, views, synthetic
    anomalies); the rest only join the bank. None: all of them.
    novel_only: of the images after the first `evidence_images`, only the patches no good part shows
    join the bank (novel_patches)."""
    started = time.perf_counter()
    params = options.params
    if len(images) < MIN_IMAGES:
        raise CalibrationError(f"{len(images)} good image(s); calibration needs at least {MIN_IMAGES}")
    if novel_only and evidence_images is None:
        raise ValueError("novel_only needs evidence_images: the first N images are the reference for what is novel")
    n_evidence = len(images) if evidence_images is None else max(MIN_IMAGES, min(len(images), evidence_images))
    # Raw features (no scales, no projection): the scales are measured on them first.
    extractor = FeatureExtractor(folded, dataclasses.replace(params, layer_scales=(), projection_dim=0), threads)
    rng = np.random.default_rng(options.seed)
    bar = tqdm(total=len(images) + n_evidence * (1 + options.synthetic_per_image) + 2, desc=desc, unit="step",
               disable=not progress, leave=False, dynamic_ncols=True)
    tick = lambda: bar.update(1)  # noqa: E731
    step = on_step or (lambda _msg: None)

    step("features")
    per_image, own, embeddings = good_features(images, extractor, options.augment, rng, tick)
    if options.layer_scales:  # equalise the tapped layers' contributions; the scales go into the graph's params
        params = with_layer_scales(params, np.stack(own))
    transform = feature_transform(params)
    own = [transform(f) for f in own]
    patches = [features_to_patches(transform(p)) for p in per_image]
    if novel_only:
        patches = novel_patches(patches, n_evidence)

    step("coreset")
    bank, from_patches = build_bank(patches, options.bank_size, options.seed)
    tick()

    step("leave-one-out")
    others_of = leave_one_out_banks(patches, n_evidence)
    loo, view_scores = leave_one_out_scores(own, images, others_of, extractor, transform, params, tick)

    step("synthetic anomalies")
    synthetic = synthetic_scores(images, others_of, extractor, transform, params, options.synthetic_per_image, rng, tick)
    del others_of

    threshold, evidence = automatic_threshold(np.array(loo), np.array(synthetic), options.false_reject_rate, np.array(view_scores))
    evidence["calibration_scores"] = [round(float(score_patches(f, bank, params)[0]), 5) for f in own]
    tick()
    bar.close()
    return Fitted(params=params, bank=bank, from_patches=from_patches, threshold=float(threshold),
                  evidence=evidence, embeddings=embeddings, seconds=time.perf_counter() - started)


NOVEL_QUANTILE = 0.99  # of the shots' leave-one-out patch distances: above it a patch is new to the bank


NOVEL_MIN_SHARE = 0.01  # an accepted frame adds at least its farthest 1 % of patches


def novel_patches(per_image: list[np.ndarray], n_reference: int) -> list[np.ndarray]:
    """Patch sets [n_i, D] with images after the first `n_reference` cut to their novel patches.

    Why: an overruled false reject is mostly like the good parts; only the region that made it score
    high is new. Adding just those patches repairs that region without widening the bank everywhere
    (with whole frames added, defects that resemble any part of them started to pass on the real sets;
    docs/calibration.md). Novel = farther from the bank so far than 99 % of the shots' own
    leave-one-out patch distances, the spread good parts normally have."""
    reference = per_image[:n_reference]
    loo = [nearest_distances(p, np.concatenate([q for j, q in enumerate(reference) if j != i])) for i, p in enumerate(reference)]
    cut = float(np.quantile(np.concatenate(loo), NOVEL_QUANTILE))
    out = list(reference)
    for patches in per_image[n_reference:]:
        d = nearest_distances(patches, np.concatenate(out))
        keep = d > cut
        least = max(1, int(round(NOVEL_MIN_SHARE * len(d))))
        if keep.sum() < least:
            keep = np.zeros(len(d), bool)
            keep[np.argsort(d)[-least:]] = True
        out.append(patches[keep])
    return out
