"""Research harness: anomalib's PatchCore floor (edge_inspect/offline/anomalib_floor.py) on the real sets,
cross-checked against an independent plain PatchCore in torch, all in one run.

    nice -n 10 .venv/bin/python tools/floor_study.py /tmp/ds/real --out floor_study.json

Per set and shot set k (train/good images 4k..4k+3 in name order; scored: every other train/good image
plus test/*, as offline/evaluate.py), image AUROC and pixel AUROC (masks, every second pixel at 256 px):
- anomalib: anomalib's PatchcoreModel with the Lite0 weights: its score (num_neighbors=9 reweighting) and
  its map (nearest upsampling, Gaussian sigma 4). Also its plain max patch distance (num_neighbors=1).
- torch, pad counted: the project's eager Lite0 (export/reference.py, not timm), F.avg_pool2d(x, 3, 1, 1)
  counting the zero padding, block10 bilinearly resized to the stride-8 grid, concat, the whole bank,
  torch.cdist, image score = max patch distance, map = bilinear + sigma 4 (scorer/calibrate.py's tail).
- torch, pad not counted: the same with count_include_pad=False (the project's plain floor).

Features do not depend on the shots, so every image is embedded once per set and each shot set reuses
them; anomalib's own nearest-neighbour search, image score and map generator run per shot set. The first
images of every set are also scored through AnomalibPatchCore.score and must agree.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from edge_inspect.export.reference import load_reference_backbone
from edge_inspect.export.weights import load_state_dict_numpy
from edge_inspect.imageio import read_bgr, to_input
from edge_inspect.offline.anomalib_floor import AnomalibPatchCore, lite0_input
from edge_inspect.offline.evaluate import dataset_roots
from edge_inspect.offline.metrics import auroc
from edge_inspect.offline.datasets.mvtec import load_dataset, read_mask
from edge_inspect.scorer.anomaly_map import anomaly_map_from_distances
from edge_inspect.scorer.params import ScorerParams

SIZE = 256
GRID = SIZE // 8
MAP_PARAMS = ScorerParams(input_size=(SIZE, SIZE), taps=("block4", "block10"), sigma_px=4.0, score_topk=0.0)
BATCH = 32


def plain_torch_features(reference, bgr: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """([1024, 152] with the padding counted, the same without) from the project's eager Lite0."""
    x = torch.from_numpy(to_input(bgr, (SIZE, SIZE)))
    b4, b10 = reference.taps(x, ("block4", "block10"))
    out = []
    for include_pad in (True, False):
        p4 = F.avg_pool2d(b4, 3, stride=1, padding=1, count_include_pad=include_pad)
        p10 = F.avg_pool2d(b10, 3, stride=1, padding=1, count_include_pad=include_pad)
        p10 = F.interpolate(p10, size=p4.shape[-2:], mode="bilinear", align_corners=False)
        f = torch.cat([p4, p10], dim=1)[0]
        out.append(f.reshape(f.shape[0], -1).T.contiguous())
    return out[0], out[1]


def anomalib_embedding(model, bgr: np.ndarray) -> torch.Tensor:
    """anomalib's own steps of PatchcoreModel.forward up to the embedding: [1024, 152]."""
    features = model.feature_extractor(lite0_input(bgr, (SIZE, SIZE)))
    features = {layer: model.feature_pooler(f) for layer, f in features.items()}
    return model.reshape_embedding(model.generate_embedding(features))


def anomalib_scores(model, embeddings: list[torch.Tensor]) -> tuple[list[float], list[float], np.ndarray]:
    """anomalib's steps of PatchcoreModel.forward after the embedding, for a batch: (reweighted scores,
    max patch distances, maps [n, 256, 256])."""
    n = len(embeddings)
    embedding = torch.cat(embeddings)
    patch_scores, locations = model.nearest_neighbors(embedding=embedding, n_neighbors=1)
    patch_scores = patch_scores.reshape((n, -1))
    locations = locations.reshape((n, -1))
    pred = model.compute_anomaly_score(patch_scores, locations, embedding)
    maps = model.anomaly_map_generator(patch_scores.reshape((n, 1, GRID, GRID)), (SIZE, SIZE))
    return pred.tolist(), patch_scores.amax(1).tolist(), maps[:, 0].numpy()


