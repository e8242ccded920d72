"""Defect injection (edge_inspect.calibration.defects and edge_inspect.offline.datasets.generate): honest masks, determinism, and the dataset generator."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge_inspect.calibration import defects
from edge_inspect.offline.datasets import generate, mvtec

pytest.importorskip("skimage", reason="the source photos come from scikit-image (pip install -e '.[dev]')")


def _good(category: str, seed: int = 0, size: int = 160) -> np.ndarray:
    return generate.render_good(generate.load_photo(category), generate.CATEGORIES[category], np.random.default_rng(seed), size)


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    return {"grey": _good("brick"), "colour": _good("cup"), "object": _good("coin")}


def _check_honest(
    original: np.ndarray, defective: np.ndarray, mask: np.ndarray, visible: float = defects.VISIBLE_LEVEL
) -> None:
    assert mask.dtype == np.uint8 and mask.shape == original.shape[:2]
    assert set(np.unique(mask).tolist()) == {0, 255}
    inside = mask > 0
    diff = np.abs(defective.astype(np.int16) - original.astype(np.int16))
    diff = diff.max(axis=2) if diff.ndim == 3 else diff
    assert np.all(diff[~inside] == 0), "pixels changed outside the mask"
    assert (diff[inside] >= 3).mean() >= 0.4, "most of the mask must be really changed"
    assert diff[inside].mean() >= visible
    # Fully inside the image: the defect never touches the border.
    assert not inside[[0, -1], :].any() and not inside[:, [0, -1]].any()


@pytest.mark.parametrize("kind", defects.DEFECT_KINDS)
@pytest.mark.parametrize("which", ["grey", "colour", "object"])
def test_each_kind_changes_exactly_its_mask(images, kind, which):
    image = images[which]
    for seed in range(3):
        defective, mask, got = defects.inject_defect(image, np.random.default_rng(seed), kind)
        assert got == kind
        _check_honest(image, defective, mask)
        area = (mask > 0).mean()
        assert 0.001 <= area <= 0.08, f"{kind} area {area:.4f} outside the intended size range"


def test_grey_images_stay_grey(images):
    grey = cv2.cvtColor(images["grey"], cv2.COLOR_BGR2GRAY)
    colourful_donor = images["colour"]
    for kind in defects.DEFECT_KINDS:
        defective, mask, _ = defects.inject_defect(grey, np.random.default_rng(1), kind, donor=colourful_donor)
        assert defective.shape == grey.shape and defective.dtype == np.uint8
        _check_honest(grey, defective, mask)
    three = images["grey"]
    for kind in ("stain", "color", "foreign_patch"):
        defective, _, _ = defects.inject_defect(three, np.random.default_rng(2), kind, donor=colourful_donor)
        assert np.array_equal(defective[..., 0], defective[..., 2]), f"{kind} put colour into a grey image"


def test_deterministic_with_a_seed(images):
    image = images["colour"]
    first = defects.inject_defect(image, np.random.default_rng(42))
    again = defects.inject_defect(image, np.random.default_rng(42))
    other = defects.inject_defect(image, np.random.default_rng(43))
    assert first[2] == again[2]
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])
    assert np.array_equal(image, images["colour"]), "the input must not be modified"


def test_sizes_and_kinds_vary(images):
    areas, kinds = [], set()
    for seed in range(40):
        _, mask, kind = defects.inject_defect(images["grey"], np.random.default_rng(seed))
        areas.append((mask > 0).mean())
        kinds.add(kind)
    assert kinds == set(defects.DEFECT_KINDS)
    assert min(areas) < 0.01 and max(areas) > 0.025


def test_foreign_patch_with_a_donor_brings_its_material(images):
    base = images["colour"]
    donor = _good("grass", seed=3, size=160)
    defective, mask, _ = defects.inject_defect(base, np.random.default_rng(5), "foreign_patch", donor=donor)
    _check_honest(base, defective, mask)


def test_synthetic_anomaly_is_honest_deterministic_and_works_without_donors(images):
    image = images["object"]
    donors = [_good("coin", seed=s) for s in (7, 8)]
    out, mask = defects.synthetic_anomaly(image, np.random.default_rng(0), donors)
    subtle = defects.SUBTLE_LEVEL  # synthetic anomalies are meant to be subtle
    _check_honest(image, out, mask, subtle)
    again, mask_again = defects.synthetic_anomaly(image, np.random.default_rng(0), donors)
    assert np.array_equal(out, again) and np.array_equal(mask, mask_again)
    alone, alone_mask = defects.synthetic_anomaly(image, np.random.default_rng(1))
    _check_honest(image, alone, alone_mask, subtle)
    assert (alone_mask > 0).mean() <= 0.05


def test_honest_change_drops_faint_changes_and_reverts_the_halo():
    rng = np.random.default_rng(0)
    original = rng.integers(90, 110, (64, 64, 3), dtype=np.uint8)
    faint = original.astype(np.float32) + 4.0  # everywhere, below CHANGE_LEVEL
    assert defects.honest_change(original, faint) is None
    painted = original.astype(np.float32)
    painted[20:30, 20:30] -= 60  # the defect
    painted += 2.0  # a faint halo over the whole image
    out, mask = defects.honest_change(original, painted)
    inside = mask > 0
    assert inside[20:30, 20:30].all()
    assert inside.sum() <= 12 * 12  # the square plus a one-pixel rim
    assert np.array_equal(out[~inside], original[~inside])


def test_errors_are_clear():
    flat = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="could not paint a visible 'color'"):
        defects.inject_defect(flat, np.random.default_rng(0), "color")
    with pytest.raises(ValueError, match="unknown defect kind"):
        defects.inject_defect(flat, np.random.default_rng(0), "dent")
    with pytest.raises(ValueError, match="too small"):
        defects.inject_defect(np.zeros((16, 16, 3), np.uint8), np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        defects.inject_defect(np.zeros((64, 64, 3), np.float32), np.random.default_rng(0))


def test_render_good_varies_like_a_line_and_is_deterministic():
    photo, spec = generate.load_photo("coin"), generate.CATEGORIES["coin"]
    a = generate.render_good(photo, spec, np.random.default_rng(1), 128)
    b = generate.render_good(photo, spec, np.random.default_rng(1), 128)
    c = generate.render_good(photo, spec, np.random.default_rng(2), 128)
    assert a.shape == (128, 128, 3) and np.array_equal(a, b)
    difference = np.abs(a.astype(int) - c.astype(int)).mean()
    assert 1.0 < difference < 60.0  # jittered, yet the same part


def test_generate_dataset_layout_loads_and_is_deterministic(tmp_path):
    kinds = ("scratch", "hole", "foreign_patch")
    root = generate.generate_dataset(tmp_path / "a", "gravel", 3, 2, 2, size=96, seed=5, kinds=kinds)
    assert root == tmp_path / "a" / "gravel"
    assert sorted(p.name for p in (root / "train" / "good").iterdir()) == ["000.png", "001.png", "002.png"]
    assert sorted(p.name for p in (root / "test").iterdir()) == sorted(["good", *kinds])
    assert sorted(p.name for p in (root / "ground_truth" / "hole").iterdir()) == ["000_mask.png", "001_mask.png"]
    dataset = mvtec.load_dataset(root, require_masks=True)
    assert len(dataset.train_good) == 3 and len(dataset.test) == 2 + 2 * len(kinds)
    assert dataset.defect_types == sorted(kinds)
    for item in dataset.test:
        image = mvtec.read_image(item.path)
        assert image.shape == (96, 96, 3)
        assert mvtec.read_mask(item, image.shape).any() == (not item.is_good)
    again = generate.generate_dataset(tmp_path / "b", "gravel", 3, 2, 2, size=96, seed=5, kinds=kinds)
    other = generate.generate_dataset(tmp_path / "c", "gravel", 3, 2, 2, size=96, seed=6, kinds=kinds)
    for rel in ("train/good/002.png", "test/hole/001.png", "ground_truth/scratch/000_mask.png"):
        assert np.array_equal(cv2.imread(str(root / rel)), cv2.imread(str(again / rel)))
    assert not np.array_equal(cv2.imread(str(root / "test/hole/001.png")), cv2.imread(str(other / "test/hole/001.png")))
    # More training images do not change the test images.
    more = generate.generate_dataset(tmp_path / "d", "gravel", 5, 2, 2, size=96, seed=5, kinds=kinds)
    assert np.array_equal(cv2.imread(str(root / "test/hole/000.png")), cv2.imread(str(more / "test/hole/000.png")))


def test_generate_dataset_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown category"):
        generate.generate_dataset(tmp_path, "marble", 1, 1, 1)
    with pytest.raises(ValueError, match="unknown defect kinds"):
        generate.generate_dataset(tmp_path, "brick", 1, 1, 1, kinds=("dent",))
