"""anomalib's PatchCore as the evaluation floor (edge_inspect/offline/anomalib_floor.py): the Lite0 weights
mapped into timm's tf_efficientnet_lite0 are the project's backbone (same ImageNet logits, same taps), the
torchvision guard is explicit, and the floor separates obvious defects."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest

from edge_inspect.errors import UserError

MISSING = [name for name in ("anomalib", "timm", "torchvision") if importlib.util.find_spec(name) is None]
needs_anomalib = pytest.mark.skipif(
    bool(MISSING), reason=f"{', '.join(MISSING)} not installed: `pip install -e '.[export,eval]'` for the anomalib floor"
)

# ImageNet classes of two scikit-image photos: 285 "Egyptian cat", 967 "espresso".
PHOTOS = (("chelsea", 285), ("coffee", 967))


@pytest.fixture(scope="module")
def one_thread():
    torch = pytest.importorskip("torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenMP threads spin badly on a busy shared CPU; results are the same
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def lite0_weights():
    pytest.importorskip("torch")
    from edge_inspect.export.weights import load_state_dict_numpy

    try:
        return load_state_dict_numpy()
    except UserError as exc:
        pytest.skip(f"no pretrained Lite0 weights: {exc}")


@pytest.fixture(scope="module")
def timm_classifier(lite0_weights, one_thread):
    from edge_inspect.offline.anomalib_floor import TIMM_ARCHITECTURE, import_anomalib_patchcore, load_lite0_into_timm

    _, timm = import_anomalib_patchcore()
    model = timm.create_model(TIMM_ARCHITECTURE, pretrained=False).eval()
    load_lite0_into_timm(model, lite0_weights)
    return model


@pytest.fixture(scope="module")
def reference_backbone(lite0_weights, one_thread):
    from edge_inspect.export.reference import load_reference_backbone

    return load_reference_backbone(lite0_weights)


def _photo_rgb255(name: str, size: int) -> np.ndarray:
    """A scikit-image photo as [1, 3, size, size] RGB 0..255 (INTER_AREA), as the project's backbone takes it."""
    data = pytest.importorskip("skimage.data")
    rgb = getattr(data, name)()
    small = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    return np.ascontiguousarray(small.transpose(2, 0, 1)[None])


