"""Build a product's calibration from a few good parts: memory bank, automatic threshold, references,
manifest, and the product's scorer ONNX graph.

Example:
    product = calibrate_product(sorted(Path("good").glob("*.png")), "bracket-a",
                                calibration_dir="calibration", engines_dir="engines")
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import cv2
import numpy as np
import onnx
import onnxruntime
import onnxruntime as ort
from tqdm import tqdm

from .. import __version__
from ..errors import CalibrationError, UserError
from ..imageio import crop_roi, read_bgr, to_input
from ..records import is_product_name
from .backbone import tap_channels
from .backends.trt_compat import check_tensorrt_compat
from .memory_bank import features_to_patches, greedy_coreset, nearest_distances
from .params import ScorerParams, gaussian_kernel_1d, image_score, projection_matrix
from .product import file_sha256, load_product
from .scorer_graph import build_features_model, build_scorer_model, folded_from_model, save_model
from .synth import synthetic_anomaly
from .threshold import DEFAULT_FALSE_REJECT_RATE, automatic_threshold
from .versions import (
    DEFAULT_KEEP,
    GOOD_DIR,
    VERSIONS_DIR,
    active_directory,
    commit_version,
    copy_version_files,
    current_version,
    product_dir,
    product_lock,
    read_manifest,
)

log = logging.getLogger(__name__)

MIN_IMAGES = 2
RECOMMENDED_IMAGES = 4
# jitter: +-6 degree rotations, for products whose pose varies; the others for products that appear
# flipped, turned or shifted on the line. None by default: on the real sets the rotated views cost
# image AUROC (their interpolation and border artefacts become "normal" patches; docs/scorer.md).
AUGMENTATIONS = ("jitter", "hflip", "vflip", "rot90", "shift")
DEFAULT_AUGMENT: tuple[str, ...] = ()
BACKBONE_FILE = "backbone/efficientnet_lite0.onnx"
REFERENCE_SIZE = 256  # longest side of the stored good reference images
MANIFEST_VERSION = 1


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


def validate_product_name(name: str) -> str:
    if not is_product_name(name):
        raise UserError(
            f"product name {name!r} is not allowed: use 1-64 letters, digits, '-', '_' or '.', starting with a "
            "letter or digit (no path separators), e.g. 'bracket-a'"
        )
    return name


def parse_augment(text: str | Iterable[str] | None) -> tuple[str, ...]:
    if not text:
        return ()
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if items == ["none"]:
        return ()
    bad = [t for t in items if t not in AUGMENTATIONS]
    if bad:
        raise UserError(f"--augment: unknown {', '.join(bad)}; choose from none, {', '.join(AUGMENTATIONS)}")
    return tuple(dict.fromkeys(items))


def augmented(bgr: np.ndarray, kinds: Sequence[str], rng: np.random.Generator) -> list[np.ndarray]:
    """Extra views of a good image for products that appear flipped, rotated or shifted on the line."""
    out = []
    h, w = bgr.shape[:2]
    if "jitter" in kinds:
        for angle in (-6.0, 6.0):
            m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
            out.append(cv2.warpAffine(bgr, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101))
    if "hflip" in kinds:
        out.append(cv2.flip(bgr, 1))
    if "vflip" in kinds:
        out.append(cv2.flip(bgr, 0))
    if "rot90" in kinds:
        out += [cv2.rotate(bgr, c) for c in (cv2.ROTATE_90_CLOCKWISE, cv2.ROTATE_180, cv2.ROTATE_90_COUNTERCLOCKWISE)]
    if "shift" in kinds:
        for _ in range(2):
            dx, dy = (rng.uniform(-0.05, 0.05, 2) * (w, h)).astype(int)
            m = np.float32([[1, 0, dx], [0, 1, dy]])
            out.append(cv2.warpAffine(bgr, m, (w, h), borderMode=cv2.BORDER_REFLECT_101))
    return out


NUISANCE = (("shift", 0.02), ("gain", 0.95), ("shift", -0.02), ("gain", 1.05))
NUISANCE_SAMPLES = 16  # views in all: 4 per image at 4 shots, fewer per image with more shots


def nuisance_views(bgr: np.ndarray, index: int = 0, count: int = len(NUISANCE)) -> list[np.ndarray]:
    """Threshold evidence, never bank content: the part-to-part variation of a fixtured line (a 2 %
    shift either way, gain 0.95 and 1.05). Scored leave-one-out, they sample the good parts' score
    tail more densely than the shots alone. `count` views, starting at `index` in NUISANCE, so that
    with fewer views per image the kinds still alternate across images."""
    h, w = bgr.shape[:2]
    out = []
    for k in range(count):
        kind, value = NUISANCE[(index + k) % len(NUISANCE)]
        if kind == "shift":
            m = np.float32([[1, 0, round(value * w)], [0, 1, round(value * h)]])
            out.append(cv2.warpAffine(bgr, m, (w, h), borderMode=cv2.BORDER_REFLECT_101))
        else:
            out.append(np.clip(bgr.astype(np.float32) * value, 0, 255).astype(np.uint8))
    return out


def backbone_path(engines_dir: str | Path) -> Path:
    return Path(engines_dir) / BACKBONE_FILE


def ensure_backbone(engines_dir: str | Path) -> Path:
    """The backbone ONNX artifact; exported from the pretrained weights (needs PyTorch) when missing."""
    path = backbone_path(engines_dir)
    if path.is_file():
        return path
    try:
        from ..export.backbone_export import export_backbone  # needs PyTorch (the export extra)
    except ImportError as exc:
        raise UserError(
            f"{path} is missing and PyTorch is not installed to export it: run `edge-inspect export-backbone` on a "
            "machine with `pip install -e '.[export]'` and copy the file here"
        ) from exc
    log.info("exporting the pretrained EfficientNet-Lite0 backbone to %s", path)
    return export_backbone(path)


def load_folded(engines_dir: str | Path) -> tuple[dict[str, np.ndarray], str]:


    path = ensure_backbone(engines_dir)
    data = path.read_bytes()
    return folded_from_model(onnx.load_from_string(data)), hashlib.sha256(data).hexdigest()


class FeatureExtractor:
    """The feature graph in ONNX Runtime: patch features + global embedding for a batch of images."""

    def __init__(self, folded: dict[str, np.ndarray], params: ScorerParams, threads: int = 0) -> None:


        self.params = params
        self.model = build_features_model(folded, params)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(self.model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def __call__(self, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features, embedding = self.session.run(["features", "embedding"], {"image": to_input(bgr, self.params.input_size)})
        return features[0], embedding[0]


def anomaly_map_from_distances(patch_dist: np.ndarray, params: ScorerParams) -> np.ndarray:
    """numpy twin of the graph's tail: bilinear upsampling + separable Gaussian with edge padding."""
    H, W = params.input_size
    full = cv2.resize(patch_dist.astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR)
    k = gaussian_kernel_1d(params.sigma_px)
    return cv2.sepFilter2D(full, -1, k, k, borderType=cv2.BORDER_REPLICATE)


