"""Method specs as strings, for the CLI and the benchmark: ``yarn:factor=4,original_max=8192``.

A spec is a method name, optionally followed by ``:`` and comma-separated
``key=value`` pairs. Values are converted to the parameter's type by the method's
dataclass, the same path Python keyword arguments take, so a spec and
``extend(model, "yarn", factor=4)`` are validated identically.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from longreach.errors import LongreachError
from longreach.methods.base import Method
from longreach.methods.registry import get_method

_FORM = "write it as name:key=value,key=value (e.g. yarn:factor=4,original_max=8192)"


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``"yarn:factor=4,original_max=8192"`` into ``("yarn", {"factor": "4", ...})``.

    Only the syntax is checked here; names and values are checked by ``build_method``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise LongreachError(f"empty method spec; {_FORM}.")
    name, sep, rest = spec.strip().partition(":")
    name = name.strip()
    if not name:
        raise LongreachError(f"method spec {spec!r} has no method name; {_FORM}.")
    params: dict[str, str] = {}
    if sep and not rest.strip():
        raise LongreachError(f"method spec {spec!r} has nothing after ':'; {_FORM}.")
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not eq or not key or not value:
                raise LongreachError(
                    f"method spec {spec!r} has a bad part {item.strip()!r}; {_FORM}."
                )
            if key in params:
                raise LongreachError(f"method spec {spec!r} sets {key!r} twice.")
            params[key] = value
    return name, params


def build_method(method: str | Method, **params: Any) -> Method:
    """A validated Method from a name, a spec string or a Method, plus keyword parameters.

    ``build_method("yarn:factor=4", original_max=8192)`` and
    ``build_method("yarn", factor=4, original_max=8192)`` give the same method; a
    parameter set both in the spec and as a keyword is an error.
    """
    if isinstance(method, Method):
        if not params:
            return method
        return build_method(method.name, **{**method.params(), **params})
    if not isinstance(method, str):
        raise LongreachError(
            f"a method is a name or a spec string such as 'yarn:factor=4', got {type(method).__name__}."
        )
    name, spec_params = parse_spec(method)
    for key in spec_params:
        if key in params:
            raise LongreachError(f"{key!r} is set both in the spec {method!r} and as a keyword.")
    cls = get_method(name)
    known = [f.name for f in dataclasses.fields(cls)]
    merged = {**spec_params, **params}
    for key in merged:
        if key not in known:
            listing = ", ".join(known) if known else "none"
            raise LongreachError(
                f"{cls.name} has no parameter {key!r}; its parameters are: {listing}."
            )
    return cls(**merged)
