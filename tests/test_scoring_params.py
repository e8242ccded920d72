"""Scorer parameters: named feature taps, their channels and strides, and the derived projection."""

from __future__ import annotations

import numpy as np
import pytest

from edge_inspect.errors import CalibrationError
from edge_inspect.scorer.anomaly_map import image_score, score_topk_count
from edge_inspect.scorer.backbone import tap_channels, tap_stride
from edge_inspect.scorer.manifest import MANIFEST_VERSION, migrate
from edge_inspect.scorer.params import (
    ScorerParams,
    feature_dim,
    output_dim,
    parse_tap,
    projection_matrix,
)


def test_taps_name_block_outputs_and_expansions():
    assert parse_tap("block4") == ("block", 4) and parse_tap("expand8") == ("expand", 8)
    assert (tap_channels("block4"), tap_stride("block4")) == (40, 8)
    assert (tap_channels("expand8"), tap_stride("expand8")) == (480, 16)  # block 8's input: stage 4, 80 ch x 6
    assert (tap_channels("expand5"), tap_stride("expand5")) == (240, 8)  # expands before its stride-2 depthwise
    assert (tap_channels("block10"), tap_stride("block10")) == (112, 16)


@pytest.mark.parametrize("bad, message", [
    ("layer4", "write blockN"), ("block", "write blockN"), ("expand0", "no expansion layer"), ("block16", "blocks 0..15"),
])
def test_bad_taps_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        feature_dim(ScorerParams(taps=(bad,)))


def test_taps_are_kept_in_network_order_and_old_manifests_load():
    assert ScorerParams(taps=("expand8", "block8", "block4")).taps == ("block4", "expand8", "block8")
    old = ScorerParams.from_json(migrate({"params": {"input_size": [256, 256], "taps": [4, 10], "sigma_px": 4.0}})["params"])
    assert old.taps == ("block4", "block10") and old.projection_dim == 0 and projection_matrix(old) is None
    again = ScorerParams.from_json(ScorerParams().to_json())
    assert again == ScorerParams()
    with pytest.raises(ValueError, match="twice"):
        ScorerParams(taps=("block4", "block4"))


def test_projection_is_derived_from_the_params_alone():
    wide = dict(taps=("block4", "expand8"), projection_dim=192)
    params = ScorerParams(**wide)
    assert feature_dim(params) == 40 + 480 and output_dim(params) == params.projection_dim == 192
    p = projection_matrix(params)
    assert p.shape == (192, 520) and p.dtype == np.float32
    np.testing.assert_array_equal(p, projection_matrix(ScorerParams(**wide)))
    other = projection_matrix(ScorerParams(taps=wide["taps"], projection_dim=192, projection_seed=1))
    assert not np.allclose(p, other)
    assert projection_matrix(ScorerParams(taps=wide["taps"], projection_dim=600)) is None  # no point projecting up
    assert output_dim(ScorerParams(taps=wide["taps"], projection_dim=0)) == 520
    # The default taps (block 4 + block 10: 152 raw dims) need no projection.
    assert projection_matrix(ScorerParams()) is None and output_dim(ScorerParams()) == 40 + 112


def test_image_score_is_the_mean_of_the_hottest_pixels():
    amap = np.zeros((100, 100), np.float32)
    amap[:10, :10] = 2.0  # 100 hot pixels = 1 % of the map
    amap[50, 50] = 9.0  # one hotter pixel
    assert image_score(amap, ScorerParams(input_size=(100, 100), score_topk=0.0)) == pytest.approx(9.0)
    assert score_topk_count(ScorerParams(input_size=(100, 100), score_topk=0.01)) == 100
    assert image_score(amap, ScorerParams(input_size=(100, 100), score_topk=0.01)) == pytest.approx((9.0 + 99 * 2.0) / 100)
    assert score_topk_count(ScorerParams(input_size=(1024, 1024), score_topk=0.01)) == 3839  # TensorRT's TopK limit
    with pytest.raises(ValueError, match="score_topk"):
        ScorerParams(score_topk=0.9)
    # Calibrations written before score_topk existed scored the map's max, and still do.
    old = ScorerParams().to_json()
    del old["score_topk"]
    assert ScorerParams.from_json(migrate({"manifest_version": 1, "params": old})["params"]).score_topk == 0.0
    with pytest.raises(KeyError):  # the params reader reads the current version only; migrate brings old ones
        ScorerParams.from_json(old)


def test_a_manifest_is_migrated_to_the_current_version_once_and_a_newer_one_is_refused():
    v1 = {"manifest_version": 1, "params": {"input_size": [256, 256], "taps": ["block4"], "sigma_px": 4.0},
          "augment": ["hflip"], "seed": 3, "false_reject_rate": 0.02, "bank": {"sha256": "x"}}
    current = migrate(v1)
    assert current["manifest_version"] == MANIFEST_VERSION and "options" not in v1  # the input is left alone
    assert current["params"]["score_topk"] == 0.0 and current["params"]["layer_scales"] == []
    assert current["params"]["pool_count_pad"] is False  # how every calibration before the field aggregated
    assert current["options"] == {"bank_size": 4096, "layer_scales": False, "synthetic_per_image": 2,
                                  "false_reject_rate": 0.02, "augment": ["hflip"], "seed": 3}
    assert current["good_set"] == [] and current["bank"]["file"] == "memory_bank.npy"
    assert migrate(current) == current
    with pytest.raises(CalibrationError, match="newer edge-inspect"):
        migrate({**current, "manifest_version": MANIFEST_VERSION + 1})
