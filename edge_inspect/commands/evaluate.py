"""`edge-inspect evaluate`: few-shot quality on an MVTec-AD-layout dataset."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="calibrate on N good shots of an MVTec-layout dataset and measure quality")
    p.add_argument("dataset", help="folder with train/good, test/<type>, ground_truth/<type>")
    p.add_argument("--shots", type=int, default=4, help="good images to calibrate on (the first N of train/good)")
    p.add_argument(
        "--shot-sets", type=int, default=1,
        help="repeat with this many disjoint shot sets (images 1..N, N+1..2N, ...) and report mean, min and max: "
        "few-shot results depend on which shots they are",
    )
    p.add_argument("--engines-dir", default="engines", help="where the backbone ONNX lives (default ./engines)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--augment", default="jitter", help="as in calibrate (default jitter)")
    p.add_argument("--sensitivity", type=float, default=1.0)
    p.add_argument("--bank-size", type=int, default=2048)
    p.add_argument("--roi")
    p.add_argument("--backend", default="onnxruntime", choices=["auto", "onnxruntime", "tensorrt"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-test", type=int, help="score at most this many test images")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import UserError
    from ..offline.evaluate import evaluate_shot_sets
    from ._common import calibration_options, show_progress

    if args.shots < 1:
        raise UserError("--shots must be at least 1 (calibration itself needs 2)")
    options = calibration_options(args)
    result = evaluate_shot_sets(
        args.dataset, args.shots, args.shot_sets, options=options, engines_dir=args.engines_dir, backend=args.backend,
        threads=args.threads, progress=show_progress(args), max_test=args.max_test,
    )
    if args.json:
        print(json.dumps(result))
        return 0
    if args.shot_sets > 1:
        return _print_summary(result)
    rows = [
        ("image AUROC", result["image_auroc"]),
        ("pixel AUROC", result["pixel_auroc"]),
        ("F1 at auto threshold", result["f1"]),
        ("false reject rate", result["false_reject_rate"]),
        ("miss rate", result["miss_rate"]),
        ("threshold", result["threshold"]),
        ("best F1 (oracle threshold)", result["best_f1"]),
        ("scorer p50 ms", result["p50_ms"]),
        ("scorer p99 ms", result["p99_ms"]),
        ("good / defect images", f"{result['n_good']} / {result['n_defect']}"),
        ("calibration s", result["calibration_s"]),
    ]
    print(f"{result['dataset']}  ({args.shots} shots)")
    for name, value in rows:
        print(f"  {name:28s} {value}")
    print("  flagged per type: " + ", ".join(f"{t} {v['flagged']:.2f} (n={v['n']})" for t, v in result["per_type"].items()))
    return 0


def _print_summary(result: dict) -> int:
    print(f"{result['dataset']}  ({result['shots']} shots, {result['shot_sets']} shot sets: mean [min .. max])")
    for key, name in (
        ("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("f1", "F1 at auto threshold"),
        ("false_reject_rate", "false reject rate"), ("miss_rate", "miss rate"), ("best_f1", "best F1 (oracle threshold)"),
    ):
        if result[key] is None:
            print(f"  {name:28s} -")
        else:
            print(f"  {name:28s} {result[key]:.4f}  [{result[key + '_min']:.4f} .. {result[key + '_max']:.4f}]")
    for run in result["runs"]:
        print(f"  shot set {run['shot_set']} ({', '.join(run['shot_images'])}): image AUROC {run['image_auroc']}, "
              f"F1 {run['f1']}, false rejects {run['false_reject_rate']}")
    print(f"  {'good / defect images':28s} {result['n_good']} / {result['n_defect']}")
    return 0
