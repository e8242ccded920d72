"""`edge-inspect bench`: scorer latency against the eager PyTorch reference of the same algorithm.

Without --product a throw-away 4-shot product is calibrated from a generated dataset first. With
--vlm --vlm-model M.gguf the VLM stage is timed too (edge_inspect.offline.bench_vlm; for a plumbing
check without a model, run tools/bench_vlm.py --tiny from a checkout).
"""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    from ._common import add_dirs

    p = subparsers.add_parser("bench", help="time the scorer against the eager PyTorch reference (p50/p99, speed-up)")
    p.add_argument("--product", help="a calibrated product (default: calibrate a temporary one from a generated dataset)")
    p.add_argument("--images", help="frames to time (default: the product's good references, or the generated test images)")
    add_dirs(p)
    p.add_argument("--category", default="brick", help="generated dataset for the temporary product (default brick)")
    p.add_argument("--shots", type=int, default=4, help="good images the temporary product is calibrated on (default 4)")
    p.add_argument("--size", type=int, help="input size of the temporary product (default: the scorer's default)")
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"])
    p.add_argument("--precision", default="fp16", choices=["fp16", "int8", "fp32"], help="TensorRT plan precision")
    p.add_argument("--iterations", type=int, default=50, help="timed runs of each implementation (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for both implementations (default 0 = all cores)")
    p.add_argument("--reference-device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the torch reference runs (auto: CUDA when the scorer runs on a GPU)")
    p.add_argument("--no-reference", action="store_true", help="time the scorer only")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--progress", action="store_true", help="show calibration progress of the temporary product")
    p.add_argument("--vlm", action="store_true", help="also time the VLM stage (needs llama-cpp-python)")
    p.add_argument("--vlm-model", help="VLM language model GGUF (needed with --vlm)")
    p.add_argument("--vlm-mmproj", help="VLM projector GGUF (image mode)")
    p.add_argument("--vlm-frames", type=int, default=3, help="timed flagged frames per VLM mode (default 3)")
    p.set_defaults(func=run)


def _check(args) -> None:
    from ..errors import UserError

    if not 1 <= args.iterations <= 100_000:
        raise UserError(f"--iterations {args.iterations}: use 1..100000")
    if not 0 <= args.warmup <= 10_000:
        raise UserError(f"--warmup {args.warmup}: use 0..10000")
    if not 0 <= args.threads <= 256:
        raise UserError(f"--threads {args.threads}: use 0 (all cores) to 256")
    if args.shots < 2:
        raise UserError(f"--shots {args.shots}: calibration needs at least 2 good images")
    if args.size is not None and (args.size % 32 or not 64 <= args.size <= 1024):
        raise UserError(f"--size {args.size}: use a multiple of 32 between 64 and 1024")
    if args.vlm_frames < 1:
        raise UserError(f"--vlm-frames {args.vlm_frames}: use at least 1")
    if args.vlm:
        import importlib.util

        if not args.vlm_model:
            raise UserError("--vlm needs --vlm-model M.gguf (and --vlm-mmproj P.gguf for image mode); for a plumbing "
                            "check without a model run tools/bench_vlm.py --tiny from the source tree")
        if importlib.util.find_spec("llama_cpp") is None:
            raise UserError("--vlm needs llama-cpp-python: `pip install -e '.[vlm]'` (or tools/ensure_llama_wheel.sh .venv)")


def _vlm_result(args, threads: int) -> dict:
    from ..offline import bench_vlm

    argv = ["--frames", str(args.vlm_frames), "--threads", str(threads), "--model", args.vlm_model]
    if args.vlm_mmproj:
        argv += ["--mmproj", args.vlm_mmproj]
    return {"result": bench_vlm.run(bench_vlm.build_parser().parse_args(argv)), "table": bench_vlm.render_table}


def run(args) -> int:
    import tempfile

    from ..imageio import list_images, read_bgr
    from ..offline.bench import (
        BenchOptions,
        bench_product,
        product_frames,
        render_table,
        resolve_threads,
        temporary_product,
    )
    from ..scorer.product import load_product
    from ._common import show_progress

    _check(args)
    options = BenchOptions(
        backend=args.backend, iterations=args.iterations, warmup=args.warmup, threads=args.threads,
        precision=args.precision, reference=not args.no_reference, reference_device=args.reference_device,
    )
    if args.product:
        product, frames, source = product_frames(load_product(args.calibration_dir, args.product, args.engines_dir), args.images)
        result = bench_product(product, frames, options, source)
        result["temporary_product"] = False
    else:
        with tempfile.TemporaryDirectory(prefix="edge-inspect-bench-") as work:
            product, paths = temporary_product(work, args.engines_dir, args.category, args.shots, args.size, progress=show_progress(args))
            if args.images:
                paths, source = list_images(args.images), args.images
            else:
                source = f"generated {args.category}, {args.shots}-shot temporary product"
            result = bench_product(product, [read_bgr(p) for p in paths], options, source)
        result["temporary_product"] = True
    exit_code = 0
    vlm = None
    if args.vlm:
        vlm = _vlm_result(args, resolve_threads(args.threads))
        result["vlm"] = vlm["result"]
        exit_code = 1 if any("error" in m for m in vlm["result"]["modes"]) else 0
    if args.json:
        print(json.dumps(result))
    else:
        print(render_table(result))
        if vlm:
            print()
            print(vlm["table"](vlm["result"]))
    return exit_code
