"""ONNX Runtime backend: CPU everywhere, CUDA provider where onnxruntime-gpu is installed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .base import INPUT_NAME, MAP_OUTPUT, SCORE_OUTPUT, ScorerBackend

log = logging.getLogger(__name__)


def ort_session(model: str | Path | bytes, threads: int = 0, use_cuda: bool | None = False) -> ort.InferenceSession:
    """The one way this project opens an ONNX Runtime session: all graph optimisations, one inter-op
    thread (the graphs are a single chain), `threads` intra-op threads (0 = ONNX Runtime's choice), the
    CUDA provider first where it exists unless use_cuda is False. `model` is a path or serialized bytes."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    providers = ["CPUExecutionProvider"]
    if use_cuda is not False and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=providers)


class OrtBackend(ScorerBackend):
    name = "onnxruntime"
    OPTIONS = ("threads", "use_cuda")

    def __init__(self, onnx_path: str | Path, threads: int = 0, use_cuda: bool | None = None) -> None:
        self._session = ort_session(onnx_path, threads, use_cuda=use_cuda)
        self.providers = self._session.get_providers()
        shape = self._session.get_inputs()[0].shape
        if any(not isinstance(d, int) for d in shape):
            raise ValueError(f"{onnx_path}: scorer graph input must have a static shape, got {shape}")
        self._shape = tuple(int(d) for d in shape)
        self._outputs = [MAP_OUTPUT, SCORE_OUTPUT]
        log.debug("onnxruntime session on %s for %s", self.providers, onnx_path)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return self._shape  # type: ignore[return-value]

    def run(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        anomaly_map, score = self._session.run(self._outputs, {INPUT_NAME: image})
        return anomaly_map[0, 0], float(score.reshape(-1)[0])

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "providers": list(self.providers), "precision": "fp32"}

    def close(self) -> None:
        """Drop the session now (its weights and arena), not whenever the last reference goes."""
        self._session = None
