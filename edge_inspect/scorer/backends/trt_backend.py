"""TensorRT backend: compiles the scorer ONNX into a cached plan and runs it with pycuda.

The plan is built from exactly the ONNX graph ONNX Runtime runs elsewhere, on the device that runs
it, and cached in engines/ under a key of graph hash, input shape, precision, GPU and TensorRT
version (edge_inspect/scorer/backends/trt_plan_cache.py). Frames run through buffers allocated once: page-locked host
arrays, device buffers bound to the execution context by address, one CUDA stream.

    copy in (async)  ->  execute_async_v3  ->  copy out (async)  ->  synchronize

Example (on a Jetson):
    backend = TensorRTBackend("engines/widget-3f2a.onnx", precision="fp16", product="widget")
    anomaly_map, score = backend.run(image_nchw)
    backend.close()

Written against the TensorRT 10 Python API (TensorRT 11 removed the FP16/INT8 builder flags and
calibrators this uses). Sources followed, cited at each call: NVIDIA/TensorRT samples/python/
common_runtime.py (allocate_buffers, do_inference with set_tensor_address + execute_async_v3),
samples/python/efficientnet/build_engine.py (OnnxParser, calibrator with pycuda), the Python API
docstrings in python/docstrings/infer/pyCoreDoc.h, and the pycuda driver docs.

tensorrt and pycuda are imported lazily: this module imports on any machine.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ...errors import UserError
from ...files import write_atomic
from ...imageio import read_bgr, to_input
from ..memory_bank import bank_inputs
from ..scorer_graph import BANK_INPUT, BANK_SQNORM_INPUT, FEATURES_OUTPUT
from . import trt_plan_cache as plan_cache
from .base import INPUT_NAME, MAP_OUTPUT, SCORE_OUTPUT, ScorerBackend

log = logging.getLogger(__name__)

SUPPORTED_TRT_MAJOR = 10
DEFAULT_WORKSPACE_MIB = 1024
Progress = Callable[[str], None]


@functools.lru_cache(maxsize=1)
def tensorrt_available() -> tuple[bool, str]:
    """(usable, reason). Never raises; the result is cached, so calling it again is free.

    Usable means: tensorrt 10.x and pycuda import, the CUDA driver initialises, a GPU is visible.
    """
    try:
        if importlib.util.find_spec("tensorrt") is None:
            return False, "tensorrt is not importable (on a Jetson it comes with JetPack: apt install python3-libnvinfer)"
        if importlib.util.find_spec("pycuda") is None:
            return False, "pycuda is not installed (pip install 'edge-inspect[tensorrt]')"
        import tensorrt as trt

        major = int(str(trt.__version__).split(".")[0])
        if major != SUPPORTED_TRT_MAJOR:
            return False, f"TensorRT {trt.__version__} found; this backend is written for TensorRT 10.x"
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() < 1:
            return False, "no CUDA GPU visible"
        device = cuda.Device(0)
        major_cc, minor_cc = device.compute_capability()
        return True, f"TensorRT {trt.__version__} and CUDA GPU {device.name()} (sm_{major_cc}{minor_cc})"
    except Exception as exc:  # a broken driver or library must not break backend selection
        return False, f"TensorRT/CUDA unusable: {type(exc).__name__}: {exc}"


# -- CUDA context -----------------------------------------------------------------------------


class CudaDevice:
    """One GPU's primary CUDA context, made current around each use, from any thread.

    A CUDA context is current per thread, and the backend may be created on one thread and run on
    another, so every entry point pushes the context and pops it again. We retain the device's
    *primary* context (pycuda `Device.retain_primary_context()`, which unlike `make_context()` does
    not push it): it is the context the CUDA runtime API uses, so TensorRT (a runtime-API user) and
    pycuda share one context instead of two (`pycuda.autoinit` would create a second, thread-bound
    one). The lock serialises users: one execution context must not run twice at once.
    """

    _shared: dict[int, "CudaDevice"] = {}
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls, index: int = 0) -> "CudaDevice":
        """The process's one CudaDevice for GPU `index`: its primary context is retained once and kept for
        the life of the process (cuDevicePrimaryCtxRelease from another thread, or per product swap, would
        leave stale or leaked retains); users only push and pop it."""
        with cls._shared_lock:
            device = cls._shared.get(index)
            if device is None:
                device = cls._shared[index] = cls(index)
            return device

    def __init__(self, index: int = 0) -> None:
        import pycuda.driver as cuda

        cuda.init()
        count = cuda.Device.count()
        if not 0 <= index < count:
            raise UserError(f"CUDA device {index} does not exist ({count} visible)")
        self._cuda = cuda
        self.index = index
        self.device = cuda.Device(index)
        self._context = self.device.retain_primary_context()
        self._lock = threading.RLock()
        self._released = False

    @contextmanager
    def active(self) -> Iterator[Any]:
        """Make the context current on this thread; yields the pycuda.driver module."""
        with self._lock:
            if self._released:
                raise RuntimeError("CUDA device context already released")
            self._context.push()
            try:
                yield self._cuda
            finally:
                self._cuda.Context.pop()  # static in pycuda: pops whatever this thread pushed last

    def facts(self) -> plan_cache.DeviceFacts:
        import tensorrt as trt

        major, minor = self.device.compute_capability()
        return plan_cache.DeviceFacts(gpu_name=self.device.name(), compute_capability=f"{major}.{minor}", tensorrt_version=str(trt.__version__))

    def release(self) -> None:
        """Release the retain: only for a CudaDevice made directly, never for `shared()` ones (process-wide)."""
        with self._lock:
            if not self._released and CudaDevice._shared.get(self.index) is not self:
                self._released = True
                self._context.detach()  # for a retained primary context: cuDevicePrimaryCtxRelease


# -- one engine per plan, shared by every camera (each has its own execution context) -----------

_ENGINES: dict[tuple[int, str, int, int], list[Any]] = {}  # (device, plan, mtime_ns, size) -> [runtime, engine, users]
_ENGINES_LOCK = threading.Lock()


def _acquire_engine(device_index: int, plan_path: Path):
    """(key, engine) for a plan, deserialised once per process and device; call inside the device's context.
    A plan rewritten on disk (a rebuild) has a new key, so it is loaded anew."""
    import tensorrt as trt

    stat = plan_path.stat()
    key = (device_index, str(plan_path.resolve()), stat.st_mtime_ns, stat.st_size)
    with _ENGINES_LOCK:
        entry = _ENGINES.get(key)
        if entry is None:
            runtime = trt.Runtime(_trt_logger())  # kept with its engine: the runtime must outlive it
            engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
            if engine is None:
                return key, None
            entry = _ENGINES[key] = [runtime, engine, 0]
        entry[2] += 1
        return key, entry[1]


def _release_engine(key) -> None:
    """Drop one user of a shared engine; the last one frees it (call inside the device's context)."""
    with _ENGINES_LOCK:
        entry = _ENGINES.get(key)
        if entry is None:
            return
        entry[2] -= 1
        if entry[2] <= 0:
            del _ENGINES[key]
            entry[1] = None  # engine before its runtime
            entry[0] = None


# -- TensorRT plumbing --------------------------------------------------------------------------

_TRT_LOGGER = None


def _trt_logger():
    """One ILogger forwarding to Python logging. TensorRT needs it alive while any object made with it
    lives (pyCoreDoc.h ILoggerDoc), hence the module-level singleton."""
    global _TRT_LOGGER
    if _TRT_LOGGER is None:
        import tensorrt as trt

        class _PythonLogger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)  # pyCoreDoc.h: "explicitly instantiate the base class"

            def log(self, severity, msg) -> None:  # noqa: A003 - TensorRT's callback name
                name = getattr(severity, "name", str(severity))
                if name in ("INTERNAL_ERROR", "ERROR"):
                    log.error("TensorRT: %s", msg)
                elif name == "WARNING":
                    log.warning("TensorRT: %s", msg)
                elif name == "INFO":
                    log.debug("TensorRT: %s", msg)

        _TRT_LOGGER = _PythonLogger()
    return _TRT_LOGGER


