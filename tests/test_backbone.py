"""The EfficientNet-Lite0 port: TF "SAME" pads, BatchNorm folding, and both implementations (the ONNX
graph from folded weights and the eager PyTorch reference) classifying real photos correctly."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge_inspect.scorer.backbone import BN_EPS, block_strides, fold_batchnorm, lite0_blocks, same_pads

# ImageNet classes of two scikit-image photos: 285 "Egyptian cat", 967 "espresso".
PHOTOS = (("chelsea", 285), ("coffee", 967))


def test_same_pads_match_tensorflow_rule():
    # TF: out = ceil(in / stride); total = max((out - 1) * stride + k - in, 0); the extra pixel goes after.
    assert same_pads(224, 3, 2) == (0, 1)
    assert same_pads(225, 3, 2) == (1, 1)
    assert same_pads(112, 5, 2) == (1, 2)
    assert same_pads(56, 3, 1) == (1, 1)
    assert same_pads(7, 1, 1) == (0, 0)
    for size in range(5, 40):
        for k in (1, 3, 5):
            for s in (1, 2):
                before, after = same_pads(size, k, s)
                assert 0 <= after - before <= 1
                assert (size + before + after - k) // s + 1 == -(-size // s)


def test_block_layout_is_lite0():
    blocks = lite0_blocks()
    assert len(blocks) == 16
    assert block_strides()[-1] == 32
    assert [b.index for b in blocks if b.residual] == [2, 4, 6, 7, 9, 10, 12, 13, 14]
    assert all(b.in_channels == blocks[b.index - 1].out_channels for b in blocks[1:])


def test_fold_batchnorm_equals_conv_then_batchnorm():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    bn = {
        "c.weight": w,
        "b.weight": rng.uniform(0.5, 2, 4).astype(np.float32),
        "b.bias": rng.standard_normal(4).astype(np.float32),
        "b.running_mean": rng.standard_normal(4).astype(np.float32),
        "b.running_var": rng.uniform(0.1, 3, 4).astype(np.float32),
    }
    fw, fb = fold_batchnorm(bn, "c", "b")
    x = rng.standard_normal((3, 10)).astype(np.float32)  # 10 pixels, 1x1 conv = matrix product
    conv = w[:, :, 0, 0] @ x
    expected = (conv - bn["b.running_mean"][:, None]) / np.sqrt(bn["b.running_var"][:, None] + BN_EPS)
    expected = expected * bn["b.weight"][:, None] + bn["b.bias"][:, None]
    np.testing.assert_allclose(fw[:, :, 0, 0] @ x + fb[:, None], expected, rtol=1e-5, atol=1e-5)


def _photo_input(name: str) -> np.ndarray:
    """A scikit-image photo as the graph's input: RGB 0..255, 224x224 (INTER_AREA), [1, 3, H, W]."""
    from skimage import data

    rgb = getattr(data, name)()
    small = cv2.resize(rgb, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32)
    return np.ascontiguousarray(small.transpose(2, 0, 1)[None])


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


@pytest.fixture(scope="module")
def classifier_session(backbone_onnx):
    """The backbone artifact as exported (graph.build_classifier_model from folded weights) in ONNX Runtime."""
    import onnxruntime as ort

    return ort.InferenceSession(str(backbone_onnx), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name, expected", PHOTOS)
def test_onnx_classifier_recognises_photos(classifier_session, name, expected):
    pytest.importorskip("skimage")
    (logits,) = classifier_session.run(["logits"], {"image": _photo_input(name)})
    probs = _softmax(logits[0])
    assert int(probs.argmax()) == expected
    assert probs[expected] > 0.7


def test_backbone_artifact_is_the_classifier_of_the_folded_weights(backbone_onnx):
    import onnx

    from edge_inspect.export.weights import load_state_dict_numpy
    from edge_inspect.scorer.backbone import folded_layers
    from edge_inspect.scorer.scorer_graph import folded_from_model

    pytest.importorskip("torch")
    model = onnx.load(str(backbone_onnx))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["architecture"] == "efficientnet-lite0" and len(meta["source_sha256"]) == 64
    stored = folded_from_model(model)
    fresh = folded_layers(load_state_dict_numpy())
    assert stored.keys() == fresh.keys()
    for key, value in fresh.items():
        np.testing.assert_array_equal(stored[key], value, err_msg=key)


@pytest.fixture(scope="module")
def reference_backbone():
    torch = pytest.importorskip("torch")
    from edge_inspect.export.reference import load_reference_backbone

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenMP threads spin badly on a busy shared CPU; results are the same
    yield load_reference_backbone()
    torch.set_num_threads(previous_threads)


@pytest.mark.parametrize("name, expected", PHOTOS)
def test_torch_reference_recognises_photos_and_agrees_with_onnx(reference_backbone, classifier_session, name, expected):
    import torch

    pytest.importorskip("skimage")
    x = _photo_input(name)
    with torch.inference_mode():
        logits = reference_backbone(torch.from_numpy(x))[0].numpy()
    probs = _softmax(logits)
    assert int(probs.argmax()) == expected
    assert probs[expected] > 0.7
    (onnx_logits,) = classifier_session.run(["logits"], {"image": x})
    assert np.abs(onnx_logits[0] - logits).max() <= 1e-3 * np.abs(logits).max()
