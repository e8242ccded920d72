"""`edge-inspect calibrate`: the errors a user can act on (exit code 2, messages naming the problem) and
the calibration directory it writes. Small images at --size 64 keep every calibration well under a second."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from edge_inspect import cli
from edge_inspect.calibration.artifacts import BACKBONE_FILE
from edge_inspect.scorer.layout import active_directory
from edge_inspect.scorer.product import load_product

REPO = Path(__file__).resolve().parents[1]
FAST = ["--size", "64", "--bank-size", "64"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def bricks() -> list[np.ndarray]:
    """Ten generated good bricks, 96 px."""
    pytest.importorskip("skimage")
    from edge_inspect.offline.datasets.generate import (
        CATEGORIES,
        load_photo,
        render_good,
    )

    photo, spec = load_photo("brick"), CATEGORIES["brick"]
    return [render_good(photo, spec, np.random.default_rng(seed), 96) for seed in range(10)]


def _write_images(folder: Path, images: list[np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        cv2.imwrite(str(folder / f"good_{i:02d}.png"), image)
    return folder


def _calibrate(tmp_path: Path, engines: Path, images: Path, product: str = "bracket", *extra: str) -> int:
    return cli.main([
        "calibrate", "--product", product, "--images", str(images), "--calibration-dir", str(tmp_path / "calibration"),
        "--engines-dir", str(engines), *FAST, *extra,
    ])


def test_no_images_is_a_user_error(tmp_path, engines_dir, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    assert _calibrate(tmp_path, engines_dir, tmp_path / "empty") == 2
    assert "holds no images" in capsys.readouterr().err
    assert _calibrate(tmp_path, engines_dir, tmp_path / "missing") == 2
    assert "missing is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "calibration" / "bracket").exists()


def test_one_image_is_too_few(tmp_path, engines_dir, bricks, capsys):
    images = _write_images(tmp_path / "good", bricks[:1])
    assert _calibrate(tmp_path, engines_dir, images) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "1 good image(s)" in err and "at least 2" in err


def test_unreadable_images_are_named(tmp_path, engines_dir, bricks, capsys):
    images = _write_images(tmp_path / "good", bricks[:3])
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not the rest of a png")
    (images / "empty.jpg").write_bytes(b"")
    assert _calibrate(tmp_path, engines_dir, images) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "empty.jpg" in err
    assert "good_00.png" not in err
    assert not (tmp_path / "calibration" / "bracket").exists()


@pytest.mark.parametrize("name", ["line/a", "../escape", "a\\b", "", ".hidden", "x" * 65])
def test_product_names_that_could_leave_the_calibration_dir_are_refused(tmp_path, engines_dir, bricks, capsys, name):
    images = _write_images(tmp_path / "good", bricks[:2])
    assert _calibrate(tmp_path, engines_dir, images, name) == 2
    assert "not allowed" in capsys.readouterr().err
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "good" not in p.parts and "engines" not in p.parts]
    assert written == []


def test_existing_product_needs_force_and_force_keeps_the_knowledge_file(tmp_path, engines_dir, bricks, capsys):
    images = _write_images(tmp_path / "good", bricks[:3])
    assert _calibrate(tmp_path, engines_dir, images) == 0
    product_dir = tmp_path / "calibration" / "bracket"
    (product_dir / "knowledge.yaml").write_text("product: bracket\n")
    before = json.loads((active_directory(tmp_path / "calibration", "bracket") / "manifest.json").read_text())
    capsys.readouterr()

    assert _calibrate(tmp_path, engines_dir, images) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err

    assert _calibrate(tmp_path, engines_dir, _write_images(tmp_path / "more", bricks[3:7]), "bracket", "--force") == 0
    after = json.loads((active_directory(tmp_path / "calibration", "bracket") / "manifest.json").read_text())
    assert len(after["images"]) == 4 and len(before["images"]) == 3
    # the recalibration is a new version whose parent is the first: it can be rolled back
    assert before["version"]["number"] == 1 and after["version"] == {**after["version"], "number": 2, "parent": 1, "change": "calibrate"}
    assert (product_dir / "knowledge.yaml").read_text() == "product: bracket\n"  # written by people: kept
    assert not list((product_dir / "versions").glob(".*tmp"))


def test_mixed_sizes_warn_and_still_calibrate(tmp_path, engines_dir, bricks, caplog):
    images = _write_images(tmp_path / "good", bricks[:3])
    cv2.imwrite(str(images / "big.png"), cv2.resize(bricks[3], (160, 128)))
    with caplog.at_level("WARNING"):
        assert _calibrate(tmp_path, engines_dir, images) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("2 different sizes" in w and "160x128" in w for w in warnings), warnings
    assert len(json.loads((active_directory(tmp_path / "calibration", "bracket") / "manifest.json").read_text())["images"]) == 4


def test_calibration_directory_contents(tmp_path, engines_dir, bricks, capsys):
    images = _write_images(tmp_path / "good", bricks[:4])
    assert _calibrate(tmp_path, engines_dir, images, "bracket", "--roi", "4,8,80,72", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["directory"] == str(tmp_path / "calibration" / "bracket") and summary["images"] == 4
    product_dir = active_directory(tmp_path / "calibration", "bracket")
    assert summary["version"] == 1 and summary["version_directory"] == str(product_dir)

    manifest = json.loads((product_dir / "manifest.json").read_text())
    assert manifest["product"] == "bracket" and manifest["calibration_id"] == summary["calibration_id"]
    assert {"numpy", "opencv", "onnxruntime", "onnx"} <= manifest["versions"].keys()
    assert manifest["edge_inspect_version"]
    assert manifest["input_size"] == [64, 64] and manifest["params"]["input_size"] == [64, 64]
    assert manifest["roi"] == [4, 8, 80, 72]
    created = dt.datetime.fromisoformat(manifest["created_utc"])
    assert abs((dt.datetime.now(dt.timezone.utc) - created).total_seconds()) < 600
    assert [Path(i["source"]).name for i in manifest["images"]] == [f"good_{i:02d}.png" for i in range(4)]
    for entry in manifest["images"]:
        assert entry["sha256"] == _sha256(Path(entry["source"]))
    assert manifest["backbone"]["sha256"] == _sha256(engines_dir / BACKBONE_FILE)

    bank = np.load(product_dir / "memory_bank.npy")
    assert bank.dtype == np.float32 and bank.ndim == 2
    assert bank.shape == (manifest["bank"]["patches"], manifest["bank"]["dim"])
    assert bank.shape[0] <= 64 < manifest["bank"]["from_patches"]
    assert manifest["bank"]["sha256"] == hashlib.sha256(bank.tobytes()).hexdigest()

    threshold_doc = json.loads((product_dir / "threshold.json").read_text())
    assert threshold_doc["threshold"] == manifest["threshold"] == pytest.approx(summary["threshold"], abs=1e-5)
    evidence = threshold_doc["evidence"]
    assert len(evidence["loo_scores"]) == 4 and len(evidence["calibration_scores"]) == 4
    assert evidence["rule"] and "synthetic_scores" in evidence
    assert all(s > 0 for s in evidence["loo_scores"] + evidence["calibration_scores"])

    references = product_dir / "references"
    listed = json.loads((references / "references.json").read_text())
    assert [e["source"] for e in listed] == [f"good_{i:02d}.png" for i in range(4)]
    assert all((references / e["file"]).is_file() for e in listed)
    embeddings = np.load(references / "embeddings.npy")
    assert embeddings.shape[0] == 4
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)

    for key in ("scorer_onnx", "features_onnx"):
        path = engines_dir / manifest[key]["file"]
        assert path.is_file() and manifest[key]["sha256"] == _sha256(path)
    # The scorer graph takes the bank as an input: named by its content, not the product, and it holds no bank.
    scorer = onnx.load(str(engines_dir / manifest["scorer_onnx"]["file"]))
    assert manifest["scorer_onnx"]["file"].startswith("scorer-64x64-")
    assert manifest["scorer_onnx"]["bank_input"] is True and manifest["scorer_onnx"]["capacity"] == 64
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in scorer.graph.input}
    assert shapes == {"image": [1, 3, 64, 64], "bank_x_minus2": [manifest["bank"]["dim"], 64], "bank_sqnorm": [1, 64]}
    assert "features" in {o.name for o in scorer.graph.output}

    product = load_product(tmp_path / "calibration", "bracket", engines_dir)
    assert product.threshold == threshold_doc["threshold"] and product.roi == (4, 8, 80, 72)


def test_ten_images_with_progress(tmp_path, engines_dir, bricks, capsys):
    images = _write_images(tmp_path / "good", bricks)
    assert _calibrate(tmp_path, engines_dir, images, "p10", "--progress") == 0
    captured = capsys.readouterr()
    counts = re.findall(r"calibrate p10:.*?(\d+)/(\d+)", captured.err)
    assert len({done for done, _ in counts}) >= 2, captured.err[-500:]
    assert len({total for _, total in counts}) == 1
    assert "calibrated p10 from 10 good images" in captured.out
    assert _calibrate(tmp_path, engines_dir, images, "quiet", "--json") == 0
    assert "calibrate quiet" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "100"], "--size 100"),
        (["--bank-size", "10"], "--bank-size 10"),
        (["--augment", "mirror"], "unknown mirror"),
        (["--roi", "1,2,3"], "--roi '1,2,3'"),
        (["--sensitivity", "50"], "--sensitivity 50"),
    ],
)
def test_bad_options_are_user_errors(tmp_path, engines_dir, bricks, capsys, args, message):
    images = _write_images(tmp_path / "good", bricks[:2])
    code = cli.main(["calibrate", "--product", "bracket", "--images", str(images), "--calibration-dir",
                     str(tmp_path / "calibration"), "--engines-dir", str(engines_dir), *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_command_line_exit_code_is_2_for_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "edge_inspect.cli", "calibrate", "--product", "x", "--images", str(tmp_path / "empty"),
         "--calibration-dir", str(tmp_path / "calibration"), "--engines-dir", str(tmp_path / "engines")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr


def test_score_many_matches_one_at_a_time_and_views_alternate():
    import numpy as np

    from edge_inspect.calibration.views import NUISANCE, nuisance_views
    from edge_inspect.scorer.anomaly_map import score_many, score_patches
    from edge_inspect.scorer.params import ScorerParams

    rng = np.random.default_rng(0)
    params = ScorerParams(input_size=(64, 64))
    bank = rng.standard_normal((300, 8)).astype(np.float32)
    maps = [rng.standard_normal((8, 8, 8)).astype(np.float32) for _ in range(3)]
    together = score_many(maps, bank, params)
    assert together == pytest.approx([score_patches(m, bank, params)[0] for m in maps], rel=1e-5)

    image = rng.integers(0, 200, (40, 50, 3), dtype=np.uint8)
    views = nuisance_views(image)
    assert len(views) == len(NUISANCE) and all(v.shape == image.shape for v in views)
    assert not any(np.array_equal(v, image) for v in views)
    # With fewer views per image, consecutive images start at the next kind: shifts and gains alternate.
    first, second = nuisance_views(image, 0, 1)[0], nuisance_views(image, 1, 1)[0]
    assert np.array_equal(first, views[0]) and np.array_equal(second, views[1])


def test_a_product_calibrated_with_the_bank_inside_its_graph_still_loads_and_scores_the_same(tmp_path, engines_dir, bricks):
    """Calibrations before the bank input: a per-product graph with the bank as a constant and a version-3
    manifest without scorer_onnx.bank_input. It loads (migrated), scores exactly as the shared graph with
    the same bank, and gives no patch features (stream learning needs a recalibration)."""
    import onnx

    from edge_inspect.calibration.artifacts import load_folded, write_graphs
    from edge_inspect.files import file_sha256
    from edge_inspect.scorer.params import ScorerParams
    from edge_inspect.scorer.product import Scorer

    images = _write_images(tmp_path / "good", bricks[:4])
    assert _calibrate(tmp_path, engines_dir, images, "new", "--size", "64", "--bank-size", "64") == 0
    shared = load_product(tmp_path / "calibration", "new", engines_dir)
    folder = active_directory(tmp_path / "calibration", "new")
    manifest = json.loads((folder / "manifest.json").read_text())
    folded, _ = load_folded(engines_dir)
    name, features = write_graphs(folded, "new", ScorerParams.from_json(manifest["params"]), shared.bank, engines_dir)
    assert name.startswith("new-") and "bank_x_minus2" not in {i.name for i in onnx.load(str(engines_dir / name)).graph.input}
    manifest["manifest_version"] = 3
    manifest["scorer_onnx"] = {"file": name, "sha256": file_sha256(engines_dir / name)}
    manifest["features_onnx"] = {"file": features, "sha256": file_sha256(engines_dir / features)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    legacy = load_product(tmp_path / "calibration", "new", engines_dir)
    assert legacy.bank is None and legacy.bank_capacity is None and shared.bank_capacity == 64
    frame = bricks[5]
    old, new = Scorer(legacy, "onnxruntime", threads=1), Scorer(shared, "onnxruntime", threads=1)
    try:
        a, b = old.score(frame, features=True), new.score(frame, features=True)
        assert a.score == pytest.approx(b.score, rel=1e-4) and np.allclose(a.anomaly_map, b.anomaly_map, rtol=1e-3, atol=1e-3)
        assert a.patch_features is None and b.patch_features is not None and not old.gives_features
    finally:
        old.close()
        new.close()
