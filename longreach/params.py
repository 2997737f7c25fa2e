"""Parameters of methods and tasks: one conversion from spec strings and Python values.

A method (``yarn:factor=4``) and a task (``multi-needle:k=4``) both declare their parameters
as dataclass fields; ``coerce`` turns a spec string or a Python value into the field's
type with a one-sentence error, so both are validated the same way.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from longreach.errors import LongreachError

TRUE = ("true", "yes", "on", "1")
FALSE = ("false", "no", "off", "0")


def param(default: Any, help: str) -> Any:
    """A parameter: its default and the one-line help that ``longreach methods`` shows."""
    return dataclasses.field(default=default, metadata={"help": help})


def field_help(field: dataclasses.Field) -> str:
    return str(field.metadata.get("help", ""))


def coerce(owner: str, name: str, value: Any, annotation: Any) -> Any:
    """Turn ``value`` (a Python value or a string from a spec) into the type ``annotation``.

    ``owner`` names the method or task in the error message. ``X | None`` accepts None,
    ``"none"`` and ``"auto"``; ``Literal`` choices are matched case-insensitively.
    """
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    optional = (origin is typing.Union or origin is types.UnionType) and type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "auto")):
            return None
        annotation = next(a for a in args if a is not type(None))
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
    if origin is typing.Literal:
        text = str(value).strip().lower() if isinstance(value, str) else value
        if text not in args:
            choices = ", ".join(str(a) for a in args)
            raise LongreachError(f"{owner}: {name} must be one of {choices}, got {value!r}.")
        return text
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = value.strip().lower() if isinstance(value, str) else None
        if text in TRUE or text in FALSE:
            return text in TRUE
        raise LongreachError(f"{owner}: {name} must be true or false, got {value!r}.")
    if annotation is int:
        if isinstance(value, bool):
            raise LongreachError(f"{owner}: {name} must be a whole number, got {value!r}.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise LongreachError(f"{owner}: {name} must be a whole number, got {value!r}.")
    if annotation is float:
        if isinstance(value, bool):
            raise LongreachError(f"{owner}: {name} must be a number, got {value!r}.")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                pass
        if number is None:
            raise LongreachError(f"{owner}: {name} must be a number, got {value!r}.")
        if not math.isfinite(number):
            raise LongreachError(f"{owner}: {name} must be a finite number, got {value!r}.")
        return number
    if annotation is str:
        return str(value)
    return value
