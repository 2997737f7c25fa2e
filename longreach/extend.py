"""``extend(model, method, **params)``: apply a context-extension method, reversibly."""

from __future__ import annotations

from typing import Any

import torch

from longreach.errors import LongreachError
from longreach.methods import Extension, Method, build_method


def extend(model: torch.nn.Module, method: str | Method, **params: Any) -> Extension:
    """Apply a context-extension method to ``model`` and return its handle.

    ``method`` is a registered name (``"yarn"``), a spec string
    (``"yarn:factor=4,original_max=8192"``) or a Method instance; ``params`` are its
    parameters (``longreach methods`` lists them). The change happens now; the handle
    is a context manager and has ``.remove()``, after which the model's logits are
    bit-identical to before::

        with longreach.extend(model, "yarn", factor=4):
            model.generate(**inputs, max_new_tokens=20)

    Raises LongreachError, with one sentence, for an unknown method or parameter, an
    invalid value, a model the method cannot apply to (no RoPE, RoPE already scaled),
    or a second method that changes what an active one changes (two position methods
    do not compose: remove the first).
    """
    _check_is_model(model)
    return Extension(model, build_method(method, **params))


def _check_is_model(model: Any) -> None:
    if isinstance(model, torch.nn.Module):
        return
    kind = type(model).__name__
    if hasattr(model, "convert_tokens_to_ids"):
        raise LongreachError(
            f"extend got a tokenizer ({kind}), not the model; pass the model: "
            "model, tok = longreach.load(...); longreach.extend(model, ...)."
        )
    shown = repr(model) if isinstance(model, (str, int, float, type(None))) else kind
    raise LongreachError(
        f"extend needs a torch model (such as longreach.load returns), got {shown[:60]}; "
        "load it first: model, tok = longreach.load('lab')."
    )
