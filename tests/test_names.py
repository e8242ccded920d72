"""One product-name rule and one inspection-id alphabet, used by config, calibrate, payloads and evidence."""

from __future__ import annotations

import json

import pytest

from edge_inspect.calibration.calibrate import validate_product_name
from edge_inspect.config import parse_config
from edge_inspect.errors import ConfigError, UserError
from edge_inspect.mqtt.payloads import check_inspection_id, parse_product_set
from edge_inspect.records import is_inspection_id, is_product_name, new_inspection_id


@pytest.mark.parametrize("name", ["abc\n", "", "-abc", "a/b", "a..b", "x" * 65, "a b"])
def test_bad_product_names_are_refused_everywhere(name):
    assert not is_product_name(name)
    with pytest.raises(UserError):
        validate_product_name(name)  # calibrate once used re.match, which let "abc\n" through
    with pytest.raises(ValueError):
        parse_product_set(f'{{"product": "{name}"}}'.replace("\n", "\\n").encode())
    config = {"station": "s1", "cameras": [{"name": "cam0", "product": name, "source": {"type": "replay", "path": "f"}}]}
    with pytest.raises(ConfigError):
        parse_config(json.dumps(config), "test.yaml")  # JSON is YAML


@pytest.mark.parametrize("name", ["abc", "bracket-a", "A.b_c-1", "x" * 64])
def test_good_product_names_pass_everywhere(name):
    assert is_product_name(name) and validate_product_name(name) == name
    assert parse_product_set(name.encode()) == name


def test_one_inspection_id_alphabet():
    new = new_inspection_id()
    assert is_inspection_id(new) and check_inspection_id(new) == new
    for bad in ("abc\n", "a/b", "a.b", "", "x" * 65):
        assert not is_inspection_id(bad)
        with pytest.raises(ValueError):
            check_inspection_id(bad)
