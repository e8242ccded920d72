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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..errors import CalibrationError
from ..imageio import crop_roi, read_bgr, to_input
from ..records import ScoreResult
from .backends import ScorerBackend, create_backend
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

    @property
    def bank_sha256(self) -> str:
        return self.manifest["bank"]["sha256"]


def default_engines_dir(calibration_dir: str | Path) -> Path:
    return Path(calibration_dir).resolve().parent / "engines"


def load_product(calibration_dir: str | Path, product: str, engines_dir: str | Path | None = None) -> ProductCalibration:
    """Load calibration/<product>/ and check its files; errors say how to fix them."""
    directory = Path(calibration_dir) / product
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        known = sorted(p.name for p in Path(calibration_dir).glob("*/manifest.json") for p in [p.parent]) if Path(calibration_dir).is_dir() else []
        hint = f" (calibrated products: {', '.join(known)})" if known else ""
        raise CalibrationError(
            f"product {product!r} is not calibrated in {calibration_dir}{hint}: run "
            f"`edge-inspect calibrate --product {product} --images DIR`"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        threshold_doc = json.loads((directory / "threshold.json").read_text())
        params = ScorerParams.from_json(manifest["params"])
        engines = Path(engines_dir) if engines_dir else default_engines_dir(calibration_dir)
        scorer_onnx = engines / manifest["scorer_onnx"]["file"]
        features_onnx = engines / manifest["features_onnx"]["file"]
    except (OSError, ValueError, KeyError) as exc:
        raise CalibrationError(f"{directory} is damaged ({exc}); recalibrate with --force") from exc
    if not scorer_onnx.is_file():
        raise CalibrationError(
            f"the scorer graph {scorer_onnx} of product {product!r} is missing (engines dir {engines}); "
            f"recalibrate with `edge-inspect calibrate --product {product} --images DIR --force` or point "
            "scoring.engines_dir at the folder that holds it"
        )
    roi = tuple(manifest["roi"]) if manifest.get("roi") else None
    return ProductCalibration(
        name=product,
        directory=directory,
        engines_dir=engines,
        input_size=tuple(manifest["input_size"]),
        threshold=float(threshold_doc["threshold"]),
        roi=roi,  # type: ignore[arg-type]
        scorer_onnx=scorer_onnx,
        features_onnx=features_onnx,
        calibration_id=manifest["calibration_id"],
        params=params,
        manifest=manifest,
    )


class Scorer:
    """Scores frames for one product. Not thread-safe: one Scorer per scoring thread."""

    def __init__(self, product: ProductCalibration, backend: str | ScorerBackend = "auto", threads: int = 0, **backend_options: Any) -> None:
        self.product = product
        self.backend = backend if isinstance(backend, ScorerBackend) else create_backend(backend, product.scorer_onnx, threads=threads, product=product, **backend_options)
        expected = (1, 3, *product.input_size)
        if tuple(self.backend.input_shape) != expected:
            raise CalibrationError(f"scorer graph input {self.backend.input_shape} does not match the calibration {expected}")
        self._input = np.empty(expected, dtype=np.float32)

    def prepare(self, bgr: np.ndarray) -> np.ndarray:
        return to_input(crop_roi(bgr, self.product.roi), self.product.input_size, out=self._input)

    def score(self, bgr: np.ndarray) -> ScoreResult:
        started = time.perf_counter()
        anomaly_map, score = self.backend.run(self.prepare(bgr))
        return ScoreResult(
            score=score,
            threshold=self.product.threshold,
            anomaly_map=np.asarray(anomaly_map, dtype=np.float32),  # backends hand out arrays the caller owns
            latency_ms=(time.perf_counter() - started) * 1000.0,
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
        self.files = [ref_dir / e["file"] for e in json.loads((ref_dir / "references.json").read_text())]
        self.embeddings = np.load(ref_dir / "embeddings.npy")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if not product.features_onnx.is_file():
            raise CalibrationError(f"feature graph {product.features_onnx} is missing: recalibrate product {product.name!r} with --force")
        self.session = ort.InferenceSession(str(product.features_onnx), options, providers=["CPUExecutionProvider"])

    def embed(self, bgr: np.ndarray) -> np.ndarray:
        x = to_input(crop_roi(bgr, self.product.roi), self.product.input_size)
        (emb,) = self.session.run(["embedding"], {"image": x})
        v = emb[0].astype(np.float32)
        return v / (np.linalg.norm(v) + 1e-12)

    def nearest(self, bgr: np.ndarray) -> tuple[Path, float]:
        sims = self.embeddings @ self.embed(bgr)
        best = int(np.argmax(sims))
        return self.files[best], float(sims[best])


def score_files(scorer: Scorer, paths: list[Path]) -> list[tuple[Path, np.ndarray, ScoreResult]]:
    return [(p, bgr, scorer.score(bgr)) for p in paths for bgr in [read_bgr(p)]]
