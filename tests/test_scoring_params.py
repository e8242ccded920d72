"""Scorer parameters: named feature taps, their channels and strides, and the derived projection."""

from __future__ import annotations

import numpy as np
import pytest

from edge_inspect.scorer.backbone import tap_channels, tap_stride
from edge_inspect.scorer.params import ScorerParams, feature_dim, output_dim, parse_tap, projection_matrix


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
    old = ScorerParams.from_json({"input_size": [256, 256], "taps": [4, 10], "sigma_px": 4.0})
    assert old.taps == ("block4", "block10") and old.projection_dim == 0 and projection_matrix(old) is None
    again = ScorerParams.from_json(ScorerParams().to_json())
    assert again == ScorerParams()
    with pytest.raises(ValueError, match="twice"):
        ScorerParams(taps=("block4", "block4"))


def test_projection_is_derived_from_the_params_alone():
    params = ScorerParams()
    assert feature_dim(params) == 40 + 480 and output_dim(params) == params.projection_dim == 192
    p = projection_matrix(params)
    assert p.shape == (192, 520) and p.dtype == np.float32
    np.testing.assert_array_equal(p, projection_matrix(ScorerParams()))
    other = projection_matrix(ScorerParams(projection_seed=1))
    assert not np.allclose(p, other)
    assert projection_matrix(ScorerParams(projection_dim=600)) is None  # no point projecting up
    assert output_dim(ScorerParams(projection_dim=0)) == 520
