"""`edge-inspect evaluate`: few-shot quality on MVTec-AD-layout datasets, beside anomalib's PatchCore as the floor."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    from ._common import add_threshold_options

    p = subparsers.add_parser("evaluate", help="calibrate on N good shots of MVTec-layout datasets and measure quality")
    p.add_argument(
        "datasets", nargs="+", metavar="DATASET",
        help="folder with train/good, test/<type>, ground_truth/<type>; or a folder of such folders. Several: one row each and the mean",
    )
    p.add_argument("--shots", type=int, default=4, help="good images to calibrate on (the first N of train/good)")
    p.add_argument(
        "--shot-sets", type=int, default=1,
        help="repeat with this many disjoint shot sets (images 1..N, N+1..2N, ...) and report mean, min and max: "
        "few-shot results depend on which shots they are",
    )
    p.add_argument("--engines-dir", default="engines", help="where the backbone ONNX lives (default ./engines)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--augment", default="default", help="as in calibrate (default: hflip,vflip)")
    add_threshold_options(p)
    p.add_argument("--bank-size", type=int, default=4096)
    p.add_argument("--roi")
    p.add_argument("--backend", default="onnxruntime", choices=["auto", "onnxruntime", "tensorrt"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-test", type=int, help="score at most this many test images")
    p.add_argument(
        "--no-floor", "--no-reference", dest="no_floor", action="store_true",
        help="skip the floor: anomalib's own PatchCore on the same Lite0 weights, by default fitted on the same shots "
        "and scored on the same images in this run (needs the eval extra: pip install -e '.[export,eval]')",
    )
    p.add_argument(
        "--feedback", type=int, default=0, metavar="K",
        help="then simulate an operator who overrules the first K false rejects of the (shuffled) test stream, each a "
        "refit as on the line; reports false-reject and miss rates before and after on the parts not overruled",
    )
    p.add_argument("--feedback-evidence", choices=["all", "shots", "novel"], default=None,
                   help="refit policy (default: the daemon's): accepted frames give threshold evidence too (all), only join "
                   "the bank (shots), or only their novel patches join it (novel)")
    p.add_argument(
        "--stream", action="store_true",
        help="learning from the line: calibrate on the shots, feed an unlabeled stream (the other train goods and a "
        "share of defective test images, which leave the test) through the daemon's learning code, and report the "
        "start, after the stream, the clean ceiling (every train good, no defect) and the floor on the test split",
    )
    p.add_argument("--contamination", type=float, default=0.1, metavar="SHARE",
                   help="with --stream: share of defective frames in the stream (default 0.1)")
    p.add_argument("--single-type", action="store_true",
                   help="with --stream: the defective frames are all of the set's most frequent defect type (a recurring fault)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..calibration.calibrate import REFIT_EVIDENCE
    from ..errors import UserError
    from ..offline.evaluate import dataset_roots, evaluate_many, evaluate_shot_sets
    from ._common import calibration_options, show_progress

    if args.shots < 1:
        raise UserError("--shots must be at least 1 (calibration itself needs 2)")
    options = calibration_options(args)
    roots = dataset_roots(args.datasets)
    common = dict(
        options=options, engines_dir=args.engines_dir, backend=args.backend, threads=args.threads,
        progress=show_progress(args), max_test=args.max_test, floor=not args.no_floor,
        feedback=args.feedback, feedback_evidence=args.feedback_evidence or REFIT_EVIDENCE,
    )
    if args.feedback < 0:
        raise UserError("--feedback K: K is the number of false rejects the operator overrules (0 = none)")
    if args.stream:
        if args.feedback:
            raise UserError("--stream and --feedback are separate experiments: run them one at a time")
        return _run_stream(args, roots, options)
    if args.contamination != 0.1 or args.single_type:
        raise UserError("--contamination and --single-type go with --stream")
    if len(roots) > 1:
        result = evaluate_many(roots, args.shots, args.shot_sets, **common)
        if args.json:
            print(json.dumps(result))
        else:
            _print_table(result)
        return 0
    result = evaluate_shot_sets(roots[0], args.shots, args.shot_sets, **common)
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
        ("detection accuracy", result["detection_accuracy"]),
        ("localisation accuracy (3x3)", f"{result['localisation_accuracy']} (of {result['localised_parts']} flagged with masks)"),
        ("threshold", result["threshold"]),
        ("best F1 (oracle threshold)", result["best_f1"]),
        ("scorer p50 ms", result["p50_ms"]),
        ("scorer p99 ms", result["p99_ms"]),
        ("good / defect images", f"{result['n_good']} / {result['n_defect']}"),
        ("calibration s", result["calibration_s"]),
    ]
    if "floor" in result:
        rows[2:2] = [
            ("floor image AUROC (ratio)", f"{result['floor']['image_auroc']} ({_fmt(result['floor']['image_auroc_ratio'])})"),
            ("floor pixel AUROC (ratio)", f"{result['floor']['pixel_auroc']} ({_fmt(result['floor']['pixel_auroc_ratio'])})"),
        ]
    print(f"{result['dataset']}  ({args.shots} shots)")
    for name, value in rows:
        print(f"  {name:28s} {value}")
    print("  flagged per type: " + ", ".join(f"{t} {v['flagged']:.2f} (n={v['n']})" for t, v in result["per_type"].items()))
    return 0


def _run_stream(args, roots, options) -> int:
    from ..offline.stream_eval import evaluate_stream_many
    from ._common import show_progress

    result = evaluate_stream_many(roots, args.shots, args.shot_sets, contamination=args.contamination, single_type=args.single_type,
                                  options=options, engines_dir=args.engines_dir, backend=args.backend, threads=args.threads,
                                  progress=show_progress(args), floor=not args.no_floor)
    if args.json:
        print(json.dumps(result))
        return 0
    kind = f"{args.contamination:.0%} defective" + (" (one recurring type)" if args.single_type else "")
    print(f"learning from the line: {args.shots} shots, then a stream of the other train goods with {kind} frames; "
          f"{args.shot_sets} shot set(s); test split without the stream's defects")
    head = (f"{'set':12s}  {'image AUROC: start':>18s} {'after':>6s} {'ceil.':>6s} {'floor':>6s}   "
            f"{'F1 start':>8s} {'after':>6s}   {'false rej.':>10s} {'after':>6s}   {'miss':>6s} {'after':>6s}   defects taken")
    print(head)
    for r in [*result["datasets"], result["mean"]]:
        name = "MEAN" if r is result["mean"] else str(r["dataset"]).rstrip("/").rsplit("/", 1)[-1]
        s, a = r["start"], r["after"]
        c, f = r.get("ceiling", {}), r.get("floor", {})
        taken = f"{r['defects_as_candidates']}/{r['defects']}" if "defects" in r else ""
        print(f"{name:12s}  {_fmt(s['image_auroc']):>18s} {_fmt(a['image_auroc']):>6s} {_fmt(c.get('image_auroc')):>6s} "
              f"{_fmt(f.get('image_auroc')):>6s}   {_fmt(s['f1']):>8s} {_fmt(a['f1']):>6s}   "
              f"{_fmt(s['false_reject_rate'], True):>10s} {_fmt(a['false_reject_rate'], True):>6s}   "
              f"{_fmt(s['miss_rate'], True):>6s} {_fmt(a['miss_rate'], True):>6s}   {taken}")
    return 0


def _print_summary(result: dict) -> int:
    print(f"{result['dataset']}  ({result['shots']} shots, {result['shot_sets']} shot sets: mean [min .. max])")
    for key, name in (
        ("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("f1", "F1 at auto threshold"),
        ("false_reject_rate", "false reject rate"), ("miss_rate", "miss rate"), ("detection_accuracy", "detection accuracy"),
        ("localisation_accuracy", "localisation accuracy (3x3)"), ("best_f1", "best F1 (oracle threshold)"),
    ):
        if result[key] is None:
            print(f"  {name:28s} -")
        else:
            print(f"  {name:28s} {result[key]:.4f}  [{result[key + '_min']:.4f} .. {result[key + '_max']:.4f}]")
    for run in result["runs"]:
        print(f"  shot set {run['shot_set']} ({', '.join(run['shot_images'])}): image AUROC {run['image_auroc']}, "
              f"F1 {run['f1']}, false rejects {run['false_reject_rate']}")
    if "floor" in result:
        ref = result["floor"]
        print(f"  {'floor image AUROC (ratio)':28s} {ref['image_auroc']:.4f} ({_fmt(ref['image_auroc_ratio'])})")
        print(f"  {'floor pixel AUROC (ratio)':28s} {_fmt(ref['pixel_auroc'])} ({_fmt(ref['pixel_auroc_ratio'])})")
        print(f"  floor: {ref['name']}")
    print(f"  {'good / defect images':28s} {result['n_good']} / {result['n_defect']}")
    return 0


def _fmt(value, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if pct else f"{value:.3f}"


COLUMNS = (
    ("image AUROC", "image_auroc", False), ("pixel AUROC", "pixel_auroc", False), ("F1", "f1", False),
    ("false rej.", "false_reject_rate", True), ("miss", "miss_rate", True), ("det. acc.", "detection_accuracy", True),
    ("loc. acc.", "localisation_accuracy", True),
)


def _print_table(result: dict) -> None:
    """One row per set: the scorer beside anomalib's PatchCore floor (ratio scorer / floor), then the mean."""
    rows = []
    for r in result["datasets"]:
        rows.append((str(r["dataset"]).rstrip("/").rsplit("/", 1)[-1], r))
    rows.append(("MEAN", result["mean"]))
    name_w = max(len(n) for n, _ in rows)
    has_ref = "floor" in result["mean"]
    head = f"{'set':{name_w}s}  " + ("img AUROC  floor  ratio  px AUROC  floor  ratio  " if has_ref else "img AUROC  px AUROC  ")
    head += "  ".join(f"{label:>10s}" for label, _, _ in COLUMNS[2:])
    floor = f"; floor = {result['mean']['floor']['name']}, same shots and images, this run" if has_ref else ""
    print(f"{result['shots']} shots, {result['shot_sets']} shot set(s) per dataset{floor}")
    print(head)
    for name, r in rows:
        line = f"{name:{name_w}s}  {_fmt(r['image_auroc']):>9s}  "
        if has_ref:
            ref = r["floor"]
            line += (f"{_fmt(ref['image_auroc']):>5s}  {_fmt(ref['image_auroc_ratio']):>5s}  {_fmt(r['pixel_auroc']):>8s}  "
                     f"{_fmt(ref['pixel_auroc']):>5s}  {_fmt(ref['pixel_auroc_ratio']):>5s}  ")
        else:
            line += f"{_fmt(r['pixel_auroc']):>8s}  "
        line += "  ".join(f"{_fmt(r.get(key), pct):>10s}" for _, key, pct in COLUMNS[2:])
        print(line)
    if has_ref:
        m = result["mean"]
        print(f"sets at or above the floor: image AUROC {m['sets_at_or_above_floor']} of {len(result['datasets'])}, "
              f"pixel AUROC {m['sets_at_or_above_floor_pixel']} of {m['sets_with_masks']} with masks")
