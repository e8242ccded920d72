"""ONNX Runtime backend: CPU everywhere, CUDA provider where onnxruntime-gpu is installed."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ...errors import UserError
from ..memory_bank import bank_inputs
from ..scorer_graph import BANK_INPUT, BANK_SQNORM_INPUT, FEATURES_OUTPUT
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


# One session per graph file and settings in the process: products and cameras that share a graph (the
# bank is an input) share its weights and its per-frame buffers' arena; each backend brings its own bank.
_SESSIONS: dict[tuple, list[Any]] = {}  # key -> [session, users]
_SESSIONS_LOCK = threading.Lock()


def _session_key(path: Path, threads: int, use_cuda: bool | None) -> tuple:
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size, threads, use_cuda)


def acquire_session(path: Path, threads: int = 0, use_cuda: bool | None = None) -> tuple[tuple, ort.InferenceSession]:
    """(key, session) for a graph file, opened once and shared (InferenceSession.run is thread-safe)."""
    key = _session_key(path, threads, use_cuda)
    with _SESSIONS_LOCK:
        entry = _SESSIONS.get(key)
        if entry is None:
            entry = _SESSIONS[key] = [ort_session(path, threads, use_cuda=use_cuda), 0]
        entry[1] += 1
        return key, entry[0]


def release_session(key: tuple) -> None:
    """Drop one user; the last one frees the session (its weights and arena) at once."""
    with _SESSIONS_LOCK:
        entry = _SESSIONS.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _SESSIONS[key]


class OrtBackend(ScorerBackend):
    name = "onnxruntime"
    OPTIONS = ("threads", "use_cuda", "bank")

    def __init__(self, onnx_path: str | Path, threads: int = 0, use_cuda: bool | None = None,
                 bank: np.ndarray | None = None) -> None:
        onnx_path = Path(onnx_path)
        self._key, self._session = acquire_session(onnx_path, threads, use_cuda)
        try:
            self.providers = self._session.get_providers()
            inputs = {i.name: i for i in self._session.get_inputs()}
            shape = inputs[INPUT_NAME].shape
            if any(not isinstance(d, int) for d in shape):
                raise ValueError(f"{onnx_path}: scorer graph input must have a static shape, got {shape}")
            self._shape = tuple(int(d) for d in shape)
            self._feeds: dict[str, np.ndarray] = {}
            if BANK_INPUT in inputs:  # the bank is an input: this backend's own
                if bank is None:
                    raise UserError(f"{onnx_path} takes the memory bank as an input and none was given")
                neg2t, sqnorm = bank_inputs(bank, int(inputs[BANK_INPUT].shape[1]))
                self._feeds = {BANK_INPUT: neg2t, BANK_SQNORM_INPUT: sqnorm}
            self.capacity = int(inputs[BANK_INPUT].shape[1]) if BANK_INPUT in inputs else None
            self.has_features = FEATURES_OUTPUT in {o.name for o in self._session.get_outputs()}
        except BaseException:
            self.close()
            raise
        self._outputs = [MAP_OUTPUT, SCORE_OUTPUT]
        log.debug("onnxruntime session on %s for %s", self.providers, onnx_path)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return self._shape  # type: ignore[return-value]

    def run(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        anomaly_map, score = self._session.run(self._outputs, {INPUT_NAME: image, **self._feeds})
        return anomaly_map[0, 0], float(score.reshape(-1)[0])

    def run_features(self, image: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        if not self.has_features:
            raise NotImplementedError("this scorer graph has no features output (calibrated before the bank was an input)")
        anomaly_map, score, features = self._session.run([*self._outputs, FEATURES_OUTPUT], {INPUT_NAME: image, **self._feeds})
        return anomaly_map[0, 0], float(score.reshape(-1)[0]), features[0]

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "providers": list(self.providers), "precision": "fp32"}

    def close(self) -> None:
        """Drop this backend's use of the shared session (the last user frees it at once)."""
        key, self._key = getattr(self, "_key", None), None
        self._session = None
        if key is not None:
            release_session(key)