def score_patches(features: np.ndarray, bank: np.ndarray, params: ScorerParams) -> tuple[float, np.ndarray]:
    d, h, w = features.shape
    dist = nearest_distances(features.reshape(d, h * w).T, bank).reshape(h, w)
    amap = anomaly_map_from_distances(dist, params)
    return image_score(amap, params), amap


def score_many(features: Sequence[np.ndarray], bank: np.ndarray, params: ScorerParams) -> list[float]:
    """Image scores of several [D, h, w] feature maps against one bank, in one nearest-neighbour pass."""
    d, h, w = features[0].shape
    queries = np.concatenate([f.reshape(d, h * w).T for f in features])
    dist = nearest_distances(queries, bank).reshape(len(features), h, w)
    return [image_score(anomaly_map_from_distances(x, params), params) for x in dist]


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


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False, dynamic_ncols=True)


def load_good_images(paths: Sequence[Path], roi, size: tuple[int, int]) -> list[np.ndarray]:
    """Read, crop and check the good images; unreadable files are an error naming each one."""
    images, unreadable, shapes = [], [], set()
    for p in paths:
        try:
            bgr = crop_roi(read_bgr(p), roi)
        except UserError as exc:
            unreadable.append(f"{p} ({exc})")
            continue
        shapes.add(bgr.shape[:2])
        images.append(bgr)
    if unreadable:
        raise CalibrationError("cannot read these images (remove or replace them):\n  " + "\n  ".join(unreadable))
    if len(shapes) > 1:
        log.warning(
            "the good images have %d different sizes (%s); all are resized to %dx%d — frames on the line should "
            "have one size", len(shapes), ", ".join(f"{w}x{h}" for h, w in sorted(shapes)[:4]), size[1], size[0],
        )
    return images


