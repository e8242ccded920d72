"""A product's knowledge file: what a good part looks like and the defect catalogue with tolerances.

The VLM is good at naming *what* it sees when it is told what to look for (Echo's knowledge guide,
AnomalyGPT's product prompts). The catalogue also fixes the `defect_type` enum of the verdict.

Example `calibration/<product>/knowledge.yaml`:

    product: bracket
    good_part: Zinc-plated steel bracket, two round holes, even matte grey surface, straight edges.
    defects:
      - name: scratch
        description: Thin bright line in the plating.
        tolerance: Up to 5 mm long and away from the holes is acceptable.
      - name: missing_hole
        description: One of the two holes is not punched.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError

KNOWLEDGE_FILE = "knowledge.yaml"
# Verdict values every catalogue gets for free; a catalogue entry may not take these names.
RESERVED_TYPES = ("other", "none")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
DOCS_HINT = "see docs/vlm.md (knowledge file) and examples/knowledge.yaml"


class DefectType(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Short id used as `defect_type` in verdicts: lowercase, digits, _ or -.")
    description: str = Field(min_length=3, max_length=400, description="How the defect looks.")
    tolerance: str = Field("", max_length=300, description="What is still acceptable, in words.")

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"{value!r} is not a valid defect name: use 1-40 lowercase letters, digits, '_' or '-', "
                "starting with a letter or digit (e.g. 'scratch', 'missing_hole')"
            )
        if value in RESERVED_TYPES:
            raise ValueError(f"{value!r} is reserved (every catalogue has 'other' and 'none'); pick another name")
        return value


class Knowledge(BaseModel):
    """The validated knowledge file of one product."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    product: str = Field("", description="Product name; when given it must match the calibration folder.")
    good_part: str = Field(min_length=3, max_length=800, description="What a good part looks like.")
    defects: tuple[DefectType, ...] = Field(min_length=1, max_length=40)
    notes: str = Field("", max_length=800, description="Anything else the inspector should know.")

    @model_validator(mode="after")
    def _unique(self) -> "Knowledge":
        seen: set[str] = set()
        for defect in self.defects:
            if defect.name in seen:
                raise ValueError(f"defect name {defect.name!r} appears twice; names must be unique")
            seen.add(defect.name)
        return self

    @property
    def defect_types(self) -> tuple[str, ...]:
        """The verdict's `defect_type` enum: the catalogue, then 'other' and 'none'."""
        return tuple(d.name for d in self.defects) + RESERVED_TYPES


def generic_knowledge(product: str) -> Knowledge:
    """Used when a product has no knowledge file yet: no catalogue beyond 'other'."""
    return Knowledge.model_construct(
        product=product,
        good_part="(no description of a good part was provided)",
        defects=(),
        notes="",
    )


def parse_knowledge(text: str, source: str = KNOWLEDGE_FILE, product: str | None = None) -> Knowledge:
    """Validate knowledge YAML; raise ConfigError naming the file, the key path and the fix."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}; {DOCS_HINT}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping with keys good_part and defects, got {type(data).__name__}; {DOCS_HINT}"
        )
    try:
        knowledge = Knowledge.model_validate(data)
    except ValidationError as exc:
        problems = []
        errors = exc.errors()
        item_errors = {err["loc"][0] for err in errors if len(err.get("loc", ())) > 1}
        for err in errors:
            loc = err.get("loc", ())
            if err.get("type") == "too_short" and len(loc) == 1 and loc[0] in item_errors:
                continue  # pydantic's echo of the item errors above ("at least 1 item after validation")
            path = _key_path(err.get("loc", ()))
            message = err.get("msg", "invalid").removeprefix("Value error, ")
            if err.get("type") == "extra_forbidden":
                message = "unknown key (allowed: " + _allowed_keys(err.get("loc", ())) + ")"
            elif err.get("type") == "missing":
                message = "required key is missing"
            elif err.get("type") == "too_short" and loc == ("defects",):
                message = "the catalogue needs at least one defect (name and description)"
            problems.append(f"{path}: {message}" if path else message)
        raise ConfigError(f"{source}: " + "; ".join(problems) + f"; {DOCS_HINT}") from None
    if product is not None and knowledge.product and knowledge.product != product:
        raise ConfigError(
            f"{source}: product is {knowledge.product!r} but the file belongs to product {product!r}; "
            "fix the product key or move the file"
        )
    return knowledge


def load_knowledge(calibration_dir: str | Path, product: str) -> Knowledge | None:
    """Read calibration/<product>/knowledge.yaml; None when the product has none."""
    path = Path(calibration_dir) / product / KNOWLEDGE_FILE
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc}); it must be a UTF-8 YAML file") from None
    return parse_knowledge(text, source=str(path), product=product)


def _key_path(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _allowed_keys(loc: tuple) -> str:
    model = DefectType if any(isinstance(item, int) for item in loc) else Knowledge
    return ", ".join(model.model_fields)