def _progress_monitor(trt, report: Progress):
    """config.progress_monitor (TensorRT >= 10.0): prints build phases and their times, two levels deep."""

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._started: dict[str, float] = {}
            self._depth: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps) -> None:
            depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
            self._depth[phase_name] = depth
            self._started[phase_name] = time.monotonic()
            if depth <= 1:
                report(f"{'  ' * depth}{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step) -> bool:
            return True  # False would cancel the build

        def phase_finish(self, phase_name) -> None:
            depth = self._depth.pop(phase_name, 0)
            seconds = time.monotonic() - self._started.pop(phase_name, time.monotonic())
            if depth <= 1:
                report(f"{'  ' * depth}{phase_name} done in {seconds:.1f} s")

    return _Monitor()


def _pin_head_to_fp32(trt, network) -> int:
    """Keep the nearest-neighbour head (first MatMul onwards) in FP32; returns the number of layers pinned.

    The head computes |f - m|^2 as |m|^2 - 2 m.f + |f|^2: large terms that cancel. In FP16 (10-bit
    mantissa) the cancellation error is of the order of the distances themselves, so only the
    backbone runs in reduced precision. Network layers are in topological order (the parser adds them
    in ONNX node order). Constants feeding pinned layers (the memory bank) are pinned too.
    """
    floats = (trt.float32, trt.float16)
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    start = next((i for i, layer in enumerate(layers) if layer.type == trt.LayerType.MATRIX_MULTIPLY), None)
    if start is None:
        return 0
    producer = {layer.get_output(j).name: layer for layer in layers for j in range(layer.num_outputs)}
    pinned = [
        layer
        for layer in layers[start:]
        if layer.type != trt.LayerType.CONSTANT
        and layer.num_outputs > 0
        and all(layer.get_output(j).dtype in floats for j in range(layer.num_outputs))
    ]
    constants = []  # weights feeding the head (the memory bank): keep their FP32 storage
    for layer in pinned:
        for j in range(layer.num_inputs):
            tensor = layer.get_input(j)
            source = producer.get(tensor.name) if tensor is not None else None
            if source is not None and source.type == trt.LayerType.CONSTANT and tensor.dtype in floats and source not in constants:
                constants.append(source)
    for layer in pinned:
        layer.precision = trt.float32  # compute precision (ILayer.precision)
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
    for layer in constants:
        layer.set_output_type(0, trt.float32)  # a constant has no compute precision, only an output type
    return len(pinned)


def _attach_timing_cache(trt, config, path: Path):
    """Load engines/timing-*.cache into the config (or start an empty one). The returned cache must
    outlive the build (pyCoreDoc.h IBuilderConfigDoc.set_timing_cache)."""
    data = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(data)
        attached = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)
    except Exception as exc:  # a truncated file
        log.warning("timing cache %s unreadable (%s); starting a new one", path, exc)
        attached = False
    if not attached:
        if data:
            log.warning("timing cache %s does not match this device/TensorRT; starting a new one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _save_timing_cache(config, path: Path) -> None:
    cache = config.get_timing_cache()
    if cache is not None:
        write_atomic(path, memoryview(cache.serialize()).tobytes())


def _make_calibrator(trt, cuda, input_shape: tuple[int, ...], images: Sequence[np.ndarray], cache_path: Path,
                     constants: dict[str, np.ndarray] | None = None):
    """INT8 entropy calibrator fed with the product's good images, one [1,3,H,W] image per batch.

    Given images, it calibrates afresh (and rewrites the cache); without, TensorRT reuses the cached scales.
    `constants`: the other inputs of the graph (the bank inputs of a graph that takes the bank), the same
    for every batch; get_batch answers device pointers in the order of the names TensorRT asks for.

    trt.IInt8EntropyCalibrator2 is deprecated since TensorRT 10.1 (superseded by explicit Q/DQ
    quantization) but present through 10.x. Pattern: samples/python/efficientnet/build_engine.py.
    """

    class _GoodPartsCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._images = iter(images)
            self._host = cuda.pagelocked_empty(input_shape, np.float32)
            self._device = cuda.mem_alloc(self._host.nbytes)
            self._constants = {}
            for name, array in (constants or {}).items():
                buffer = cuda.mem_alloc(np.ascontiguousarray(array, np.float32).nbytes)
                cuda.memcpy_htod(buffer, np.ascontiguousarray(array, np.float32))
                self._constants[name] = buffer
            self.used = 0

        def get_batch_size(self) -> int:
            return 1  # explicit-batch network: the batch is part of the static input shape

        def get_batch(self, names):
            try:
                image = next(self._images)
            except StopIteration:
                return None  # no more calibration data
            np.copyto(self._host, image)
            cuda.memcpy_htod(self._device, self._host)
            self.used += 1
            return [int(self._constants[name]) if name in self._constants else int(self._device) for name in names]

        def read_calibration_cache(self):
            if images or not cache_path.is_file():
                return None  # None makes TensorRT call get_batch and calibrate
            return cache_path.read_bytes()

        def write_calibration_cache(self, cache) -> None:
            write_atomic(cache_path, memoryview(cache).tobytes())

        def free(self) -> None:
            self._device.free()
            self._host.base.free()
            for buffer in self._constants.values():
                buffer.free()

    return _GoodPartsCalibrator()


def build_plan(
    key: plan_cache.PlanKey,
    onnx_path: str | Path,
    *,
    device: CudaDevice,
    engines_dir: str | Path,
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
    calibration_images: Sequence[np.ndarray] | None = None,
    progress: Progress | None = None,
    calibration_bank: np.ndarray | None = None,
) -> tuple[bytes, dict[str, Any]]:
    """Compile `onnx_path` for `key` on `device`. Returns (serialized plan, sidecar facts).

    Uses the timing cache in engines_dir and, for INT8, the calibration cache or calibration_images
    (with calibration_bank as the bank inputs when the graph takes the bank).
    """
    import tensorrt as trt

    report = progress or (lambda message: log.info("%s", message))
    onnx_path = Path(onnx_path)
    started = time.monotonic()
    images = [_as_input(img, key.input_shape) for img in (calibration_images or [])]
    calibration_cache = plan_cache.calibration_cache_path(engines_dir, key)
    if key.precision == "int8" and not images and not calibration_cache.is_file():
        raise UserError(
            f"an INT8 plan for {plan_cache.owner_words(key)[0]} needs calibration images and there is no calibration "
            f"cache ({calibration_cache.name}): run `edge-inspect build-engine --product {plan_cache.owner_words(key)[1]} "
            "--precision int8`"
        )
    builder = network = parser = config = timing_cache = None
    with device.active() as cuda:
        try:
            logger = _trt_logger()
            builder = trt.Builder(logger)
            network = builder.create_network(0)  # TRT 10: explicit batch is the only mode; EXPLICIT_BATCH flag is deprecated
            parser = trt.OnnxParser(network, logger)
            report(f"parsing {onnx_path.name}")
            if not parser.parse_from_file(str(onnx_path)):  # from a path, so external weights resolve
                errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise UserError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  {errors}")
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
            config.clear_flag(trt.BuilderFlag.TF32)  # TF32 rounds FP32 matmul inputs to 10-bit mantissas
            pinned = 0
            if key.precision in ("fp16", "int8"):
                config.set_flag(trt.BuilderFlag.FP16)  # deprecated in 10.12 (strong typing), present in 10.x
                pinned = _pin_head_to_fp32(trt, network)
                config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)  # fail loudly rather than run the head in FP16
                report(f"FP16 backbone, {pinned} head layers pinned to FP32")
            calibrator = None
            if key.precision == "int8":
                config.set_flag(trt.BuilderFlag.INT8)
                constants = None
                if calibration_bank is not None:
                    capacity = next(network.get_input(i).shape[1] for i in range(network.num_inputs)
                                    if network.get_input(i).name == BANK_INPUT)
                    constants = dict(zip((BANK_INPUT, BANK_SQNORM_INPUT), bank_inputs(calibration_bank, int(capacity))))
                calibrator = _make_calibrator(trt, cuda, key.input_shape, images, calibration_cache, constants)
                config.int8_calibrator = calibrator  # deprecated in 10.1, present in 10.x
                source = f"{len(images)} good images" if images else f"cached scales {calibration_cache.name}"
                report(f"INT8 calibration from {source}")
            timing_path = plan_cache.timing_cache_path(engines_dir, device.facts())
            timing_cache = _attach_timing_cache(trt, config, timing_path)  # noqa: F841 - must outlive the build
            if hasattr(trt, "IProgressMonitor"):
                config.progress_monitor = _progress_monitor(trt, report)
            report(f"building {key.precision} plan for {key.gpu_name} (TensorRT {key.tensorrt_version}); this takes minutes")
            try:
                serialized = builder.build_serialized_network(network, config)
            finally:
                if calibrator is not None:
                    calibrator.free()
            if serialized is None:
                raise UserError(f"TensorRT could not build a {key.precision} plan from {onnx_path}; its errors are logged above")
            data = memoryview(serialized).tobytes()  # IHostMemory supports the buffer protocol
            del serialized
            _save_timing_cache(config, timing_path)
        finally:
            # TensorRT objects are destroyed on their last reference: drop them while the context is current,
            # also on an error (a raised exception's traceback would otherwise keep them until after the pop).
            timing_cache = config = parser = network = builder = None  # noqa: F841
    seconds = time.monotonic() - started
    report(f"plan built in {seconds:.1f} s ({len(data) / 2**20:.1f} MiB)")
    return data, {
        "onnx": onnx_path.name,
        "build_seconds": round(seconds, 1),
        "workspace_mib": int(workspace_mib),
        "fp32_head_layers": pinned,
        "int8_calibration_images": calibrator.used if calibrator is not None else 0,
        "timing_cache": timing_path.name,
    }


