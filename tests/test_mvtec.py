"""MVTec-layout reading (edge_inspect.offline.datasets.mvtec) and the tools/make_dataset.py converters."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_inspect.errors import UserError
from edge_inspect.offline.datasets import convert, mvtec

REPO = Path(__file__).resolve().parents[1]
MAGNETIC_TILE = Path(__file__).parents[1].parent / "shared/data/magnetic-tile"


@pytest.fixture(scope="module")
def make_dataset():
    """tools/make_dataset.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_dataset", REPO / "tools" / "make_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _img(path: Path, value: int = 128, shape=(40, 50)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full(shape, value, np.uint8)
    cv2.putText(image, str(value), (2, 20), 0, 0.5, 255, 1)
    assert cv2.imwrite(str(path), image)
    return path


def _tiny_mvtec(root: Path) -> Path:
    _img(root / "train/good/b.png")
    _img(root / "train/good/a.JPG")
    _img(root / "train/good/.hidden.png")
    (root / "train/good/notes.txt").write_text("not an image")
    _img(root / "test/good/000.png")
    _img(root / "test/scratch/000.png")
    mask = np.zeros((20, 25), np.uint8)
    mask[5:10, 5:10] = 255
    (root / "ground_truth/scratch").mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(root / "ground_truth/scratch/000_mask.png"), mask)
    return root


def test_load_dataset_indexes_train_and_test(tmp_path):
    root = _tiny_mvtec(tmp_path / "part")
    dataset = mvtec.load_dataset(root, require_masks=True)
    assert [p.name for p in dataset.train_good] == ["a.JPG", "b.png"]
    assert [(t.defect_type, t.path.name) for t in dataset.test] == [("good", "000.png"), ("scratch", "000.png")]
    good, scratch = dataset.test
    assert good.is_good and good.mask_path is None and good.has_pixel_truth
    assert scratch.mask_path == root / "ground_truth/scratch/000_mask.png"
    assert dataset.defect_types == ["scratch"] and dataset.name == "part"
    mask = mvtec.read_mask(scratch, (40, 50, 3))  # mask is 20x25: resized nearest
    assert mask.shape == (40, 50) and mask.dtype == bool
    assert mask[10:20, 10:20].all() and mask.sum() == 100
    assert not mvtec.read_mask(good, (40, 50)).any()
    assert mvtec.read_image(scratch.path).shape == (40, 50, 3)


def test_missing_mask_warns_or_fails_on_request(tmp_path, caplog):
    root = _tiny_mvtec(tmp_path / "part")
    _img(root / "test/hole/007.png")
    with caplog.at_level(logging.WARNING, logger="edge_inspect.offline.datasets.mvtec"):
        dataset = mvtec.load_dataset(root)
    assert "have no mask" in caplog.text and "007_mask.png" in caplog.text
    hole = [t for t in dataset.test if t.defect_type == "hole"][0]
    assert hole.mask_path is None and not hole.has_pixel_truth
    assert not mvtec.read_mask(hole, (40, 50)).any()
    with pytest.raises(UserError, match="have no mask"):
        mvtec.load_dataset(root, require_masks=True)


def test_load_dataset_errors_name_the_problem_and_the_fix(tmp_path):
    with pytest.raises(UserError, match="does not exist.*make_dataset.py generate"):
        mvtec.load_dataset(tmp_path / "nowhere")
    _tiny_mvtec(tmp_path / "parent" / "brick")
    with pytest.raises(UserError, match=r"no train/good folder.*brick"):
        mvtec.load_dataset(tmp_path / "parent")
    (tmp_path / "bare").mkdir()
    with pytest.raises(UserError, match="no train/good folder.*MVTec AD layout"):
        mvtec.load_dataset(tmp_path / "bare")
    (tmp_path / "empty/train/good").mkdir(parents=True)
    (tmp_path / "empty/train/good/readme.txt").write_text("x")
    with pytest.raises(UserError, match="holds no images"):
        mvtec.load_dataset(tmp_path / "empty")
    item = mvtec.TestItem(tmp_path / "x.png", "hole", tmp_path / "missing_mask.png")
    with pytest.raises(UserError, match="cannot read mask"):
        mvtec.read_mask(item, (4, 4))
    with pytest.raises(UserError, match="cannot read image"):
        mvtec.read_image(tmp_path / "x.png")


