"""The verdict contract: JSON Schema, GBNF grammar text and the parser agree on what is valid."""

from __future__ import annotations

import json

import jsonschema
import pytest

from edge_inspect.records import GRID_WORDS
from edge_inspect.vlm.schema import (
    DESCRIPTION_MAX,
    VerdictError,
    parse_verdict,
    verdict_grammar,
    verdict_schema,
)

TYPES = ("scratch", "dent", "other", "none")


def _answer(**changes):
    answer = {
        "observations": "A bright line runs across the top left; the reference has none.",
        "defect": True,
        "defect_type": "scratch",
        "location": ["top left", "top"],
        "description": "Scratch of about 4 mm in the plating.",
        "confidence": 0.85,
    }
    answer.update(changes)
    return {k: v for k, v in answer.items() if v is not ...}


def test_valid_answer_parses_into_a_verdict_and_satisfies_the_schema():
    answer = _answer()
    jsonschema.validate(answer, verdict_schema(TYPES))
    verdict, observations = parse_verdict(json.dumps(answer), TYPES, model="m", latency_ms=12.5)
    assert verdict.defect is True and verdict.defect_type == "scratch"
    assert verdict.location == ("top left", "top")
    assert verdict.confidence == pytest.approx(0.85)
    assert verdict.model == "m" and verdict.latency_ms == 12.5
    assert observations.startswith("A bright line")


def test_no_defect_means_type_none_and_duplicate_locations_collapse():
    answer = _answer(defect=False, defect_type="none", location=["center", "center"], confidence=1)
    verdict, _ = parse_verdict(json.dumps(answer), TYPES)
    assert verdict.defect is False and verdict.defect_type == "none" and verdict.location == ("center",)


def test_without_reasoning_the_schema_has_no_observations():
    schema = verdict_schema(TYPES, reasoning=False)
    assert "observations" not in schema["properties"]
    jsonschema.validate(_answer(observations=...), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_answer(), schema)


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("", "empty output"),
        ('{"defect": true, "defect_type": "scr', "not JSON: Unterminated string"),
        ("[1, 2]", "expected a JSON object"),
        (_answer(defect="yes"), "defect must be true or false"),
        (_answer(defect_type="crack"), "defect_type 'crack' is not one of"),
        (_answer(defect=False), "expected 'none'"),
        (_answer(defect_type="none"), "defect is true but defect_type is 'none'"),
        (_answer(location=["middle"]), "location must be a list of grid words"),
        (_answer(location="top"), "location must be a list of grid words"),
        (_answer(description="x" * (DESCRIPTION_MAX + 1)), "at most 200 characters"),
        (_answer(confidence=1.5), "outside 0..1"),
        (_answer(confidence=True), "confidence must be a number"),
        (_answer(confidence=...), "missing key 'confidence'"),
        (_answer(extra=1), "unexpected keys ['extra']"),
    ],
)
def test_invalid_answers_are_rejected_with_a_reason(answer, reason):
    text = answer if isinstance(answer, str) else json.dumps(answer)
    with pytest.raises(VerdictError) as info:
        parse_verdict(text, TYPES)
    assert reason in str(info.value)
    if isinstance(answer, dict) and "extra" not in answer and reason != "expected 'none'" and "is 'none'" not in reason:
        # the JSON Schema rejects the same answers (the defect/type pairing is the grammar's and parser's)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(answer, verdict_schema(TYPES))


def test_grammar_lists_the_catalogue_the_grid_and_the_bounds():
    grammar = verdict_grammar(("scratch", "missing_hole", "other", "none"))
    rules = dict(line.split(" ::= ", 1) for line in grammar.strip().splitlines())
    assert rules["defect-kind"] == '"\\"scratch\\"" | "\\"missing_hole\\"" | "\\"other\\""'
    assert all(f'"\\"{word}\\""' in rules["grid"] for word in GRID_WORDS)
    assert f"char{{0,{DESCRIPTION_MAX}}}" in rules["description"]
    assert '"\\"observations\\":"' in rules["root"]
    assert "observations" not in verdict_grammar(TYPES, reasoning=False).split("root ::= ")[1].splitlines()[0]
    # "none" is only reachable through defect false
    assert '"false"' in rules["verdict"] and '"\\"none\\""' in rules["verdict"]


def test_catalogue_names_with_quotes_are_escaped_in_the_grammar():
    grammar = verdict_grammar(('we"ird', "other", "none"))
    assert '"\\"we\\\\\\"ird\\""' in grammar  # GBNF literal for the JSON text "we\"ird"
