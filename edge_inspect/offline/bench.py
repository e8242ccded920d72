"""Speed of the scorer against the eager PyTorch reference of the same algorithm, in one run.

The scorer is what runs on the line (one ONNX graph in ONNX Runtime or TensorRT); the reference is
export.reference.ReferenceScorer (PyTorch eager: the same backbone taps, aggregation, kNN over the
same memory bank and smoothing). Both are timed on the same real frames, preprocessing included,
after a warm-up, with the same number of CPU threads; the ratio of their medians is the speed-up of
the compiled graph over the straightforward implementation.

Example:
    product = load_product("calibration", "bracket-a")
    result = bench_product(product, frames, BenchOptions(iterations=50, threads=2))
    print(render_table(result))
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnxruntime

from ..calibration.artifacts import BACKBONE_FILE, ensure_backbone
from ..calibration.calibrate import calibrate_product
from ..calibration.fit import CalibrationOptions
from ..errors import UserError
from ..imageio import crop_roi, list_images, read_bgr, to_input
from ..scorer.params import ScorerParams
from ..scorer.product import Scorer
from .datasets.generate import CATEGORIES, generate_dataset

MIN_FRAME_SIZE = 128  # generated frames are at least this big: smaller ones leave no room for a defect
REFERENCE_EXTRA = "PyTorch is not installed: `pip install -e '.[export]'` to time the eager reference"


@dataclass(frozen=True)
class BenchOptions:
    backend: str = "auto"
    iterations: int = 50  # timed runs of each implementation
    warmup: int = 5  # untimed runs first: lazy initialisation, caches, thread pools
    threads: int = 0  # CPU threads for both implementations; 0 = all cores
    precision: str = "fp16"  # TensorRT plan precision (ignored by ONNX Runtime)
    reference: bool = True  # also time the eager PyTorch reference
    reference_device: str = "auto"  # auto: CUDA when the scorer runs on a GPU and torch has CUDA, else CPU


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    runs: int

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> "Latency":
        a = np.asarray(samples_ms, dtype=np.float64)
        return cls(
            p50_ms=round(float(np.percentile(a, 50)), 3),
            p99_ms=round(float(np.percentile(a, 99)), 3),
            mean_ms=round(float(a.mean()), 3),
            min_ms=round(float(a.min()), 3),
            runs=int(a.size),
        )


def resolve_threads(threads: int) -> int:
    """0 means all cores; the same explicit number is then given to both implementations."""
    return threads if threads > 0 else (os.cpu_count() or 1)


def time_calls(run: Callable[[np.ndarray], float], frames: Sequence[np.ndarray], iterations: int, warmup: int) -> tuple[list[float], dict[int, float]]:
    """Call `run` on the frames in turn: `warmup` untimed calls, then `iterations` timed ones.

    Returns the timed latencies in ms and the score `run` returned for each frame the first time.
    """
    if not frames:
        raise ValueError("time_calls needs at least one frame")
    scores: dict[int, float] = {}
    samples: list[float] = []
    for i in range(warmup + iterations):
        index = i % len(frames)
        started = time.perf_counter()
        score = run(frames[index])
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        scores.setdefault(index, float(score))
        if i >= warmup:
            samples.append(elapsed_ms)
    return samples, scores


def reference_scorer(product, threads: int, device: str = "cpu") -> Callable[[np.ndarray], float]:
    """The eager PyTorch reference over the product's memory bank, as `bgr frame -> image score`.

    Sets torch's intra-op threads to `threads` (process-wide). Raises ImportError without PyTorch.
    """
    import torch

    from ..export.reference import ReferenceScorer, load_reference_backbone

    torch.set_num_threads(threads)
    bank = np.load(product.directory / "memory_bank.npy")
    model = ReferenceScorer(load_reference_backbone(), product.params, bank).eval().to(device)
    size, roi = tuple(product.input_size), product.roi
    buffer = np.empty((1, 3, *size), dtype=np.float32)

    def run(bgr: np.ndarray) -> float:
        x = torch.from_numpy(to_input(crop_roi(bgr, roi), size, out=buffer)).to(device)
        with torch.inference_mode():
            anomaly_map, score = model(x)
            anomaly_map.cpu().numpy()  # the map comes back to the host, as the scorer's does
        return float(score.item())

    return run


def _pick_reference_device(requested: str, backend_facts: dict[str, Any]) -> str:
    """cpu, or cuda where asked for (auto: where the scorer itself runs on the GPU) and torch has it."""
    import torch

    if requested == "cpu":
        return "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--reference-device cuda: this PyTorch build sees no CUDA device; use cpu or auto")
        return "cuda"
    on_gpu = backend_facts.get("backend") == "tensorrt" or "CUDAExecutionProvider" in backend_facts.get("providers", [])
    return "cuda" if on_gpu and torch.cuda.is_available() else "cpu"


def bench_product(product, frames: Sequence[np.ndarray], options: BenchOptions, source: str = "") -> dict[str, Any]:
    """Time the product's scorer and (when PyTorch is installed) the eager reference on `frames`."""

    if not frames:
        raise UserError("no frames to time: give --images DIR with at least one image")
    threads = resolve_threads(options.threads)
    load_before = _load_average()
    scorer = Scorer(product, backend=options.backend, threads=threads, precision=options.precision)
    try:
        facts = scorer.backend.describe()
        scorer_samples, scorer_scores = time_calls(lambda f: scorer.score(f).score, frames, options.iterations, options.warmup)
    finally:
        scorer.close()
    scorer_latency = Latency.of(scorer_samples)
    bank = np.load(product.directory / "memory_bank.npy", mmap_mode="r")
    result: dict[str, Any] = {
        "product": product.name,
        "calibration_id": product.calibration_id,
        "frames": len(frames),
        "frames_source": source,
        "input_size": list(product.input_size),
        "bank_size": int(bank.shape[0]),
        "feature_dim": int(bank.shape[1]),
        "threshold": round(product.threshold, 5),
        "threads": threads,
        "iterations": options.iterations,
        "warmup": options.warmup,
        "backend": facts.get("backend", options.backend),
        "backend_info": facts,
        "scorer_p50_ms": scorer_latency.p50_ms,
        "scorer_p99_ms": scorer_latency.p99_ms,
        "scorer_mean_ms": scorer_latency.mean_ms,
        "scorer_min_ms": scorer_latency.min_ms,
        "reference_p50_ms": None,
        "reference_p99_ms": None,
        "reference_mean_ms": None,
        "reference_min_ms": None,
        "reference_device": None,
        "speedup": None,
        "score_max_abs_diff": None,
        "reference_note": "not run (--no-reference)" if not options.reference else "",
    }
    if options.reference:
        reference = _time_reference(product, frames, options, threads, facts)
        if isinstance(reference, str):
            result["reference_note"] = reference
        else:
            samples, reference_scores, device = reference
            reference_latency = Latency.of(samples)
            result.update(
                reference_p50_ms=reference_latency.p50_ms,
                reference_p99_ms=reference_latency.p99_ms,
                reference_mean_ms=reference_latency.mean_ms,
                reference_min_ms=reference_latency.min_ms,
                reference_device=device,
                speedup=round(reference_latency.p50_ms / scorer_latency.p50_ms, 3) if scorer_latency.p50_ms > 0 else None,
                # Same algorithm, same bank: the scores must agree (a check that the comparison is fair).
                score_max_abs_diff=float(f"{max(abs(scorer_scores[i] - reference_scores[i]) for i in scorer_scores):.3g}"),
            )
    result["host"] = _host_facts(load_before)
    return result


