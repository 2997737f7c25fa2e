"""longreach: reach past a causal LM's trained context length, and measure how far it really reaches.

The public functions (``load``, ``extend``, ``prefill``, ``greedy``) are imported on first use,
so that ``import longreach`` and ``longreach --version`` / ``--help`` do not pay for importing
torch and transformers (about 2 s).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from longreach.errors import LongreachError

if TYPE_CHECKING:  # pragma: no cover
    from longreach.context import Context
    from longreach.extend import extend
    from longreach.methods.reader import read
    from longreach.models import load
    from longreach.prefill import greedy, prefill
    from longreach.session import Session

_LAZY = {
    "Context": "longreach.context",
    "extend": "longreach.extend",
    "load": "longreach.models",
    "prefill": "longreach.prefill",
    "greedy": "longreach.prefill",
    "Session": "longreach.session",
    "read": "longreach.methods.reader",
}

__all__ = [
    "Context",
    "LongreachError",
    "Session",
    "__version__",
    "extend",
    "greedy",
    "load",
    "prefill",
    "read",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'longreach' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps ``longreach.extend`` and ``longreach.prefill`` the functions: importing the
    submodules of the same names would otherwise rebind them to the modules."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
