"""How a config field's type reads from YAML and from the command line: its shape (optional, list, element type), the
words that mean none/true/false, and the canonical flag name."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import Any

NO_VALUE = ("none", "null")
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


@dataclass(frozen=True)
class FieldShape:
    """What a field's type hint allows: the base type (bool, int, float, str, list, dict), a list's element type and
    whether None is allowed."""

    origin: type
    element: type | None
    optional: bool

    def expected(self) -> str:
        if self.origin is list:
            return "a list of numbers" if self.element in (int, float) else "a list"
        return {bool: "true or false", dict: "a JSON object"}.get(self.origin, self.origin.__name__)

    def metavar(self) -> str:
        if self.origin is list:
            word = "NUMBER" if self.element in (int, float) else "WORD"
            text = f"{word} [{word} ...]"
        else:
            text = {bool: "true|false", dict: "JSON"}.get(self.origin, self.origin.__name__.upper())
        return f"{text}|none" if self.optional else text


def field_shape(hint: Any) -> FieldShape:
    args = typing.get_args(hint)
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        optional = type(None) in args
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint) or hint
    element = None
    if origin is list:
        element_args = typing.get_args(hint)
        element = element_args[0] if element_args else str
    if origin not in (bool, int, float, str, list, dict):
        raise TypeError(f"config field type {hint!r} is not one the engine reads (bool, int, float, str, list, dict)")
    return FieldShape(origin, element, optional)


def canonical(key: str) -> str:
    """`--micro-batch-size` and `--micro_batch_size` name the same field."""
    return str(key).replace("-", "_")


def flag_text(value: Any) -> str:
    """A value as it is typed after its flag: true/false, none, space-separated words, JSON for a mapping."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "'" + json.dumps(value) + "'"
    if isinstance(value, list):
        return " ".join(map(str, value)) if value else "[]"
    if value == "":
        return "''"
    return str(value)