def test_train_only_dataset_has_no_test_items(tmp_path):
    _img(tmp_path / "p/train/good/0.bmp")
    assert mvtec.load_dataset(tmp_path / "p").test == []


def _fake_magnetic_tile(root: Path, n_free: int = 9) -> Path:
    """The magnetic-tile layout: MT_<X>/Imgs/<stem>.jpg with a same-named .png mask."""
    rng = np.random.default_rng(0)
    for i in range(n_free):
        h, w = int(rng.integers(60, 90)), int(rng.integers(60, 90))
        _img(root / f"MT_Free/Imgs/exp0_num_{i}.jpg", 100 + i, (h, w))
        cv2.imwrite(str(root / f"MT_Free/Imgs/exp0_num_{i}.png"), np.zeros((h, w), np.uint8))
    for folder in convert.MAGNETIC_TILE_DEFECTS:
        for i in range(2):
            stem = f"exp1_num_{folder}_{i}"
            _img(root / f"{folder}/Imgs/{stem}.jpg", 90, (70, 80))
            mask = np.zeros((70, 80), np.uint8)
            mask[10:30, 20:50] = 254  # not quite 255, as in the real masks
            mask[30, 20:50] = 60  # a faint anti-aliased edge: not defect
            cv2.imwrite(str(root / f"{folder}/Imgs/{stem}.png"), mask)
    return root


def test_magnetic_tile_conversion_layout_split_and_masks(tmp_path, make_dataset):
    source = _fake_magnetic_tile(tmp_path / "mt")
    out = tmp_path / "out"
    assert make_dataset.main(["magnetic-tile", "--source", str(source), "--out", str(out), "--train", "3", "--test-good", "4"]) == 0
    dataset = mvtec.load_dataset(out, require_masks=True)
    assert len(dataset.train_good) == 3
    counts = {d: sum(t.defect_type == d for t in dataset.test) for d in ["good", *convert.MAGNETIC_TILE_DEFECTS.values()]}
    assert counts == {"good": 4, "blowhole": 2, "break": 2, "crack": 2, "fray": 2, "uneven": 2}
    train_names = {p.stem for p in dataset.train_good}
    test_good_names = {t.path.stem for t in dataset.test if t.is_good}
    assert not train_names & test_good_names, "a good image in both train and test"
    crack = [t for t in dataset.test if t.defect_type == "crack"][0]
    raw = cv2.imread(str(crack.mask_path), cv2.IMREAD_UNCHANGED)
    assert raw.ndim == 2 and set(np.unique(raw).tolist()) == {0, 255}
    assert (raw > 0).sum() == 20 * 30  # the faint edge row is not defect
    image = cv2.imread(str(crack.path), cv2.IMREAD_UNCHANGED)
    assert image.ndim == 2 and image.shape == (70, 80)  # grey PNG, original size
    assert crack.path.name == "exp1_num_MT_Crack_0.png" and crack.path.suffix == ".png"

    # Same seed, same split; another seed, another split.
    again = tmp_path / "again"
    make_dataset.main(["magnetic-tile", "--source", str(source), "--out", str(again), "--train", "3", "--test-good", "4"])
    assert [p.name for p in mvtec.load_dataset(again).train_good] == [p.name for p in dataset.train_good]
    other = tmp_path / "other"
    make_dataset.main(["magnetic-tile", "--source", str(source), "--out", str(other), "--train", "3", "--seed", "9"])
    assert [p.name for p in mvtec.load_dataset(other).train_good] != [p.name for p in dataset.train_good]
    assert sum(t.is_good for t in mvtec.load_dataset(other).test) == 6  # default 200 -> all the rest

    # An existing dataset is not replaced without --overwrite.
    assert make_dataset.main(["magnetic-tile", "--source", str(source), "--out", str(out)]) == 2


