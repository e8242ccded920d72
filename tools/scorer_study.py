"""Research harness (issue 21): the scorer's settings re-chosen on the real sets against anomalib's PatchCore,
and whether choosing them per product from good parts alone beats one fixed default.

    PY="nice -n 10 env PYTHONPATH=. .venv/bin/python tools/scorer_study.py --engines engines --cache /tmp/study-cache"
    $PY /tmp/ds/real2 --stage default --json default.json --md default.md   # (a) score, sigma, pool, ring, taps
    $PY /tmp/ds/real2 --stage views --json views.json                       # flip / rot90 views in every bank
    $PY /tmp/ds/real2 --stage select --json select.json                     # (b) per-product choice
    $PY x --stage report --json select.json                                 # (b) candidate groups re-picked
    $PY /tmp/ds/real2 --stage size --only "320 x 320" --json size.json      # (c) input size
    $PY /tmp/ds/real2/ball_screw --stage size --json size_bs.json           # (c) aspect (the one fixed-aspect set)
    $PY x --stage speed                                                     # scorer graph p50s, interleaved

A first run of all stages takes about an hour on 2 cores; later runs read the cache.

Protocol, as `edge-inspect evaluate --shots 4 --shot-sets 3` (offline/evaluate.py): for shot set k the shots
are train/good[4k:4k+4] in name order, fitted in their stored form (calibration/views.stored_good_image,
what calibration fits on); scored: every other train/good image plus test/*. Image AUROC per shot set, pixel
AUROC over the test items with pixel truth (maps at the input size, masks resized nearest, every second
pixel), rounded as evaluate rounds them, then the mean of the three shot sets.

How it is fast enough for a 2-core machine:
- Patch features come from the project's own feature graph (scorer/features.FeatureExtractor) and are cached
  per set and FeatureSpec (float16, --cache). A Config that taps a subset of a spec's taps reads its channel
  slices: the graph pools and resizes each tap on its own and only then concatenates, so a slice is exactly
  what a graph with fewer taps computes.
- Nearest-neighbour distances (memory_bank.nearest_distances's matrix-product form, optionally only over
  bank patches within r cells of the same place) are cached per shot set; the heads (bilinear map, Gaussian
  sigma, image score, border ring) then run in numpy like scorer/anomaly_map.py.
- The floor is offline/anomalib_floor.AnomalibPatchCore fitted on the same shots (read raw, as evaluate fits
  its reference) and scoring the same images; its scores and AUROCs are cached per set.

Per-product choice (--stage select): for each shot set and candidate Config, from the 4 shots alone: each
shot and its nuisance views (calibration/views.nuisance_views) against the bank of the other three shots
(the good evidence), and synthetic defects made from that shot (calibration/defects: synthetic_anomaly, the
NSA-like Poisson cut-paste, and inject_defect of every kind) against the same bank. A rule (e.g. AUROC of
good evidence vs synthetic) picks one candidate per shot set; its real test AUROC is reported beside the
fixed default's and the per-set oracle's.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")  # BLAS threads, read when numpy loads
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from edge_inspect.calibration.artifacts import load_folded  # noqa: E402
from edge_inspect.calibration.defects import DEFECT_KINDS, inject_defect, synthetic_anomaly  # noqa: E402
from edge_inspect.calibration.fit import build_bank  # noqa: E402
from edge_inspect.calibration.views import augmented, nuisance_views, stored_good_image  # noqa: E402
from edge_inspect.imageio import read_bgr  # noqa: E402
from edge_inspect.offline.datasets.mvtec import load_dataset, read_mask  # noqa: E402
from edge_inspect.offline.evaluate import dataset_roots  # noqa: E402
from edge_inspect.offline.metrics import auroc  # noqa: E402
from edge_inspect.scorer.anomaly_map import TOPK_LIMIT, gaussian_kernel_1d  # noqa: E402
from edge_inspect.scorer.backbone import tap_channels  # noqa: E402
from edge_inspect.scorer.features import FeatureExtractor  # noqa: E402
from edge_inspect.scorer.memory_bank import features_to_patches  # noqa: E402
from edge_inspect.scorer.params import ScorerParams  # noqa: E402
from edge_inspect.scorer.scorer_graph import base_stride  # noqa: E402

SHOTS = 4
SHOT_SETS = 3
SYNTHETIC_SIZE = (256, 256)  # synthetic defects are painted at the default input size, as calibration does
NSA_PER_SHOT = 3  # plus one inject_defect of every kind per shot
FLOOR_FILE = "floor.json"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- what is compared


@dataclass(frozen=True)
class FeatureSpec:
    """One feature graph: cached per set. The input area is `pixels`; with keep_aspect the sides follow a
    set's common aspect ratio (a set whose images differ in aspect stays square)."""

    name: str
    taps: tuple[str, ...] = ("block4", "block10", "block14", "block15")
    pixels: int = 256 * 256
    keep_aspect: bool = False
    pool_count_pad: bool = True
    context_pad: int = 0

    def params(self, aspect: float | None) -> ScorerParams:
        if self.keep_aspect and aspect:
            h, w = math.sqrt(self.pixels / aspect), math.sqrt(self.pixels * aspect)
        else:
            h = w = math.sqrt(self.pixels)
        size = (int(round(h / 16)) * 16, int(round(w / 16)) * 16)
        return ScorerParams(input_size=size, taps=self.taps, pool_count_pad=self.pool_count_pad,
                            context_pad=self.context_pad, score_topk=0.0)

    def key(self, aspect: float | None) -> str:
        text = json.dumps(self.params(aspect).to_json(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Head:
    """Everything after the nearest-neighbour distances.

    score: "max" (of the map), "top<f>" (mean of the top fraction f of the map, the graph's TopK cap kept),
    "pmax" / "ptop<f>" (the same over the patch distances, no map), "rw" (anomalib's reweighted max patch
    distance, num_neighbors=9). upsample: how the patch grid becomes the map. ring: the outer `ring` patch rows and columns count `ring_weight` times in
    the image score (0 = ignored); the map itself (pixel AUROC) is unchanged."""

    sigma: float = 4.0
    score: str = "top0.01"
    ring: int = 0
    ring_weight: float = 0.0
    upsample: str = "linear"  # or "nearest" (anomalib's map generator)

    @property
    def on_patches(self) -> bool:
        return self.score.startswith("p")

    @property
    def fraction(self) -> float:
        text = self.score.lstrip("p")
        return float(text[3:]) if text.startswith("top") else 0.0


@dataclass(frozen=True)
class Config:
    name: str
    feature: str = "base"
    taps: tuple[str, ...] = ("block4", "block10")
    fine: str | None = None  # a FeatureSpec with one stride-4 tap, averaged 2x2 onto the stride-8 grid and added
    augment: tuple[str, ...] = ()  # calibration/views.augmented kinds added to the bank
    radius: int | None = None  # positional kNN: only bank patches within this many cells of the same place
    head: Head = Head()
    bank_size: int | None = None  # thin the bank to this many patches by calibration's greedy coreset (None: all)

    def __post_init__(self) -> None:
        if self.bank_size and self.radius is not None:
            raise ValueError(f"{self.name}: a coreset bank keeps no patch places for a positional kNN")

    @property
    def dist_key(self) -> tuple:
        key = (self.feature, self.taps, self.fine, self.augment)
        return key + (self.bank_size,) if self.bank_size else key


FEATURES = {
    spec.name: spec
    for spec in (
        FeatureSpec("base"),
        FeatureSpec("nopad", taps=("block4", "block10"), pool_count_pad=False),
        FeatureSpec("ctx16", taps=("block4", "block10", "block14"), context_pad=16),
        FeatureSpec("ctx32", taps=("block4", "block10", "block14"), context_pad=32),
        FeatureSpec("fine", taps=("block2",)),
        # The same taps as "base": where a set has no common aspect the cached arrays are shared.
        FeatureSpec("s320", pixels=320 * 320),
        FeatureSpec("aspect256", keep_aspect=True),
        FeatureSpec("aspect320", pixels=320 * 320, keep_aspect=True),
    )
}


# --------------------------------------------------------------------------- data


@dataclass
class RealSet:
    name: str
    root: Path
    paths: list[Path]  # train/good then test/*: the row order of every feature array
    n_train: int
    labels: np.ndarray  # [N] True = defective
    truth: list  # [N] TestItem with pixel truth (evaluate's pixel AUROC set), else None
    aspect: float | None
    shapes: list[tuple[int, int]] = field(default_factory=list)
    _masks: dict = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path) -> "RealSet":
        ds = load_dataset(root)
        paths = list(ds.train_good) + [t.path for t in ds.test]
        labels = np.array([False] * len(ds.train_good) + [not t.is_good for t in ds.test])
        truth = [None] * len(ds.train_good) + [t if t.has_pixel_truth else None for t in ds.test]
        sizes = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape[:2] for p in ds.train_good]
        aspects = np.array([w / h for h, w in sizes])
        aspect = float(np.median(aspects)) if np.ptp(aspects) <= 0.02 * aspects.mean() else None
        return cls(root.name, root, paths, len(ds.train_good), labels, truth, aspect)

    def shots(self, k: int) -> list[int]:
        return list(range(k * SHOTS, (k + 1) * SHOTS))

    def items(self, k: int) -> np.ndarray:
        """Rows scored in shot set k: the other train/good images, then test/*."""
        shots = set(self.shots(k))
        return np.array([i for i in range(self.n_train) if i not in shots] + list(range(self.n_train, len(self.paths))))

    @property
    def has_masks(self) -> bool:
        return any(t is not None and t.mask_path is not None for t in self.truth)

    def masks(self, size: tuple[int, int]) -> dict[int, np.ndarray]:
        """Row -> every second pixel of its mask at the input size (evaluate's pixel AUROC sample)."""
        if size not in self._masks:
            out = {}
            for i, item in enumerate(self.truth):
                if item is not None:
                    mask = read_mask(item, self.shapes[i])
                    mask = cv2.resize(mask.astype(np.uint8), size[::-1], interpolation=cv2.INTER_NEAREST).astype(bool)
                    out[i] = mask[::2, ::2].ravel()
            self._masks[size] = out
        return self._masks[size]


