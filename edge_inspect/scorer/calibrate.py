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
from .product import load_product
from .scorer_graph import build_features_model, build_scorer_model, folded_from_model, save_model
from .synth import synthetic_anomaly
from .threshold import DEFAULT_FALSE_REJECT_RATE, automatic_threshold

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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
):
    """Calibrate `product` from good images; returns the loaded scoring.ProductCalibration."""

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
    out_dir = Path(calibration_dir) / product
    if out_dir.exists() and not force:
        raise CalibrationError(f"product {product!r} already exists in {out_dir}; use --force to recalibrate it")
    started = time.perf_counter()
    images = load_good_images(paths, options.roi, params.input_size)
    folded, backbone_sha = load_folded(engines_dir)
    # Raw features (no scales, no projection): the scales are measured on them first.
    extractor = FeatureExtractor(folded, dataclasses.replace(params, layer_scales=(), projection_dim=0), threads)
    rng = np.random.default_rng(options.seed)

    n_steps = len(images) * (2 + options.synthetic_per_image) + 3
    bar = _progress(n_steps, f"calibrate {product}", progress)
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

    step("coreset")
    all_patches = np.concatenate(per_image)
    keep = greedy_coreset(all_patches, options.bank_size, seed=options.seed)
    bank = np.ascontiguousarray(all_patches[np.sort(keep)])
    bar.update(1)

    step("leave-one-out")
    # Each good image against a bank of the *other* good images: how a new good part will score.
    others_of = [np.concatenate([p for j, p in enumerate(per_image) if j != i]) for i in range(len(per_image))]
    loo, view_scores = [], []
    views_per_image = max(1, min(len(NUISANCE), round(NUISANCE_SAMPLES / len(images))))
    for i, f in enumerate(own):
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
    for i, base in enumerate(resized):
        donors = [b for j, b in enumerate(resized) if j != i][:3]
        for _ in range(options.synthetic_per_image):
            try:
                anomalous, _mask = synthetic_anomaly(base, rng, donors)
            except ValueError as exc:  # a flat image offers no structure to paste
                log.debug("no synthetic anomaly for image %d: %s", i, exc)
                bar.update(1)
                continue
            f, _ = extractor(anomalous)
            f = transform(f)
            synthetic.append(score_patches(f, others_of[i], params)[0])
            bar.update(1)
    del others_of

    threshold, evidence = automatic_threshold(np.array(loo), np.array(synthetic), options.false_reject_rate, np.array(view_scores))
    in_sample = [score_patches(f, bank, params)[0] for f in own]
    evidence["calibration_scores"] = [round(float(s), 5) for s in in_sample]

    step("export scorer graph")
    bank_sha = hashlib.sha256(bank.tobytes()).hexdigest()
    engine_name = f"{product}-{bank_sha[:12]}.onnx"
    engines = Path(engines_dir)
    model = build_scorer_model(folded, params, bank, metadata={"product": product, "bank_sha256": bank_sha, "threshold": repr(threshold)})
    save_model(model, engines / engine_name)

    for problem in check_tensorrt_compat(model):  # the same file must compile on a Jetson later
        log.warning("scorer graph may not compile with TensorRT 10: %s", problem)
    features_name = f"{product}-{bank_sha[:12]}.features.onnx"
    save_model(extractor.model, engines / features_name)
    bar.update(1)

    step("write calibration")
    tmp_dir = out_dir.with_name(f".{product}.tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    (tmp_dir / "references").mkdir(parents=True)
    np.save(tmp_dir / "memory_bank.npy", bank)
    names = []
    for i, (bgr, p) in enumerate(zip(images, paths)):
        scale = REFERENCE_SIZE / max(bgr.shape[:2])
        small = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else bgr
        name = f"{i:03d}.jpg"
        cv2.imwrite(str(tmp_dir / "references" / name), small, [cv2.IMWRITE_JPEG_QUALITY, 92])
        names.append({"file": name, "source": p.name})
    emb = np.stack(embeddings).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12
    np.save(tmp_dir / "references" / "embeddings.npy", emb)
    (tmp_dir / "references" / "references.json").write_text(json.dumps(names, indent=1))
    threshold_doc = {"threshold": threshold, "false_reject_rate": options.false_reject_rate, "evidence": evidence}
    (tmp_dir / "threshold.json").write_text(json.dumps(threshold_doc, indent=1))
    calibration_id = f"{product}@{bank_sha[:12]}"
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "product": product,
        "calibration_id": calibration_id,
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "edge_inspect_version": __version__,
        "versions": _versions(),
        "params": params.to_json(),
        "input_size": list(params.input_size),
        "roi": list(options.roi) if options.roi else None,
        "augment": list(options.augment),
        "seed": options.seed,
        "threshold": threshold,
        "false_reject_rate": options.false_reject_rate,
        "bank": {"file": "memory_bank.npy", "patches": int(bank.shape[0]), "dim": int(bank.shape[1]), "from_patches": int(all_patches.shape[0]), "sha256": bank_sha},
        "backbone": {"file": BACKBONE_FILE, "sha256": backbone_sha, "architecture": "efficientnet-lite0"},
        "scorer_onnx": {"file": engine_name, "sha256": _sha256(engines / engine_name)},
        "features_onnx": {"file": features_name, "sha256": _sha256(engines / features_name)},
        "images": [{"source": str(p), "sha256": _sha256(p)} for p in paths],
        "seconds": round(time.perf_counter() - started, 2),
    }
    (tmp_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    knowledge = out_dir / "knowledge.yaml"
    if knowledge.is_file():  # the product's knowledge guide is written by people: keep it
        shutil.copy2(knowledge, tmp_dir / "knowledge.yaml")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp_dir.replace(out_dir)
    bar.update(1)
    bar.close()
    if evidence.get("synthetic_detected", 1.0) < 0.5:
        log.warning(
            "at the automatic threshold only %.0f%% of synthetic anomalies are flagged: add more good images, set "
            "an ROI, or raise --false-reject-rate", 100 * evidence["synthetic_detected"],
        )
    return load_product(calibration_dir, product, engines_dir)


def _versions() -> dict[str, str]:
    versions = {"numpy": np.__version__, "opencv": cv2.__version__, "onnxruntime": onnxruntime.__version__}
    try:

        versions["onnx"] = onnx.__version__
    except ImportError:  # pragma: no cover
        pass
    return versions
