"""NTK-aware scaling: a larger RoPE base instead of squeezed positions."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from longreach.methods.base import param
from longreach.methods.registry import register
from longreach.methods.rope import RopeMethod, default_inv_freq, ntk_base


def ntk_frequencies(head_dim: int, base: float, factor: float) -> tuple[torch.Tensor, float]:
    """θ'_i = (b · s^(d/(d-2)))^(-2i/d), attention factor 1.

    The exponent d/(d-2) makes the lowest frequency i = d/2 - 1 exactly θ/s (it is
    interpolated like PI) while the highest, i = 0, is unchanged (extrapolated).
    """
    return default_inv_freq(head_dim, ntk_base(base, head_dim, factor)), 1.0


@register
@dataclasses.dataclass
class NTKAware(RopeMethod):
    """Static NTK-aware scaling of the RoPE base (bloc97, 2023; used by Code Llama, analysed in YaRN).

    Raising the base from b to b·s^(d/(d-2)) stretches the low frequencies (long
    wavelengths) by up to s while leaving the high frequencies that resolve nearby
    tokens almost untouched, so short-range order survives without fine-tuning.
    Formalised in the YaRN paper (Peng et al., 2023, arXiv 2309.00071, section 3.1,
    Definition 1: b' = b·s^(|D|/(|D|-2))) after bloc97's 2023 post "NTK-Aware Scaled RoPE".

    Parameters:
        factor: s (default 4).
        original_max: L, the trained length (default: the model's own); the static
            formula does not use it.
    """

    name: ClassVar[str] = "ntk"
    paper: ClassVar[str] = (
        "bloc97, 2023, NTK-Aware Scaled RoPE; as defined in Peng et al., 2023, YaRN, arXiv 2309.00071, section 3.1"
    )
    summary: ClassVar[str] = "RoPE base b -> b*s^(d/(d-2))"

    factor: float = param(4.0, "s: the base grows by s^(d/(d-2)); reach about s x original_max")
    original_max: int | None = param(None, "L, the trained length (default: the model's)")

    def frequencies(
        self, head_dim: int, base: float, trained_length: int, seq_len: int | None = None
    ) -> tuple[torch.Tensor, float]:
        return ntk_frequencies(head_dim, base, self.factor)
