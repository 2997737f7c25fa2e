"""Method names -> method classes. The CLI, the benchmark and the report all read this."""

from __future__ import annotations

from typing import TypeVar

from longreach.errors import LongreachError
from longreach.methods.base import Method

M = TypeVar("M", bound=type[Method])

_REGISTRY: dict[str, type[Method]] = {}


def normalize(name: str) -> str:
    """Registry key of a user-typed name: lower case, ``_`` read as ``-`` (``dynamic_ntk``)."""
    return name.strip().lower().replace("_", "-")


def register(cls: M) -> M:
    """Class decorator: make a Method subclass available under its ``name``."""
    key = normalize(cls.name)
    if not key:
        raise TypeError(f"{cls.__name__} needs a non-empty `name` to be registered")
    existing = _REGISTRY.get(key)
    if existing is not None and existing is not cls:
        raise TypeError(f"method name {key!r} is taken by {existing.__name__}")
    _REGISTRY[key] = cls
    return cls


def method_names() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name``; a one-line error listing the known ones."""
    cls = _REGISTRY.get(normalize(name))
    if cls is None:
        raise LongreachError(
            f"unknown method {name!r}; known methods: {', '.join(method_names())}."
        )
    return cls


def all_methods() -> list[type[Method]]:
    """The registered method classes, sorted by name."""
    return [_REGISTRY[name] for name in method_names()]
