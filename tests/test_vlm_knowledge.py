"""The knowledge file: the shipped example validates; broken files fail with errors that say where and how."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_inspect.errors import ConfigError, UserError
from edge_inspect.vlm.knowledge import load_knowledge, parse_knowledge

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "knowledge.yaml"
GOOD = """
good_part: Grey plate with two holes.
defects:
  - name: scratch
    description: Thin bright line.
    tolerance: Up to 5 mm.
  - name: missing_hole
    description: A hole is not punched.
"""


def test_example_knowledge_validates_and_sets_the_defect_enum():
    knowledge = parse_knowledge(EXAMPLE.read_text(), str(EXAMPLE), product="bracket")
    assert knowledge.defect_types[-2:] == ("other", "none")
    assert "scratch" in knowledge.defect_types and "missing_hole" in knowledge.defect_types
    assert knowledge.defects[0].tolerance


def test_load_knowledge_reads_the_product_folder_and_returns_none_without_a_file(tmp_path):
    (tmp_path / "plate").mkdir()
    assert load_knowledge(tmp_path, "plate") is None
    (tmp_path / "plate" / "knowledge.yaml").write_text(GOOD)
    assert load_knowledge(tmp_path, "plate").defect_types == ("scratch", "missing_hole", "other", "none")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("good_part: ok part\ndefects: [\n  {name: a, description: abc}\n", "not valid YAML at line"),
        ("- just\n- a list\n", "expected a mapping"),
        ("defects:\n  - {name: scratch, description: thin line}\n", "good_part: required key is missing"),
        ("good_part: ok part\n", "defects: required key is missing"),
        ("good_part: ok part\ndefects: []\n", "defects: the catalogue needs at least one defect"),
        ("good_part: ok part\ndefects:\n  - {name: Bad Name, description: abc}\n", "defects[0].name: 'Bad Name' is not a valid defect name"),
        ("good_part: ok part\ndefects:\n  - {name: other, description: abc}\n", "defects[0].name: 'other' is reserved"),
        ("good_part: ok part\ndefects:\n  - {name: a, description: abc}\n  - {name: a, description: abcd}\n", "defect name 'a' appears twice"),
        ("good_part: ok part\ndefects:\n  - {name: a, descripton: abc}\n", "defects[0].descripton: unknown key (allowed: name, description, tolerance)"),
        ("good_part: ok part\ncolour: red\ndefects:\n  - {name: a, description: abc}\n", "colour: unknown key (allowed: product, good_part, defects, notes)"),
    ],
)
def test_broken_knowledge_files_name_the_key_and_the_fix(text, expected):
    with pytest.raises(ConfigError) as info:
        parse_knowledge(text, "calibration/plate/knowledge.yaml")
    message = str(info.value)
    assert message.startswith("calibration/plate/knowledge.yaml: ")
    assert expected.lower() in message.lower(), message
    assert "docs/vlm.md" in message
    assert isinstance(info.value, UserError)


def test_item_errors_are_not_echoed_as_an_empty_list():
    with pytest.raises(ConfigError) as info:
        parse_knowledge("good_part: ok part\ndefects:\n  - {name: X, description: abc}\n", "k.yaml")
    assert "at least 1 item" not in str(info.value)


def test_product_key_must_match_the_folder(tmp_path):
    (tmp_path / "plate").mkdir()
    (tmp_path / "plate" / "knowledge.yaml").write_text("product: bracket\n" + GOOD)
    with pytest.raises(ConfigError, match="product is 'bracket' but the file belongs to product 'plate'"):
        load_knowledge(tmp_path, "plate")


def test_undecodable_file_is_a_clear_error(tmp_path):
    (tmp_path / "plate").mkdir()
    (tmp_path / "plate" / "knowledge.yaml").write_bytes(b"good_part: \xff\xfe\n")
    with pytest.raises(ConfigError, match="UTF-8 YAML"):
        load_knowledge(tmp_path, "plate")
