"""Versioned calibrations (calibration/store.py, calibrate.refit_product / rollback_product) and the
`edge-inspect calibration history|diff|rollback` command. Small images at --size 64 keep each fit fast."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_inspect import cli
from edge_inspect.calibration import store
from edge_inspect.calibration.calibrate import refit_product, rollback_product
from edge_inspect.calibration.store import GoodImage, commit_version
from edge_inspect.errors import CalibrationError, UserError
from edge_inspect.scorer import layout
from edge_inspect.scorer.product import Scorer, load_product

FAST = ["--size", "64", "--bank-size", "64"]


@pytest.fixture(scope="module")
def bricks() -> list[np.ndarray]:
    pytest.importorskip("skimage")
    from edge_inspect.offline.datasets.generate import (
        CATEGORIES,
        load_photo,
        render_good,
    )

    photo, spec = load_photo("brick"), CATEGORIES["brick"]
    return [render_good(photo, spec, np.random.default_rng(seed), 96) for seed in range(8)]


@pytest.fixture
def product(tmp_path, engines_dir, bricks):
    folder = tmp_path / "good"
    folder.mkdir()
    for i, image in enumerate(bricks[:4]):
        cv2.imwrite(str(folder / f"good_{i:02d}.png"), image)
    cal = tmp_path / "calibration"
    assert cli.main(["calibrate", "--product", "brick", "--images", str(folder), "--calibration-dir", str(cal),
                     "--engines-dir", str(engines_dir), *FAST]) == 0
    return cal, engines_dir


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def _refit(cal, engines, image, inspection_id="insp-1", **kwargs) -> int:
    with store.product_lock(cal, "brick"):
        return refit_product(cal, "brick", engines, [GoodImage(image, f"inspection {inspection_id}", "feedback", inspection_id)],
                             {"change": "feedback_ok", "by": "op-7", "why": "scratch-free, lighting", "inspection_ids": [inspection_id]},
                             threads=1, **kwargs)


def test_a_refit_adds_the_frame_to_the_bank_and_records_who_and_why(product, bricks):
    cal, engines = product
    before = load_product(cal, "brick", engines)
    odd = np.clip(bricks[5].astype(np.int16) + 40, 0, 255).astype(np.uint8)  # a brighter good part
    scorer = Scorer(before, backend="onnxruntime", threads=1)
    try:
        odd_before = scorer.score(odd).score
    finally:
        scorer.close()
    assert _refit(cal, engines, odd) == 2
    after = load_product(cal, "brick", engines)
    assert after.version == 2 and after.calibration_id != before.calibration_id
    manifest = after.manifest
    assert manifest["version"] == {**manifest["version"], "number": 2, "parent": 1, "change": "feedback_ok", "by": "op-7",
                                   "why": "scratch-free, lighting", "inspection_ids": ["insp-1"]}
    assert [g["added_by"] for g in manifest["good_set"]] == ["calibrate"] * 4 + ["feedback"]
    assert manifest["good_set"][-1]["inspection_id"] == "insp-1"
    evidence = json.loads((after.directory / "threshold.json").read_text())["evidence"]
    assert len(evidence["loo_scores"]) == 4  # the default refit: only the shots give threshold evidence
    scorer = Scorer(after, backend="onnxruntime", threads=1)
    try:
        assert scorer.score(odd).score < odd_before  # its patches are in the bank now
    finally:
        scorer.close()


def test_rollback_restores_the_previous_bank_and_threshold_bit_for_bit(product, bricks, capsys):
    cal, engines = product
    v1 = layout.product_dir(cal, "brick") / "versions" / "1"
    files_v1 = _digest(v1)
    first = load_product(cal, "brick", engines)
    _refit(cal, engines, bricks[6])
    assert load_product(cal, "brick", engines).threshold != first.threshold or _digest(layout.active_directory(cal, "brick")) != files_v1

    assert cli.main(["calibration", "rollback", "--product", "brick", "--calibration-dir", str(cal),
                     "--engines-dir", str(engines), "--why", "refit let a dent through"]) == 0
    assert "version 3 is active, a copy of version 1" in capsys.readouterr().out
    restored = load_product(cal, "brick", engines)
    assert restored.version == 3
    assert _digest(restored.directory) == files_v1  # bank, threshold.json, references: the same bytes
    assert restored.threshold == first.threshold and restored.bank_sha256 == first.bank_sha256
    assert restored.scorer_onnx == first.scorer_onnx
    assert restored.manifest["version"]["restored_from"] == 1 and restored.manifest["version"]["parent"] == 2

    frame = bricks[7]
    a, b = Scorer(first, backend="onnxruntime", threads=1), Scorer(restored, backend="onnxruntime", threads=1)
    try:
        assert a.score(frame).score == b.score(frame).score
    finally:
        a.close(), b.close()


def test_rollback_rebuilds_a_pruned_graph(product, bricks):
    cal, engines = product
    first = load_product(cal, "brick", engines)
    _refit(cal, engines, bricks[6])
    first.scorer_onnx.unlink()  # as if it had been pruned
    rollback_product(cal, "brick", engines, to=1, by="test")
    restored = load_product(cal, "brick", engines)  # verifies the rebuilt graph's sha256 against the manifest
    assert restored.scorer_onnx.is_file() and restored.bank_sha256 == first.bank_sha256


def test_history_and_diff(product, bricks, capsys):
    cal, engines = product
    _refit(cal, engines, bricks[6])
    common = ["--product", "brick", "--calibration-dir", str(cal)]
    assert cli.main(["calibration", "history", *common, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["number"], r["parent"], r["change"], r["active"]) for r in rows] == [(1, None, "calibrate", False), (2, 1, "feedback_ok", True)]
    assert rows[1]["by"] == "op-7" and rows[1]["good_images"] == 5 and rows[0]["good_images"] == 4

    assert cli.main(["calibration", "history", *common]) == 0
    text = capsys.readouterr().out
    assert "feedback_ok" in text and "op-7: scratch-free, lighting" in text

    assert cli.main(["calibration", "diff", *common, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["from"]["number"] == 1 and d["to"]["number"] == 2 and not d["bank"]["same"]
    assert [g["inspection_id"] for g in d["good_images_added"]] == ["insp-1"] and d["good_images_removed"] == []
    assert d["threshold"]["delta"] == pytest.approx(d["threshold"]["to"] - d["threshold"]["from"], abs=1e-5)

    assert cli.main(["calibration", "diff", *common, "1", "9"]) == 2
    assert "no calibration version 9" in capsys.readouterr().err


def test_disk_use_is_bounded_by_keep(product, bricks):
    cal, engines = product
    for i in range(4):
        image = np.clip(bricks[4 + i % 4].astype(np.int16) + 10 * i, 0, 255).astype(np.uint8)
        _refit(cal, engines, image, inspection_id=f"insp-{i}", keep=3, max_good=6)
    assert layout.version_numbers(cal, "brick") == [3, 4, 5]
    kept = [layout.read_manifest(cal, "brick", n) for n in (3, 4, 5)]
    named = {g["file"] for m in kept for g in m["good_set"]}
    on_disk = {f"good/{p.name}" for p in (layout.product_dir(cal, "brick") / "good").iterdir()}
    assert on_disk == named  # good images of deleted versions are gone
    # Refits change the bank, not the graph: every version scores with the one shared graph (the bank is an
    # input), so four refits wrote no graph and there is nothing per version to prune.
    graphs = {m[k]["file"] for m in kept for k in ("scorer_onnx", "features_onnx")}
    assert {p.name for p in engines.glob("*.onnx")} == graphs and len(graphs) == 2
    # max_good: the shots stay, the oldest accepted frames leave
    assert [g["added_by"] for g in kept[-1]["good_set"]] == ["calibrate"] * 4 + ["feedback"] * 2


def test_a_crash_while_writing_a_version_leaves_the_old_one_active(product):
    cal, engines = product

    def broken_writer(folder: Path) -> dict:
        (folder / "threshold.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError), store.product_lock(cal, "brick"):
        commit_version(cal, "brick", broken_writer, {"change": "feedback_ok", "by": "t"})
    assert layout.current_version(cal, "brick") == 1
    assert load_product(cal, "brick", engines).version == 1
    assert not list((layout.product_dir(cal, "brick") / "versions").glob(".*"))


def test_damaged_current_pointer_and_unknown_versions_are_clear_errors(product, capsys):
    cal, engines = product
    (layout.product_dir(cal, "brick") / "current").write_text("banana")
    with pytest.raises(CalibrationError, match="current is damaged"):
        load_product(cal, "brick", engines)
    (layout.product_dir(cal, "brick") / "current").write_text("1\n")
    with pytest.raises(UserError, match="no calibration version 7"):
        rollback_product(cal, "brick", engines, to=7)
    with pytest.raises(UserError, match="no parent"):
        rollback_product(cal, "brick", engines)
    assert cli.main(["calibration", "history", "--product", "nothing", "--calibration-dir", str(cal)]) == 2
    assert "not calibrated" in capsys.readouterr().err


def test_a_product_calibrated_before_versioning_loads_and_says_how_to_start_a_history(product, engines_dir):
    cal, engines = product
    pdir = layout.product_dir(cal, "brick")
    legacy = cal / "old"
    legacy.mkdir()
    for item in (pdir / "versions" / "1").iterdir():
        target = legacy / item.name
        if item.is_dir():
            shutil.copytree(item, target)
        else:
            target.write_bytes(item.read_bytes())
    loaded = load_product(cal, "old", engines)
    assert loaded.version is None and loaded.directory == legacy
    with pytest.raises(UserError, match="before calibrations were versioned"):
        store.history(cal, "old")
    with pytest.raises(CalibrationError, match="recalibrate"), store.product_lock(cal, "old"):
        refit_product(cal, "old", engines, [], {"change": "feedback_ok", "by": "t"})
