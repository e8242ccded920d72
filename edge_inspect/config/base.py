"""The base every config section derives from: strict, documented, immutable."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.types import AllowInfNan, Strict


def _scalar_kinds(annotation: Any) -> set[type]:
    """The plain scalar types a field accepts (int, float, bool, str), through Optional/Union."""
    if annotation in (int, float, bool, str):
        return {annotation}
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return {kind for arg in typing.get_args(annotation) for kind in _scalar_kinds(arg)}
    return set()


class Section(BaseModel):
    """A config section. Unknown keys are errors (a typo must never be silently ignored), and numbers and
    booleans are taken as written: `true` is not the port 1, `"yes"` is not a boolean, `.nan` is no number."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        changed = False
        for field in cls.model_fields.values():
            kinds = _scalar_kinds(field.annotation)
            if not kinds or str in kinds:
                continue  # text fields (and unions with text) keep their own validators
            if not any(isinstance(m, Strict) for m in field.metadata):
                field.metadata.append(Strict())  # int: no bool/str/float; bool: only true/false; float: int ok
                changed = True
            if float in kinds and not any(isinstance(m, AllowInfNan) for m in field.metadata):
                field.metadata.append(AllowInfNan(False))
                changed = True
        if changed:
            cls.model_rebuild(force=True)
