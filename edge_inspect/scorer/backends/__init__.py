"""Scorer runtimes behind one interface (Frigate's detector-plugin shape).

Every backend runs the *same* ONNX scorer graph:

    input  "image"          float32 [1, 3, H, W]  RGB, 0..255 (normalisation is inside the graph)
    input  "bank_x_minus2"  float32 [D, C]        -2 x the memory bank, transposed (C slots: the capacity)
    input  "bank_sqnorm"    float32 [1, C]        |m|^2 per slot; unused slots never nearest
    output "anomaly_map"    float32 [1, 1, H, W]  smoothed patch distances at input resolution
    output "score"          float32 [1]           image anomaly score
    output "features"       float32 [1, D, h, w]  the patch features (stream learning)

The bank inputs are the backend's own, set once from `bank=` (memory_bank.bank_inputs): one graph,
one ONNX Runtime session and one TensorRT plan serve every product of that shape. Graphs written
before the bank was an input hold it as a constant and have only the image input and two outputs.

Example:
    backend = create_backend("auto", onnx_path, threads=2, bank=product.bank)
    anomaly_map, score = backend.run(image_nchw)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ...errors import UserError
from .base import INPUT_NAME, MAP_OUTPUT, SCORE_OUTPUT, ScorerBackend  # noqa: F401 - the interface, re-exported

log = logging.getLogger(__name__)


def create_backend(kind: str, onnx_path: str | Path, **options: Any) -> ScorerBackend:
    """Pick and build a backend. kind: auto | onnxruntime | tensorrt.

    `auto` takes TensorRT when it imports and a CUDA GPU exists, otherwise ONNX Runtime; the choice
    and its reason are logged.
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"scorer graph {onnx_path} does not exist: run `edge-inspect calibrate` for this product")
    if kind == "auto":
        kind, reason = _auto_choice()
        log.info("scoring.backend auto -> %s (%s)", kind, reason)
    if kind == "onnxruntime":
        from .ort_backend import OrtBackend

        return OrtBackend(onnx_path, **{k: v for k, v in options.items() if k in OrtBackend.OPTIONS})
    if kind == "tensorrt":
        from .trt_backend import TensorRTBackend

        return TensorRTBackend(onnx_path, **{k: v for k, v in options.items() if k in TensorRTBackend.OPTIONS})
    raise UserError(f"scoring.backend: unknown backend {kind!r}; use auto, onnxruntime or tensorrt")


def _auto_choice() -> tuple[str, str]:
    """(backend, reason): TensorRT when it imports and a CUDA GPU exists, else ONNX Runtime."""
    try:
        from .trt_backend import tensorrt_available

        ok, reason = tensorrt_available()  # cached, never raises
    except ImportError as exc:  # the module itself only imports tensorrt lazily
        ok, reason = False, f"TensorRT backend unavailable: {exc}"
    if ok:
        return "tensorrt", reason
    return "onnxruntime", f"{reason}; using {_ort_device()}"


def _ort_device() -> str:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return f"ONNX Runtime (not importable: {exc})"
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return "ONNX Runtime with its CUDA provider"
    return "ONNX Runtime on the CPU"
