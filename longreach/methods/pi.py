"""Position interpolation (PI): squeeze positions back into the trained range."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from longreach.methods.base import param
from longreach.methods.registry import register
from longreach.methods.rope import RopeMethod, default_inv_freq


def pi_frequencies(head_dim: int, base: float, factor: float) -> tuple[torch.Tensor, float]:
    """θ'_i = θ_i / s, attention factor 1.

    PI maps position m to m/s (Chen et al., 2023, section 2.2: f'(x, m) = f(x, mL/L')); since
    RoPE's angle is m·θ_i, dividing the frequencies by s is the same rotation.
    """
    return default_inv_freq(head_dim, base) / factor, 1.0


@register
@dataclasses.dataclass
class PositionInterpolation(RopeMethod):
    """Linear position interpolation (Chen et al., 2023, arXiv 2306.15595).

    Every position m becomes m/s, so an input of s·L tokens uses only the positions
    0..L the model was trained on, at s times finer spacing. The paper fine-tunes
    briefly after interpolating; without that, the squeezed spacing damages the model
    at every length (SmolLM2-135M: perplexity 25 -> ~170 at 2k), which the
    reports must show. Equals transformers' ``linear`` rope type.

    Parameters:
        factor: s, the interpolation factor (default 4): reach s·L tokens.
        original_max: L, the trained length (default: the model's own). PI's math does
            not use it; it fixes the length the factor refers to.
    """

    name: ClassVar[str] = "pi"
    paper: ClassVar[str] = (
        "Chen et al., 2023, Extending Context Window of LLMs via Positional Interpolation, arXiv 2306.15595"
    )
    summary: ClassVar[str] = "positions m -> m/s (transformers' linear)"

    factor: float = param(4.0, "s: positions are divided by s; reach s x original_max")
    original_max: int | None = param(None, "L, the trained length (default: the model's)")

    def frequencies(
        self, head_dim: int, base: float, trained_length: int, seq_len: int | None = None
    ) -> tuple[torch.Tensor, float]:
        return pi_frequencies(head_dim, base, self.factor)
