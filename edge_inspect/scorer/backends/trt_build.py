"""Build a product's TensorRT plan on this device and check it (what `edge-inspect build-engine` runs).

Steps, each reported through `say` with its time: check the graph against TensorRT 10's ONNX support
(no GPU needed; check_only stops here), build or reuse the cached plan (trt_plan_cache), time it, and
check its accuracy on the product's good images: against ONNX Runtime (FP32 reference) and, for INT8,
against the FP16 plan.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

from ...errors import UserError
from ...imageio import crop_roi, list_images, read_bgr, to_input
from .ort_backend import OrtBackend
from .trt_backend import TensorRTBackend, good_images, tensorrt_available
from .trt_compat import TARGET_TENSORRT, check_tensorrt_compat_file

# Largest |score difference| accepted, as a fraction of the product threshold, per precision.
# Initial limits, to be confirmed with measurements on the device (docs/jetson.md).
DEFAULT_TOLERANCE = {"fp32": 0.002, "fp16": 0.02, "int8": 0.05}
CHECK_IMAGES = 16  # good images used for the accuracy checks and the timing


def agreement(reference: Sequence[tuple[np.ndarray, float]], candidate: Sequence[tuple[np.ndarray, float]], threshold: float) -> dict[str, Any]:
    """How closely `candidate` (map, score) results follow `reference` on the same images.

    max_map_diff_rel is the largest map difference relative to the reference map's peak; verdict_flips
    counts images on opposite sides of the threshold.
    """
    if len(reference) != len(candidate) or not reference:
        raise ValueError("agreement needs the same, non-zero number of results on both sides")
    score_diff = np.array([abs(float(a[1]) - float(b[1])) for a, b in zip(reference, candidate)])
    map_diff = [float(np.max(np.abs(a[0] - b[0]))) / max(float(np.max(np.abs(a[0]))), 1e-12) for a, b in zip(reference, candidate)]
    flips = sum((float(a[1]) >= threshold) != (float(b[1]) >= threshold) for a, b in zip(reference, candidate))
    return {
        "images": len(reference),
        "max_score_diff": float(score_diff.max()),
        "mean_score_diff": float(score_diff.mean()),
        "max_score_diff_of_threshold": float(score_diff.max() / threshold) if threshold > 0 else float("inf"),
        "max_map_diff_rel": float(max(map_diff)),
        "verdict_flips": int(flips),
    }


def passes(stats: dict[str, Any], tolerance: float) -> bool:
    return stats["verdict_flips"] == 0 and stats["max_score_diff_of_threshold"] <= tolerance


def _images(images_dir: str | None, product) -> list[np.ndarray]:
    if images_dir:
        paths = list_images(images_dir)
        if not paths:
            raise UserError(f"--images {images_dir}: no images in that folder")
        return [to_input(crop_roi(read_bgr(p), product.roi), tuple(product.input_size)) for p in paths]
    return good_images(product)


def _median_ms(backend, image: np.ndarray, runs: int = 50) -> float:
    for _ in range(5):  # warm-up: first runs include lazy initialisation
        backend.run(image)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        backend.run(image)
        times.append((time.perf_counter() - started) * 1000.0)
    return float(np.median(times))


def build_engine(product, precision: str, *, images_dir: str | None = None, workspace_mib: int = 1024,
                 tolerance: float | None = None, force: bool = False, check_only: bool = False,
                 say: Callable[[str], None] = print) -> tuple[dict[str, Any], int]:
    """Check the graph, build (or reuse) the plan, time it and check its accuracy: (summary, exit code).

    Example: summary, code = build_engine(load_product("calibration", "bracket-a"), "fp16")
    """
    started = time.monotonic()
    problems = check_tensorrt_compat_file(str(product.scorer_onnx))
    if problems:
        raise UserError(f"{product.scorer_onnx} will not build with TensorRT {TARGET_TENSORRT}:\n  " + "\n  ".join(problems))
    say(f"graph check      {product.scorer_onnx.name}: only ops and attributes TensorRT {TARGET_TENSORRT} supports, static shapes ({time.monotonic() - started:.2f} s)")
    summary: dict[str, Any] = {"product": product.name, "precision": precision, "graph": product.scorer_onnx.name, "graph_check": "ok"}
    if check_only:
        return summary, 0

    ok, reason = tensorrt_available()
    if not ok:
        raise UserError(
            f"cannot build a TensorRT plan here: {reason}. A plan is built on the device that runs it: run this "
            "command on the Jetson (docs/jetson.md); `--check-only` checks the graph without TensorRT"
        )
    say(f"device           {reason}")
    tolerance = tolerance if tolerance is not None else DEFAULT_TOLERANCE[precision]
    images = _images(images_dir, product)
    check_images = images[:CHECK_IMAGES]
    options = dict(product=product, engines_dir=product.engines_dir, allow_build=True, workspace_mib=workspace_mib, progress=say,
                   bank=product.bank)

    started = time.monotonic()
    backend = TensorRTBackend(product.scorer_onnx, precision=precision, force_build=force, calibration_images=images if precision == "int8" else None, **options)
    results: list[tuple[np.ndarray, float]] = []
    try:
        say(f"plan             {backend.plan_path} ({time.monotonic() - started:.1f} s)")
        latency = _median_ms(backend, check_images[0])
        say(f"latency          {latency:.2f} ms median per frame (copy in + execute + copy out)")
        results = [backend.run(x) for x in check_images]
    finally:
        backend.close()
    summary.update(plan=str(backend.plan_path), latency_ms_median=round(latency, 3), device=backend.facts.gpu_name, tensorrt=backend.facts.tensorrt_version)

    reference = OrtBackend(product.scorer_onnx, use_cuda=False, bank=product.bank)
    try:
        fp32_results = [reference.run(x) for x in check_images]
    finally:
        reference.close()
    checks = {"vs_onnxruntime_fp32": agreement(fp32_results, results, product.threshold)}
    if precision == "int8":
        fp16 = TensorRTBackend(product.scorer_onnx, precision="fp16", **options)
        try:
            fp16_results = [fp16.run(x) for x in check_images]
        finally:
            fp16.close()
        checks["vs_fp16_plan"] = agreement(fp16_results, results, product.threshold)
    failed = []
    for name, stats in checks.items():
        verdict = "ok" if passes(stats, tolerance) else "FAIL"
        if verdict == "FAIL":
            failed.append(name)
        say(
            f"accuracy {name:18s} {verdict}: max |score diff| {stats['max_score_diff']:.5f} = "
            f"{100 * stats['max_score_diff_of_threshold']:.2f}% of threshold (limit {100 * tolerance:.1f}%), "
            f"max map diff {100 * stats['max_map_diff_rel']:.2f}% of peak, {stats['verdict_flips']} verdict flips, "
            f"{stats['images']} good images"
        )
    summary.update(checks=checks, tolerance=tolerance, passed=not failed)
    if failed:
        say(f"the {precision} plan disagrees with its reference beyond tolerance ({', '.join(failed)}); "
            "use --precision fp16 (or fp32), or recalibrate INT8 with more good images (--images)")
        return summary, 1
    return summary, 0
