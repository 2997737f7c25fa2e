"""Shared plumbing of the methods that change RoPE frequencies.

Notation (docs/methods.md): rotary dimension d, base b, inverse frequencies
θ_i = b^(-2i/d) for i in [0, d/2), trained length L, factor s.

Every RoPE method's math is a pure function ``(head_dim, base, ...) -> (inv_freq,
attention_factor)`` in the style of transformers' ``ROPE_INIT_FUNCTIONS``: ``inv_freq``
are the new θ'_i, and ``attention_factor`` multiplies cos and sin (so it multiplies
the attention logits by its square). ``RopeMethod.install`` writes them into each
rotary embedding module of the model (its ``inv_freq`` buffer and its
``attention_scaling``), which is all the model's forward reads; nothing else changes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from longreach import compat
from longreach.methods.base import ROPE, Method, Patch


def default_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """Plain RoPE, θ_i = b^(-2i/d), computed exactly as transformers computes it (fp32)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim
    return 1.0 / (base**exponents)


def rotary_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's rotary embedding modules: those holding an ``inv_freq`` buffer."""
    return [
        module
        for module in model.modules()
        if isinstance(module._buffers.get("inv_freq"), torch.Tensor)
        and hasattr(module, "attention_scaling")
    ]


@dataclasses.dataclass
class RopeTarget:
    """One rotary module with the facts a RoPE method needs about it."""

    module: torch.nn.Module
    head_dim: int  # rotary dimension d (head_dim x partial_rotary_factor)
    base: float  # b
    trained_length: int  # L unless the method's original_max overrides it


@dataclasses.dataclass
class RopeMethod(Method):
    """Base of the methods that replace the RoPE inverse frequencies.

    Subclasses implement ``frequencies(head_dim, base, trained_length, seq_len)``;
    static methods ignore ``seq_len``. ``original_max`` (every position method takes
    it) is the trained length L; None means the model's own.
    """

    touches: ClassVar[frozenset[str]] = frozenset({ROPE})

    def frequencies(
        self, head_dim: int, base: float, trained_length: int, seq_len: int | None = None
    ) -> tuple[torch.Tensor, float]:
        raise NotImplementedError

    def validate(self) -> None:
        factor = getattr(self, "factor", None)
        if factor is not None and not factor >= 1.0:
            self.fail(
                f"factor must be >= 1 (got {factor:g}); a factor below 1 shrinks the context "
                "instead of extending it."
            )
        original_max = getattr(self, "original_max", None)
        if original_max is not None and original_max < 1:
            self.fail(f"original_max must be a positive number of tokens (got {original_max}).")

    def targets(self, model: torch.nn.Module) -> list[RopeTarget]:
        """Each rotary module of ``model``, checked to be plain RoPE this method can rescale."""
        config = getattr(model, "config", None)
        model_name = type(model).__name__
        params = compat.rope_parameters(config) if config is not None else None
        modules = rotary_modules(model)
        if params is None or not modules:
            self.fail(
                f"{model_name} has no rotary position embedding (RoPE) module, and this method "
                "changes RoPE frequencies."
            )
        if "rope_theta" not in params:
            self.fail(f"{model_name}'s config names no rope_theta, so the RoPE base is unknown.")
        base = float(params["rope_theta"])
        length = self.trained_length(model)
        targets = []
        for module in modules:
            rope_type = getattr(module, "rope_type", "default")
            if not isinstance(rope_type, str):
                self.fail(
                    f"{model_name} uses a different RoPE per layer type ({sorted(rope_type)}), "
                    "which longreach's position methods do not support yet."
                )
            if rope_type != "default":
                self.fail(
                    f"{model_name} already scales RoPE with rope_type {rope_type!r}; position "
                    "methods start from plain RoPE, so load the model without rope scaling."
                )
            inv_freq = module.inv_freq
            dim = 2 * inv_freq.numel()
            expected = default_inv_freq(dim, base)
            if not torch.allclose(inv_freq.detach().float().cpu(), expected, rtol=1e-2, atol=0.0):
                self.fail(
                    f"{model_name}'s rotary frequencies do not follow base^(-2i/d) with "
                    f"base {base:g} and d {dim}, so this method cannot rescale them."
                )
            targets.append(RopeTarget(module, dim, base, length))
        return targets

    def check_model(self, model: torch.nn.Module) -> None:
        self.targets(model)

    def install(self, model: torch.nn.Module, patch: Patch) -> None:
        for target in self.targets(model):
            inv_freq, attention_factor = self.frequencies(
                target.head_dim, target.base, target.trained_length
            )
            set_frequencies(target.module, inv_freq, attention_factor, patch)


def set_frequencies(
    module: torch.nn.Module,
    inv_freq: torch.Tensor,
    attention_factor: float,
    patch: Patch | None = None,
) -> None:
    """Write new frequencies into a rotary module, keeping its buffer's device and dtype.

    With a ``patch`` the old buffer object and scaling are restored on undo; without
    one (a per-call update inside an already-patched module) they are overwritten.
    """
    old = module.inv_freq
    new = inv_freq.to(device=old.device, dtype=old.dtype)
    if patch is None:
        module.inv_freq = new
        module.attention_scaling = attention_factor
    else:
        patch.set_attr(module, "inv_freq", new)
        patch.set_attr(module, "attention_scaling", attention_factor)


def ntk_base(base: float, head_dim: int, scale: float) -> float:
    """NTK-aware base b · s^(d/(d-2)) (bloc97, 2023)."""
    return base * scale ** (head_dim / (head_dim - 2))


def wavelengths(inv_freq: torch.Tensor) -> torch.Tensor:
    """λ_i = 2π/θ_i, in tokens."""
    return 2 * math.pi / inv_freq
