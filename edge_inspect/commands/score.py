"""`edge-inspect score`: score image files against a calibrated product."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path


def add_parser(subparsers) -> None:
    from ._common import add_dirs

    p = subparsers.add_parser("score", help="score images: score, threshold, OK/NG, regions with grid words")
    p.add_argument("--product", required=True)
    p.add_argument("images", nargs="+", help="image files or folders")
    add_dirs(p)
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"])
    p.add_argument("--save-maps", metavar="DIR", help="write heatmap overlays (PNG) and raw maps (.npy) here")
    p.add_argument("--json", action="store_true", help="one JSON object per image (JSON lines)")
    p.add_argument("--fail-on-ng", action="store_true", help="exit 1 when any image is NG")
    p.set_defaults(func=run)


def run(args) -> int:
    import cv2
    import numpy as np

    from ..capture.geometry import scale_regions
    from ..errors import UserError
    from ..imageio import list_images, read_bgr
    from ..localize import find_regions, overlay
    from ..scorer.product import Scorer, load_product

    paths: list[Path] = []
    for item in args.images:
        p = Path(item)
        if p.is_dir():
            paths += list_images(p)
        elif p.is_file():
            paths.append(p)
        else:
            raise UserError(f"{item}: no such file or folder")
    product = load_product(args.calibration_dir, args.product, args.engines_dir)
    scorer = Scorer(product, backend=args.backend)
    out_dir = Path(args.save_maps) if args.save_maps else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    any_ng = False
    stem_counts = Counter(p.stem for p in paths)
    duplicated = {s for s, n in stem_counts.items() if n > 1}
    if not args.json:
        print(f"{'image':40s} {'score':>8s} {'thresh':>8s} verdict  regions")
    for path in paths:
        bgr = read_bgr(path)
        result = scorer.score(bgr)
        regions = find_regions(result.anomaly_map, result.threshold)
        view = bgr
        offset = (0, 0)
        if product.roi:
            x, y, w, h = product.roi
            view, offset = bgr[y : y + h, x : x + w], (x, y)
        frame_regions = scale_regions(regions, result.anomaly_map.shape, view.shape[:2], offset)
        any_ng |= result.flagged
        record = {
            "image": str(path),
            "score": round(result.score, 5),
            "threshold": round(result.threshold, 5),
            "verdict": result.verdict,
            "regions": [r.to_json() for r in frame_regions],
            "latency_ms": round(result.latency_ms, 2),
        }
        if out_dir:
            # test/hole/000.png and test/scratch/000.png must not overwrite each other
            stem = f"{path.parent.name}_{path.stem}" if path.stem in duplicated else path.stem
            amap = cv2.resize(result.anomaly_map, (view.shape[1], view.shape[0]), interpolation=cv2.INTER_LINEAR)
            local = scale_regions(regions, result.anomaly_map.shape, view.shape[:2])
            cv2.imwrite(str(out_dir / f"{stem}_overlay.png"), overlay(view, amap, result.threshold, local))
            np.save(out_dir / f"{stem}_map.npy", result.anomaly_map)
            record["overlay"] = str(out_dir / f"{stem}_overlay.png")
        if args.json:
            print(json.dumps(record))
        else:
            words = "; ".join(f"{', '.join(r['grid'])} ({r['area_pct']:.1f}%)" for r in record["regions"]) or "-"
            print(f"{str(path)[-40:]:40s} {result.score:8.3f} {result.threshold:8.3f} {result.verdict:7s}  {words}")
    scorer.close()
    return 1 if (args.fail_on_ng and any_ng) else 0
