"""The files calibration makes besides a version's own: the backbone artifact and a product's graphs.

    engines/backbone/efficientnet_lite0.onnx     exported once from the pretrained weights (needs PyTorch)
    engines/scorer-256x256-<sha[:12]>.onnx       a scorer graph that takes the bank as an input: one per
                                                 input size, params and capacity, named by its content and
                                                 shared by every product and version of that shape
    engines/features-256x256-<sha[:12]>.onnx     the feature graph (calibration, reference retrieval)
    engines/<product>-<bank sha[:12]>.onnx       a scorer graph with its bank inside: what calibrations
    engines/<product>-<bank sha[:12]>.features.onnx   before the bank input wrote; still loaded and rebuilt

A refit or a product switch of a graph with the bank input needs no new graph and no new TensorRT
plan; a rollback whose graph was deleted rebuilds it bit for bit (ensure_graphs).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import CalibrationError, UserError
from ..files import array_sha256, bytes_sha256, file_sha256
from ..scorer.backends.trt_compat import check_tensorrt_compat
from ..scorer.params import ScorerParams
from ..scorer.scorer_graph import (
    SHARED_GRAPH_PREFIX,
    build_features_model,
    build_scorer_model,
    folded_from_model,
    save_model,
)

log = logging.getLogger(__name__)

BACKBONE_FILE = "backbone/efficientnet_lite0.onnx"
FEATURES_GRAPH_PREFIX = "features-"


def backbone_path(engines_dir: str | Path) -> Path:
    return Path(engines_dir) / BACKBONE_FILE


def ensure_backbone(engines_dir: str | Path) -> Path:
    """The backbone ONNX artifact; exported from the pretrained weights (needs PyTorch) when missing."""
    path = backbone_path(engines_dir)
    if path.is_file():
        return path
    try:
        from ..export.backbone_export import (
            export_backbone,  # needs PyTorch (the export extra)
        )
    except ImportError as exc:
        raise UserError(
            f"{path} is missing and PyTorch is not installed to export it: run `edge-inspect export-backbone` on a "
            "machine with `pip install -e '.[export]'` and copy the file here"
        ) from exc
    log.info("exporting the pretrained EfficientNet-Lite0 backbone to %s", path)
    return export_backbone(path)


def load_folded(engines_dir: str | Path) -> tuple[dict[str, np.ndarray], str]:
    """The backbone's folded weights (exported first when missing) and the sha256 of its file."""
    path = ensure_backbone(engines_dir)
    data = path.read_bytes()
    return folded_from_model(onnx.load_from_string(data)), bytes_sha256(data)


def graph_names(product: str, bank_sha: str) -> tuple[str, str]:
    """The per-product file names of a graph with its bank inside (calibrations before the bank input)."""
    return f"{product}-{bank_sha[:12]}.onnx", f"{product}-{bank_sha[:12]}.features.onnx"


def _features_params(params: ScorerParams) -> ScorerParams:
    return dataclasses.replace(params, layer_scales=(), projection_dim=0)  # raw features: calibration scales them


def _save_named_by_content(model: onnx.ModelProto, engines: Path, prefix: str, params: ScorerParams) -> str:
    data = model.SerializeToString()
    h, w = params.input_size
    name = f"{prefix}{h}x{w}-{bytes_sha256(data)[:12]}.onnx"
    path = engines / name
    if not (path.is_file() and file_sha256(path) == bytes_sha256(data)):
        save_model(model, path)
    return name


def write_graphs(folded: dict[str, np.ndarray], product: str, params: ScorerParams, bank: np.ndarray,
                 engines: Path, capacity: int | None = None) -> tuple[str, str]:
    """The scorer and feature graphs for this bank, written to engines/ when not there yet; their names.

    capacity: the graph takes the bank as an input with this many slots (named by content, shared);
    None: the bank is a graph constant (named after the product and the bank's hash, as before)."""
    if capacity is not None:
        model = build_scorer_model(folded, params, capacity=capacity)
        engine_name = _save_named_by_content(model, engines, SHARED_GRAPH_PREFIX, params)
        features_name = _save_named_by_content(build_features_model(folded, _features_params(params)), engines,
                                               FEATURES_GRAPH_PREFIX, params)
    else:
        bank_sha = array_sha256(bank)
        engine_name, features_name = graph_names(product, bank_sha)
        model = build_scorer_model(folded, params, bank, metadata={"product": product, "bank_sha256": bank_sha})
        save_model(model, engines / engine_name)
        save_model(build_features_model(folded, _features_params(params)), engines / features_name)
    for problem in check_tensorrt_compat(model):  # the same file must compile on a Jetson later
        log.warning("scorer graph may not compile with TensorRT 10: %s", problem)
    return engine_name, features_name


def ensure_graphs(manifest: dict[str, Any], product: str, folder: Path, engines: Path) -> None:
    """The graphs a version names, rebuilt from its bank when missing (they are pruned with old versions)."""
    scorer_file = engines / manifest["scorer_onnx"]["file"]
    features_file = engines / manifest["features_onnx"]["file"]
    if scorer_file.is_file() and features_file.is_file():
        return
    folded, backbone_sha = load_folded(engines)
    if backbone_sha != manifest.get("backbone", {}).get("sha256"):
        raise CalibrationError(f"the graphs of that version are gone and the backbone in {engines} is not the one it was "
                               "calibrated with, so they cannot be rebuilt: recalibrate instead")
    bank = np.load(folder / manifest["bank"]["file"], allow_pickle=False)
    capacity = manifest["scorer_onnx"]["capacity"] if manifest["scorer_onnx"]["bank_input"] else None
    write_graphs(folded, product, ScorerParams.from_json(manifest["params"]), bank, engines, capacity)
    for key, path in (("scorer_onnx", scorer_file), ("features_onnx", features_file)):
        if not path.is_file() or file_sha256(path) != manifest[key].get("sha256"):
            raise CalibrationError(f"rebuilt {path} does not match the sha256 version's manifest records: recalibrate instead")
