"""`edge-inspect bench`: scorer and eager reference timed in one run. No timing is asserted, only that
both ran, reported positive numbers, and computed the same scores."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edge_inspect import cli
from edge_inspect.offline.bench import Latency, time_calls
from edge_inspect.scorer.layout import active_directory

REPO = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("scorer_p50_ms", "scorer_p99_ms", "reference_p50_ms", "reference_p99_ms", "speedup")


def _bench_json(capsys, *args: str) -> dict:
    assert cli.main(["bench", "--json", "--iterations", "3", "--warmup", "1", "--threads", "1", *args]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1
    return json.loads(out)


def _product_args(product: dict) -> list[str]:
    return ["--product", product["name"], "--calibration-dir", str(product["calibration_dir"]),
            "--engines-dir", str(product["engines_dir"])]


def _check_both_ran(result: dict) -> None:
    pytest.importorskip("torch")
    for key in TIMING_KEYS:
        assert isinstance(result[key], float) and result[key] > 0, (key, result[key])
    assert result["scorer_p99_ms"] >= result["scorer_p50_ms"] and result["reference_p99_ms"] >= result["reference_p50_ms"]
    assert result["speedup"] == pytest.approx(result["reference_p50_ms"] / result["scorer_p50_ms"], rel=1e-2)
    assert result["backend"] == "onnxruntime" and result["threads"] == 1 and result["iterations"] == 3
    assert result["bank_size"] > 0 and result["feature_dim"] > 0 and result["reference_device"] == "cpu"
    # Same graph input, same bank: the two implementations agree far inside the threshold.
    assert 0 <= result["score_max_abs_diff"] <= 1e-3 * result["threshold"]


def test_bench_json_on_a_calibrated_product(calibrated_product, capsys):
    result = _bench_json(capsys, *_product_args(calibrated_product), "--backend", "onnxruntime")
    _check_both_ran(result)
    manifest = json.loads((active_directory(calibrated_product["calibration_dir"], calibrated_product["name"]) / "manifest.json").read_text())
    assert result["input_size"] == manifest["input_size"]
    assert result["bank_size"] == manifest["bank"]["patches"] and result["feature_dim"] == manifest["bank"]["dim"]
    assert result["frames"] == len(manifest["images"]) and "good references" in result["frames_source"]
    assert result["temporary_product"] is False and result["host"]["cpus"] >= 1


def test_bench_builds_a_temporary_product_when_none_is_given(engines_dir, capsys, tmp_path):
    pytest.importorskip("skimage")
    result = _bench_json(capsys, "--engines-dir", str(engines_dir), "--size", "64", "--shots", "2", "--backend", "onnxruntime")
    _check_both_ran(result)
    assert result["temporary_product"] is True and result["input_size"] == [64, 64]
    assert result["frames"] == 8  # the generated held-out images
    assert sorted(p.name for p in engines_dir.iterdir()) == ["backbone"]  # graphs went to the temporary dir


def test_table_output_names_both_and_the_ratio(calibrated_product, capsys):
    pytest.importorskip("torch")
    args = ["bench", *_product_args(calibrated_product), "--iterations", "2", "--warmup", "0", "--threads", "1"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "scorer (onnxruntime)" in out and "reference (torch eager, cpu)" in out
    assert "speed-up (reference p50 / scorer p50)" in out


def test_no_reference_times_the_scorer_alone(calibrated_product, tmp_path, capsys):
    images = tmp_path / "frames"
    images.mkdir()
    for path in calibrated_product["good"][:2]:
        (images / path.name).write_bytes(path.read_bytes())
    result = _bench_json(capsys, *_product_args(calibrated_product), "--no-reference", "--images", str(images))
    assert result["scorer_p50_ms"] > 0 and result["frames"] == 2
    assert result["reference_p50_ms"] is None and result["speedup"] is None
    assert "no-reference" in result["reference_note"]


def test_without_torch_the_scorer_is_reported_alone(calibrated_product, tmp_path):
    """torch made unimportable in a fresh interpreter: the bench still runs and says what is missing."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # import torch now raises ImportError, as on an edge box without it
        from edge_inspect import cli
        sys.exit(cli.main(["bench", "--json", "--iterations", "2", "--warmup", "0", "--threads", "1",
                           *{_product_args(calibrated_product)!r}]))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["scorer_p50_ms"] > 0 and result["reference_p50_ms"] is None and result["speedup"] is None
    assert "export" in result["reference_note"] and result["host"]["torch"] is None


@pytest.mark.parametrize(
    "args, message",
    [(["--iterations", "0"], "--iterations 0"), (["--threads", "-1"], "--threads -1"), (["--shots", "1"], "--shots 1"),
     (["--size", "100"], "--size 100"), (["--category", "wood"], "--category 'wood'")],
)
def test_bad_options_are_user_errors(capsys, args, message):
    assert cli.main(["bench", *args]) == 2
    assert message in capsys.readouterr().err


def test_time_calls_and_latency_summary():
    frames = [np.full((2, 2), i, np.float32) for i in range(3)]
    seen = []
    samples, scores = time_calls(lambda f: seen.append(float(f[0, 0])) or float(f[0, 0]) * 2, frames, iterations=5, warmup=2)
    assert seen == [0, 1, 2, 0, 1, 2, 0]  # warm-up first, frames in turn
    assert len(samples) == 5 and all(s >= 0 for s in samples)
    assert scores == {0: 0.0, 1: 2.0, 2: 4.0}
    summary = Latency.of([1.0, 2.0, 3.0, 4.0, 100.0])
    assert summary.p50_ms == 3.0 and summary.min_ms == 1.0 and summary.runs == 5
    assert 4.0 < summary.p99_ms <= 100.0 and summary.mean_ms == pytest.approx(22.0)
    with pytest.raises(ValueError):
        time_calls(lambda f: 0.0, [], 1, 0)


@pytest.mark.vlm
@pytest.mark.slow
def test_bench_with_vlm_times_the_vlm_stage_too(calibrated_product, capsys, tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf", reason="the tiny test model is written with the gguf package")
    from tiny_gguf import build_tiny_vlm

    pair = build_tiny_vlm(tmp_path / "tiny")
    result = _bench_json(capsys, *_product_args(calibrated_product), "--no-reference", "--vlm", "--vlm-frames", "1",
                         "--vlm-model", str(pair.model), "--vlm-mmproj", str(pair.mmproj))
    assert result["scorer_p50_ms"] > 0
    modes = {m["mode"]: m for m in result["vlm"]["modes"]}
    assert set(modes) == {"image", "text"} and result["vlm"]["tiny"] is False
    for mode in modes.values():
        assert "error" not in mode and mode["frames"] == 1 and mode["latency_ms_p50"] > 0


def test_reference_on_a_missing_cuda_device_is_reported_not_crashed(calibrated_product, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = _bench_json(capsys, *_product_args(calibrated_product), "--reference-device", "cuda", "--iterations", "1")
    assert result["scorer_p50_ms"] > 0 and result["reference_p50_ms"] is None
    assert "--reference-device cuda" in result["reference_note"]


def test_bench_vlm_without_a_model_says_what_to_give(capsys):
    from edge_inspect import cli

    assert cli.main(["bench", "--vlm", "--no-reference"]) == 2
    assert "--vlm-model" in capsys.readouterr().err
