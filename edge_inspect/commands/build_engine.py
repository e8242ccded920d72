"""`edge-inspect build-engine`: compile a product's scorer graph into a TensorRT plan on this device.

Steps, each printed with its time: check the graph against TensorRT 10's ONNX support (no GPU
needed; `--check-only` stops here), build or reuse the cached plan in engines/, time it, and check
its accuracy on the product's good images: against ONNX Runtime (FP32 reference) and, for INT8,
against the FP16 plan. A check outside tolerance exits 1.
"""

from __future__ import annotations


def add_parser(subparsers) -> None:
    from ._common import add_dirs

    p = subparsers.add_parser("build-engine", help="compile a product's scorer graph into a TensorRT plan (on the Jetson)")
    p.add_argument("--product", required=True)
    p.add_argument("--precision", default="fp16", choices=["fp16", "int8", "fp32"], help="plan precision (default fp16)")
    add_dirs(p)
    p.add_argument("--images", help="good-part images for INT8 calibration and the checks (default: the product's references)")
    p.add_argument("--workspace-mib", type=int, default=1024, help="TensorRT builder workspace limit in MiB (default 1024)")
    p.add_argument("--tolerance", type=float, help="max |score difference| / threshold in the accuracy checks (default: fp32 0.002, fp16 0.02, int8 0.05)")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching plan exists")
    p.add_argument("--check-only", action="store_true", help="only check the graph against TensorRT 10's ONNX support (no GPU needed)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from ..scorer.backends.trt_build import build_engine
    from ..scorer.product import load_product

    product = load_product(args.calibration_dir, args.product, args.engines_dir)
    summary, code = build_engine(
        product, args.precision, images_dir=args.images, workspace_mib=args.workspace_mib, tolerance=args.tolerance,
        force=args.force, check_only=args.check_only, say=(lambda *a: None) if args.json else print,
    )
    if args.json:
        print(json.dumps(summary))
    return code