def _time_reference(product, frames, options: BenchOptions, threads: int, facts: dict[str, Any]):
    """(latencies, first score per frame, device) of the eager reference, or why it could not run."""
    try:
        import torch
    except ImportError:
        return REFERENCE_EXTRA
    previous_threads = torch.get_num_threads()
    try:
        device = _pick_reference_device(options.reference_device, facts)
        run = reference_scorer(product, threads, device)
        samples, scores = time_calls(run, frames, options.iterations, options.warmup)
    except UserError as exc:  # PyTorch without the pretrained weights package
        return str(exc)
    finally:
        torch.set_num_threads(previous_threads)
    return samples, scores, device


def temporary_product(work_dir: str | Path, engines_dir: str | Path, category: str = "brick", shots: int = 4, size: int | None = None, seed: int = 0, progress: bool = False):
    """Calibrate a throw-away product from `shots` generated good images of `category` in `work_dir`.

    Returns (product, frame paths): the frames are the generated dataset's held-out good images and
    defects, so the timing runs on real, varied frames. The backbone comes from `engines_dir` (exported
    there first when missing); the product's own graphs go to `work_dir`.
    """

    if category not in CATEGORIES:
        raise UserError(f"--category {category!r}: choose one of {', '.join(CATEGORIES)}")
    params = ScorerParams() if size is None else ScorerParams(input_size=(size, size))
    work = Path(work_dir)
    backbone = ensure_backbone(engines_dir)
    engines = work / "engines"
    (engines / BACKBONE_FILE).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(backbone.resolve(), engines / BACKBONE_FILE)
    try:
        dataset = generate_dataset(
            work / "data", category, n_train=shots, n_test_good=4, n_test_defect=1, size=max(params.input_size[0], MIN_FRAME_SIZE), seed=seed,
            kinds=("scratch", "hole", "stain", "missing"),
        )
    except ImportError as exc:
        raise UserError(f"the generated dataset needs scikit-image (`pip install -e '.[dev]'`), or pass --product: {exc}") from exc
    shots_paths = sorted((dataset / "train" / "good").glob("*.png"))
    product = calibrate_product(
        shots_paths, f"bench-{category}", work / "calibration", engines, CalibrationOptions(params=params, seed=seed), progress=progress,
    )
    frames = sorted((dataset / "test").glob("*/*.png"))
    return product, frames


