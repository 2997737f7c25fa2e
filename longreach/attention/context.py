"""The per-forward memory context: how an attention function learns about the model's cache.

transformers hands the KV cache to each attention *module*, which calls ``cache.update``
and then the attention function without the cache. A method whose layout must read a
memory (retrieved blocks, representative keys) therefore publishes the cache for the
duration of one model call: its model pre-hook calls :func:`enter` and its forward hook
:func:`leave`. The value lives in a :class:`contextvars.ContextVar`, so two threads (a
server's workers) or two interleaved models never see each other's memory. Nothing else
is global.
"""

from __future__ import annotations

import contextvars
from typing import Any

__all__ = ["current_memory", "enter", "leave"]

_MEMORY: contextvars.ContextVar[Any] = contextvars.ContextVar("longreach_memory", default=None)


def enter(memory: Any) -> contextvars.Token:
    """Publish ``memory`` for the attention calls of the model call that starts now."""
    return _MEMORY.set(memory)


def leave(token: contextvars.Token | None = None) -> None:
    """End the current model call's memory (the value before :func:`enter`, or none)."""
    if token is not None:
        try:
            _MEMORY.reset(token)
            return
        except ValueError:  # made in another context: fall through
            pass
    _MEMORY.set(None)


def current_memory() -> Any:
    """The memory published for the running model call, or None."""
    return _MEMORY.get()
