"""The scorer stage: a product's calibration + a backend running its graph -> ScoreResult per frame.

Example:
    product = load_product("calibration", "bracket-a")
    scorer = Scorer(product, backend="auto")
    result = scorer.score(frame_bgr)       # records.ScoreResult: score, threshold, anomaly_map, flagged
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CalibrationError, UserError
from ..files import array_sha256, file_sha256
from ..imageio import crop_roi, to_input
from ..records import ScoreResult
from .backends import ScorerBackend, create_backend
from .backends.ort_backend import ort_session
from .layout import (
    MANIFEST_FILE,
    THRESHOLD_FILE,
    VERSIONS_DIR,
    calibrated_products,
    current_version,
    product_dir,
)
from .manifest import check_threshold, load_manifest, read_json_object, recalibrate_hint
from .params import ScorerParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProductCalibration:
    name: str
    directory: Path
    engines_dir: Path
    input_size: tuple[int, int]
    threshold: float
    roi: tuple[int, int, int, int] | None
    scorer_onnx: Path
    features_onnx: Path
    calibration_id: str
    params: ScorerParams
    manifest: dict[str, Any]
    version: int | None = None  # the calibration version (calibration/store.py); None: calibrated before versioning
    # The memory bank [M, D] when the scorer graph takes it as an input (None: the bank is inside the graph).
    bank: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def bank_capacity(self) -> int | None:
        """Bank slots of a shared scorer graph (None: a graph with its bank inside)."""
        entry = self.manifest["scorer_onnx"]
        return int(entry["capacity"]) if entry["bank_input"] else None

    @property
    def bank_sha256(self) -> str:
        return self.manifest["bank"]["sha256"]


def default_engines_dir(calibration_dir: str | Path) -> Path:
    return Path(calibration_dir).resolve().parent / "engines"


def _load_bank(directory: Path, entry: Any, product: str) -> np.ndarray:
    """memory_bank.npy, which must load and hash (of its array bytes) to what calibrate recorded."""
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise CalibrationError(f"{directory / MANIFEST_FILE}: `bank` has no sha256: {recalibrate_hint(product)}")
    path = directory / str(entry["file"])
    try:
        bank = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise CalibrationError(f"{path} (the memory bank) is missing: {recalibrate_hint(product)}") from None
    except (OSError, ValueError, EOFError) as exc:
        raise CalibrationError(f"{path} (the memory bank) is damaged or truncated ({exc}): {recalibrate_hint(product)}") from None
    if array_sha256(bank) != entry["sha256"]:
        raise CalibrationError(
            f"{path} (the memory bank) does not match the sha256 in {directory / MANIFEST_FILE}: it was changed or "
            f"damaged after calibration; {recalibrate_hint(product)}"
        )
    return bank


def _check_file_hash(path: Path, entry: dict[str, Any], what: str, manifest_path: Path, product: str) -> None:
    expected = entry.get("sha256")
    if not isinstance(expected, str):
        return  # older manifests without a hash: nothing to compare against
    try:
        actual = file_sha256(path)
    except OSError as exc:
        raise CalibrationError(f"{path} ({what}) cannot be read ({exc}): {recalibrate_hint(product)}") from None
    if actual != expected:
        raise CalibrationError(
            f"{path} ({what}) does not match the sha256 in {manifest_path}: it was replaced or damaged after "
            f"calibration (or another product's calibration overwrote it); {recalibrate_hint(product)}"
        )


def load_product(calibration_dir: str | Path, product: str, engines_dir: str | Path | None = None,
                 verify: bool = True) -> ProductCalibration:
    """Load calibration/<product>/ and check its files; every problem is a CalibrationError naming the file and the fix.

    verify: also check the sha256 the manifest records for the memory bank and both graphs.
    """
    version = current_version(calibration_dir, product)  # read once: a feedback worker may commit meanwhile
    directory = product_dir(calibration_dir, product)
    if version is not None:
        directory = directory / VERSIONS_DIR / str(version)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        known = calibrated_products(calibration_dir)
        hint = f" (calibrated products: {', '.join(known)})" if known else ""
        raise CalibrationError(
            f"product {product!r} is not calibrated in {calibration_dir}{hint}: run "
            f"`edge-inspect calibrate --product {product} --images DIR`"
        )
    threshold_path = directory / THRESHOLD_FILE
    threshold = check_threshold(read_json_object(threshold_path, product), threshold_path, product)
    manifest = load_manifest(manifest_path, product)
    try:
        params = ScorerParams.from_json(manifest["params"])
    except Exception as exc:  # noqa: BLE001 - any shape of damage in the params block
        raise CalibrationError(f"{manifest_path} is damaged (`params`: {type(exc).__name__}: {exc}): "
                               f"{recalibrate_hint(product)}") from None
    engines = Path(engines_dir) if engines_dir else default_engines_dir(calibration_dir)
    graphs = {key: (engines / manifest[key]["file"], manifest[key]) for key in ("scorer_onnx", "features_onnx")}
    scorer_onnx, features_onnx = graphs["scorer_onnx"][0], graphs["features_onnx"][0]
    if not scorer_onnx.is_file():
        raise CalibrationError(
            f"the scorer graph {scorer_onnx} of product {product!r} is missing (engines dir {engines}); "
            f"recalibrate with `edge-inspect calibrate --product {product} --images DIR --force` or point "
            "scoring.engines_dir at the folder that holds it"
        )
    bank = None
    if verify or manifest["scorer_onnx"]["bank_input"]:  # a shared graph needs the bank to score
        bank = _load_bank(directory, manifest.get("bank"), product)
    if verify:
        _check_file_hash(scorer_onnx, graphs["scorer_onnx"][1], "the scorer graph", manifest_path, product)
        if features_onnx.is_file():  # only the VLM's reference retrieval needs it; ReferenceIndex says so when missing
            _check_file_hash(features_onnx, graphs["features_onnx"][1], "the feature graph", manifest_path, product)
    return ProductCalibration(
        name=product,
        directory=directory,
        engines_dir=engines,
        input_size=(manifest["input_size"][0], manifest["input_size"][1]),
        threshold=threshold,
        roi=tuple(manifest["roi"]) if manifest.get("roi") else None,  # type: ignore[arg-type]
        scorer_onnx=scorer_onnx,
        features_onnx=features_onnx,
        calibration_id=manifest["calibration_id"],
        params=params,
        manifest=manifest,
        version=version,
        bank=bank if manifest["scorer_onnx"]["bank_input"] else None,
    )


class Scorer:
    """Scores frames for one product. Not thread-safe: one Scorer per scoring thread."""

    def __init__(self, product: ProductCalibration, backend: str | ScorerBackend = "auto", threads: int = 0, **backend_options: Any) -> None:
        self.product = product
        if isinstance(backend, ScorerBackend):
            self.backend = backend
        else:
            try:
                self.backend = create_backend(backend, product.scorer_onnx, threads=threads, product=product,
                                              bank=product.bank, **backend_options)
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - ONNX Runtime/TensorRT refuse a damaged graph in many ways
                raise CalibrationError(
                    f"the scorer graph {product.scorer_onnx} of product {product.name!r} does not load "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): {recalibrate_hint(product.name)}"
                ) from None
        expected = (1, 3, *product.input_size)
        if tuple(self.backend.input_shape) != expected:
            self.backend.close()
            raise CalibrationError(f"scorer graph {product.scorer_onnx} input {self.backend.input_shape} does not match the "
                                   f"calibration {expected}: {recalibrate_hint(product.name)}")
        self._input = np.empty(expected, dtype=np.float32)

    def prepare(self, bgr: np.ndarray) -> np.ndarray:
        return to_input(crop_roi(bgr, self.product.roi), self.product.input_size, out=self._input)

    @property
    def gives_features(self) -> bool:
        """score(features=True) returns the frame's patch features (a graph with the bank as an input)."""
        return self.backend.has_features

    def score(self, bgr: np.ndarray, features: bool = False) -> ScoreResult:
        started = time.perf_counter()
        patch_features = None
        if features and self.backend.has_features:
            anomaly_map, score, patch_features = self.backend.run_features(self.prepare(bgr))
        else:
            anomaly_map, score = self.backend.run(self.prepare(bgr))
        return ScoreResult(
            score=score,
            threshold=self.product.threshold,
            anomaly_map=np.asarray(anomaly_map, dtype=np.float32),  # backends hand out arrays the caller owns
            latency_ms=(time.perf_counter() - started) * 1000.0,
            patch_features=patch_features,
        )

    def close(self) -> None:
        self.backend.close()


