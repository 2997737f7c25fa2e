"""YaRN: NTK-by-parts interpolation plus an attention temperature."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

import torch

from longreach.methods.base import param
from longreach.methods.registry import register
from longreach.methods.rope import RopeMethod, default_inv_freq


def yarn_attention_factor(factor: float) -> float:
    """√(1/t) = 0.1·ln(s) + 1 (YaRN section 3.4), applied to cos and sin, so logits scale by its square."""
    return 0.1 * math.log(factor) + 1.0 if factor > 1.0 else 1.0


def yarn_ramp_by_ratio(
    inv_freq: torch.Tensor, trained_length: int, alpha: float, beta: float
) -> torch.Tensor:
    """The paper's ramp γ_i = clamp((r_i − α)/(β − α), 0, 1) with r_i = L/λ_i = L·θ_i/2π."""
    ratio = trained_length * inv_freq / (2 * math.pi)
    return ((ratio - alpha) / (beta - alpha)).clamp(0.0, 1.0)


def yarn_ramp_by_index(
    head_dim: int, base: float, trained_length: int, alpha: float, beta: float
) -> torch.Tensor:
    """The released code's ramp: linear in the dimension index i, not in r_i.

    It finds the (fractional) dimensions where r_i = β and r_i = α, i(r) = d·ln(L/(2π·r))
    / (2·ln b), rounds them outwards (floor, ceil) and ramps γ linearly from 1 at the
    first to 0 at the second. transformers' ``yarn`` and YaRN checkpoints use this form.
    """

    def dim_at(ratio: float) -> float:
        return head_dim * math.log(trained_length / (ratio * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(dim_at(beta)), 0)
    high = min(math.ceil(dim_at(alpha)), head_dim - 1)
    if low == high:
        high += 0.001  # as the reference code, to avoid dividing by zero
    index = torch.arange(head_dim // 2, dtype=torch.float32)
    return 1.0 - ((index - low) / (high - low)).clamp(0.0, 1.0)


def yarn_frequencies(
    head_dim: int,
    base: float,
    factor: float,
    trained_length: int,
    alpha: float = 1.0,
    beta: float = 32.0,
    attention_factor: float | None = None,
    ramp: str = "index",
) -> tuple[torch.Tensor, float]:
    """θ'_i = (1 − γ_i)·θ_i/s + γ_i·θ_i, and the attention factor 0.1·ln(s) + 1."""
    inv_freq = default_inv_freq(head_dim, base)
    if ramp == "ratio":
        gamma = yarn_ramp_by_ratio(inv_freq, trained_length, alpha, beta)
    else:
        gamma = yarn_ramp_by_index(head_dim, base, trained_length, alpha, beta)
    scaled = (1.0 - gamma) * (inv_freq / factor) + gamma * inv_freq
    if attention_factor is None:
        attention_factor = yarn_attention_factor(factor)
    return scaled, attention_factor


@register
@dataclasses.dataclass
class YaRN(RopeMethod):
    """YaRN (Peng et al., 2023, arXiv 2309.00071): NTK-by-parts interpolation + temperature.

    Each RoPE dimension is treated by how many full turns it makes within the trained
    length, r_i = L/λ_i with wavelength λ_i = 2π/θ_i (section 3.2, Definition 2):
    dimensions that turn more than β times (high frequencies, which encode local order)
    keep θ_i; those that turn less than α times are interpolated like PI, θ_i/s; in
    between, γ_i ramps from one to the other and θ'_i = (1 − γ_i)·θ_i/s + γ_i·θ_i. The
    attention logits are then scaled by (0.1·ln s + 1)², applied as the factor
    0.1·ln s + 1 on both cos and sin (section 3.4; transformers' ``attention_factor``).

    Paper and code differ on the ramp: the paper's γ is linear in r_i,
    γ_i = clamp((r_i − α)/(β − α), 0, 1), while the authors' released code (and so
    transformers' ``yarn`` and every YaRN checkpoint) ramps linearly in the dimension
    index between the dimensions where r = β and r = α, rounded outwards. The default,
    ``ramp=index``, follows the code so that ``yarn`` equals transformers' ``yarn``;
    ``ramp=ratio`` is the paper's equation as written.

    Parameters:
        factor: s (default 4): reach s·L tokens.
        original_max: L in r_i = L/λ_i (default: the model's trained length).
        alpha: α, turns below which a dimension is fully interpolated (default 1;
            transformers' ``beta_slow``).
        beta: β, turns above which a dimension is left unchanged (default 32;
            transformers' ``beta_fast``).
        attention_factor: the factor on cos and sin (default 0.1·ln s + 1).
        ramp: ``index`` (released code, default) or ``ratio`` (paper's equation).
    """

    name: ClassVar[str] = "yarn"
    paper: ClassVar[str] = (
        "Peng et al., 2023, YaRN: Efficient Context Window Extension of LLMs, arXiv 2309.00071"
    )
    summary: ClassVar[str] = "NTK-by-parts ramp + attention temperature (transformers' yarn)"

    factor: float = param(4.0, "s: reach s x original_max")
    original_max: int | None = param(None, "L in r = L/wavelength (default: the model's)")
    alpha: float = param(1.0, "turns within L below which a dimension is interpolated (beta_slow)")
    beta: float = param(32.0, "turns within L above which a dimension is kept (beta_fast)")
    attention_factor: float | None = param(None, "factor on cos/sin (default 0.1*ln(s)+1)")
    ramp: Literal["index", "ratio"] = param(
        "index", "index: released code; ratio: paper's equation"
    )

    def validate(self) -> None:
        super().validate()
        if not self.alpha > 0:
            self.fail(f"alpha must be > 0 (got {self.alpha:g}).")
        if not self.beta > self.alpha:
            self.fail(
                f"beta must be larger than alpha (got beta {self.beta:g}, alpha {self.alpha:g})."
            )
        if self.attention_factor is not None and not self.attention_factor > 0:
            self.fail(f"attention_factor must be > 0 (got {self.attention_factor:g}).")

    def frequencies(
        self, head_dim: int, base: float, trained_length: int, seq_len: int | None = None
    ) -> tuple[torch.Tensor, float]:
        return yarn_frequencies(
            head_dim,
            base,
            self.factor,
            trained_length,
            alpha=self.alpha,
            beta=self.beta,
            attention_factor=self.attention_factor,
            ramp=self.ramp,
        )