class Cache:
    """Feature arrays, distances and the floor on disk, one folder per set."""

    def __init__(self, root: Path, folded: dict, threads: int) -> None:
        self.root = root
        self.folded = folded
        self.threads = threads
        self._extractors: dict = {}
        self._memory: dict = {}

    def folder(self, s: RealSet) -> Path:
        path = self.root / s.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def extractor(self, params: ScorerParams) -> FeatureExtractor:
        key = json.dumps(params.to_json(), sort_keys=True)
        if key not in self._extractors:
            self._extractors[key] = FeatureExtractor(self.folded, params, self.threads)
        return self._extractors[key]

    def _array(self, s: RealSet, spec: FeatureSpec, what: str, make) -> np.ndarray:
        """An array cached as <set>/<what>-<spec key>.npy (float16), made by make(extractor, params)."""
        key = (s.name, spec.name, what)
        if key in self._memory:
            return self._memory[key]
        path = self.folder(s) / f"{what}-{spec.key(s.aspect)}.npy"
        if not path.exists():
            params = spec.params(s.aspect)
            started = time.perf_counter()
            array = make(self.extractor(params), params)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, array)
            tmp.rename(path)
            log(f"{s.name}: {what} features of {spec.name} {params.input_size} {array.shape} in {time.perf_counter() - started:.0f} s")
        self._memory[key] = np.load(path, mmap_mode="r")
        return self._memory[key]

    def shapes(self, s: RealSet) -> None:
        path = self.folder(s) / "shapes.json"
        if not path.exists():
            path.write_text(json.dumps([list(read_bgr(p).shape[:2]) for p in s.paths]))
        s.shapes = [tuple(v) for v in json.loads(path.read_text())]

    def features(self, s: RealSet, spec: FeatureSpec) -> np.ndarray:
        """[N, D, h, w]: every image as read (the test form)."""
        def make(extractor, params):
            first = extractor(read_bgr(s.paths[0]))[0]
            out = np.empty((len(s.paths), *first.shape), np.float16)
            for i, p in enumerate(s.paths):
                out[i] = extractor(read_bgr(p))[0]
            return out
        return self._array(s, spec, "test", make)

    def stored(self, s: RealSet, spec: FeatureSpec, index: int) -> np.ndarray:
        return stored_good_image(read_bgr(s.paths[index]), spec.params(s.aspect).input_size)

    def shot_features(self, s: RealSet, spec: FeatureSpec) -> np.ndarray:
        """[S*K, D, h, w]: the shot images in their stored form (what calibration fits on)."""
        n = SHOTS * SHOT_SETS
        return self._array(s, spec, "shots", lambda ex, _p: np.stack([ex(self.stored(s, spec, i))[0] for i in range(n)]).astype(np.float16))

    def view_features(self, s: RealSet, spec: FeatureSpec, kind: str) -> np.ndarray:
        """[S*K, V, D, h, w]: calibration/views.augmented(kind) views of the stored shots (bank content)."""
        n = SHOTS * SHOT_SETS

        def make(ex, _p):
            rng = np.random.default_rng(0)
            return np.stack([np.stack([ex(v)[0] for v in augmented(self.stored(s, spec, i), (kind,), rng)]) for i in range(n)]).astype(np.float16)
        return self._array(s, spec, f"aug-{kind}", make)

    def nuisance_features(self, s: RealSet, spec: FeatureSpec) -> np.ndarray:
        """[S*K, 4, D, h, w]: the shift / gain nuisance views of each stored shot (good evidence)."""
        n = SHOTS * SHOT_SETS
        return self._array(s, spec, "nuisance", lambda ex, _p: np.stack(
            [np.stack([ex(v)[0] for v in nuisance_views(self.stored(s, spec, i), i % SHOTS, 4)]) for i in range(n)]).astype(np.float16))

    def synthetic_images(self, s: RealSet) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """[K, S, P, h, w, 3] uint8 defects painted into each shot of each shot set at 256 x 256 (donors: the
        other shots of the set), [K, S, P] whether each could be made (a flat image gives no visible
        cut-paste: calibration skips those too), and the kind of each of the P ("nsa" or a defect kind)."""
        path = self.folder(s) / "synthetic.npz"
        kinds = ["nsa"] * NSA_PER_SHOT + list(DEFECT_KINDS)
        if not path.exists():
            out = np.zeros((SHOT_SETS, SHOTS, len(kinds), *SYNTHETIC_SIZE, 3), np.uint8)
            valid = np.zeros(out.shape[:3], bool)
            for k in range(SHOT_SETS):
                resized = [cv2.resize(stored_good_image(read_bgr(s.paths[i]), SYNTHETIC_SIZE), SYNTHETIC_SIZE[::-1],
                                      interpolation=cv2.INTER_AREA) for i in s.shots(k)]
                for j, base in enumerate(resized):
                    rng = np.random.default_rng(1000 * k + j)
                    donors = [b for t, b in enumerate(resized) if t != j]
                    for p, kind in enumerate(kinds):
                        try:
                            if kind == "nsa":
                                out[k, j, p] = synthetic_anomaly(base, rng, donors)[0]
                            else:
                                out[k, j, p] = inject_defect(base, rng, kind, donor=donors[p % len(donors)])[0]
                            valid[k, j, p] = True
                        except ValueError:
                            out[k, j, p] = base
            np.savez_compressed(path, images=out, valid=valid)
            log(f"{s.name}: {int(valid.sum())} of {valid.size} synthetic defects made")
        data = np.load(path)
        return data["images"], data["valid"], kinds

    def synthetic_features(self, s: RealSet, spec: FeatureSpec) -> np.ndarray:
        """[K, S, P, D, h, w]."""
        images, _, _ = self.synthetic_images(s)
        return self._array(s, spec, "synthetic", lambda ex, _p: np.stack(
            [np.stack([np.stack([ex(img)[0] for img in shot]) for shot in shots]) for shots in images]).astype(np.float16))


