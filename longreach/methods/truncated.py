"""Giraffe's truncated basis: keep the fast RoPE frequencies, flatten or drop the slow ones."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from longreach.methods.base import param
from longreach.methods.registry import register
from longreach.methods.rope import RopeMethod, default_inv_freq


def truncated_frequencies(
    head_dim: int,
    base: float,
    factor: float,
    cutoff: float,
    zero_ratio: float = 8.0,
    rho_ratio: float = 16.0,
) -> tuple[torch.Tensor, float]:
    """θ*_i = θ_i if θ_i >= b;  ρ if a < θ_i < b;  0 if θ_i <= a  (Pal et al., 2023, section 3).

    θ_i are the (optionally linearly scaled, θ_i/s) RoPE frequencies; b = 2π/cutoff,
    a = b/zero_ratio and ρ = b/rho_ratio, the relations in the authors' released code.
    """
    inv_freq = default_inv_freq(head_dim, base) / factor
    b = 2 * math.pi / cutoff
    a = b / zero_ratio
    rho = b / rho_ratio
    flat = torch.where(inv_freq > a, torch.full_like(inv_freq, rho), torch.zeros_like(inv_freq))
    return torch.where(inv_freq >= b, inv_freq, flat), 1.0


@register
@dataclasses.dataclass
class TruncatedBasis(RopeMethod):
    """Giraffe's truncated basis (Pal et al., 2023, arXiv 2308.10882, section 3).

    The paper keeps the high RoPE frequencies, which the model sees through many full
    turns during training, and replaces the low ones, whose angles at long distances it
    never saw: frequencies at or above a cut-off b are kept, those between a and b are
    set to one small constant ρ, and those at or below a to 0 (no rotation, so those
    dimensions carry no position at all and look the same at every distance):

        θ*_i = θ_i  if θ_i >= b,   ρ  if a < θ_i < b,   0  if θ_i <= a.

    The paper leaves a, b and ρ free. The values here follow the authors' released code
    (abacusai/Long-Context, python/models/interpolate.py): the cut-off is a wavelength
    T with b = 2π/T, a = b/8 and ρ = b/16, and an optional linear scale s is applied to
    the frequencies before truncating. T defaults to the trained length, the rule the
    authors give for it: keep exactly the frequencies that complete at least one full
    turn within the training context. The paper fine-tunes with this basis; applied
    without training it changes the model even at short lengths.

    Degenerate setting: factor 1 and a cutoff at or beyond the longest wavelength
    (2π·b^((d-2)/d) tokens) leave every frequency unchanged.

    Parameters:
        factor: s, linear interpolation applied before truncating (default 1: none).
        original_max: L, the trained length (default: the model's own).
        cutoff: T, the wavelength in tokens of the cut-off b = 2π/T (default L).
        zero_ratio: b/a; frequencies at or below a = b/zero_ratio become 0 (default 8).
        rho_ratio: b/ρ; the constant for frequencies between a and b (default 16).
    """

    name: ClassVar[str] = "truncated"
    paper: ClassVar[str] = (
        "Pal et al., 2023, Giraffe: Adventures in Expanding Context Lengths in LLMs, arXiv 2308.10882"
    )
    summary: ClassVar[str] = "keep frequencies >= 2pi/cutoff, set slower ones to rho or 0"

    factor: float = param(1.0, "s: linear interpolation before truncating (1: none)")
    original_max: int | None = param(None, "L, the trained length (default: the model's)")
    cutoff: float | None = param(None, "T: keep wavelengths <= T tokens, b = 2pi/T (default L)")
    zero_ratio: float = param(8.0, "b/a: frequencies <= a = b/zero_ratio become 0")
    rho_ratio: float = param(16.0, "b/rho: frequencies between a and b become rho = b/rho_ratio")

    def validate(self) -> None:
        super().validate()
        if self.cutoff is not None and not self.cutoff > 0:
            self.fail(f"cutoff must be a positive number of tokens (got {self.cutoff:g}).")
        if not self.zero_ratio >= 1:
            self.fail(f"zero_ratio must be >= 1 so that a <= b (got {self.zero_ratio:g}).")
        if not self.rho_ratio > 0:
            self.fail(f"rho_ratio must be > 0 (got {self.rho_ratio:g}).")

    def frequencies(
        self, head_dim: int, base: float, trained_length: int, seq_len: int | None = None
    ) -> tuple[torch.Tensor, float]:
        cutoff = self.cutoff if self.cutoff is not None else trained_length
        return truncated_frequencies(
            head_dim, base, self.factor, cutoff, self.zero_ratio, self.rho_ratio
        )
