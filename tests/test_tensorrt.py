"""TensorRT backend: plan-cache rules and backend selection (any machine), parity with ONNX Runtime and
the plan cache on a real GPU (skipped, with the reason, where tensorrt or a CUDA GPU is missing).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import threading

import numpy as np
import pytest
from model_helpers import random_folded_weights

from edge_inspect.errors import UserError
from edge_inspect.scorer.backends import create_backend
from edge_inspect.scorer.backends import trt_plan_cache as engines
from edge_inspect.scorer.backends.trt_backend import tensorrt_available
from edge_inspect.scorer.backends.trt_build import agreement, passes

TRT_OK, TRT_REASON = tensorrt_available()
needs_gpu = pytest.mark.skipif(not TRT_OK, reason=f"needs TensorRT 10 and a CUDA GPU: {TRT_REASON}")

ORIN = engines.DeviceFacts("Orin", "8.7", "10.3.0")
XAVIER = engines.DeviceFacts("Xavier", "7.2", "10.3.0")


@pytest.fixture(scope="module")
def scorer_onnx(tmp_path_factory):
    """The product's scorer graph structure (edge_inspect.scorer.scorer_graph), random weights, a 128x128 input."""
    from edge_inspect.scorer.params import ScorerParams, output_dim
    from edge_inspect.scorer.scorer_graph import build_scorer_model, save_model

    folded = random_folded_weights()
    params = ScorerParams(input_size=(128, 128))
    bank = np.random.default_rng(1).standard_normal((256, output_dim(params))).astype(np.float32)
    path = tmp_path_factory.mktemp("engines") / "widget-0123456789ab.onnx"
    save_model(build_scorer_model(folded, params, bank), path)
    return path


