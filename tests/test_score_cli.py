"""`edge-inspect score` on a product calibrated from generated good parts (conftest `calibrated_product`):
held-out good parts pass, injected defects fail, and the regions name where the defect really is."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_inspect import cli
from edge_inspect.localize import grid_words_for
from edge_inspect.scorer.anomaly_map import image_score
from edge_inspect.scorer.product import load_product


def _score(product: dict, *args: str) -> int:
    return cli.main([
        "score", "--product", product["name"], "--calibration-dir", str(product["calibration_dir"]),
        "--engines-dir", str(product["engines_dir"]), "--backend", "onnxruntime", *args,
    ])


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _mask_of(product: dict, image: Path) -> np.ndarray:
    mask = cv2.imread(str(product["dataset"] / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"), cv2.IMREAD_GRAYSCALE)
    assert mask is not None
    return mask > 0


@pytest.fixture(scope="module")
def scored(calibrated_product) -> dict[str, dict]:
    """Every held-out good and defective image scored once with --json, keyed by path."""
    paths = calibrated_product["good"] + calibrated_product["defects"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert _score(calibrated_product, "--json", *map(str, paths)) == 0
    records = _json_lines(out.getvalue())
    assert [r["image"] for r in records] == [str(p) for p in paths]
    return {r["image"]: r for r in records}


def test_json_lines_have_the_documented_fields(scored):
    for record in scored.values():
        assert set(record) >= {"image", "score", "threshold", "verdict", "regions", "latency_ms"}
        assert record["verdict"] in ("OK", "NG")
        assert (record["verdict"] == "NG") == (record["score"] >= record["threshold"])
        assert record["score"] > 0 and record["threshold"] > 0 and record["latency_ms"] > 0
    assert len({r["threshold"] for r in scored.values()}) == 1


def test_held_out_good_parts_are_ok(calibrated_product, scored):
    for path in calibrated_product["good"]:
        record = scored[str(path)]
        assert record["verdict"] == "OK", record
        assert record["regions"] == []


def test_injected_defects_are_ng(calibrated_product, scored):
    for path in calibrated_product["defects"]:
        assert scored[str(path)]["verdict"] == "NG", (path, scored[str(path)]["score"], scored[str(path)]["threshold"])


def test_regions_name_the_defects_location(calibrated_product, scored):
    for path in calibrated_product["defects"]:
        record = scored[str(path)]
        mask = _mask_of(calibrated_product, path)
        expected = grid_words_for(mask)
        assert record["regions"], path
        strongest = record["regions"][0]
        assert strongest["grid"][0] in expected, (path, strongest["grid"], expected)
        x0, y0, x1, y1 = strongest["box"]
        assert mask[y0:y1, x0:x1].any(), f"{path}: region box {strongest['box']} misses the defect"
        assert 0 < strongest["area_pct"] < 100 and strongest["peak"] >= record["threshold"]


def test_save_maps_writes_overlays_and_raw_maps(calibrated_product, tmp_path, capsys):
    good, defect = calibrated_product["good"][0], calibrated_product["defects"][-1]
    assert good.stem != defect.stem
    out = tmp_path / "maps"
    assert _score(calibrated_product, "--json", "--save-maps", str(out), str(good), str(defect)) == 0
    records = _json_lines(capsys.readouterr().out)
    for path, record in zip((good, defect), records):
        frame = cv2.imread(str(path))
        overlay_path = out / f"{path.stem}_overlay.png"
        assert record["overlay"] == str(overlay_path)
        overlay = cv2.imread(str(overlay_path))
        assert overlay is not None and overlay.shape == frame.shape
        assert not np.array_equal(overlay, frame)
        amap = np.load(out / f"{path.stem}_map.npy")
        assert amap.dtype == np.float32 and amap.ndim == 2
        # The score is the mean of the map's hottest pixels (scorer.params.image_score): the saved map is the one scored.
        params = load_product(calibrated_product["calibration_dir"], calibrated_product["name"], calibrated_product["engines_dir"]).params
        assert image_score(amap, params) == pytest.approx(record["score"], rel=1e-4)


def test_table_output_and_fail_on_ng(calibrated_product, capsys):
    good, defect = calibrated_product["good"][0], calibrated_product["defects"][0]
    assert _score(calibrated_product, str(good), str(defect)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["image", "score", "thresh", "verdict"]
    assert " OK " in lines[1] and lines[1].rstrip().endswith("-")
    assert " NG " in lines[2]
    assert _score(calibrated_product, "--fail-on-ng", str(defect)) == 1
    assert _score(calibrated_product, "--fail-on-ng", str(good)) == 0


def test_folders_expand_and_missing_inputs_are_user_errors(calibrated_product, tmp_path, capsys):
    folder = calibrated_product["dataset"] / "test" / "good"
    assert _score(calibrated_product, "--json", str(folder)) == 0
    assert len(_json_lines(capsys.readouterr().out)) == len(calibrated_product["good"])
    assert _score(calibrated_product, str(tmp_path / "nope.png")) == 2
    assert "nope.png: no such file or folder" in capsys.readouterr().err
    code = cli.main(["score", "--product", "gear", "--calibration-dir", str(calibrated_product["calibration_dir"]),
                     "--engines-dir", str(calibrated_product["engines_dir"]), str(folder)])
    assert code == 2
    err = capsys.readouterr().err
    assert "'gear' is not calibrated" in err and calibrated_product["name"] in err
