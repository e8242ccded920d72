"""A calibration's manifest: its version, the migration of older ones, and the checks on load.

Why: fields were added to the manifest over time (the image score's top-k, the options block, the
stored good set, ...). Instead of a `.get(key, default)` wherever a field is read, a manifest is
brought to the current version once, here, with each added field set to what calibrations of that
time scored with; everything after reads the fields plainly. A manifest from a newer edge-inspect is
refused by name instead of being half understood.

    manifest = load_manifest(path, "bracket-a")      # migrated and checked, or a CalibrationError
    manifest["params"]["score_topk"]                 # always present

History:
- 1: the first versioned layout; fields were added later without a version bump, so a version-1
  manifest may lack any of them (migration fills them).
- 2: every field written; the options block holds what a refit repeats.
- 3: params.pool_count_pad (how the 3x3 aggregation treats the image border); before, the padding
  was left out of the average.
- 4: scorer_onnx.bank_input and .capacity: the scorer graph takes the bank as an input (one graph per
  shape, shared by products); before, the bank was a constant inside a per-product graph.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CalibrationError

MANIFEST_VERSION = 4

# What a field added after version 1 means when it is absent: how those calibrations scored.
PARAMS_ADDED = {
    "context_pad": 0,
    "layer_scales": [],
    "projection_dim": 0,
    "projection_seed": 0,
    "score_topk": 0.0,  # the map's max: before the top-k image score existed
    "extra": {},
}
DEFAULT_BANK_SIZE = 4096
DEFAULT_SYNTHETIC_PER_IMAGE = 2
DEFAULT_FALSE_REJECT_RATE = 0.01


def recalibrate_hint(product: str) -> str:
    return f"recalibrate with `edge-inspect calibrate --product {product} --images DIR --force`"


def read_json_object(path: Path, product: str) -> dict[str, Any]:
    """A JSON object from a calibration file; a CalibrationError naming the file and the fix otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalibrationError(f"{path} is missing: {recalibrate_hint(product)}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CalibrationError(f"{path} is damaged ({exc}): {recalibrate_hint(product)}") from None
    if not isinstance(data, dict):
        raise CalibrationError(f"{path} is damaged (a JSON {type(data).__name__}, not an object): {recalibrate_hint(product)}")
    return data


def migrate(manifest: dict[str, Any], where: str = "manifest") -> dict[str, Any]:
    """A copy of `manifest` brought to MANIFEST_VERSION (the input is not changed)."""
    version = manifest.get("manifest_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CalibrationError(f"{where}: `manifest_version` is {version!r}, not a version number")
    if version > MANIFEST_VERSION:
        raise CalibrationError(
            f"{where} has manifest version {version}, written by a newer edge-inspect (this one reads up to "
            f"{MANIFEST_VERSION}): upgrade edge-inspect on this box, or recalibrate the product with this one"
        )
    out = copy.deepcopy(manifest)
    if version < 2:
        _v1_to_v2(out)
    if version < 3:
        _v2_to_v3(out)
    if version < 4:
        _v3_to_v4(out)
    out["manifest_version"] = MANIFEST_VERSION
    return out


def _v1_to_v2(m: dict[str, Any]) -> None:
    params = m.get("params")
    if isinstance(params, dict):
        for key, value in PARAMS_ADDED.items():
            params.setdefault(key, copy.deepcopy(value))
    options = m.get("options")
    if not isinstance(options, dict):
        options = m["options"] = {}
    layer_scales = bool(params.get("layer_scales")) if isinstance(params, dict) else False
    options.setdefault("bank_size", DEFAULT_BANK_SIZE)
    options.setdefault("layer_scales", layer_scales)
    options.setdefault("synthetic_per_image", DEFAULT_SYNTHETIC_PER_IMAGE)
    options.setdefault("false_reject_rate", m.get("false_reject_rate", DEFAULT_FALSE_REJECT_RATE))
    options.setdefault("augment", list(m.get("augment", [])))
    options.setdefault("seed", m.get("seed", 0))
    m.setdefault("good_set", [])
    m.setdefault("images", [])
    if isinstance(m.get("bank"), dict):
        m["bank"].setdefault("file", "memory_bank.npy")


def _v2_to_v3(m: dict[str, Any]) -> None:
    if isinstance(m.get("params"), dict):
        m["params"].setdefault("pool_count_pad", False)  # how every calibration before it aggregated


def _v3_to_v4(m: dict[str, Any]) -> None:
    if isinstance(m.get("scorer_onnx"), dict):
        m["scorer_onnx"].setdefault("bank_input", False)  # the bank was a constant of the graph
        m["scorer_onnx"].setdefault("capacity", None)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check(manifest: dict[str, Any], path: Path, product: str) -> None:
    """The fields load_product relies on are there and well formed; a CalibrationError names the first one that is not."""

    def damaged(what: str) -> CalibrationError:
        return CalibrationError(f"{path} is damaged ({what}): {recalibrate_hint(product)}")

    calibration_id = manifest.get("calibration_id")
    if not isinstance(calibration_id, str) or not calibration_id:
        raise damaged(f"`calibration_id` is {calibration_id!r}, not a non-empty text")
    input_size = manifest.get("input_size")
    if not (isinstance(input_size, list) and len(input_size) == 2 and all(_is_int(v) and v > 0 for v in input_size)):
        raise damaged(f"`input_size` is {input_size!r}, not [height, width]")
    roi = manifest.get("roi")
    if roi is not None and not (
        isinstance(roi, list) and len(roi) == 4 and all(_is_int(v) and v >= 0 for v in roi) and roi[2] > 0 and roi[3] > 0
    ):
        raise damaged(f"`roi` is {roi!r}, not null or [x, y, width, height]")
    if not isinstance(manifest.get("params"), dict):
        raise damaged("`params` is not an object")
    for key in ("scorer_onnx", "features_onnx"):
        entry = manifest.get(key)
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not entry["file"]:
            raise damaged(f"`{key}` has no file name")
    scorer = manifest["scorer_onnx"]
    if scorer["bank_input"] and not (_is_int(scorer["capacity"]) and scorer["capacity"] > 0):
        raise damaged(f"`scorer_onnx.capacity` is {scorer['capacity']!r}, not a number of bank slots")


def load_manifest(path: Path, product: str) -> dict[str, Any]:
    """Read, migrate and check one manifest."""
    manifest = migrate(read_json_object(path, product), str(path))
    check(manifest, path, product)
    return manifest


def check_threshold(doc: dict[str, Any], path: Path, product: str) -> float:
    threshold = doc.get("threshold")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not np.isfinite(threshold):
        raise CalibrationError(f"{path} is damaged (`threshold` is {threshold!r}, not a finite number): "
                               f"{recalibrate_hint(product)}")
    return float(threshold)
