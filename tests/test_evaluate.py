"""`edge-inspect evaluate`: few-shot quality report on a small generated MVTec-layout dataset."""

from __future__ import annotations

import json
import math
import shutil

import cv2
import numpy as np
import pytest

from edge_inspect import cli


def _strict_json(text: str) -> dict:
    def refuse(constant: str):
        raise ValueError(f"not valid JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    pytest.importorskip("skimage")
    from edge_inspect.offline.datasets.generate import generate_dataset

    return generate_dataset(
        tmp_path_factory.mktemp("evaluate"), "coin", n_train=6, n_test_good=3, n_test_defect=2, size=128, seed=2,
        kinds=("hole", "scratch"),
    )


def _check_report(result: dict, n_good: int, n_defect: int) -> None:
    for key in ("image_auroc", "pixel_auroc", "f1", "false_reject_rate", "miss_rate", "best_f1"):
        assert isinstance(result[key], float) and 0.0 <= result[key] <= 1.0, (key, result[key])
    assert isinstance(result["threshold"], float) and result["threshold"] > 0
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert result["n_good"] == n_good and result["n_defect"] == n_defect
    assert isinstance(result["n_good"], int) and isinstance(result["n_defect"], int)
    assert result["counts"]["fp"] + result["counts"]["tn"] == n_good
    assert result["counts"]["tp"] + result["counts"]["fn"] == n_defect
    assert result["false_reject_rate"] == pytest.approx(result["counts"]["fp"] / n_good, abs=1e-4)
    assert set(result["per_type"]) == {"good", "hole", "scratch"}
    assert result["best_f1"] >= result["f1"]


def test_evaluate_json_at_default_settings(dataset, engines_dir, capsys):
    code = cli.main(["evaluate", str(dataset), "--shots", "4", "--json", "--engines-dir", str(engines_dir)])
    assert code == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1
    result = _strict_json(out)
    assert result["shots"] == 4
    # 6 train/good - 4 shots = 2 held-out good, plus 3 test/good; 2 kinds x 2 defects.
    _check_report(result, n_good=5, n_defect=4)


def test_evaluate_json_small_and_table(dataset, engines_dir, capsys):
    args = ["evaluate", str(dataset), "--shots", "3", "--engines-dir", str(engines_dir), "--size", "64", "--bank-size", "64"]
    assert cli.main([*args, "--json"]) == 0
    result = _strict_json(capsys.readouterr().out.strip())
    _check_report(result, n_good=6, n_defect=4)
    assert not math.isnan(result["image_auroc"])
    assert cli.main([*args, "--max-test", "4"]) == 0
    out = capsys.readouterr().out
    assert "image AUROC" in out and "good / defect images" in out and "flagged per type" in out


@pytest.mark.parametrize("shots, message", [(6, "--shots 6 needs at least 7"), (0, "--shots must be at least 1")])
def test_evaluate_shot_count_errors(dataset, engines_dir, capsys, shots, message):
    assert cli.main(["evaluate", str(dataset), "--shots", str(shots), "--engines-dir", str(engines_dir), "--json"]) == 2
    assert message in capsys.readouterr().err


def test_shot_sets_use_disjoint_shots_and_summarise(dataset, engines_dir, capsys):
    args = ["evaluate", str(dataset), "--shots", "2", "--shot-sets", "2", "--engines-dir", str(engines_dir), "--size", "64", "--bank-size", "64"]
    assert cli.main([*args, "--json"]) == 0
    result = _strict_json(capsys.readouterr().out.strip())
    runs = result["runs"]
    assert result["shot_sets"] == 2 and [r["shot_set"] for r in runs] == [0, 1]
    assert set(runs[0]["shot_images"]).isdisjoint(runs[1]["shot_images"])
    for run in runs:  # 6 train/good - 2 shots = 4 held out (the other set's shots among them), plus 3 test/good
        _check_report(run, n_good=7, n_defect=4)
    for key in ("image_auroc", "f1", "false_reject_rate", "threshold"):
        values = [r[key] for r in runs]
        assert result[key] == pytest.approx(sum(values) / 2, abs=1e-4)
        assert result[f"{key}_min"] == min(values) and result[f"{key}_max"] == max(values)
    assert result["p99_ms"] == max(r["p99_ms"] for r in runs)
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "2 shot sets" in out and "shot set 1 (" in out


def test_shot_sets_need_enough_good_images(dataset, engines_dir, capsys):
    assert cli.main(["evaluate", str(dataset), "--shots", "3", "--shot-sets", "2", "--engines-dir", str(engines_dir)]) == 2
    assert "--shots 3 with 2 shot sets needs at least 7" in capsys.readouterr().err
    assert cli.main(["evaluate", str(dataset), "--shot-sets", "0", "--engines-dir", str(engines_dir)]) == 2
    assert "--shot-sets must be at least 1" in capsys.readouterr().err


def test_the_anomalib_floor_and_mmad_metrics_in_a_single_run(dataset, engines_dir, capsys):
    pytest.importorskip("anomalib", reason="the floor is anomalib's PatchCore (pip install -e '.[export,eval]')")
    assert cli.main(["evaluate", str(dataset), "--shots", "4", "--json", "--engines-dir", str(engines_dir)]) == 0
    result = _strict_json(capsys.readouterr().out.strip())
    ref = result["floor"]
    assert ref["name"].startswith("anomalib")
    assert 0.5 < ref["image_auroc"] <= 1.0 and 0.5 < ref["pixel_auroc"] <= 1.0  # painted coin defects: easy for it too
    assert ref["image_auroc_ratio"] == pytest.approx(result["image_auroc"] / ref["image_auroc"], abs=1e-3)
    counts = result["counts"]
    assert result["detection_accuracy"] == pytest.approx((counts["tp"] + counts["tn"]) / 9, abs=1e-4)
    # Localisation accuracy is a share of the flagged defective parts that have a mask.
    assert result["localised_parts"] <= counts["tp"]
    if result["localised_parts"]:
        assert 0.0 <= result["localisation_accuracy"] <= 1.0
    else:
        assert result["localisation_accuracy"] is None


def test_several_sets_give_one_row_each_and_the_mean(dataset, engines_dir, tmp_path, capsys):
    import shutil

    sets = tmp_path / "sets"
    shutil.copytree(dataset, sets / "coin_a")
    shutil.copytree(dataset, sets / "coin_b")
    (sets / "notes").mkdir()  # not a set: ignored inside a folder of sets
    pytest.importorskip("anomalib", reason="the floor is anomalib's PatchCore (pip install -e '.[export,eval]')")
    args = ["evaluate", str(sets), "--shots", "4", "--engines-dir", str(engines_dir), "--size", "64", "--bank-size", "64"]
    assert cli.main([*args, "--json"]) == 0
    result = _strict_json(capsys.readouterr().out.strip())
    assert [r["dataset"].rsplit("/", 1)[-1] for r in result["datasets"]] == ["coin_a", "coin_b"]
    a, b = result["datasets"]
    assert a["image_auroc"] == b["image_auroc"]  # same images, same shots: same numbers
    assert result["mean"]["image_auroc"] == pytest.approx((a["image_auroc"] + b["image_auroc"]) / 2, abs=1e-4)
    assert result["mean"]["floor"]["image_auroc"] == pytest.approx(a["floor"]["image_auroc"], abs=1e-4)
    assert result["mean"]["sets_at_or_above_floor"] in (0, 2) and result["mean"]["sets_with_masks"] == 2
    assert cli.main(args) == 0
    table = capsys.readouterr().out
    assert "floor" in table and "coin_a" in table and "coin_b" in table and "MEAN" in table


def test_evaluate_refuses_a_folder_without_sets(tmp_path, engines_dir, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["evaluate", str(tmp_path / "empty"), "--engines-dir", str(engines_dir)]) == 2
    assert "neither an MVTec-layout set" in capsys.readouterr().err


def test_feedback_simulation_overrules_false_rejects_and_reports_before_and_after(dataset, engines_dir, tmp_path, capsys):
    """--feedback K: the first K false rejects of the stream are overruled (refits); before and after are
    measured on the same parts, the overruled ones left out."""
    shifted = tmp_path / "shifted"
    shutil.copytree(dataset, shifted)
    for path in sorted((shifted / "test" / "good").iterdir()):  # another batch: good parts, darker and shifted
        image = cv2.imread(str(path))
        image = np.roll((image * 0.6).astype(np.uint8), 9, axis=1)
        cv2.imwrite(str(path), image)
    args = ["evaluate", str(shifted), "--shots", "3", "--engines-dir", str(engines_dir), "--size", "64", "--bank-size", "256",
            "--no-reference", "--json"]
    assert cli.main([*args, "--feedback", "2"]) == 0
    result = _strict_json(capsys.readouterr().out.strip())
    fb = result["feedback"]
    n_parts = result["n_good"] + result["n_defect"]
    false_rejects = result["counts"]["fp"]
    assert false_rejects >= 2, "the test needs false rejects: the darker good parts"
    # after the first overruled dark part the refit bank knows the batch: fewer (or no) more to overrule
    n = fb["overruled"]
    assert fb["k"] == 2 and n in (1, 2) and len(fb["overruled_images"]) == n
    assert fb["parts"] == n_parts - n and fb["evidence_from"] == "shots"
    # before: the first calibration's verdicts on the parts that were not overruled (the overruled ones were
    # false rejects of the calibration active when they came by: the first, or a refit of it)
    assert false_rejects - n <= fb["before"]["false_rejects"] <= false_rejects
    assert fb["after"]["false_rejects"] < fb["before"]["false_rejects"]
    assert fb["before"]["misses"] == result["counts"]["fn"]
    assert fb["before"]["threshold"] == pytest.approx(result["threshold"], abs=1e-4)
    for when in ("before", "after"):
        assert 0.0 <= fb[when]["false_reject_rate"] <= 1.0 and 0.0 <= fb[when]["miss_rate"] <= 1.0
    assert fb["refit_s_mean"] > 0

    assert cli.main([*args, "--feedback", "-1"]) == 2
    assert "--feedback K" in capsys.readouterr().err