def product_frames(product, images: str | Path | None = None) -> tuple[Any, list[np.ndarray], str]:
    """Frames to time for a calibrated product: the images in `images`, else its good references.

    The references are stored already cropped to the product's ROI, so with them the product is
    returned without its ROI (the crop itself costs microseconds).
    """
    if images:
        paths = list_images(images)
        if not paths:
            raise UserError(f"--images {images}: no images in that folder")
        return product, [read_bgr(p) for p in paths], str(images)
    ref_dir = Path(product.directory) / "references"
    try:
        entries = json.loads((ref_dir / "references.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{ref_dir}: no readable good reference images ({exc}); pass --images DIR or recalibrate") from exc
    frames = [read_bgr(ref_dir / e["file"]) for e in entries]
    return dataclasses.replace(product, roi=None), frames, f"{ref_dir} (good references)"


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on Linux
        return None


def _host_facts(load_before: float | None) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "nice": os.nice(0) if hasattr(os, "nice") else None,
        # The run shares the CPU with whatever else runs: a load above the core count inflates both sides.
        "load_1m_before": load_before,
        "load_1m_after": _load_average(),
    }
    try:
        import torch

        facts["torch"] = torch.__version__
    except ImportError:
        facts["torch"] = None
    return facts


def render_table(result: dict[str, Any]) -> str:
    h, w = result["input_size"]
    host = result["host"]
    lines = [
        f"edge-inspect bench: product {result['product']} ({result['frames_source'] or 'frames'}; {result['frames']} frames), "
        f"input {w}x{h}, bank {result['bank_size']} x {result['feature_dim']}, threads {result['threads']}",
        f"host: {host['machine']}, {host['cpus']} CPUs, nice {host['nice']}, load {host['load_1m_before']} -> {host['load_1m_after']}; "
        f"onnxruntime {host['onnxruntime']}, torch {host['torch'] or '-'}",
        f"{'':30s} {'p50 ms':>9s} {'p99 ms':>9s} {'mean ms':>9s} {'min ms':>9s} {'runs':>6s}",
        f"{'scorer (' + result['backend'] + ')':30s} {result['scorer_p50_ms']:9.2f} {result['scorer_p99_ms']:9.2f} "
        f"{result['scorer_mean_ms']:9.2f} {result['scorer_min_ms']:9.2f} {result['iterations']:6d}",
    ]
    if result["reference_p50_ms"] is not None:
        lines.append(
            f"{'reference (torch eager, ' + result['reference_device'] + ')':30s} {result['reference_p50_ms']:9.2f} "
            f"{result['reference_p99_ms']:9.2f} {result['reference_mean_ms']:9.2f} {result['reference_min_ms']:9.2f} {result['iterations']:6d}"
        )
        lines.append(f"speed-up (reference p50 / scorer p50): {result['speedup']:.2f}x")
        lines.append(f"same algorithm: largest |score difference| {result['score_max_abs_diff']:.2g} (threshold {result['threshold']})")
    else:
        lines.append(f"reference: {result['reference_note']}")
    return "\n".join(lines)
