"""`calibrate --augment auto`: the views in the bank chosen from the good parts alone (calibration/choose.py),
with the evidence in the manifest and on the console; and what --augment accepts."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge_inspect import cli
from edge_inspect.calibration.artifacts import load_folded
from edge_inspect.calibration.choose import CANDIDATES, choose_views
from edge_inspect.calibration.views import DEFAULT_AUGMENT, parse_augment
from edge_inspect.errors import UserError
from edge_inspect.scorer import layout
from edge_inspect.scorer.params import ScorerParams


@pytest.fixture(scope="module")
def bricks():
    pytest.importorskip("skimage")
    from edge_inspect.offline.datasets.generate import CATEGORIES, load_photo, render_good

    photo, spec = load_photo("brick"), CATEGORIES["brick"]
    return [render_good(photo, spec, np.random.default_rng(seed), 96) for seed in range(4)]


def test_augment_names():
    assert parse_augment("default") == DEFAULT_AUGMENT == ("hflip", "vflip")
    assert parse_augment("none") == ()
    assert parse_augment("auto") == ("auto",)
    assert parse_augment("hflip,rot90") == ("hflip", "rot90")
    with pytest.raises(UserError, match="unknown mirror"):
        parse_augment("hflip,mirror")


def test_auto_takes_the_candidate_that_separates_painted_defects_best(bricks, engines_dir):
    folded, _ = load_folded(engines_dir)
    params = ScorerParams(input_size=(64, 64))
    chosen, evidence = choose_views(bricks, folded, params, seed=0, threads=1)
    measured = evidence["candidates"]
    assert set(measured) == {",".join(c) or "none" for c in CANDIDATES}
    best = max(measured.values(), key=lambda m: m["separation"])["separation"]
    assert measured[evidence["chosen"]]["separation"] == best and (",".join(chosen) or "none") == evidence["chosen"]
    for numbers in measured.values():
        assert 0.0 <= numbers["separation"] <= 1.0 and numbers["defects"] > 0 and numbers["good_scores"] >= 4
    again, _ = choose_views(bricks, folded, params, seed=0, threads=1)
    assert again == chosen  # deterministic for a seed


def test_calibrate_auto_records_the_choice_and_prints_it(bricks, engines_dir, tmp_path, capsys):
    folder = tmp_path / "good"
    folder.mkdir()
    for i, image in enumerate(bricks):
        cv2.imwrite(str(folder / f"good_{i}.png"), image)
    cal = tmp_path / "calibration"
    assert cli.main(["calibrate", "--product", "brick", "--images", str(folder), "--calibration-dir", str(cal),
                     "--engines-dir", str(engines_dir), "--size", "64", "--augment", "auto"]) == 0
    out = capsys.readouterr().out
    manifest = layout.read_manifest(cal, "brick", layout.current_version(cal, "brick"))
    views = manifest["views"]
    assert views["chosen"] in views["candidates"] and "painted" in views["rule"]
    assert (",".join(manifest["options"]["augment"]) or "none") == views["chosen"]
    assert "views in bank" in out and views["chosen"] in out.split("views in bank", 1)[1].splitlines()[0]