# --------------------------------------------------------------------------- features of a config


def tap_slices(spec: FeatureSpec, taps: tuple[str, ...]) -> list[slice]:
    starts, start = {}, 0
    for tap in spec.params(None).taps:
        starts[tap] = slice(start, start + tap_channels(tap))
        start += tap_channels(tap)
    missing = [t for t in taps if t not in starts]
    if missing:
        raise ValueError(f"feature spec {spec.name} does not tap {missing}")
    return [starts[t] for t in taps]


def select(array: np.ndarray, spec: FeatureSpec, config: Config, fine: np.ndarray | None) -> np.ndarray:
    """[..., D, h, w] float32 of a config from a spec's array [..., D_spec, h, w] (and the fine spec's)."""
    parts = [np.asarray(array[..., sl, :, :], np.float32) for sl in tap_slices(spec, config.taps)]
    if fine is not None:
        f = np.asarray(fine, np.float32)
        *lead, c, h2, w2 = f.shape
        parts.insert(0, f.reshape(*lead, c, h2 // 2, 2, w2 // 2, 2).mean(axis=(-3, -1)))
    return np.concatenate(parts, axis=-3) if len(parts) > 1 else parts[0]


def config_arrays(cache: Cache, s: RealSet, config: Config, what: str, *args) -> np.ndarray:
    spec = FEATURES[config.feature]
    getter = {"test": cache.features, "shots": cache.shot_features, "nuisance": cache.nuisance_features,
              "synthetic": cache.synthetic_features, "aug": cache.view_features}[what]
    fine = getter(s, FEATURES[config.fine], *args) if config.fine else None
    return select(getter(s, spec, *args), spec, config, fine)


def bank_images(cache: Cache, s: RealSet, config: Config, rows: list[int]) -> np.ndarray:
    """[M, D, h, w]: the given shots (stored form) and their augmented views; with a bank_size, the
    coreset calibration keeps (calibration/fit.build_bank) as [M', D, 1, 1]."""
    shots = config_arrays(cache, s, config, "shots")[rows]
    views = [config_arrays(cache, s, config, "aug", kind)[rows] for kind in config.augment]
    # Image by image, each followed by its views, as calibration/fit.good_features orders them (the
    # greedy coreset's first pick depends on the order).
    bank = np.concatenate([np.concatenate([shots[i : i + 1], *(v[i] for v in views)]) for i in range(len(rows))])
    if config.bank_size:
        patches, _ = build_bank([features_to_patches(bank)], config.bank_size, seed=0)
        bank = patches[:, :, None, None]
    return bank


# --------------------------------------------------------------------------- nearest neighbours


@functools.lru_cache(maxsize=8)
def positional_penalty(h: int, w: int, m: int, radius: int) -> np.ndarray:
    """[hw, m*hw] 0 where a bank patch lies within `radius` cells of the query's place, else +inf."""
    y, x = np.divmod(np.arange(h * w), w)
    near = (np.abs(y[:, None] - y[None, :]) <= radius) & (np.abs(x[:, None] - x[None, :]) <= radius)
    return np.tile(np.where(near, 0.0, np.inf).astype(np.float32), (1, m))


def knn(queries: np.ndarray, bank: np.ndarray, radii: tuple, reweight: bool = True) -> dict:
    """queries [n, D, h, w], bank [m, D, h, w] -> {radius: [n, h, w] distances}, "rw": [n] anomalib's score.

    Distances as scorer/memory_bank.nearest_distances: |q|^2 - 2 q.b + |b|^2, min over the bank, sqrt."""
    n, d, h, w = queries.shape
    rows = np.ascontiguousarray(bank.transpose(0, 2, 3, 1).reshape(-1, d), np.float32)
    bank_t = np.ascontiguousarray(rows.T)
    bank_sq = np.einsum("ij,ij->i", rows, rows)
    penalty = {r: positional_penalty(h, w, bank.shape[0], r) for r in radii if r is not None}
    out = {r: np.empty((n, h, w), np.float32) for r in radii}
    rw = np.empty(n, np.float32)
    for i in range(n):
        q = np.ascontiguousarray(np.asarray(queries[i], np.float32).reshape(d, h * w).T)
        q_sq = np.einsum("ij,ij->i", q, q)
        cross = q @ bank_t
        cross *= -2.0
        cross += bank_sq[None, :]
        for r in radii:
            best = cross.min(axis=1) if r is None else (cross + penalty[r]).min(axis=1)
            out[r][i] = np.sqrt(np.maximum(best + q_sq, 0.0)).reshape(h, w)
        if reweight:
            rw[i] = anomalib_reweighted(q, cross, rows, bank_sq, q_sq)
    out["rw"] = rw
    return out


def anomalib_reweighted(q: np.ndarray, cross: np.ndarray, rows: np.ndarray, bank_sq: np.ndarray, q_sq: np.ndarray,
                        neighbours: int = 9) -> float:
    """anomalib's PatchcoreModel.compute_anomaly_score: the max patch distance s*, weighted by
    1 - softmax(distances of that patch to the 9 bank neighbours of its nearest bank patch)[0]."""
    d2 = np.maximum(cross + q_sq[:, None], 0.0)
    nearest = d2.min(axis=1)
    patch = int(np.argmax(nearest))
    score = float(np.sqrt(nearest[patch]))
    nn = int(np.argmin(d2[patch]))
    to_nn = np.maximum(bank_sq - 2.0 * rows @ rows[nn] + bank_sq[nn], 0.0)
    support = np.argsort(to_nn, kind="stable")[:neighbours]
    dist = np.sqrt(np.maximum(d2[patch, support], 0.0)).astype(np.float64)
    soft = np.exp(dist - dist.max())
    return float((1.0 - soft[0] / soft.sum()) * score)


def test_distances(cache: Cache, s: RealSet, key_config: Config, k: int, radii: tuple, reweight: bool) -> dict:
    """knn of every row of the set against shot set k's bank, cached per (config's distance key, k, radius)."""
    spec_key = "-".join(FEATURES[f].key(s.aspect) for f in (key_config.feature, key_config.fine) if f)
    name = hashlib.sha256(repr((key_config.dist_key, spec_key)).encode()).hexdigest()[:12]
    path = cache.folder(s) / f"dist-{name}-k{k}.npz"
    stored = dict(np.load(path)) if path.exists() else {}
    missing = [r for r in radii if f"r{r}" not in stored]
    if missing:
        started = time.perf_counter()
        queries = config_arrays(cache, s, key_config, "test")
        bank = bank_images(cache, s, key_config, s.shots(k))
        result = knn(queries, bank, tuple(missing), reweight=reweight and "rrw" not in stored)
        stored.update({f"r{r}": result[r] for r in missing})
        if reweight:
            stored.setdefault("rrw", result["rw"])
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **stored)
        tmp.rename(path)
        log(f"{s.name} k={k}: distances {key_config.dist_key} radii {missing} ({bank.shape[0]} bank images) in {time.perf_counter() - started:.0f} s")
    out = {r: stored[f"r{r}"] for r in radii}
    out["rw"] = stored.get("rrw")
    return out


# --------------------------------------------------------------------------- heads


_MAP_PARAMS: dict = {}


def anomaly_map(dist: np.ndarray, size: tuple[int, int], sigma: float, upsample: str = "linear") -> np.ndarray:
    """scorer/anomaly_map.anomaly_map_from_distances with any sigma (0 = no smoothing) and upsampling."""
    mode = {"linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}[upsample]
    full = cv2.resize(dist.astype(np.float32), size[::-1], interpolation=mode)
    if sigma > 0:
        k = gaussian_kernel_1d(sigma)
        full = cv2.sepFilter2D(full, -1, k, k, borderType=cv2.BORDER_REPLICATE)
    return full


def ringed(x: np.ndarray, width: int, weight: float) -> np.ndarray:
    if not width:
        return x
    x = x.copy()
    x[:width] *= weight
    x[-width:] *= weight
    x[:, :width] *= weight
    x[:, -width:] *= weight
    return x


def top_means(flat: np.ndarray, counts: list[int]) -> dict[int, float]:
    """Mean of the top c values for each c in counts (1 = max)."""
    k = max(counts)
    top = np.sort(np.partition(flat, flat.size - k)[-k:])[::-1].astype(np.float64)
    csum = np.cumsum(top)
    return {c: float(csum[c - 1] / c) for c in counts}


def top_count(fraction: float, size: int, capped: bool) -> int:
    if not fraction:
        return 1
    c = max(1, int(round(fraction * size)))
    return min(TOPK_LIMIT, c) if capped else c


def head_scores(dists: dict, heads: list[tuple[int | None, Head]], rows: np.ndarray, size: tuple[int, int], stride: int,
                masks: dict[int, np.ndarray]) -> tuple[dict, dict]:
    """Image scores of `rows` for every (radius, head), and the pixel samples per (radius, sigma, upsampling) of the rows
    with pixel truth."""
    scores = {rh: np.empty(len(rows)) for rh in heads}
    pixels: dict = {}
    groups: dict = {}
    for radius, head in heads:
        groups.setdefault((radius, head.sigma, head.upsample), []).append(head)
    for (radius, sigma, upsample), group in groups.items():
        need_map = any(not h.on_patches for h in group)
        for n, row in enumerate(rows):
            dist = dists[radius][row]
            amap = anomaly_map(dist, size, sigma, upsample) if need_map or row in masks else None
            if amap is not None and row in masks:
                pixels.setdefault((radius, sigma, upsample), []).append(amap[::2, ::2].ravel())
            by_ring: dict = {}
            for head in group:
                if head.score == "rw":
                    scores[radius, head][n] = dists["rw"][row]
                    continue
                base = dist if head.on_patches else amap
                ring_key = (head.on_patches, head.ring, head.ring_weight)
                if ring_key not in by_ring:
                    width = head.ring if head.on_patches else head.ring * stride
                    x = ringed(base, width, head.ring_weight).ravel()
                    counts = sorted({top_count(h.fraction, x.size, not h.on_patches) for h in group
                                     if (h.on_patches, h.ring, h.ring_weight) == ring_key and h.score != "rw"})
                    by_ring[ring_key] = top_means(x, counts)
                scores[radius, head][n] = by_ring[ring_key][top_count(head.fraction, base.size, not head.on_patches)]
    return scores, pixels


# --------------------------------------------------------------------------- real test sets


def evaluate_configs(cache: Cache, sets: list[RealSet], configs: list[Config]) -> dict:
    """{config name: {set: {"image": [per shot set], "pixel": [...] or None}}}."""
    results: dict = {c.name: {} for c in configs}
    groups: dict = {}
    for c in configs:
        groups.setdefault(c.dist_key, []).append(c)
    for s in sets:
        for group in groups.values():
            first = group[0]
            spec = FEATURES[first.feature]
            params = spec.params(s.aspect)
            size, stride = params.input_size, base_stride(params)
            radii = tuple(sorted({c.radius for c in group}, key=lambda r: -1 if r is None else r))
            heads = list(dict.fromkeys((c.radius, c.head) for c in group))
            masks = s.masks(size)
            for k in range(SHOT_SETS):
                dists = test_distances(cache, s, first, k, radii, any(c.head.score == "rw" for c in group))
                rows = s.items(k)
                labels = s.labels[rows]
                scores, pixels = head_scores(dists, heads, rows, size, stride, masks)
                truth = [masks[r] for r in rows if r in masks]
                for c in group:
                    entry = results[c.name].setdefault(s.name, {"image": [], "pixel": []})
                    entry["image"].append(round(auroc(labels, scores[c.radius, c.head]), 4))
                    px = pixels.get((c.radius, c.head.sigma, c.head.upsample))
                    has = s.has_masks and px is not None
                    entry["pixel"].append(round(auroc(np.concatenate(truth), np.concatenate(px)), 4) if has else None)
        log(f"{s.name}: {len(configs)} configs evaluated")
    return results


def floor_results(cache: Cache, sets: list[RealSet], threads: int) -> dict:
    """anomalib's PatchCore on the same shots and images, per set: {"image": [k], "pixel": [k] or None}.

    Every image is embedded once per set by anomalib's own steps (tools/floor_study.py: the feature extractor,
    pooler and embedding of PatchcoreModel.forward); per shot set only the bank changes, and anomalib's
    nearest-neighbour search, reweighted score and map generator run on the batch. The first scored image of
    each set is also scored through AnomalibPatchCore.score and must agree."""
    out = {}
    floor = None
    for s in sets:
        path = cache.folder(s) / FLOOR_FILE
        if not path.exists():
            import torch

            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from floor_study import BATCH, anomalib_embedding, anomalib_scores

            if floor is None:
                from edge_inspect.offline.anomalib_floor import AnomalibPatchCore

                floor = AnomalibPatchCore(threads=threads)
            started = time.perf_counter()
            with torch.inference_mode():
                embedded = [anomalib_embedding(floor.model, read_bgr(p)) for p in s.paths]
            log(f"{s.name}: floor embeddings in {time.perf_counter() - started:.0f} s")
            masks = s.masks((256, 256))
            runs = []
            for k in range(SHOT_SETS):
                rows = s.items(k)
                with torch.inference_mode():
                    floor.model.memory_bank = torch.cat([embedded[i] for i in s.shots(k)])
                    scores, px, truth = [], [], []
                    for start in range(0, len(rows), BATCH):
                        batch = rows[start : start + BATCH]
                        pred, _max, maps = anomalib_scores(floor.model, [embedded[r] for r in batch])
                        scores += pred
                        for r, amap in zip(batch, maps):
                            if r in masks:
                                px.append(amap[::2, ::2].ravel())
                                truth.append(masks[r])
                check, _ = floor.score(read_bgr(s.paths[rows[0]]))  # the public API, same bank
                if abs(check - scores[0]) > 1e-4 * max(1.0, abs(check)):
                    raise RuntimeError(f"{s.name}: anomalib's steps gave {scores[0]}, AnomalibPatchCore.score {check}")
                runs.append({"image": round(auroc(s.labels[rows], np.array(scores)), 4),
                             "pixel": round(auroc(np.concatenate(truth), np.concatenate(px)), 4) if s.has_masks else None,
                             "scores": [round(float(v), 5) for v in scores]})
                log(f"{s.name} k={k}: floor {runs[-1]['image']} / {runs[-1]['pixel']}")
            path.write_text(json.dumps({"name": floor.name, "runs": runs}))
        data = json.loads(path.read_text())
        out[s.name] = {"image": [r["image"] for r in data["runs"]], "pixel": [r["pixel"] for r in data["runs"]]}
    return out


# --------------------------------------------------------------------------- per-product choice from good parts


def evidence_scores(cache: Cache, s: RealSet, configs: list[Config], k: int) -> dict:
    """{config name: {"loo": [4], "views": [16], "synthetic": [S, P]}} for shot set k, each shot's evidence
    scored against the bank of the other three shots (their augmented views included)."""
    _, valid, kinds = cache.synthetic_images(s)
    out = {c.name: {"loo": [], "views": [], "synthetic": []} for c in configs}
    groups: dict = {}
    for c in configs:
        groups.setdefault(c.dist_key, []).append(c)
    shots = s.shots(k)
    for group in groups.values():
        first = group[0]
        params = FEATURES[first.feature].params(s.aspect)
        size, stride = params.input_size, base_stride(params)
        radii = tuple(sorted({c.radius for c in group}, key=lambda r: -1 if r is None else r))
        heads = list(dict.fromkeys((c.radius, c.head) for c in group))
        own = config_arrays(cache, s, first, "shots")
        views = config_arrays(cache, s, first, "nuisance")
        synth = config_arrays(cache, s, first, "synthetic")[k]
        for j, shot in enumerate(shots):
            others = [t for t in shots if t != shot]
            bank = bank_images(cache, s, first, others)
            queries = np.concatenate([own[shot : shot + 1], views[shot], synth[j]])
            dists = knn(queries, bank, radii, reweight=any(c.head.score == "rw" for c in group))
            scores, _ = head_scores(dists, heads, np.arange(len(queries)), size, stride, {})
            for c in group:
                v = scores[c.radius, c.head]
                out[c.name]["loo"].append(float(v[0]))
                out[c.name]["views"] += [float(x) for x in v[1 : 1 + views.shape[1]]]
                out[c.name]["synthetic"].append([float(x) for x in v[1 + views.shape[1]:]])
    for c in configs:
        out[c.name]["kinds"] = kinds
        out[c.name]["valid"] = valid[k].tolist()
    return out


def separations(ev: dict) -> dict[str, float]:
    """Scale-free measures of how far the synthetic defects stand from the good evidence."""
    kinds = np.array(ev["kinds"])
    synthetic = np.array(ev["synthetic"])  # [S, P]
    valid = np.array(ev["valid"])
    good = np.array(ev["loo"] + ev["views"])
    loo = np.array(ev["loo"])
    nsa, painted = synthetic[valid & (kinds == "nsa")], synthetic[valid & (kinds != "nsa")]
    every = synthetic[valid]

    def sep(g, b):
        if not len(b):
            return 0.5
        return auroc(np.r_[np.zeros(len(g)), np.ones(len(b))], np.r_[g, b])

    spread = math.sqrt(0.5 * (good.var() + every.var())) or 1e-12
    return {
        "auc_all": sep(good, every),
        "auc_nsa": sep(good, nsa),
        "auc_painted": sep(good, painted),
        "auc_loo_only": sep(loo, every),
        "tpr_at_max_good": float((every > good.max()).mean()),
        "dprime": float((every.mean() - good.mean()) / spread),
    }


RULES = ("auc_all", "auc_nsa", "auc_painted", "auc_loo_only", "tpr_at_max_good", "dprime")


def selection_study(cache: Cache, sets: list[RealSet], candidates: list[Config], real: dict) -> dict:
    """Per set and shot set: each rule's pick among `candidates` (ties: the earlier candidate, the default
    first) and its real image AUROC; beside it the default's and the per-set oracle's."""
    out: dict = {"candidates": [c.name for c in candidates], "sets": {}}
    for s in sets:
        per_k = []
        for k in range(SHOT_SETS):
            ev = evidence_scores(cache, s, candidates, k)
            seps = {c.name: separations(ev[c.name]) for c in candidates}
            picks = {}
            for rule in RULES:
                values = [seps[c.name][rule] for c in candidates]
                best = candidates[int(np.argmax(values))].name
                picks[rule] = {"pick": best, "real": real[best][s.name]["image"][k]}
            per_k.append({"separations": seps, "picks": picks})
            log(f"{s.name} k={k}: picks " + ", ".join(f"{r}={p['pick']}" for r, p in picks.items()))
        oracle = max(candidates, key=lambda c: np.mean(real[c.name][s.name]["image"]))
        out["sets"][s.name] = {
            "runs": per_k,
            "default": float(np.mean(real[candidates[0].name][s.name]["image"])),
            "oracle": {"pick": oracle.name, "real": float(np.mean(real[oracle.name][s.name]["image"]))},
            "rules": {r: float(np.mean([run["picks"][r]["real"] for run in per_k])) for r in RULES},
        }
    return out


# --------------------------------------------------------------------------- the studies


DEFAULT_HEAD = Head(sigma=4.0, score="top0.01")


def default_configs() -> list[Config]:
    """Stage (a): score, sigma, pooling, border ring and taps, one change at a time from the floor's shape."""
    out = [
        Config("floor shape: b4+b10, pad counted, patch max", head=Head(score="pmax")),
        Config("floor shape, anomalib reweighted score", head=Head(score="rw")),
        Config("b4+b10, pad NOT counted, top 1 % map (current default)", feature="nopad", head=DEFAULT_HEAD),
        Config("b4+b10, pad not counted, patch max (old plain floor)", feature="nopad", head=Head(score="pmax")),
    ]
    for sigma in (0.0, 2.0, 4.0, 8.0):
        for score in ("max", "top0.001", "top0.003", "top0.01", "top0.03", "top0.1"):
            out.append(Config(f"b4+b10, sigma {sigma:g}, {score}", head=Head(sigma=sigma, score=score)))
    for score in ("ptop0.003", "ptop0.01", "ptop0.03"):
        out.append(Config(f"b4+b10, {score}", head=Head(score=score)))
    for sigma in (2.0, 4.0, 6.0):
        out.append(Config(f"b4+b10, nearest upsampling, sigma {sigma:g}, max", head=Head(sigma=sigma, score="max", upsample="nearest")))
    out.append(Config("b4+b10, sigma 6, max", head=Head(sigma=6.0, score="max")))
    for sigma in (2.0, 4.0):
        for score in ("max", "top0.01"):
            for ring, weight in ((1, 0.0), (1, 0.5), (2, 0.0), (2, 0.5)):
                out.append(Config(f"b4+b10, sigma {sigma:g}, {score}, ring {ring} x{weight:g}",
                                  head=Head(sigma=sigma, score=score, ring=ring, ring_weight=weight)))
    for sigma in (2.0, 4.0):
        for score in ("max", "top0.01"):
            head = Head(sigma=sigma, score=score)
            tail = f"sigma {sigma:g}, {score}"
            out += [
                Config(f"b4+b10+b14, {tail}", taps=("block4", "block10", "block14"), head=head),
                Config(f"b4+b10+b15, {tail}", taps=("block4", "block10", "block15"), head=head),
                Config(f"b2+b4+b10 (b2 2x2-averaged), {tail}", fine="fine", head=head),
                Config(f"b4+b10+b14+b15, {tail}", taps=("block4", "block10", "block14", "block15"), head=head),
                Config(f"b4 only, {tail}", taps=("block4",), head=head),
                Config(f"ctx16 b4+b10, {tail}", feature="ctx16", head=head),
                Config(f"ctx16 b4+b10+b14, {tail}", feature="ctx16", taps=("block4", "block10", "block14"), head=head),
            ]
    return out


def size_configs() -> list[Config]:
    """Stage (c): input size and aspect, with the chosen default's taps and head (sigma also scaled with size).
    Only a set whose images share one aspect (here ball_screw) differs between the square and aspect rows."""
    out = []
    for feature, label in (("s320", "320 x 320"), ("aspect256", "~256^2 px, aspect kept"), ("aspect320", "~320^2 px, aspect kept")):
        for sigma in sorted({CHOSEN.head.sigma, CHOSEN.head.sigma * 1.25}) if "320" in feature else (CHOSEN.head.sigma,):
            head = dataclasses.replace(CHOSEN.head, sigma=sigma)
            out.append(dataclasses.replace(CHOSEN, name=f"{label}, sigma {sigma:g}", feature=feature, head=head))
    return out


def views_configs() -> list[Config]:
    """Flip / rotation views in the bank for every product, full or thinned back to the 4-shot bank size."""
    out = []
    for augment in (("hflip",), ("vflip",), ("hflip", "vflip"), ("rot90",)):
        label = " + ".join(augment)
        out.append(dataclasses.replace(CHOSEN, name=f"default + {label} views", augment=augment))
        out.append(dataclasses.replace(CHOSEN, name=f"default + {label} views, coreset 4096", augment=augment, bank_size=4096))
    return out


STAGES = {"default": default_configs, "size": size_configs, "views": views_configs}


# --------------------------------------------------------------------------- report


def relative_cost(cache: Cache, s: RealSet, config: Config) -> float:
    """kNN work (bank rows x feature dims x patches) against the floor's at 256 px (4096 x 152 x 1024)."""
    params = FEATURES[config.feature].params(s.aspect)
    stride = base_stride(params)
    patches = (params.input_size[0] // stride) * (params.input_size[1] // stride)
    dims = sum(tap_channels(t) for t in config.taps) + (24 if config.fine else 0)
    views = 1 + sum(len(augmented(np.zeros((64, 64, 3), np.uint8), (k,), np.random.default_rng(0))) for k in config.augment)
    rows = min(SHOTS * views * patches, config.bank_size or 10**9)
    return rows * dims * patches / (4096 * 152 * 1024)


def summarise(name: str, per_set: dict, floor: dict) -> dict:
    row = {"sets": {}}
    for set_name, entry in per_set.items():
        px = [v for v in entry["pixel"] if v is not None]
        row["sets"][set_name] = {"image": round(float(np.mean(entry["image"])), 4),
                                 "pixel": round(float(np.mean(px)), 4) if px else None,
                                 "image_runs": entry["image"], "pixel_runs": entry["pixel"]}
    images = [v["image"] for v in row["sets"].values()]
    pixels = [v["pixel"] for v in row["sets"].values() if v["pixel"] is not None]
    row["mean_image"] = round(float(np.mean(images)), 4)
    row["mean_pixel"] = round(float(np.mean(pixels)), 4) if pixels else None
    if floor:
        f = {n: float(np.mean(v["image"])) for n, v in floor.items()}
        fp = {n: float(np.mean(v["pixel"])) for n, v in floor.items() if v["pixel"][0] is not None}
        row["sets_at_or_above_floor"] = sum(row["sets"][n]["image"] >= round(f[n], 4) for n in row["sets"])
        row["pixel_sets_at_or_above_floor"] = sum(row["sets"][n]["pixel"] >= round(fp[n], 4) for n in fp if n in row["sets"])
        row["ratio_to_floor"] = round(row["mean_image"] / float(np.mean(list(f.values()))), 4)
    return row


def markdown(rows: dict, floor_row: dict | None, set_names: list[str], costs: dict) -> str:
    head = "| configuration | " + " | ".join(set_names) + " | mean image | mean pixel | sets ≥ floor (img/px) | ratio | kNN cost |"
    lines = [head, "|---" * (len(set_names) + 6) + "|"]

    def cell(v):
        return f"{v['image']:.3f}" + (f" / {v['pixel']:.3f}" if v.get("pixel") is not None else "")

    if floor_row:
        lines.append("| **anomalib PatchCore floor** | " + " | ".join(cell(floor_row["sets"][n]) for n in set_names)
                     + f" | {floor_row['mean_image']:.4f} | {floor_row['mean_pixel']:.4f} | — | 1.000 | 1.00 |")
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(row["sets"][n]) for n in set_names)
                     + f" | {row['mean_image']:.4f} | {row['mean_pixel']:.4f} | {row.get('sets_at_or_above_floor', '')}/{len(set_names)}"
                     + f" ({row.get('pixel_sets_at_or_above_floor', '')}) | {row.get('ratio_to_floor', float('nan')):.3f} | {costs.get(name, float('nan')):.2f} |")
    return "\n".join(lines)


def speed(folded: dict, threads: int, frames: int) -> str:
    """p50 of the project's scorer graph (bank as an input, full 4-shot bank) for candidate defaults,
    sessions interleaved frame by frame in one process so the machine's load hits them alike."""
    from edge_inspect.scorer.backends.ort_backend import ort_session
    from edge_inspect.scorer.memory_bank import bank_inputs
    from edge_inspect.scorer.params import output_dim
    from edge_inspect.scorer.scorer_graph import BANK_INPUT, BANK_SQNORM_INPUT, build_scorer_model

    variants = {
        "floor shape (b4+b10, max of map)": ScorerParams(taps=("block4", "block10"), score_topk=0.0, pool_count_pad=True),
        "b4+b10, top 1 % (current default's graph)": ScorerParams(taps=("block4", "block10"), pool_count_pad=True),
        "b4+b10+b14": ScorerParams(taps=("block4", "block10", "block14"), pool_count_pad=True),
        "b4+b10+b15": ScorerParams(taps=("block4", "block10", "block15"), pool_count_pad=True),
        "b4+b10, context pad 16": ScorerParams(taps=("block4", "block10"), pool_count_pad=True, context_pad=16),
        "b4+b10, 320 x 320": ScorerParams(input_size=(320, 320), taps=("block4", "block10"), pool_count_pad=True),
    }
    rng = np.random.default_rng(0)
    runs = {}
    for name, params in variants.items():
        h, w = params.input_size
        stride = base_stride(params)
        capacity = SHOTS * (h // stride) * (w // stride)
        session = ort_session(build_scorer_model(folded, params, capacity=capacity).SerializeToString(), threads)
        neg2t, sqnorm = bank_inputs(rng.standard_normal((capacity, output_dim(params))).astype(np.float32), capacity)
        feeds = {"image": rng.uniform(0, 255, (1, 3, h, w)).astype(np.float32), BANK_INPUT: neg2t, BANK_SQNORM_INPUT: sqnorm}
        for _ in range(5):
            session.run(["score"], feeds)
        runs[name] = (session, feeds, [])
    for _ in range(frames):
        for session, feeds, times in runs.values():
            t0 = time.perf_counter()
            session.run(["score"], feeds)
            times.append((time.perf_counter() - t0) * 1000.0)
    ref = float(np.median(next(iter(runs.values()))[2]))
    lines = [f"| graph ({threads} threads, {cpu_model()}, {os.getloadavg()[0]:.1f} load) | p50 ms | p99 ms | ratio |", "|---|---|---|---|"]
    for name, (_s, _f, times) in runs.items():
        lines.append(f"| {name} | {np.median(times):.1f} | {np.percentile(times, 99):.1f} | {np.median(times) / ref:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("roots", nargs="+")
    parser.add_argument("--stage", choices=sorted(STAGES) + ["select", "speed", "report"], default="default",
                        help="default / views / size: real-set tables; select: per-product choice; report: the selection "
                             "tables again from --json; speed: scorer graph p50s")
    parser.add_argument("--frames", type=int, default=200, help="--stage speed: frames per graph")
    parser.add_argument("--cache", default="/tmp/study-cache")
    parser.add_argument("--engines", default="engines", help="where the backbone artifact is (exported if missing)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="scorer_study.json", help="results, merged into the file if it exists")
    parser.add_argument("--md", default=None, help="write the table here too")
    parser.add_argument("--only", default=None, help="regular expression: only the configurations it finds in their name")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    folded = load_folded(args.engines)[0]
    if args.stage == "speed":
        print(speed(folded, args.threads, args.frames))
        return 0
    if args.stage == "report":
        data = json.loads(Path(args.json).read_text())
        print(selection_markdown(data["selection"], data["configs"], list(data["selection"]["sets"])))
        return 0
    cache = Cache(Path(args.cache), folded, args.threads)
    sets = [RealSet.load(r) for r in dataset_roots(args.roots)]
    for s in sets:
        cache.shapes(s)
    out_path = Path(args.json)
    data = json.loads(out_path.read_text()) if out_path.exists() else {}
    data["cpu"] = cpu_model()
    floor = floor_results(cache, sets, args.threads)
    data["floor"] = summarise("floor", floor, {})
    names = [s.name for s in sets]
    if args.stage == "select":
        from_stage = selection_candidates()
        real = evaluate_configs(cache, sets, from_stage)
        rows = {c.name: summarise(c.name, real[c.name], floor) for c in from_stage}
        data.setdefault("configs", {}).update(rows)
        data["selection"] = selection_study(cache, sets, from_stage, real)
        text = markdown(rows, data["floor"], names, {c.name: relative_cost(cache, sets[0], c) for c in from_stage})
        text += "\n\n" + selection_markdown(data["selection"], data["configs"], names)
    else:
        configs = [c for c in STAGES[args.stage]() if not args.only or re.search(args.only, c.name)]
        real = evaluate_configs(cache, sets, configs)
        rows = {c.name: summarise(c.name, real[c.name], floor) for c in configs}
        data.setdefault("configs", {}).update(rows)
        text = markdown(rows, data["floor"], names, {c.name: relative_cost(cache, sets[0], c) for c in configs})
    out_path.write_text(json.dumps(data, indent=1))
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    return 0


# The default stage (a) chose; the per-product candidates are single changes from it.
CHOSEN = Config("default", head=Head(sigma=4.0, score="max"))


def selection_candidates() -> list[Config]:
    """Stage (b): what a product could choose from its good parts; the chosen default first (ties go to it)."""
    def variant(name: str, **changes) -> Config:
        return dataclasses.replace(CHOSEN, name=name, **changes)

    return [
        variant("default"),
        variant("+ hflip views", augment=("hflip",)),
        variant("+ vflip views", augment=("vflip",)),
        variant("+ hflip + vflip views", augment=("hflip", "vflip")),
        variant("+ rot90 views (90/180/270)", augment=("rot90",)),
        variant("positional kNN r=1", radius=1),
        variant("positional kNN r=2", radius=2),
        variant("positional kNN r=4", radius=4),
        variant("score top 1 % of map", head=dataclasses.replace(CHOSEN.head, score="top0.01")),
        variant("score top 3 % of map", head=dataclasses.replace(CHOSEN.head, score="top0.03")),
        variant("+ block15 tap", taps=("block4", "block10", "block15")),
    ]


# Candidate groups re-picked from the stored separations (no new scoring): which kind of per-product choice
# carries the gain, and whether picking beats the best fixed default (the first of a group is the default).
SELECTION_GROUPS = {
    "all candidates": None,
    "bank views only": ["default", "+ hflip views", "+ vflip views", "+ hflip + vflip views", "+ rot90 views (90/180/270)"],
    "positional kNN only": ["default", "positional kNN r=1", "positional kNN r=2", "positional kNN r=4"],
    "image score only": ["default", "score top 1 % of map", "score top 3 % of map"],
    "block15 tap only": ["default", "+ block15 tap"],
    "hflip+vflip first, + rot90, + block15": ["+ hflip + vflip views", "default", "+ rot90 views (90/180/270)", "+ block15 tap"],
}


def repick(selection: dict, configs: dict, order: list[str], rule: str) -> dict[str, float]:
    """Per set, the mean over shot sets of the real image AUROC of the candidate in `order` that `rule` ranks
    first (ties: the earlier one)."""
    out = {}
    for set_name, entry in selection["sets"].items():
        values = []
        for k, run in enumerate(entry["runs"]):
            best = order[int(np.argmax([run["separations"][c][rule] for c in order]))]
            values.append(configs[best]["sets"][set_name]["image_runs"][k])
        out[set_name] = float(np.mean(values))
    return out


def selection_markdown(selection: dict, configs: dict, names: list[str]) -> str:
    blocks = []
    for label, order in SELECTION_GROUPS.items():
        order = order or selection["candidates"]
        fixed = {n: float(np.mean(configs[order[0]]["sets"][n]["image_runs"])) for n in names}
        lines = [f"**{label}** (fixed default: {order[0]})", "",
                 "| rule | " + " | ".join(names) + " | mean | sets ≥ fixed |", "|---" * (len(names) + 3) + "|",
                 "| fixed default | " + " | ".join(f"{fixed[n]:.3f}" for n in names) + f" | {np.mean(list(fixed.values())):.4f} | — |"]
        for rule in RULES:
            got = repick(selection, configs, order, rule)
            lines.append(f"| pick by {rule} | " + " | ".join(f"{got[n]:.3f}" for n in names)
                         + f" | {np.mean([got[n] for n in names]):.4f} | {sum(got[n] >= fixed[n] - 1e-9 for n in names)}/{len(names)} |")
        oracle = {n: max(float(np.mean(configs[c]["sets"][n]["image_runs"])) for c in order) for n in names}
        lines.append("| oracle (best of the group per set, on test labels) | " + " | ".join(f"{oracle[n]:.3f}" for n in names)
                     + f" | {np.mean(list(oracle.values())):.4f} | — |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


if __name__ == "__main__":
    raise SystemExit(main())