def smooth_images(n: int, size=(128, 128), seed: int = 3) -> list[np.ndarray]:
    """Structured float32 [1,3,H,W] RGB 0..255 inputs (upsampled noise, not white noise)."""
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.uniform(0, 255, (size[0] // 8, size[1] // 8, 3)).astype(np.float32)
        big = cv2.resize(small, (size[1], size[0]), interpolation=cv2.INTER_CUBIC).clip(0, 255)
        out.append(np.ascontiguousarray(big.transpose(2, 0, 1)[None]))
    return out


# -- plan keys and the cache rules (no TensorRT needed) -------------------------------------------


def test_plan_key_reads_graph_hash_and_shape(scorer_onnx):
    key = engines.plan_key(scorer_onnx, "widget", "fp16", ORIN)
    assert key.graph_sha256 == hashlib.sha256(scorer_onnx.read_bytes()).hexdigest()
    assert key.input_shape == (1, 3, 128, 128)
    assert (key.gpu_name, key.compute_capability, key.tensorrt_version) == ("Orin", "8.7", "10.3.0")
    assert key.build_recipe == engines.BUILD_RECIPE
    assert engines.PlanKey.from_json(json.loads(json.dumps(key.to_json()))) == key


def test_every_key_field_changes_the_digest(scorer_onnx):
    key = engines.plan_key(scorer_onnx, "widget", "fp16", ORIN)
    variants = {
        "product": "gadget", "graph_sha256": "0" * 64, "input_shape": (1, 3, 256, 256), "precision": "int8",
        "gpu_name": "Xavier", "compute_capability": "7.2", "tensorrt_version": "10.7.0", "build_recipe": "other",
    }
    digests = {key.digest}
    for field, value in variants.items():
        other = engines.PlanKey.from_json({**key.to_json(), field: value})
        assert other.digest not in digests, field
        assert any(d.startswith(field) for d in key.differences(other))
        digests.add(other.digest)


def test_unknown_precision_is_a_user_error(scorer_onnx):
    with pytest.raises(UserError, match="scoring.precision"):
        engines.plan_key(scorer_onnx, "widget", "fp8", ORIN)


def test_caches_are_per_device_and_per_graph(tmp_path, scorer_onnx):
    assert engines.timing_cache_path(tmp_path, ORIN) != engines.timing_cache_path(tmp_path, XAVIER)
    key_orin = engines.plan_key(scorer_onnx, "widget", "int8", ORIN)
    key_xavier = engines.plan_key(scorer_onnx, "widget", "int8", XAVIER)
    # INT8 scales depend on graph + TensorRT version, not on the GPU model
    assert engines.calibration_cache_path(tmp_path, key_orin) == engines.calibration_cache_path(tmp_path, key_xavier)
    assert engines.plan_path(tmp_path, key_orin) != engines.plan_path(tmp_path, key_xavier)


def test_missing_plan_with_building_disabled_is_refused(tmp_path, scorer_onnx):
    key = engines.plan_key(scorer_onnx, "widget", "fp16", ORIN)
    with pytest.raises(UserError) as exc:
        engines.find_or_build_plan(key, tmp_path, allow_build=False, build=None)
    message = str(exc.value)
    assert "allow_engine_build is false" in message
    assert "edge-inspect build-engine --product widget --precision fp16" in message
    assert "no plan file" in message


def test_foreign_plan_is_refused_and_named(tmp_path, scorer_onnx):
    """A plan built on another GPU sits in engines/; it must not be used, and the refusal says why."""
    here = engines.plan_key(scorer_onnx, "widget", "fp16", ORIN)
    foreign = engines.plan_key(scorer_onnx, "widget", "fp16", XAVIER)
    engines.write_plan(engines.plan_path(tmp_path, foreign), b"xavier plan bytes", foreign, {"build_seconds": 1.0})
    with pytest.raises(UserError) as exc:
        engines.find_or_build_plan(here, tmp_path, allow_build=False, build=None)
    assert engines.plan_path(tmp_path, foreign).name in str(exc.value)
    assert "gpu_name: plan 'Xavier' vs here 'Orin'" in str(exc.value)


def test_plan_problem_detects_copied_sidecar_and_corruption(tmp_path, scorer_onnx):
    here = engines.plan_key(scorer_onnx, "widget", "fp16", ORIN)
    plan = engines.plan_path(tmp_path, here)
    engines.write_plan(plan, b"plan bytes", here, {})
    assert engines.plan_problem(plan, here) is None
    # a plan renamed into place from another device keeps its own sidecar key
    sidecar = json.loads(engines.sidecar_path(plan).read_text())
    sidecar["key"]["tensorrt_version"] = "10.7.0"
    engines.sidecar_path(plan).write_text(json.dumps(sidecar))
    assert "tensorrt_version: plan '10.7.0' vs here '10.3.0'" in engines.plan_problem(plan, here)
    engines.write_plan(plan, b"plan bytes", here, {})
    plan.write_bytes(b"plan bytes, truncated")
    assert "sha256" in engines.plan_problem(plan, here)
    engines.sidecar_path(plan).unlink()
    assert "sidecar" in engines.plan_problem(plan, here)


def test_find_or_build_builds_once_and_rebuilds_stale(tmp_path, scorer_onnx):
    """Cache bookkeeping with a builder returning fixed bytes; the GPU tests below build real plans."""
    calls = []

    def build(key):
        calls.append(key)
        return f"plan for {key.digest}".encode(), {"build_seconds": 0.0}

    key = engines.plan_key(scorer_onnx, "widget", "fp16", ORIN)
    first = engines.find_or_build_plan(key, tmp_path, allow_build=True, build=build)
    second = engines.find_or_build_plan(key, tmp_path, allow_build=True, build=build)
    assert first == second and len(calls) == 1
    assert engines.read_sidecar(first)["plan_bytes"] == len(first.read_bytes())
    first.write_bytes(b"damaged")
    engines.find_or_build_plan(key, tmp_path, allow_build=True, build=build)
    assert len(calls) == 2 and engines.plan_problem(first, key) is None
    engines.find_or_build_plan(key, tmp_path, allow_build=True, build=build, force=True)
    assert len(calls) == 3


# -- backend selection ----------------------------------------------------------------------------


def test_tensorrt_available_reports_without_raising():
    ok, reason = tensorrt_available()
    assert isinstance(ok, bool) and reason
    if importlib.util.find_spec("tensorrt") is None:
        assert not ok and "tensorrt is not importable" in reason


@pytest.mark.skipif(TRT_OK, reason="this machine has TensorRT and a GPU: auto picks TensorRT")
def test_auto_falls_back_to_onnxruntime_and_logs_why(scorer_onnx, caplog):
    with caplog.at_level(logging.INFO, logger="edge_inspect.scorer.backends"):
        backend = create_backend("auto", scorer_onnx, threads=1, precision="fp16", product="widget")
    assert backend.name == "onnxruntime"
    assert any("auto -> onnxruntime" in r.getMessage() and TRT_REASON in r.getMessage() for r in caplog.records)
    anomaly_map, score = backend.run(smooth_images(1)[0])
    assert anomaly_map.shape == (128, 128) and np.isfinite(score)


@pytest.mark.skipif(TRT_OK, reason="this machine has TensorRT and a GPU")
def test_forcing_tensorrt_without_it_is_a_clear_error(scorer_onnx):
    with pytest.raises(UserError, match="scoring.backend tensorrt"):
        create_backend("tensorrt", scorer_onnx, precision="fp16")


# -- the accuracy check of build-engine ------------------------------------------------------------


def test_agreement_measures_score_map_and_verdict_differences():
    maps = [np.full((4, 4), 2.0, np.float32), np.full((4, 4), 4.0, np.float32)]
    reference = [(maps[0], 1.0), (maps[1], 3.0)]
    same = agreement(reference, reference, threshold=2.0)
    assert same["max_score_diff"] == 0 and same["verdict_flips"] == 0 and passes(same, 0.0)
    shifted = [(maps[0] + 0.1, 1.05), (maps[1], 1.9)]  # second image crosses the threshold
    stats = agreement(reference, shifted, threshold=2.0)
    assert stats["max_score_diff"] == pytest.approx(1.1)
    assert stats["max_score_diff_of_threshold"] == pytest.approx(0.55)
    assert stats["max_map_diff_rel"] == pytest.approx(0.05)
    assert stats["verdict_flips"] == 1 and not passes(stats, 1.0)


# -- on a GPU with TensorRT -----------------------------------------------------------------------


def _ort(scorer_onnx):
    from edge_inspect.scorer.backends.ort_backend import OrtBackend

    return OrtBackend(scorer_onnx, threads=1, use_cuda=False)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("precision, score_tol, map_tol", [("fp32", 1e-3, 1e-3), ("fp16", 2e-2, 3e-2)])
def test_parity_with_onnxruntime(tmp_path, scorer_onnx, precision, score_tol, map_tol):
    from edge_inspect.scorer.backends.trt_backend import TensorRTBackend

    images = smooth_images(6)
    reference = [_ort(scorer_onnx).run(x) for x in images]
    backend = TensorRTBackend(scorer_onnx, precision=precision, product="widget", engines_dir=tmp_path)
    try:
        assert backend.input_shape == (1, 3, 128, 128)
        results = [backend.run(x) for x in images]
    finally:
        backend.close()
    for (ref_map, ref_score), (trt_map, trt_score) in zip(reference, results):
        assert trt_map.shape == ref_map.shape and trt_map.dtype == np.float32
        assert abs(trt_score - ref_score) <= score_tol * abs(ref_score)
        assert np.max(np.abs(trt_map - ref_map)) <= map_tol * np.max(np.abs(ref_map))
    sidecar = engines.read_sidecar(backend.plan_path)
    assert sidecar["key"]["precision"] == precision
    if precision == "fp16":
        assert sidecar["fp32_head_layers"] > 0  # the nearest-neighbour head stays in FP32


@needs_gpu
@pytest.mark.gpu
@pytest.mark.slow
def test_plan_cache_reuses_refuses_and_rebuilds(tmp_path, scorer_onnx):
    from edge_inspect.scorer.backends.trt_backend import TensorRTBackend

    first = TensorRTBackend(scorer_onnx, precision="fp16", product="widget", engines_dir=tmp_path)
    plan, facts = first.plan_path, first.facts
    first.close()
    built_at = engines.read_sidecar(plan)["built_at"]
    mtime = plan.stat().st_mtime_ns
    assert engines.timing_cache_path(tmp_path, facts).is_file()
    again = TensorRTBackend(scorer_onnx, precision="fp16", product="widget", engines_dir=tmp_path, allow_build=False)
    again.close()
    assert again.plan_path == plan and plan.stat().st_mtime_ns == mtime and engines.read_sidecar(plan)["built_at"] == built_at
    sidecar = json.loads(engines.sidecar_path(plan).read_text())
    sidecar["key"]["gpu_name"] = "some other GPU"
    engines.sidecar_path(plan).write_text(json.dumps(sidecar))
    with pytest.raises(UserError, match="gpu_name: plan 'some other GPU'"):
        TensorRTBackend(scorer_onnx, precision="fp16", product="widget", engines_dir=tmp_path, allow_build=False)
    rebuilt = TensorRTBackend(scorer_onnx, precision="fp16", product="widget", engines_dir=tmp_path, allow_build=True)
    rebuilt.close()
    assert engines.plan_problem(plan, engines.plan_key(scorer_onnx, "widget", "fp16", facts)) is None


@needs_gpu
@pytest.mark.gpu
@pytest.mark.slow
def test_runs_on_another_thread_and_returns_independent_maps(tmp_path, scorer_onnx):
    from edge_inspect.scorer.backends.trt_backend import TensorRTBackend

    a, b = smooth_images(2, seed=9)
    backend = TensorRTBackend(scorer_onnx, precision="fp32", product="widget", engines_dir=tmp_path)
    try:
        map_a, score_a = backend.run(a)
        out = {}
        worker = threading.Thread(target=lambda: out.update(result=backend.run(b)))
        worker.start()
        worker.join()
        map_b, score_b = out["result"]
        again_a, _ = backend.run(a)
    finally:
        backend.close()
    assert not np.array_equal(map_a, map_b)  # the first map was not overwritten by the later frames
    np.testing.assert_array_equal(map_a, again_a)
    ref_b = _ort(scorer_onnx).run(b)
    assert abs(score_b - ref_b[1]) <= 1e-3 * abs(ref_b[1])


@needs_gpu
@pytest.mark.gpu
@pytest.mark.slow
def test_int8_plan_builds_from_good_images(tmp_path, scorer_onnx):
    from edge_inspect.scorer.backends.trt_backend import TensorRTBackend

    images = smooth_images(8, seed=5)
    backend = TensorRTBackend(scorer_onnx, precision="int8", product="widget", engines_dir=tmp_path, calibration_images=images)
    try:
        anomaly_map, score = backend.run(images[0])
    finally:
        backend.close()
    assert np.isfinite(score) and np.all(np.isfinite(anomaly_map))
    assert engines.read_sidecar(backend.plan_path)["int8_calibration_images"] == 8
    key = engines.plan_key(scorer_onnx, "widget", "int8", backend.facts)
    assert engines.calibration_cache_path(tmp_path, key).is_file()
