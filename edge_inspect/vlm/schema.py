"""The VLM verdict's output contract: a JSON Schema, the GBNF grammar that forces it, and the parser.

Generation is constrained by a GBNF grammar written here rather than by llama.cpp's schema
converter, because the converter does not enforce number ranges (confidence must stay in 0..1) and
cannot tie `defect: false` to `defect_type: "none"`. The JSON Schema documents the same contract and
the parser checks it again, so a model or grammar bug shows up as `vlm_status: failed`, never as a
malformed verdict.
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

from ..records import GRID_WORDS, Verdict

DESCRIPTION_MAX = 200
OBSERVATIONS_MAX = 400
NO_DEFECT = "none"


class VerdictError(ValueError):
    """The model's output is not a valid verdict; the message says why (it goes into `vlm_error`)."""


def verdict_schema(defect_types: Sequence[str], reasoning: bool = True) -> dict[str, Any]:
    """JSON Schema of one verdict; `defect_types` is the catalogue plus 'other' and 'none'."""
    properties: dict[str, Any] = {}
    if reasoning:
        properties["observations"] = {
            "type": "string",
            "maxLength": OBSERVATIONS_MAX,
            "description": "Step-wise comparison with the reference before deciding.",
        }
    properties.update(
        {
            "defect": {"type": "boolean"},
            "defect_type": {"type": "string", "enum": list(_unique(defect_types))},
            "location": {
                "type": "array",
                "items": {"type": "string", "enum": list(GRID_WORDS)},
                "maxItems": len(GRID_WORDS),
            },
            "description": {"type": "string", "maxLength": DESCRIPTION_MAX},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        }
    )
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def verdict_grammar(defect_types: Sequence[str], reasoning: bool = True) -> str:
    """GBNF for exactly the verdict object (keys in schema order, compact whitespace)."""
    kinds = [t for t in _unique(defect_types) if t != NO_DEFECT]
    if not kinds:
        kinds = ["other"]
    defect_enum = " | ".join(_gbnf_literal(json.dumps(t)) for t in kinds)
    grid_enum = " | ".join(_gbnf_literal(json.dumps(w)) for w in GRID_WORDS)
    head = '"{" ws '
    if reasoning:
        head += '"\\"observations\\":" ws observations "," ws '
    rules = [
        f"root ::= {head}verdict ws \"}}\"",
        'verdict ::= "\\"defect\\":" ws "true" "," ws "\\"defect_type\\":" ws defect-kind "," ws rest'
        ' | "\\"defect\\":" ws "false" "," ws "\\"defect_type\\":" ws "\\"none\\"" "," ws rest',
        'rest ::= "\\"location\\":" ws location "," ws "\\"description\\":" ws description "," ws '
        '"\\"confidence\\":" ws confidence',
        f"defect-kind ::= {defect_enum}",
        f"grid ::= {grid_enum}",
        f'location ::= "[" ws ( grid ( ws "," ws grid ){{0,{len(GRID_WORDS) - 1}}} ws )? "]"',
        f'description ::= "\\"" char{{0,{DESCRIPTION_MAX}}} "\\""',
        f'observations ::= "\\"" char{{0,{OBSERVATIONS_MAX}}} "\\""',
        'confidence ::= "0" ( "." [0-9]{1,3} )? | "1" ( "." "0"{1,3} )?',
        'char ::= [^"\\\\\\x7F\\x00-\\x1F] | "\\\\" ( ["\\\\/bfnrt] | "u" [0-9a-fA-F]{4} )',
        'ws ::= ( " " | "\\n" " "{0,4} )?',
    ]
    return "\n".join(rules) + "\n"


def parse_verdict(
    text: str,
    defect_types: Sequence[str],
    model: str = "",
    latency_ms: float = 0.0,
) -> tuple[Verdict, str]:
    """Parse and check the model's JSON; return the Verdict and the observations text (may be '')."""
    data = _json_object(text, VerdictError)
    allowed = {"observations", "defect", "defect_type", "location", "description", "confidence"}
    extra = sorted(set(data) - allowed)
    if extra:
        raise VerdictError(f"unexpected keys {extra}")
    for key in ("defect", "defect_type", "location", "description", "confidence"):
        if key not in data:
            raise VerdictError(f"missing key {key!r}")

    defect = data["defect"]
    if not isinstance(defect, bool):
        raise VerdictError(f"defect must be true or false, got {defect!r}")
    types = _unique(defect_types)
    defect_type = data["defect_type"]
    if defect_type not in types:
        raise VerdictError(f"defect_type {defect_type!r} is not one of {list(types)}")
    if not defect and defect_type != NO_DEFECT:
        raise VerdictError(f"defect is false but defect_type is {defect_type!r} (expected 'none')")
    if defect and defect_type == NO_DEFECT:
        raise VerdictError("defect is true but defect_type is 'none'")
    location = data["location"]
    if not isinstance(location, list) or any(word not in GRID_WORDS for word in location):
        raise VerdictError(f"location must be a list of grid words {list(GRID_WORDS)}, got {location!r}")
    description = data["description"]
    if not isinstance(description, str) or len(description) > DESCRIPTION_MAX:
        raise VerdictError(f"description must be a string of at most {DESCRIPTION_MAX} characters")
    confidence = data["confidence"]
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not math.isfinite(confidence):
        raise VerdictError(f"confidence must be a number, got {confidence!r}")
    if not 0.0 <= confidence <= 1.0:
        raise VerdictError(f"confidence {confidence} is outside 0..1")
    observations = data.get("observations", "")
    if not isinstance(observations, str):
        raise VerdictError("observations must be a string")

    verdict = Verdict(
        defect=defect,
        defect_type=defect_type,
        location=_unique(location),
        description=description.strip(),
        confidence=float(confidence),
        model=model,
        latency_ms=latency_ms,
    )
    return verdict, observations.strip()


