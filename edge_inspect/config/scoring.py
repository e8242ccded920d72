"""Config of the scorer stage (which runtime runs the graph)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import Section


class ScoringConfig(Section):
    backend: Literal["auto", "onnxruntime", "tensorrt"] = Field(
        "auto",
        title="Scorer runtime",
        description="auto: TensorRT when it imports and a CUDA GPU exists, else ONNX Runtime "
        "(CUDA provider when present, else CPU).",
    )
    precision: Literal["fp32", "fp16", "int8"] = Field(
        "fp16", description="TensorRT plan precision (ignored by ONNX Runtime)."
    )
    threads: int = Field(0, ge=0, le=64, description="CPU threads for ONNX Runtime; 0 = all cores.")
    calibration_dir: str = Field("calibration", description="Folder holding calibration/<product>/.")
    engines_dir: str = Field("engines", description="Folder holding exported ONNX graphs and TensorRT plans.")
    allow_engine_build: bool = Field(
        True, description="Build a TensorRT plan at start when none matches this device; false refuses instead. "
        "A SIGHUP reload or an MQTT product/set never builds (minutes, on the loop that feeds the watchdog, or "
        "started remotely): it refuses, naming `edge-inspect build-engine`."
    )