REFIT_EVIDENCE_CHOICES = ("all", "shots", "novel")
REFIT_EVIDENCE = "shots"  # measured best on the real sets (docs/calibration.md#learning-from-operator-feedback)
STORED_SIDE_FACTOR = 2  # good images are kept at most this many times the scorer's input side


def stored_good_image(bgr: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    """The form a good image is fitted on and kept in (ROI-cropped already): at most twice the scorer's
    input side, so a refit from the stored copy sees what calibration saw, at a fraction of the disk."""
    limit = STORED_SIDE_FACTOR * max(input_size)
    scale = limit / max(bgr.shape[:2])
    if scale >= 1:
        return bgr
    return cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class GoodImage:
    """One image of a product's good set: a calibration shot, or a frame an operator overruled as ok."""

    bgr: np.ndarray  # ROI-cropped, in its stored form
    source: str  # the file it came from, or "inspection <id>"
    added_by: str = "calibrate"  # "calibrate" | "feedback"
    inspection_id: str | None = None


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
    """Memory bank (coreset of every good patch), leave-one-out and nuisance-view scores, synthetic
    anomalies and the automatic threshold, for good images already ROI-cropped.

    evidence_images: only the first N images give threshold evidence (leave-one-out, views, synthetic
    anomalies); the rest only join the bank. None: all of them.
    novel_only: of the images after the first `evidence_images`, only the patches no good part shows
    join the bank (novel_patches)."""
    started = time.perf_counter()
    params = options.params
    if len(images) < MIN_IMAGES:
        raise CalibrationError(f"{len(images)} good image(s); calibration needs at least {MIN_IMAGES}")
    # Raw features (no scales, no projection): the scales are measured on them first.
    extractor = FeatureExtractor(folded, dataclasses.replace(params, layer_scales=(), projection_dim=0), threads)
    rng = np.random.default_rng(options.seed)

    n_evidence = len(images) if evidence_images is None else max(MIN_IMAGES, min(len(images), evidence_images))
    if novel_only and evidence_images is None:
        raise ValueError("novel_only needs evidence_images: the first N images are the reference for what is novel")
    n_steps = len(images) + n_evidence * (1 + options.synthetic_per_image) + 2
    bar = _progress(n_steps, desc, progress)
    step = on_step or (lambda _msg: None)
    step("features")
    per_image: list[np.ndarray] = []  # patch features of each original image (and its augmentations)
    own: list[np.ndarray] = []  # features of the original view only, for leave-one-out
    embeddings: list[np.ndarray] = []
    for bgr in images:
        views = [bgr] + augmented(bgr, options.augment, rng)
        feats = []
        for i, view in enumerate(views):
            f, e = extractor(view)
            feats.append(f)
            if i == 0:
                own.append(f)
                embeddings.append(e)
        per_image.append(np.stack(feats))
        bar.update(1)

    # Equalise the tapped layers' contributions, then bake the scales into the graph's parameters.
    if options.layer_scales:
        params = with_layer_scales(params, np.stack(own))
    transform = feature_transform(params)
    own = [transform(f) for f in own]
    per_image = [features_to_patches(transform(p)) for p in per_image]
    n_evidence = len(images) if evidence_images is None else max(MIN_IMAGES, min(len(images), evidence_images))
    if novel_only:
        per_image = novel_patches(per_image, n_evidence)

    step("coreset")
    all_patches = np.concatenate(per_image)
    keep = greedy_coreset(all_patches, options.bank_size, seed=options.seed)
    bank = np.ascontiguousarray(all_patches[np.sort(keep)])
    bar.update(1)

    step("leave-one-out")
    # Each good image against a bank of the *other* good images: how a new good part will score.
    others_of = [np.concatenate([p for j, p in enumerate(per_image) if j != i]) for i in range(n_evidence)]
    loo, view_scores = [], []
    views_per_image = max(1, min(len(NUISANCE), round(NUISANCE_SAMPLES / n_evidence)))
    for i, f in enumerate(own[:n_evidence]):
        views = [transform(extractor(v)[0]) for v in nuisance_views(images[i], i, views_per_image)]
        scores = score_many([f, *views], others_of[i], params)  # one pass over the bank for all of them
        loo.append(scores[0])
        view_scores += scores[1:]
        bar.update(1)

    step("synthetic anomalies")
    # Synthetic anomalies in good image i, scored against the same leave-one-out bank as image i, so
    # their scores compare with the good parts' leave-one-out scores like for like.
    synthetic = []
    size_wh = (params.input_size[1], params.input_size[0])
    resized = [cv2.resize(b, size_wh, interpolation=cv2.INTER_AREA) for b in images]
    for i, base in enumerate(resized[:n_evidence]):
        donors = [b for j, b in enumerate(resized) if j != i][:3]
        for _ in range(options.synthetic_per_image):
            try:
                anomalous, _mask = synthetic_anomaly(base, rng, donors)
            except ValueError as exc:  # a flat image offers no structure to paste
                log.debug("no synthetic anomaly for image %d: %s", i, exc)
                bar.update(1)
                continue
            f, _ = extractor(anomalous)
            synthetic.append(score_patches(transform(f), others_of[i], params)[0])
            bar.update(1)
    del others_of

    threshold, evidence = automatic_threshold(np.array(loo), np.array(synthetic), options.false_reject_rate, np.array(view_scores))
    evidence["calibration_scores"] = [round(float(score_patches(f, bank, params)[0]), 5) for f in own]
    bar.update(1)
    bar.close()
    emb = np.stack(embeddings).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12
    return Fitted(params=params, bank=bank, from_patches=int(all_patches.shape[0]), threshold=float(threshold),
                  evidence=evidence, embeddings=emb, seconds=time.perf_counter() - started)


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


def options_to_json(options: CalibrationOptions) -> dict[str, Any]:
    """What a refit needs to repeat this calibration (params are stored apart, with their layer scales)."""
    return {"bank_size": options.bank_size, "layer_scales": options.layer_scales, "synthetic_per_image": options.synthetic_per_image,
            "false_reject_rate": options.false_reject_rate, "augment": list(options.augment), "seed": options.seed}


def options_from_manifest(manifest: dict[str, Any]) -> CalibrationOptions:
    stored = manifest.get("options") or {}
    params = ScorerParams.from_json(manifest["params"])
    layer_scales = bool(stored.get("layer_scales", bool(params.layer_scales)))
    if layer_scales:
        params = dataclasses.replace(params, layer_scales=())  # measured again on the new good set
    return CalibrationOptions(
        params=params,
        roi=tuple(manifest["roi"]) if manifest.get("roi") else None,
        augment=tuple(stored.get("augment", manifest.get("augment", ()))),
        bank_size=int(stored.get("bank_size", 4096)),
        layer_scales=layer_scales,
        false_reject_rate=float(stored.get("false_reject_rate", manifest.get("false_reject_rate", DEFAULT_FALSE_REJECT_RATE))),
        synthetic_per_image=int(stored.get("synthetic_per_image", 2)),
        seed=int(stored.get("seed", manifest.get("seed", 0))),
    )


def _good_file(pdir: Path, bgr: np.ndarray) -> str:
    """Store a good image once (content-addressed PNG, lossless) and return its path relative to pdir."""
    ok, png = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise CalibrationError(f"could not encode a good image of shape {bgr.shape} as PNG")
    data = png.tobytes()
    name = f"{GOOD_DIR}/{hashlib.sha256(data).hexdigest()[:20]}.png"
    path = pdir / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return name


def write_graphs(folded: dict[str, np.ndarray], product: str, params: ScorerParams, bank: np.ndarray,
                 engines: Path) -> tuple[str, str]:
    """The product's scorer and feature graphs for this bank, named by the bank's hash. They depend on the
    bank and params only (no threshold inside), so versions that differ in threshold share one file."""
    bank_sha = hashlib.sha256(np.ascontiguousarray(bank).tobytes()).hexdigest()
    engine_name = f"{product}-{bank_sha[:12]}.onnx"
    features_name = f"{product}-{bank_sha[:12]}.features.onnx"
    model = build_scorer_model(folded, params, bank, metadata={"product": product, "bank_sha256": bank_sha})
    save_model(model, engines / engine_name)
    for problem in check_tensorrt_compat(model):  # the same file must compile on a Jetson later
        log.warning("scorer graph may not compile with TensorRT 10: %s", problem)
    features = build_features_model(folded, dataclasses.replace(params, layer_scales=(), projection_dim=0))
    save_model(features, engines / features_name)
    return engine_name, features_name


def write_version_files(
    folder: Path,
    product: str,
    fitted: Fitted,
    good: Sequence[GoodImage],
    options: CalibrationOptions,
    folded: dict[str, np.ndarray],
    backbone_sha: str,
    engines: Path,
    pdir: Path,
    images_meta: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A version's files (bank, threshold, references) in `folder`, its graphs in `engines`, its good images
    in pdir/good/; returns its manifest."""
    bank = fitted.bank
    bank_sha = hashlib.sha256(bank.tobytes()).hexdigest()
    engine_name, features_name = write_graphs(folded, product, fitted.params, bank, engines)
    (folder / "references").mkdir(parents=True, exist_ok=True)
    np.save(folder / "memory_bank.npy", bank)
    names, good_set = [], []
    for i, item in enumerate(good):
        bgr = item.bgr
        scale = REFERENCE_SIZE / max(bgr.shape[:2])
        small = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else bgr
        name = f"{i:03d}.jpg"
        cv2.imwrite(str(folder / "references" / name), small, [cv2.IMWRITE_JPEG_QUALITY, 92])
        names.append({"file": name, "source": Path(item.source).name if item.added_by == "calibrate" else item.source})
        entry = {"file": _good_file(pdir, bgr), "source": item.source, "added_by": item.added_by}
        if item.inspection_id:
            entry["inspection_id"] = item.inspection_id
        good_set.append(entry)
    np.save(folder / "references" / "embeddings.npy", fitted.embeddings)
    (folder / "references" / "references.json").write_text(json.dumps(names, indent=1))
    threshold_doc = {"threshold": fitted.threshold, "false_reject_rate": options.false_reject_rate, "evidence": fitted.evidence}
    (folder / "threshold.json").write_text(json.dumps(threshold_doc, indent=1))
    return {
        "manifest_version": MANIFEST_VERSION,
        "product": product,
        "calibration_id": f"{product}@{bank_sha[:12]}",
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "edge_inspect_version": __version__,
        "versions": _versions(),
        "params": fitted.params.to_json(),
        "options": options_to_json(options),
        "input_size": list(fitted.params.input_size),
        "roi": list(options.roi) if options.roi else None,
        "augment": list(options.augment),
        "seed": options.seed,
        "threshold": fitted.threshold,
        "false_reject_rate": options.false_reject_rate,
        "bank": {"file": "memory_bank.npy", "patches": int(bank.shape[0]), "dim": int(bank.shape[1]),
                 "from_patches": fitted.from_patches, "sha256": bank_sha},
        "backbone": {"file": BACKBONE_FILE, "sha256": backbone_sha, "architecture": "efficientnet-lite0"},
        "scorer_onnx": {"file": engine_name, "sha256": file_sha256(engines / engine_name)},
        "features_onnx": {"file": features_name, "sha256": file_sha256(engines / features_name)},
        "images": images_meta if images_meta is not None else [],
        "good_set": good_set,
        "seconds": round(fitted.seconds, 2),
    }


def _warn_synthetic(evidence: dict[str, Any]) -> None:
    if evidence.get("synthetic_detected", 1.0) < 0.5:
        log.warning(
            "at the automatic threshold only %.0f%% of synthetic anomalies are flagged: add more good images, set "
            "an ROI, or raise --false-reject-rate", 100 * evidence["synthetic_detected"],
        )


def calibrate_product(
    image_paths: Sequence[str | Path],
    product: str,
    calibration_dir: str | Path = "calibration",
    engines_dir: str | Path = "engines",
    options: CalibrationOptions | None = None,
    force: bool = False,
    progress: bool = True,
    threads: int = 0,
    on_step: Callable[[str], None] | None = None,
    by: str = "calibrate",
    why: str = "",
    keep: int = DEFAULT_KEEP,
):
    """Calibrate `product` from good images as a new version; returns the loaded scoring.ProductCalibration.

    With --force on a product that has versions, the new calibration is one more version (its parent the
    active one), so `calibration rollback` can undo a recalibration too."""

    options = options or CalibrationOptions()
    params = options.params
    validate_product_name(product)
    paths = [Path(p) for p in image_paths]
    if len(paths) < MIN_IMAGES:
        raise CalibrationError(
            f"{len(paths)} good image(s) given; calibration needs at least {MIN_IMAGES} "
            f"(recommended {RECOMMENDED_IMAGES}-10 of different good parts)"
        )
    if len(paths) < RECOMMENDED_IMAGES:
        log.warning("only %d good images: %d or more give a more reliable threshold", len(paths), RECOMMENDED_IMAGES)
    pdir = product_dir(calibration_dir, product)
    if active_directory(calibration_dir, product) is not None and not force:
        raise CalibrationError(f"product {product!r} already exists in {pdir}; use --force to recalibrate it")
    images = [stored_good_image(b, params.input_size) for b in load_good_images(paths, options.roi, params.input_size)]
    folded, backbone_sha = load_folded(engines_dir)
    fitted = fit_calibration(images, folded, options, threads, progress, on_step, desc=f"calibrate {product}")
    if on_step:
        on_step("write calibration")
    engines = Path(engines_dir)
    good = [GoodImage(bgr, str(p)) for bgr, p in zip(images, paths)]
    images_meta = [{"source": str(p), "sha256": file_sha256(p)} for p in paths]
    with product_lock(calibration_dir, product):
        if current_version(calibration_dir, product) is None:
            _retire_legacy(pdir)
        commit_version(
            calibration_dir, product,
            lambda folder: write_version_files(folder, product, fitted, good, options, folded, backbone_sha, engines, pdir, images_meta),
            {"change": "calibrate", "by": by, "why": why or f"calibrated from {len(paths)} good image(s)"},
            keep=keep, engines_dir=engines,
        )
    _warn_synthetic(fitted.evidence)
    return load_product(calibration_dir, product, engines_dir)


def _retire_legacy(pdir: Path) -> None:
    """A product calibrated before versioning, recalibrated: its flat files go (knowledge.yaml stays)."""
    for name in ("manifest.json", "threshold.json", "memory_bank.npy"):
        (pdir / name).unlink(missing_ok=True)
    shutil.rmtree(pdir / "references", ignore_errors=True)


def load_good_set(calibration_dir: str | Path, product: str, manifest: dict[str, Any]) -> list[GoodImage]:
    """The stored good images a version was fitted on."""
    pdir = product_dir(calibration_dir, product)
    entries = manifest.get("good_set")
    if not entries:
        raise CalibrationError(
            f"product {product!r} was calibrated before good images were kept with the calibration, so it cannot "
            f"be refitted: recalibrate once with `edge-inspect calibrate --product {product} --images DIR --force`"
        )
    out = []
    for entry in entries:
        path = pdir / entry["file"]
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise CalibrationError(f"{path} (a good image of the active calibration) is missing or damaged: recalibrate "
                                   f"with `edge-inspect calibrate --product {product} --images DIR --force`")
        out.append(GoodImage(bgr, entry.get("source", entry["file"]), entry.get("added_by", "calibrate"), entry.get("inspection_id")))
    return out


def refit_product(
    calibration_dir: str | Path,
    product: str,
    engines_dir: str | Path,
    add: Sequence[GoodImage],
    change: dict[str, Any],
    keep: int = DEFAULT_KEEP,
    threads: int = 0,
    progress: bool = False,
    max_good: int | None = None,
    evidence_from: str = REFIT_EVIDENCE,
) -> int:
    """A new version fitted on the active version's good set plus `add` (frames operators accepted, already
    ROI-cropped): their patches join the bank (coreset-bounded) and the threshold evidence is recomputed.
    The caller holds `product_lock`. Returns the new version number.

    max_good: the good set's size limit; beyond it the oldest accepted frames leave it (the shots stay).
    evidence_from: "all" = every good image gives threshold evidence (leave-one-out); "shots" = only the
    calibration shots do and accepted frames only join the bank; "novel" = as "shots", and of each
    accepted frame only its novel patches join (novel_patches). docs/calibration.md compares them."""
    if evidence_from not in REFIT_EVIDENCE_CHOICES:
        raise UserError(f"evidence_from must be one of {REFIT_EVIDENCE_CHOICES}, got {evidence_from!r}")
    number = current_version(calibration_dir, product)
    if number is None:
        raise CalibrationError(
            f"product {product!r} has no versioned calibration (calibrated before versioning, or not at all): "
            f"recalibrate with `edge-inspect calibrate --product {product} --images DIR --force`"
        )
    manifest = read_manifest(calibration_dir, product, number)
    options = options_from_manifest(manifest)
    good = load_good_set(calibration_dir, product, manifest)
    good += [GoodImage(stored_good_image(g.bgr, options.params.input_size), g.source, g.added_by, g.inspection_id) for g in add]
    if max_good is not None and len(good) > max_good:
        shots = [g for g in good if g.added_by == "calibrate"]
        accepted = [g for g in good if g.added_by != "calibrate"]
        good = shots + accepted[max(0, len(accepted) - max(0, max_good - len(shots))):]
    folded, backbone_sha = load_folded(engines_dir)
    n_shots = sum(g.added_by == "calibrate" for g in good)
    fitted = fit_calibration([g.bgr for g in good], folded, options, threads, progress, desc=f"refit {product}",
                             evidence_images=None if evidence_from == "all" else n_shots, novel_only=evidence_from == "novel")
    pdir = product_dir(calibration_dir, product)
    return commit_version(
        calibration_dir, product,
        lambda folder: write_version_files(folder, product, fitted, good, options, folded, backbone_sha, Path(engines_dir),
                                           pdir, manifest.get("images")),
        change, keep=keep, engines_dir=engines_dir,
    )


def rollback_product(
    calibration_dir: str | Path,
    product: str,
    engines_dir: str | Path,
    to: int | None = None,
    by: str = "unknown",
    why: str = "",
    keep: int = DEFAULT_KEEP,
) -> int:
    """A new version whose bank, threshold and references are bit-for-bit copies of version `to` (default:
    the active version's parent). Its scorer graph is rebuilt from the bank when it was deleted."""
    with product_lock(calibration_dir, product):
        active = current_version(calibration_dir, product)
        if active is None:
            raise UserError(f"product {product!r} has no versioned calibration to roll back")
        if to is None:
            parent = read_manifest(calibration_dir, product, active).get("version", {}).get("parent")
            if parent is None:
                raise UserError(f"version {active} of product {product!r} has no parent: nothing to roll back to")
            to = int(parent)
        if to == active:
            raise UserError(f"version {to} of product {product!r} is already the active one")
        source = product_dir(calibration_dir, product) / VERSIONS_DIR / str(to)
        old = read_manifest(calibration_dir, product, to)  # a clear error when it was pruned
        _ensure_graphs(old, product, source, Path(engines_dir))
        return commit_version(
            calibration_dir, product, lambda folder: copy_version_files(source, folder),
            {"change": "rollback", "by": by, "why": why or f"rolled back to version {to}", "restored_from": to},
            keep=keep, engines_dir=engines_dir,
        )


def _ensure_graphs(manifest: dict[str, Any], product: str, folder: Path, engines: Path) -> None:
    """The graphs a version names, rebuilt from its bank when missing (they are pruned with old versions)."""
    scorer_file = engines / manifest["scorer_onnx"]["file"]
    features_file = engines / manifest["features_onnx"]["file"]
    if scorer_file.is_file() and features_file.is_file():
        return
    folded, backbone_sha = load_folded(engines)
    if backbone_sha != manifest.get("backbone", {}).get("sha256"):
        raise CalibrationError(f"the graphs of that version are gone and the backbone in {engines} is not the one it was "
                               "calibrated with, so they cannot be rebuilt: recalibrate instead")
    bank = np.load(folder / "memory_bank.npy", allow_pickle=False)
    write_graphs(folded, product, ScorerParams.from_json(manifest["params"]), bank, engines)
    for key, path in (("scorer_onnx", scorer_file), ("features_onnx", features_file)):
        if not path.is_file() or file_sha256(path) != manifest[key].get("sha256"):
            raise CalibrationError(f"rebuilt {path} does not match the sha256 version's manifest records: recalibrate instead")


def _versions() -> dict[str, str]:
    versions = {"numpy": np.__version__, "opencv": cv2.__version__, "onnxruntime": onnxruntime.__version__}
    try:

        versions["onnx"] = onnx.__version__
    except ImportError:  # pragma: no cover
        pass
    return versions
