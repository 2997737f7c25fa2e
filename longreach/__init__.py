"""longreach: reach past a causal LM's trained context length, and measure how far it really reaches."""

from __future__ import annotations

__version__ = "0.1.0"

from longreach.errors import LongreachError
from longreach.extend import extend
from longreach.models import load
from longreach.prefill import greedy, prefill  # the function shadows the submodule name

__all__ = ["LongreachError", "__version__", "extend", "greedy", "load", "prefill"]