def study_set(root: Path, floor: AnomalibPatchCore, reference, shot_sets: int, shots: int) -> dict:
    dataset = load_dataset(root)
    test_items = {t.path: t for t in dataset.test}
    paths = list(dataset.train_good) + [t.path for t in dataset.test]
    model = floor.model
    started = time.perf_counter()
    emb_a, emb_p, emb_q, masks = {}, {}, {}, {}
    with torch.inference_mode():
        for i, path in enumerate(paths):
            bgr = read_bgr(path)
            emb_a[path] = anomalib_embedding(model, bgr)
            emb_p[path], emb_q[path] = plain_torch_features(reference, bgr)
            item = test_items.get(path)
            if item is not None and item.has_pixel_truth:
                mask = read_mask(item, bgr.shape[:2])
                masks[path] = cv2.resize(mask.astype(np.uint8), (SIZE, SIZE), interpolation=cv2.INTER_NEAREST).astype(bool)[::2, ::2].ravel()
            if i % 50 == 0:
                print(f"  {root.name}: embedded {i + 1}/{len(paths)}", file=sys.stderr, flush=True)
    embed_s = time.perf_counter() - started
    runs = []
    for k in range(shot_sets):
        first = k * shots
        shot_paths = dataset.train_good[first : first + shots]
        held = dataset.train_good[:first] + dataset.train_good[first + shots :]
        items = [(p, False) for p in held] + [(t.path, not t.is_good) for t in dataset.test]
        labels = np.array([bad for _, bad in items])
        with torch.inference_mode():
            model.memory_bank = torch.cat([emb_a[p] for p in shot_paths])
            bank_p = torch.cat([emb_p[p] for p in shot_paths])
            bank_q = torch.cat([emb_q[p] for p in shot_paths])
            if k == 0:  # the public API gives the same as these steps
                check = [items[0][0], items[-1][0]]
                s9, _, m9 = anomalib_scores(model, [emb_a[p] for p in check])
                for j, p in enumerate(check):
                    s, amap = floor.score(read_bgr(p))  # floor.model is `model`, its bank just set
                    assert abs(s - s9[j]) <= 1e-4 * max(1.0, abs(s)), (p, s, s9[j])
                    assert np.abs(amap - m9[j]).max() <= 1e-4 * max(1.0, float(np.abs(amap).max())), p
            score_a, max_a, score_p, score_q = [], [], [], []
            px_a, px_p, px_q, px_l = [], [], [], []
            for start in range(0, len(items), BATCH):
                batch = [p for p, _ in items[start : start + BATCH]]
                s9, s1, maps = anomalib_scores(model, [emb_a[p] for p in batch])
                score_a += s9
                max_a += s1
                for j, p in enumerate(batch):
                    dp = torch.cdist(emb_p[p], bank_p).min(dim=1).values
                    dq = torch.cdist(emb_q[p], bank_q).min(dim=1).values
                    score_p.append(float(dp.max()))
                    score_q.append(float(dq.max()))
                    if p in masks:
                        px_l.append(masks[p])
                        px_a.append(maps[j][::2, ::2].ravel())
                        px_p.append(anomaly_map_from_distances(dp.reshape(GRID, GRID).numpy(), MAP_PARAMS)[::2, ::2].ravel())
                        px_q.append(anomaly_map_from_distances(dq.reshape(GRID, GRID).numpy(), MAP_PARAMS)[::2, ::2].ravel())

        def pix(scores):
            if not px_l or not any(m.any() for m in px_l):
                return None
            return round(auroc(np.concatenate(px_l), np.concatenate(scores)), 4)

        runs.append({
            "shot_set": k,
            "shots": [p.name for p in shot_paths],
            "n_good": int((~labels).sum()), "n_defect": int(labels.sum()),
            "anomalib": {"image_auroc": round(auroc(labels, np.array(score_a)), 4), "pixel_auroc": pix(px_a)},
            "anomalib_max": {"image_auroc": round(auroc(labels, np.array(max_a)), 4)},
            "torch_pad_counted": {"image_auroc": round(auroc(labels, np.array(score_p)), 4), "pixel_auroc": pix(px_p)},
            "torch_pad_not_counted": {"image_auroc": round(auroc(labels, np.array(score_q)), 4), "pixel_auroc": pix(px_q)},
        })
        print(f"  {root.name} shot set {k}: {json.dumps({n: runs[-1][n] for n in ('anomalib', 'anomalib_max', 'torch_pad_counted', 'torch_pad_not_counted')})}", file=sys.stderr, flush=True)
    mean = {}
    for name in ("anomalib", "anomalib_max", "torch_pad_counted", "torch_pad_not_counted"):
        mean[name] = {}
        for key in ("image_auroc", "pixel_auroc"):
            values = [r[name][key] for r in runs if r[name].get(key) is not None]
            mean[name][key] = round(float(np.mean(values)), 4) if values else None
    return {"set": root.name, "images": len(paths), "embed_s": round(embed_s, 1), "mean": mean, "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("roots", nargs="+")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--shot-sets", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="floor_study.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weights = load_state_dict_numpy()
    floor = AnomalibPatchCore(threads=args.threads, weights=weights)
    reference = load_reference_backbone(weights)
    results = []
    for root in dataset_roots(args.roots):
        results.append(study_set(root, floor, reference, args.shot_sets, args.shots))
        Path(args.out).write_text(json.dumps({"cpu": platform.processor() or platform.machine(), "sets": results}, indent=1))
    cols = ("anomalib", "anomalib_max", "torch_pad_counted", "torch_pad_not_counted")
    print(f"| set | {' | '.join(cols)} | anomalib − torch (image) |")
    print("|---" * (len(cols) + 2) + "|")

    def cell(m):
        return f"{m['image_auroc']:.3f}" + (f" / {m['pixel_auroc']:.3f}" if m.get("pixel_auroc") is not None else "")

    for r in results:
        m = r["mean"]
        print(f"| {r['set']} | " + " | ".join(cell(m[c]) for c in cols) + f" | {m['anomalib']['image_auroc'] - m['torch_pad_counted']['image_auroc']:+.4f} |")
    means = {c: float(np.mean([r["mean"][c]["image_auroc"] for r in results])) for c in cols}
    print("| mean image | " + " | ".join(f"{means[c]:.4f}" for c in cols) + f" | {means['anomalib'] - means['torch_pad_counted']:+.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