def _unique(items: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _gbnf_literal(json_text: str) -> str:
    """A GBNF string literal that matches `json_text` exactly."""
    return '"' + json_text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- follow-up answers -----------------------------------------------------------------------------

ANSWER_MAX = 300
QUESTION_KINDS = ("open", "yes_no", "location")
_YES_NO_STARTS = (
    "is", "are", "was", "were", "does", "do", "did", "has", "have", "had", "can", "could", "should",
    "would", "will", "may", "might", "must", "shall",
)
_LOCATION_WORDS = ("where", "which side", "which part", "which corner", "which area", "which region", "location",
                   "located", "position")


def _json_object(text: str, error: type[VerdictError]) -> dict[str, Any]:
    """The model's output as one JSON object, or `error` saying what it was instead."""
    cleaned = text.strip()
    if not cleaned:
        raise error("empty output")
    try:
        data = json.loads(cleaned)
    except json.JSONDecodeError as exc:
        raise error(f"not JSON: {exc.msg} at char {exc.pos}") from None
    if not isinstance(data, dict):
        raise error(f"expected a JSON object, got {type(data).__name__}")
    return data


class AnswerError(VerdictError):
    """The model's output is not a valid answer to a follow-up question."""


def question_kind(question: str) -> str:
    """'location' for where-questions, 'yes_no' for questions that start like one, else 'open'."""
    text = " ".join(question.lower().split())
    if any(word in text for word in _LOCATION_WORDS):
        return "location"
    first = text.split(" ", 1)[0].strip("?,.!:;\"'") if text else ""
    if first in _YES_NO_STARTS or first.endswith("n't"):
        return "yes_no"
    return "open"


def answer_schema(kind: str) -> dict[str, Any]:
    """JSON Schema of one answer: the typed field first (yes_no or location), then the answer text."""
    properties: dict[str, Any] = {}
    if kind == "yes_no":
        properties["yes_no"] = {"enum": ["yes", "no"]}
    elif kind == "location":
        properties["location"] = {
            "type": "array", "items": {"type": "string", "enum": list(GRID_WORDS)}, "maxItems": len(GRID_WORDS),
        }
    elif kind != "open":
        raise ValueError(f"question kind must be one of {QUESTION_KINDS}, got {kind!r}")
    properties["answer"] = {"type": "string", "maxLength": ANSWER_MAX}
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def answer_grammar(kind: str) -> str:
    """GBNF for exactly the answer object of `answer_schema(kind)`."""
    answer_schema(kind)  # checks the kind
    head = '"{" ws '
    if kind == "yes_no":
        head += '"\\"yes_no\\":" ws ( "\\"yes\\"" | "\\"no\\"" ) "," ws '
    elif kind == "location":
        head += '"\\"location\\":" ws location "," ws '
    grid_enum = " | ".join(_gbnf_literal(json.dumps(w)) for w in GRID_WORDS)
    rules = [
        f'root ::= {head}"\\"answer\\":" ws answer ws "}}"',
        f'answer ::= "\\"" char{{1,{ANSWER_MAX}}} "\\""',
        f"grid ::= {grid_enum}",
        f'location ::= "[" ws ( grid ( ws "," ws grid ){{0,{len(GRID_WORDS) - 1}}} ws )? "]"',
        'char ::= [^"\\\\\\x7F\\x00-\\x1F] | "\\\\" ( ["\\\\/bfnrt] | "u" [0-9a-fA-F]{4} )',
        'ws ::= ( " " | "\\n" " "{0,4} )?',
    ]
    return "\n".join(rules) + "\n"


def parse_answer(text: str, kind: str) -> dict[str, Any]:
    """Parse and check an answer: {"answer": str, "yes_no"?: "yes"|"no", "location"?: [grid words]}."""
    data = _json_object(text, AnswerError)
    expected = set(answer_schema(kind)["properties"])
    if set(data) != expected:
        raise AnswerError(f"expected keys {sorted(expected)}, got {sorted(data)}")
    answer = data["answer"]
    if not isinstance(answer, str) or len(answer) > ANSWER_MAX:
        raise AnswerError(f"answer must be a string of at most {ANSWER_MAX} characters")
    out: dict[str, Any] = {"answer": answer.strip()}
    if kind == "yes_no":
        if data["yes_no"] not in ("yes", "no"):
            raise AnswerError(f"yes_no must be 'yes' or 'no', got {data['yes_no']!r}")
        out["yes_no"] = data["yes_no"]
    if kind == "location":
        location = data["location"]
        if not isinstance(location, list) or any(word not in GRID_WORDS for word in location):
            raise AnswerError(f"location must be a list of grid words {list(GRID_WORDS)}, got {location!r}")
        out["location"] = list(_unique(location))
    return out
