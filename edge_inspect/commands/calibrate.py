"""`edge-inspect calibrate`: build a product's memory bank and threshold from a few good parts."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    from ._common import add_dirs, add_threshold_options

    p = subparsers.add_parser("calibrate", help="build a product's memory bank and automatic threshold from good images")
    p.add_argument("--product", required=True, help="product name (letters, digits, - _ .)")
    p.add_argument("--images", required=True, help="folder of good-part images (4-10 recommended)")
    add_dirs(p)
    p.add_argument("--roi", help="x,y,width,height crop applied to every image and frame of this product")
    p.add_argument("--size", type=int, default=256, help="square scorer input size in pixels, multiple of 32 (default 256)")
    p.add_argument("--augment", default="default",
                   help="views of the good parts in the bank: default (hflip,vflip: parts that may appear mirrored; use none where a mirror image is a defect), none, auto (chosen per product by synthetic defects, evidence in the manifest), or a comma list of jitter (small rotations), hflip, vflip, rot90, shift")
    add_threshold_options(p)
    p.add_argument("--bank-size", type=int, default=4096, help="max memory bank patches; more are thinned by the coreset (default 4096)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true",
                   help="recalibrate an existing product: a new calibration version (the old one stays for `calibration rollback`)")
    p.add_argument("--why", default="", help="note kept in the version's manifest (calibration history shows it)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--progress", action="store_true", help="show a progress bar even when not on a terminal")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..calibration.calibrate import calibrate_product
    from ..errors import UserError
    from ..imageio import list_images
    from ._common import calibration_options, operator_name, show_progress

    images = list_images(args.images)
    if not images:
        raise UserError(f"{args.images} holds no images (.png .jpg .jpeg .bmp .tif .tiff .webp)")
    options = calibration_options(args)
    product = calibrate_product(images, args.product, args.calibration_dir, args.engines_dir, options, force=args.force,
                                progress=show_progress(args), by=operator_name(), why=args.why)
    evidence = json.loads((product.directory / "threshold.json").read_text())["evidence"]
    summary = {
        "product": product.name,
        "calibration_id": product.calibration_id,
        "directory": str(product.directory.parent.parent if product.version else product.directory),
        "version": product.version,
        "version_directory": str(product.directory),
        "scorer_onnx": str(product.scorer_onnx),
        "images": len(images),
        "threshold": round(product.threshold, 5),
        "false_reject_rate": evidence["false_reject_rate"],
        "loo_scores": evidence["loo_scores"],
        "synthetic_detected": evidence.get("synthetic_detected"),
        "bank_patches": product.manifest["bank"]["patches"],
        "seconds": product.manifest["seconds"],
        "views": product.manifest.get("views"),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"calibrated {product.name} from {len(images)} good images in {summary['seconds']} s")
        print(f"  threshold        {summary['threshold']}  (for {100 * summary['false_reject_rate']:g} % false rejects; "
              f"good parts left out: {', '.join(f'{s:.3f}' for s in summary['loo_scores'])})")
        if summary["synthetic_detected"] is not None:
            print(f"  synthetic flaws  {100 * summary['synthetic_detected']:.0f}% flagged at this threshold")
        print(f"  memory bank      {summary['bank_patches']} patches")
        views = summary["views"] or {}
        detail = ""
        if views.get("candidates"):
            detail = "  (chosen by synthetic defects: " + ", ".join(
                f"{name} {c['separation']:.3f}" for name, c in views["candidates"].items()) + ")"
        print(f"  views in bank    {views.get('chosen', '-')}{detail}")
        print(f"  calibration      {product.directory} (version {product.version})")
        print(f"  scorer graph     {product.scorer_onnx}")
    return 0