class ReferenceIndex:
    """Retrieves the most similar good calibration image for a frame (Echo's reference module).

    Cosine similarity of global embeddings (average-pooled deepest patch features), computed by the
    product's feature graph. Only used for flagged frames, so it has its own small session.
    """

    def __init__(self, product: ProductCalibration, threads: int = 1) -> None:
        ref_dir = product.directory / "references"
        self.product = product
        try:
            self.files = [ref_dir / e["file"] for e in json.loads((ref_dir / "references.json").read_text())]
            self.embeddings = np.load(ref_dir / "embeddings.npy", allow_pickle=False)
        except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:
            raise CalibrationError(f"the good references in {ref_dir} are missing or damaged ({exc}): "
                                   f"{recalibrate_hint(product.name)}") from None
        if not product.features_onnx.is_file():
            raise CalibrationError(f"feature graph {product.features_onnx} is missing: recalibrate product {product.name!r} with --force")
        try:
            self.session = ort_session(product.features_onnx, threads, use_cuda=False)
        except Exception as exc:  # noqa: BLE001 - a damaged graph
            raise CalibrationError(f"the feature graph {product.features_onnx} does not load ({type(exc).__name__}): "
                                   f"{recalibrate_hint(product.name)}") from None

    def embed(self, bgr: np.ndarray) -> np.ndarray:
        x = to_input(crop_roi(bgr, self.product.roi), self.product.input_size)
        (emb,) = self.session.run(["embedding"], {"image": x})
        v = emb[0].astype(np.float32)
        return v / (np.linalg.norm(v) + 1e-12)

    def nearest(self, bgr: np.ndarray) -> tuple[Path, float]:
        sims = self.embeddings @ self.embed(bgr)
        best = int(np.argmax(sims))
        return self.files[best], float(sims[best])