def test_magnetic_tile_resize_and_limit(tmp_path, make_dataset):
    source = _fake_magnetic_tile(tmp_path / "mt")
    out = tmp_path / "small"
    argv = ["magnetic-tile", "--source", str(source), "--out", str(out), "--resize", "40x30", "--limit", "1", "--train", "2"]
    assert make_dataset.main(argv) == 0
    dataset = mvtec.load_dataset(out, require_masks=True)
    assert len(dataset.train_good) == 2 and len(dataset.test) == 1 + len(convert.MAGNETIC_TILE_DEFECTS)
    for path in [*dataset.train_good, *(t.path for t in dataset.test), *(t.mask_path for t in dataset.test if t.mask_path)]:
        assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).shape == (30, 40)
    mask = cv2.imread(str(dataset.test[-1].mask_path), cv2.IMREAD_UNCHANGED)
    assert set(np.unique(mask).tolist()) == {0, 255}


def test_resizing_keeps_a_tiny_defect_in_its_mask(tmp_path):
    source = _fake_magnetic_tile(tmp_path / "mt")
    tiny = np.zeros((70, 80), np.uint8)
    tiny[33, 41] = 255  # one pixel: nearest-neighbour sampling at 1/8 scale misses it
    cv2.imwrite(str(source / "MT_Fray/Imgs/exp1_num_MT_Fray_0.png"), tiny)
    out = convert.convert_magnetic_tile(source, tmp_path / "out", n_train=2, resize=(10, 9))
    mask = cv2.imread(str(out / "ground_truth/fray/exp1_num_MT_Fray_0_mask.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (9, 10) and mask.sum() // 255 == 1 and mask[4, 5] == 255


def test_magnetic_tile_errors(tmp_path, make_dataset, capsys):
    assert make_dataset.main(["magnetic-tile", "--source", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "magnetic-tile folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --out is required: never write into the repository by default
        make_dataset.main(["magnetic-tile"])
    with pytest.raises(SystemExit):
        make_dataset.main(["magnetic-tile", "--out", str(tmp_path / "o"), "--resize", "256"])
    source = _fake_magnetic_tile(tmp_path / "mt")
    (source / "MT_Crack/Imgs/exp1_num_MT_Crack_1.png").unlink()
    with pytest.raises(UserError, match="exp1_num_MT_Crack_1.png.*missing"):
        convert.convert_magnetic_tile(source, tmp_path / "o2", n_train=3)
    assert not (tmp_path / "o2").exists(), "checked before anything is written"
    with pytest.raises(UserError, match="--train 20 needs at least 21"):
        convert.convert_magnetic_tile(_fake_magnetic_tile(tmp_path / "few", n_free=5), tmp_path / "o3")


def test_generate_command_writes_the_layout(tmp_path, make_dataset, capsys):
    pytest.importorskip("skimage", reason="the source photos come from scikit-image")
    argv = ["generate", "--out", str(tmp_path), "--categories", "brick,cup", "--kinds", "hole,stain",
            "--train", "2", "--test-good", "1", "--test-defect", "1", "--size", "64"]
    assert make_dataset.main(argv) == 0
    for category in ("brick", "cup"):
        dataset = mvtec.load_dataset(tmp_path / category, require_masks=True)
        assert len(dataset.train_good) == 2 and dataset.defect_types == ["hole", "stain"]
    assert make_dataset.main(argv) == 2  # exists: needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert make_dataset.main([*argv, "--overwrite"]) == 0
    assert make_dataset.main(["generate", "--out", str(tmp_path), "--categories", "marble"]) == 2


@pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason=f"magnetic-tile data not found at {MAGNETIC_TILE}")
def test_real_magnetic_tile_handful(tmp_path, make_dataset):
    out = tmp_path / "mt"
    argv = ["magnetic-tile", "--source", str(MAGNETIC_TILE), "--out", str(out), "--train", "3", "--test-good", "2", "--limit", "2"]
    assert make_dataset.main(argv) == 0
    dataset = mvtec.load_dataset(out, require_masks=True)
    assert len(dataset.train_good) == 3
    assert dataset.defect_types == sorted(convert.MAGNETIC_TILE_DEFECTS.values())
    for item in dataset.test:
        image = mvtec.read_image(item.path)
        mask = mvtec.read_mask(item, image.shape)
        assert cv2.imread(str(item.path), cv2.IMREAD_UNCHANGED).ndim == 2
        if item.is_good:
            assert not mask.any()
        else:
            raw = cv2.imread(str(item.mask_path), cv2.IMREAD_UNCHANGED)
            assert raw.shape == image.shape[:2] and set(np.unique(raw).tolist()) <= {0, 255}
            assert mask.any(), f"{item.path.name}: empty mask for a defect"


def test_magnetic_tile_one_lighting(tmp_path, make_dataset):
    source = _fake_magnetic_tile(tmp_path / "mt")  # good images are exp0_*, defects exp1_*
    for i in range(3):
        _img(source / f"MT_Free/Imgs/exp1_num_free{i}.jpg", 120, (60, 60))
    out = convert.convert_magnetic_tile(source, tmp_path / "exp1", n_train=2, lighting="exp1")
    dataset = mvtec.load_dataset(out, require_masks=True)
    names = [p.name for p in dataset.train_good] + [t.path.name for t in dataset.test]
    assert names and all(n.startswith("exp1_") for n in names), "another lighting leaked in"
    assert len(dataset.train_good) == 2 and sum(t.is_good for t in dataset.test) == 1
    with pytest.raises(UserError, match="exp1 .. exp6"):
        convert.convert_magnetic_tile(source, tmp_path / "bad", n_train=2, lighting="exp9")
    argv = ["magnetic-tile", "--source", str(source), "--out", str(tmp_path / "cli"), "--train", "2", "--lighting", "exp1"]
    assert make_dataset.main(argv) == 0


def _elpv_labels(root: Path) -> Path:
    """The elpv-dataset package's layout: labels.csv ('images/cellNNNN.png  probability  type')."""
    rows = []
    for i, (probability, kind) in enumerate([(0.0, "mono")] * 5 + [(1.0, "mono")] * 3 + [(1 / 3, "mono"), (0.0, "poly"), (1.0, "poly")]):
        name = f"images/cell{i:04d}.png"
        _img(root / name, 50 + 10 * i, (30, 30))
        rows.append(f"{name}  {probability}  {kind}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def test_elpv_conversion_keeps_one_cell_type_and_only_certain_labels(tmp_path, make_dataset):
    labels = _elpv_labels(tmp_path / "elpv")
    out = convert.convert_elpv(tmp_path / "mono", "mono", n_train=2, n_test_good=None, n_test_defect=None, labels_csv=labels)
    dataset = mvtec.load_dataset(out)
    assert len(dataset.train_good) == 2
    assert sorted(t.defect_type for t in dataset.test) == ["defective"] * 3 + ["good"] * 3  # the 1/3 cell is left out
    assert not {p.stem for p in dataset.train_good} & {t.path.stem for t in dataset.test}
    assert all(t.mask_path is None for t in dataset.test)  # image-level labels only
    with pytest.raises(UserError, match="mono or poly"):
        convert.convert_elpv(tmp_path / "x", "thin-film", labels_csv=labels)
    with pytest.raises(UserError, match="--train 5 needs at least 6"):
        convert.convert_elpv(tmp_path / "y", "mono", n_train=5, labels_csv=labels)
    argv = ["elpv", "--out", str(tmp_path / "cli"), "--kind", "poly", "--train", "0"]
    assert make_dataset.main(argv) == 2


def test_real_elpv_handful(tmp_path, make_dataset):
    pytest.importorskip("elpv_dataset", reason="the ELPV cells come from the PyPI package elpv-dataset (dev extra)")
    argv = ["elpv", "--out", str(tmp_path / "mono"), "--kind", "mono", "--train", "3", "--test-good", "2", "--test-defect", "2"]
    assert make_dataset.main(argv) == 0
    dataset = mvtec.load_dataset(tmp_path / "mono")
    assert len(dataset.train_good) == 3 and sorted(t.defect_type for t in dataset.test) == ["defective"] * 2 + ["good"] * 2
    assert mvtec.read_image(dataset.test[0].path).shape[:2] == (300, 300)
