"""Context-extension methods: one file per method, a registry, and spec parsing.

``longreach.extend(model, "yarn", factor=4)`` applies a method; see ``longreach.extend``.
Adding a method is adding a file with a ``@register``-ed ``Method`` dataclass and
importing it below.
"""

from longreach.methods import (  # noqa: F401 - register
    dynamic_ntk,
    h2o,
    hip,
    hyper,
    infiniretri,
    infllm,
    lm_infinite,
    ntk,
    pi,
    self_extend,
    sirllm,
    snapkv,
    spans,
    squeezed,
    streaming,
    truncated,
    vanilla,
    xl3m,
    yarn,
)
from longreach.methods.base import Extension, Method, Patch, active_extensions
from longreach.methods.registry import all_methods, get_method, method_names, register
from longreach.methods.spec import build_method, parse_spec

__all__ = [
    "Extension",
    "Method",
    "Patch",
    "active_extensions",
    "all_methods",
    "build_method",
    "get_method",
    "method_names",
    "parse_spec",
    "register",
]