@needs_anomalib
@pytest.mark.parametrize("name, expected", PHOTOS)
def test_mapped_timm_lite0_gives_the_projects_imagenet_logits(timm_classifier, reference_backbone, backbone_onnx, name, expected):
    import onnxruntime as ort
    import torch

    from edge_inspect.scorer.backbone import INPUT_MEAN, INPUT_STD

    x = _photo_rgb255(name, 224)
    with torch.inference_mode():
        timm_logits = timm_classifier((torch.from_numpy(x) - INPUT_MEAN) / INPUT_STD)[0].numpy()
        reference_logits = reference_backbone(torch.from_numpy(x))[0].numpy()
    assert int(timm_logits.argmax()) == expected
    scale = np.abs(reference_logits).max()
    # Same unfolded BatchNorm and TF "SAME" padding in both: equal to float rounding.
    assert np.abs(timm_logits - reference_logits).max() <= 1e-5 * scale
    session = ort.InferenceSession(str(backbone_onnx), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(["logits"], {"image": x})  # BatchNorm folded: rounding differs a little
    assert np.abs(onnx_logits[0] - timm_logits).max() <= 1e-3 * scale


@needs_anomalib
def test_floor_taps_are_the_scorers_block4_and_block10(lite0_weights, reference_backbone, one_thread):
    import torch

    from edge_inspect.offline.anomalib_floor import FLOOR_LAYERS, AnomalibPatchCore, lite0_input
    from edge_inspect.scorer.backbone import INPUT_MEAN, INPUT_STD

    floor = AnomalibPatchCore(weights=lite0_weights)
    data = pytest.importorskip("skimage.data")
    bgr = cv2.cvtColor(cv2.resize(data.coffee(), (320, 200), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2BGR)
    x = lite0_input(bgr)
    assert tuple(x.shape) == (1, 3, 256, 256)
    with torch.inference_mode():
        features = floor.model.feature_extractor(x)
        taps = reference_backbone.taps(x * INPUT_STD + INPUT_MEAN, ("block4", "block10"))
    for layer, tap, (channels, side) in zip(FLOOR_LAYERS, taps, ((40, 32), (112, 16))):
        assert tuple(features[layer].shape) == (1, channels, side, side)
        assert torch.allclose(features[layer], tap, rtol=0, atol=1e-5 * float(tap.abs().max()))


@needs_anomalib
def test_floor_separates_obvious_defects_and_points_at_them(tmp_path, lite0_weights, one_thread):
    pytest.importorskip("skimage", reason="the generated dataset is rendered from scikit-image photos")
    from edge_inspect.imageio import read_bgr
    from edge_inspect.offline.anomalib_floor import AnomalibPatchCore
    from edge_inspect.offline.datasets.mvtec import load_dataset, read_mask
    from edge_inspect.offline.datasets.generate import generate_dataset

    root = generate_dataset(tmp_path, "coin", n_train=4, n_test_good=4, n_test_defect=3, seed=0, kinds=("foreign_patch", "hole"))
    dataset = load_dataset(root)
    floor = AnomalibPatchCore(weights=lite0_weights)
    floor.fit([read_bgr(p) for p in dataset.train_good])
    assert floor.bank_size == 4 * 32 * 32  # the whole bank: every stride-8 patch of the 4 shots
    good, defective = [], []
    for item in dataset.test:
        bgr = read_bgr(item.path)
        score, amap = floor.score(bgr)
        assert amap.shape == (256, 256) and amap.dtype == np.float32
        if item.is_good:
            good.append(score)
            continue
        defective.append(score)
        mask = cv2.resize(read_mask(item, bgr.shape[:2]).astype(np.uint8), (256, 256), interpolation=cv2.INTER_NEAREST)
        near = cv2.dilate(mask, np.ones((17, 17), np.uint8))  # one stride-8 patch of slack around the truth
        y, x = np.unravel_index(int(amap.argmax()), amap.shape)
        assert near[y, x], f"{item.path.name}: hottest pixel ({x}, {y}) is away from the defect"
    assert len(good) == 4 and len(defective) == 6
    assert min(defective) > max(good), (good, defective)


@needs_anomalib
def test_score_before_fit_says_so(lite0_weights):
    from edge_inspect.offline.anomalib_floor import AnomalibPatchCore

    floor = AnomalibPatchCore(weights=lite0_weights)
    with pytest.raises(RuntimeError, match="fit"):
        floor.score(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="at least one"):
        floor.fit([])


@needs_anomalib
def test_torchvision_guard_is_explicit_and_its_ops_raise():
    """In a fresh interpreter: torchvision imports through the guard; where the guard was needed, it logged
    why, torchvision reports no C++ ops and calling one raises instead of answering."""
    script = textwrap.dedent(
        """
        import json, logging, torch
        records = []
        handler = logging.Handler(); handler.emit = records.append
        logging.getLogger("edge_inspect.offline.anomalib_floor").addHandler(handler)
        from edge_inspect.offline import anomalib_floor
        torchvision = anomalib_floor.import_torchvision()
        out = {"missing": anomalib_floor.torchvision_ops_missing, "has_ops": torchvision.extension._has_ops(),
               "logged": [r.getMessage() for r in records]}
        try:
            torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
            out["nms"] = "ran"
        except Exception as exc:
            out["nms"] = type(exc).__name__ + ": " + str(exc)[:80]
        try:
            torch.ops.torchvision.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
            out["raw_nms"] = "ran"
        except Exception as exc:
            out["raw_nms"] = type(exc).__name__
        print(json.dumps(out))
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = __import__("json").loads(run.stdout.strip().splitlines()[-1])
    if out["missing"] is None:  # a torchvision built for this torch: nothing guarded, its ops work
        assert out["has_ops"] and out["logged"] == [] and out["nms"] == "ran"
        return
    assert not out["has_ops"]
    assert len(out["logged"]) == 1 and "torchvision::nms" in out["logged"][0] and out["missing"] in out["logged"][0]
    assert out["nms"].startswith("RuntimeError: Couldn't load custom C++ ops"), out["nms"]
    assert out["raw_nms"] == "NotImplementedError"


def test_missing_anomalib_names_the_extra(monkeypatch):
    from edge_inspect.offline.anomalib_floor import import_anomalib_patchcore

    monkeypatch.setitem(sys.modules, "anomalib", None)  # how Python marks a module that cannot be imported
    with pytest.raises(UserError, match=r"anomalib.*\.\[export,eval\]"):
        import_anomalib_patchcore()
