"""The ONNX graphs (edge_inspect.scorer.scorer_graph) against the independent eager PyTorch reference of the same
algorithm (export.reference.ReferenceScorer) and the numpy twin used at calibration, on real images
with a real memory bank. Also: the runtime path never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edge_inspect.scorer.anomaly_map import image_score
from edge_inspect.scorer.params import ScorerParams

REPO = Path(__file__).resolve().parents[1]
RELATIVE_TOLERANCE = 1e-3


def _max_rel_diff(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference relative to the largest magnitude of the expected tensor."""
    return float(np.abs(np.asarray(actual) - np.asarray(expected)).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def parity(backbone_onnx):
    """Feature and scorer graphs at the default ScorerParams, a bank from three good bricks, and the
    eager reference over the same bank; plus one held-out good and one defective input tensor."""
    pytest.importorskip("torch")
    pytest.importorskip("skimage")
    import onnx
    import onnxruntime as ort
    import torch

    from edge_inspect.calibration.defects import inject_defect
    from edge_inspect.export.reference import ReferenceScorer, load_reference_backbone
    from edge_inspect.imageio import to_input
    from edge_inspect.offline.datasets.generate import (
        CATEGORIES,
        load_photo,
        render_good,
    )
    from edge_inspect.scorer.memory_bank import features_to_patches, greedy_coreset
    from edge_inspect.scorer.scorer_graph import (
        build_features_model,
        build_scorer_model,
        folded_from_model,
    )

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenMP threads spin badly on a busy shared CPU; results are the same
    params = ScorerParams()
    folded = folded_from_model(onnx.load(str(backbone_onnx)))
    features_session = ort.InferenceSession(build_features_model(folded, params).SerializeToString(), providers=["CPUExecutionProvider"])
    photo, spec = load_photo("brick"), CATEGORIES["brick"]
    goods = [render_good(photo, spec, np.random.default_rng(seed), params.input_size[0]) for seed in range(4)]
    features = [features_session.run(["features"], {"image": to_input(g, params.input_size)})[0] for g in goods[:3]]
    patches = features_to_patches(np.concatenate(features))
    bank = np.ascontiguousarray(patches[np.sort(greedy_coreset(patches, 512, seed=0))])
    scorer_session = ort.InferenceSession(build_scorer_model(folded, params, bank).SerializeToString(), providers=["CPUExecutionProvider"])
    reference = ReferenceScorer(load_reference_backbone(), params, bank).eval()
    defective, mask, _ = inject_defect(goods[3], np.random.default_rng(5), "hole")
    inputs = {"good": to_input(goods[3], params.input_size), "defect": to_input(defective, params.input_size)}
    yield {
        "params": params, "bank": bank, "features": features_session, "scorer": scorer_session,
        "reference": reference, "inputs": inputs, "mask": mask > 0, "torch": torch,
    }
    torch.set_num_threads(previous_threads)


@pytest.mark.parametrize("which", ["good", "defect"])
def test_feature_graph_matches_reference_patch_features(parity, which):
    torch = parity["torch"]
    x = parity["inputs"][which]
    features, embedding = parity["features"].run(["features", "embedding"], {"image": x})
    with torch.inference_mode():
        expected = parity["reference"].patch_features(torch.from_numpy(x)).numpy()
        # The embedding pools the deepest tap over the whole backbone input, context padding included.
        pad = parity["params"].context_pad
        padded = torch.nn.functional.pad(torch.from_numpy(x), (pad, pad, pad, pad), mode="reflect") if pad else torch.from_numpy(x)
        deepest = parity["reference"].backbone.taps(padded, parity["params"].taps)[-1]
    assert features.shape == expected.shape
    assert features.shape[1] == parity["bank"].shape[1]
    assert _max_rel_diff(features, expected) <= RELATIVE_TOLERANCE
    assert _max_rel_diff(embedding, deepest.mean(dim=(2, 3)).numpy()) <= RELATIVE_TOLERANCE


@pytest.mark.parametrize("which", ["good", "defect"])
def test_scorer_graph_matches_reference_scorer(parity, which):
    torch = parity["torch"]
    x = parity["inputs"][which]
    anomaly_map, score = parity["scorer"].run(["anomaly_map", "score"], {"image": x})
    with torch.inference_mode():
        expected_map, expected_score = (t.numpy() for t in parity["reference"](torch.from_numpy(x)))
    H, W = parity["params"].input_size
    assert anomaly_map.shape == expected_map.shape == (1, 1, H, W)
    scale = float(expected_map.max())
    assert scale > 0
    assert float(np.abs(anomaly_map - expected_map).max()) <= RELATIVE_TOLERANCE * scale
    assert abs(float(score[0]) - float(expected_score[0])) <= RELATIVE_TOLERANCE * scale
    # The score is the graph's TopK mean of the hottest pixels; its numpy twin agrees.
    assert float(score[0]) == pytest.approx(image_score(anomaly_map, parity["params"]), rel=1e-5)
    assert float(score[0]) <= float(anomaly_map.max())


@pytest.mark.parametrize("count_pad", [True, False])
def test_both_border_rules_of_the_aggregation_match_the_reference(parity, backbone_onnx, count_pad):
    """pool_count_pad: the 3x3 average counts the zero padding (PyTorch's default) or not. Graph and
    eager reference agree for both; the two rules differ on the outer ring of patches only."""
    import dataclasses

    import onnx
    import onnxruntime as ort

    from edge_inspect.export.reference import ReferenceScorer
    from edge_inspect.scorer.scorer_graph import build_features_model, folded_from_model

    torch = parity["torch"]
    params = dataclasses.replace(parity["params"], pool_count_pad=count_pad)
    other = dataclasses.replace(parity["params"], pool_count_pad=not count_pad)
    folded = folded_from_model(onnx.load(str(backbone_onnx)))
    x = parity["inputs"]["good"]

    def graph(p):
        session = ort.InferenceSession(build_features_model(folded, p).SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(["features"], {"image": x})[0]

    with torch.inference_mode():
        expected = ReferenceScorer(parity["reference"].backbone, params, parity["bank"]).patch_features(torch.from_numpy(x)).numpy()
    features, changed = graph(params), graph(other)
    assert _max_rel_diff(features, expected) <= RELATIVE_TOLERANCE
    # block 10 is upsampled from the stride-16 grid, so its border reaches one more stride-8 patch in
    ring = np.ones(features.shape[-2:], bool)
    ring[3:-3, 3:-3] = False
    assert np.allclose(features[..., ~ring], changed[..., ~ring], rtol=1e-5, atol=1e-5)
    assert not np.allclose(features[..., 0, 0], changed[..., 0, 0])


def test_layer_scales_are_applied_the_same_way(parity, backbone_onnx):
    """Calibration sets one scale per tapped layer; graph and reference must scale the same channels."""
    import dataclasses

    import onnx
    import onnxruntime as ort

    from edge_inspect.export.reference import ReferenceScorer
    from edge_inspect.scorer.scorer_graph import (
        build_features_model,
        build_scorer_model,
        folded_from_model,
    )

    torch = parity["torch"]
    params = dataclasses.replace(parity["params"], layer_scales=tuple(0.5 * (i + 1) for i in range(len(parity["params"].taps))))
    folded = folded_from_model(onnx.load(str(backbone_onnx)))
    x = parity["inputs"]["defect"]
    reference = ReferenceScorer(parity["reference"].backbone, params, parity["bank"]).eval()
    with torch.inference_mode():
        expected_features = reference.patch_features(torch.from_numpy(x)).numpy()
        expected_map, _ = (t.numpy() for t in reference(torch.from_numpy(x)))
    features_session = ort.InferenceSession(build_features_model(folded, params).SerializeToString(), providers=["CPUExecutionProvider"])
    (features,) = features_session.run(["features"], {"image": x})
    assert _max_rel_diff(features, expected_features) <= RELATIVE_TOLERANCE
    (unscaled,) = parity["features"].run(["features"], {"image": x})
    assert not np.allclose(features, unscaled)
    scorer_session = ort.InferenceSession(build_scorer_model(folded, params, parity["bank"]).SerializeToString(), providers=["CPUExecutionProvider"])
    (anomaly_map,) = scorer_session.run(["anomaly_map"], {"image": x})
    assert float(np.abs(anomaly_map - expected_map).max()) <= RELATIVE_TOLERANCE * float(expected_map.max())


@pytest.mark.parametrize("which", ["good", "defect"])
def test_numpy_twin_of_the_graph_tail_matches_the_graph(parity, which):
    """calibrate.score_patches (nearest_distances + anomaly_map_from_distances) sets the threshold, the
    graph scores frames: they must agree or the threshold is set on a different scale."""
    from edge_inspect.scorer.anomaly_map import (
        anomaly_map_from_distances,
        score_patches,
    )
    from edge_inspect.scorer.memory_bank import nearest_distances

    x = parity["inputs"][which]
    (features,) = parity["features"].run(["features"], {"image": x})
    anomaly_map, score = parity["scorer"].run(["anomaly_map", "score"], {"image": x})
    twin_score, twin_map = score_patches(features[0], parity["bank"], parity["params"])
    scale = float(anomaly_map.max())
    assert twin_map.shape == anomaly_map.shape[2:]
    assert float(np.abs(twin_map - anomaly_map[0, 0]).max()) <= RELATIVE_TOLERANCE * scale
    assert abs(twin_score - float(score[0])) <= RELATIVE_TOLERANCE * scale
    d, h, w = features[0].shape
    distances = nearest_distances(features[0].reshape(d, h * w).T, parity["bank"]).reshape(h, w)
    np.testing.assert_array_equal(anomaly_map_from_distances(distances, parity["params"]), twin_map)


def test_anomaly_map_tail_on_a_single_hot_patch():
    """The twin's upsampling + smoothing on a known input: mass stays where the patch was."""
    from edge_inspect.scorer.anomaly_map import anomaly_map_from_distances

    params = ScorerParams()
    H, W = params.input_size
    patch = np.zeros((H // 8, W // 8), np.float32)
    patch[5, 20] = 1.0
    amap = anomaly_map_from_distances(patch, params)
    assert amap.shape == (H, W)
    y, x = np.unravel_index(int(np.argmax(amap)), amap.shape)
    assert abs(y - (5 * 8 + 3.5)) <= 1 and abs(x - (20 * 8 + 3.5)) <= 1
    assert amap.min() >= 0 and amap.sum() == pytest.approx(patch.sum() * 64, rel=0.02)


def test_the_defect_scores_higher_and_peaks_on_the_defect(parity):
    scores, peaks = {}, {}
    for which, x in parity["inputs"].items():
        anomaly_map, score = parity["scorer"].run(["anomaly_map", "score"], {"image": x})
        scores[which] = float(score[0])
        peaks[which] = np.unravel_index(int(np.argmax(anomaly_map[0, 0])), anomaly_map.shape[2:])
    assert scores["defect"] > scores["good"]
    ys, xs = np.nonzero(parity["mask"])
    y, x = peaks["defect"]
    margin = 16  # two patches: the map is smoothed
    assert ys.min() - margin <= y <= ys.max() + margin and xs.min() - margin <= x <= xs.max() + margin


def test_runtime_path_does_not_import_torch(tmp_path, engines_factory):
    """Calibrating and scoring need only numpy, OpenCV and ONNX Runtime (torch stays an export tool)."""
    engines = engines_factory(tmp_path / "engines")
    goods = tmp_path / "good"
    goods.mkdir()
    import cv2

    rng = np.random.default_rng(0)
    base = cv2.resize(rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8), (96, 96), interpolation=cv2.INTER_CUBIC)
    for i in range(3):
        noisy = np.clip(base.astype(np.int16) + rng.integers(-4, 5, base.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(goods / f"{i}.png"), noisy)
    script = textwrap.dedent(
        f"""
        import json, sys
        from pathlib import Path
        import cv2
        from edge_inspect.calibration import calibrate, fit
        from edge_inspect.scorer import product as scoring, scorer_graph as graph
        from edge_inspect.scorer.params import ScorerParams
        images = sorted(Path({str(goods)!r}).glob("*.png"))
        options = fit.CalibrationOptions(params=ScorerParams(input_size=(64, 64)), bank_size=64, synthetic_per_image=1)
        product = calibrate.calibrate_product(images, "plain", {str(tmp_path / "calibration")!r}, {str(engines)!r}, options, progress=False)
        scorer = scoring.Scorer(product, backend="onnxruntime", threads=1)
        result = scorer.score(cv2.imread(str(images[0])))
        scorer.close()
        print(json.dumps({{"torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")),
                          "score": result.score, "graph": graph.__name__}}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["torch"] == []
    assert report["score"] > 0


def test_calibration_projects_raw_features_into_the_graphs_space(parity, backbone_onnx):
    """Calibration builds the bank from raw features (concatenated, then scaled and projected in
    numpy); the graph projects each tap on its own grid before pooling and resizing. Both must give
    the same patch features, or the bank and the live frames would live in different spaces."""
    import dataclasses

    import onnx
    import onnxruntime as ort

    from edge_inspect.calibration.fit import feature_transform
    from edge_inspect.scorer.params import output_dim, projection_matrix
    from edge_inspect.scorer.scorer_graph import build_features_model, folded_from_model

    params = dataclasses.replace(parity["params"], taps=("block4", "expand8"), projection_dim=192, layer_scales=(0.7, 1.9))
    assert projection_matrix(params) is not None, "a wide-tap scorer projects its features"
    folded = folded_from_model(onnx.load(str(backbone_onnx)))
    raw_params = dataclasses.replace(params, layer_scales=(), projection_dim=0)
    x = parity["inputs"]["defect"]

    def run(p):
        session = ort.InferenceSession(build_features_model(folded, p).SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(["features"], {"image": x})[0]

    raw, projected = run(raw_params), run(params)
    assert raw.shape[1] > projected.shape[1] == output_dim(params)
    assert _max_rel_diff(feature_transform(params)(raw), projected) <= RELATIVE_TOLERANCE


def test_the_bank_as_an_input_scores_as_the_bank_inside_and_unused_slots_are_never_nearest(parity, backbone_onnx, tmp_path):
    """One graph with the bank as an input (capacity larger than the bank) against the graph with the same bank
    as a constant: the same map and score; its features output is the feature graph's; two backends of the one
    graph with different banks share its session and keep their own banks."""
    import onnx

    from edge_inspect.scorer.backends.ort_backend import _SESSIONS, OrtBackend
    from edge_inspect.scorer.scorer_graph import (
        build_scorer_model,
        folded_from_model,
        save_model,
    )

    folded = folded_from_model(onnx.load(str(backbone_onnx)))
    params, bank = parity["params"], parity["bank"]
    path = tmp_path / "shared.onnx"
    save_model(build_scorer_model(folded, params, capacity=bank.shape[0] + 300), path)
    x = parity["inputs"]["defect"]
    constant_map, constant_score = parity["scorer"].run(["anomaly_map", "score"], {"image": x})
    (features,) = parity["features"].run(["features"], {"image": x})
    backend = OrtBackend(path, threads=1, bank=bank)
    half = OrtBackend(path, threads=1, bank=bank[: bank.shape[0] // 2])
    try:
        assert len([k for k in _SESSIONS if k[0] == str(path.resolve())]) == 1
        anomaly_map, score, patch_features = backend.run_features(x)
        assert np.allclose(anomaly_map, constant_map[0, 0], rtol=1e-4, atol=1e-4 * float(constant_map.max()))
        assert score == pytest.approx(float(constant_score[0]), rel=1e-4)
        assert np.allclose(patch_features, features[0], rtol=1e-5, atol=1e-5)
        assert half.run(x)[1] > score  # fewer good patches to match: further from the nearest
        assert backend.capacity == bank.shape[0] + 300 and backend.has_features
    finally:
        backend.close()
        half.close()
    assert not [k for k in _SESSIONS if k[0] == str(path.resolve())]  # the last user freed the session