def _as_input(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    array = np.ascontiguousarray(image, dtype=np.float32)
    if array.shape != tuple(shape):
        raise UserError(f"calibration image has shape {array.shape}, the graph input is {tuple(shape)}")
    return array


def good_images(product) -> list[np.ndarray]:
    """The product's good reference images (stored ROI-cropped by calibrate) as graph inputs."""


    ref_dir = Path(product.directory) / "references"
    try:
        entries = json.loads((ref_dir / "references.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{ref_dir}: no readable good reference images ({exc}); recalibrate the product") from exc
    return [to_input(read_bgr(ref_dir / e["file"]), tuple(product.input_size)) for e in entries]


# -- the backend ------------------------------------------------------------------------------


class TensorRTBackend(ScorerBackend):
    """The scorer graph as a TensorRT plan. Options (scoring config / Scorer):

    precision: fp16 (default) | int8 | fp32. product: a scorer.product.ProductCalibration or a name.
    engines_dir: where plans live (default: the product's engines dir, else the ONNX's folder).
    allow_build: build a missing/stale plan (minutes) instead of refusing. device: CUDA device index.
    bank: the memory bank [M, D], for a graph that takes it as an input. Such a graph's plan is named
    after the graph, not the product: every product and version of that shape shares it, and each
    backend (execution context) holds its own bank on the device, copied once here.
    """

    name = "tensorrt"
    OPTIONS = ("precision", "product", "engines_dir", "allow_build", "workspace_mib", "device", "calibration_images",
               "progress", "force_build", "bank")

    def __init__(
        self,
        onnx_path: str | Path,
        precision: str = "fp16",
        product: Any = None,
        engines_dir: str | Path | None = None,
        allow_build: bool = True,
        workspace_mib: int = DEFAULT_WORKSPACE_MIB,
        device: int = 0,
        calibration_images: Sequence[np.ndarray] | None = None,
        progress: Progress | None = None,
        force_build: bool = False,
        bank: np.ndarray | None = None,
    ) -> None:
        self._gpu: CudaDevice | None = None
        self._closed = False
        self._host: dict[str, np.ndarray] = {}
        self._device_buffers: dict[str, Any] = {}
        self._context = self._engine = self._runtime = self._stream = None
        self._engine_key = None
        ok, reason = tensorrt_available()
        if not ok:
            raise UserError(f"scoring.backend tensorrt: {reason}; use scoring.backend: auto or onnxruntime")
        onnx_path = Path(onnx_path)
        shared = plan_cache.takes_bank(onnx_path)
        if shared and bank is None:
            raise UserError(f"{onnx_path} takes the memory bank as an input and none was given")
        self._bank = bank if shared else None
        product_name = plan_cache.plan_owner(onnx_path, getattr(product, "name", product) or onnx_path.stem)
        plan_dir = Path(engines_dir) if engines_dir else Path(getattr(product, "engines_dir", onnx_path.parent))
        self.precision = precision
        try:
            self._gpu = CudaDevice.shared(device)
            self.facts = self._gpu.facts()
            key = plan_cache.plan_key(onnx_path, str(product_name), precision, self.facts)

            def build(k: plan_cache.PlanKey) -> tuple[bytes, dict[str, Any]]:
                images = calibration_images
                if k.precision == "int8" and images is None and product is not None and hasattr(product, "directory"):
                    images = good_images(product)
                return build_plan(k, onnx_path, device=self._gpu, engines_dir=plan_dir, workspace_mib=workspace_mib,
                                  calibration_images=images, progress=progress, calibration_bank=self._bank)

            self.plan_path = plan_cache.find_or_build_plan(key, plan_dir, allow_build=allow_build, build=build, force=force_build)
            self._load(key)
        except BaseException:
            self.close()
            raise

    def _load(self, key: plan_cache.PlanKey) -> None:
        import tensorrt as trt

        with self._gpu.active() as cuda:
            # One engine per plan in the process (weights once on the GPU); this camera's execution context,
            # stream and buffers are its own.
            self._engine_key, self._engine = _acquire_engine(self._gpu.index, self.plan_path)
            if self._engine is None:
                raise UserError(
                    f"TensorRT {key.tensorrt_version} could not load {self.plan_path} (errors logged above); "
                    f"rebuild it: `edge-inspect build-engine --product {plan_cache.owner_words(key)[1]} --precision "
                    f"{key.precision} --force`"
                )
            expected: dict[str, tuple[Any, tuple[int, ...] | None]] = {
                INPUT_NAME: (trt.TensorIOMode.INPUT, tuple(key.input_shape)),
                MAP_OUTPUT: (trt.TensorIOMode.OUTPUT, (1, 1, *key.input_shape[-2:])),
                SCORE_OUTPUT: (trt.TensorIOMode.OUTPUT, None),
            }
            if self._bank is not None:  # the shapes come from the plan; bank_inputs checks the bank fits them
                expected.update({BANK_INPUT: (trt.TensorIOMode.INPUT, None), BANK_SQNORM_INPUT: (trt.TensorIOMode.INPUT, None),
                                 FEATURES_OUTPUT: (trt.TensorIOMode.OUTPUT, None)})
            # samples/python/common_runtime.py allocate_buffers: name-based I/O introspection (TRT 10)
            names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
            if sorted(names) != sorted(expected):
                raise UserError(f"{self.plan_path}: plan tensors {names}, expected {sorted(expected)}; rebuild with --force")
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise UserError(f"TensorRT could not create an execution context for {self.plan_path} (GPU memory?)")
            self._stream = cuda.Stream()  # a non-default stream: pyCoreDoc.h execute_async_v3 warns against the default one
            for name, (mode, shape) in expected.items():
                actual = tuple(self._engine.get_tensor_shape(name))
                if self._engine.get_tensor_mode(name) != mode or (shape is not None and actual != shape):
                    raise UserError(f"{self.plan_path}: tensor {name!r} is {actual}, expected {shape}; rebuild with --force")
                if trt.nptype(self._engine.get_tensor_dtype(name)) != np.float32:
                    raise UserError(f"{self.plan_path}: tensor {name!r} is not float32; rebuild with --force")
                host = cuda.pagelocked_empty(actual, np.float32)  # page-locked: async copies need pinned memory
                buffer = cuda.mem_alloc(host.nbytes)
                if not self._context.set_tensor_address(name, int(buffer)):
                    raise RuntimeError(f"TensorRT refused the device address for {name!r}")
                self._host[name], self._device_buffers[name] = host, buffer
            if self._bank is not None:  # this context's bank: on the device once, read by every frame
                capacity = int(self._host[BANK_INPUT].shape[1])
                for name, array in zip((BANK_INPUT, BANK_SQNORM_INPUT), bank_inputs(self._bank, capacity)):
                    np.copyto(self._host[name], array)
                    cuda.memcpy_htod(self._device_buffers[name], self._host[name])
                self.capacity = capacity
                self.has_features = True
        self._input_shape = tuple(key.input_shape)
        log.info("TensorRT plan %s loaded on %s (%s)", self.plan_path.name, self.facts.gpu_name, self.precision)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return self._input_shape  # type: ignore[return-value]

    def run(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        anomaly_map, score, _ = self._execute(image, features=False)
        return anomaly_map, score

    def run_features(self, image: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        if not self.has_features:
            raise NotImplementedError("this plan has no features output (its graph holds the bank as a constant)")
        anomaly_map, score, features = self._execute(image, features=True)
        return anomaly_map, score, features

    def _execute(self, image: np.ndarray, features: bool) -> tuple[np.ndarray, float, np.ndarray | None]:
        if self._closed:
            raise RuntimeError("TensorRT backend is closed")
        if tuple(image.shape) != self._input_shape:
            raise ValueError(f"image shape {tuple(image.shape)}, the plan expects {self._input_shape}")
        host, device = self._host, self._device_buffers
        with self._gpu.active() as cuda:
            np.copyto(host[INPUT_NAME], image, casting="same_kind")
            cuda.memcpy_htod_async(device[INPUT_NAME], host[INPUT_NAME], self._stream)
            # common_runtime.py do_inference: addresses were bound once with set_tensor_address
            if not self._context.execute_async_v3(stream_handle=self._stream.handle):
                raise RuntimeError("TensorRT execute_async_v3 failed (errors logged above)")
            cuda.memcpy_dtoh_async(host[MAP_OUTPUT], device[MAP_OUTPUT], self._stream)
            cuda.memcpy_dtoh_async(host[SCORE_OUTPUT], device[SCORE_OUTPUT], self._stream)
            if features:
                cuda.memcpy_dtoh_async(host[FEATURES_OUTPUT], device[FEATURES_OUTPUT], self._stream)
            self._stream.synchronize()
            # the host buffers are reused by the next frame: hand out copies
            patch_features = host[FEATURES_OUTPUT][0].copy() if features else None
            return host[MAP_OUTPUT][0, 0].copy(), float(host[SCORE_OUTPUT].reshape(-1)[0]), patch_features

    def describe(self) -> dict[str, Any]:
        facts = getattr(self, "facts", None)
        return {
            "backend": self.name,
            "device": facts.gpu_name if facts else None,
            "compute_capability": facts.compute_capability if facts else None,
            "tensorrt": facts.tensorrt_version if facts else None,
            "precision": self.precision,
            "plan": getattr(getattr(self, "plan_path", None), "name", None),
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._gpu is None:
            return
        try:
            with self._gpu.active():
                for buffer in self._device_buffers.values():
                    buffer.free()
                for host in self._host.values():
                    host.base.free()
                self._device_buffers.clear()
                self._host.clear()
                # TensorRT objects are freed on the last reference: drop them while the context is current
                self._context = None
                self._engine = None
                self._runtime = None
                self._stream = None
                if self._engine_key is not None:
                    _release_engine(self._engine_key)  # the last camera on this plan frees the engine
                    self._engine_key = None
        finally:
            self._gpu.release()
