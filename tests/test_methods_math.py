"""The RoPE methods' math as pure functions: against transformers' rope init functions and by hand."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from longreach.methods.dynamic_ntk import dynamic_ntk_frequencies
from longreach.methods.ntk import ntk_frequencies
from longreach.methods.pi import pi_frequencies
from longreach.methods.rope import default_inv_freq
from longreach.methods.truncated import truncated_frequencies
from longreach.methods.yarn import yarn_attention_factor, yarn_frequencies

# (head_dim, base, trained length): the tiny test models, a Llama-2-like and a SmolLM2-like head.
SHAPES = [(16, 10000.0, 256), (128, 10000.0, 4096), (64, 100000.0, 8192)]


def hf_config(head_dim, base, length, **rope):
    heads = 4
    return LlamaConfig(
        hidden_size=head_dim * heads,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=length,
        rope_parameters={"rope_theta": base, **rope},
    )


def hf_frequencies(config, seq_len=None):
    rope_type = config.rope_parameters["rope_type"]
    return ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)


@pytest.mark.parametrize("head_dim,base,length", SHAPES)
def test_default_matches_transformers_plain_rope(head_dim, base, length):
    config = hf_config(head_dim, base, length, rope_type="default")
    expected = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    assert torch.equal(default_inv_freq(head_dim, base), expected)
    assert config.rope_parameters["rope_theta"] == base


@pytest.mark.parametrize("factor", [1.0, 2.0, 4.0, 8.5])
@pytest.mark.parametrize("head_dim,base,length", SHAPES)
def test_pi_equals_transformers_linear(head_dim, base, length, factor):
    ours, scale = pi_frequencies(head_dim, base, factor)
    theirs, their_scale = hf_frequencies(
        hf_config(head_dim, base, length, rope_type="linear", factor=factor)
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    assert scale == their_scale == 1.0


@pytest.mark.parametrize("seq_len", [None, 100, 256, 257, 600, 1024, 5000])
@pytest.mark.parametrize("head_dim,base,length", SHAPES)
def test_dynamic_ntk_equals_transformers_dynamic(head_dim, base, length, seq_len):
    config = hf_config(head_dim, base, length, rope_type="dynamic", factor=4.0)
    ours, scale = dynamic_ntk_frequencies(head_dim, base, 4.0, length, seq_len)
    theirs, their_scale = hf_frequencies(config, seq_len)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    assert scale == their_scale == 1.0


def test_dynamic_ntk_is_plain_rope_up_to_the_trained_length_then_ntk_of_the_current_scale():
    plain = default_inv_freq(16, 10000.0)
    for n in (None, 1, 255, 256):
        inv, _ = dynamic_ntk_frequencies(16, 10000.0, 4.0, 256, n)
        assert torch.equal(inv, plain), f"length {n} <= L must give plain RoPE"
    # scale (s·n/L) − (s − 1) = 4·448/256 − 3 = 4: the static NTK base for factor 4.
    at_target, _ = dynamic_ntk_frequencies(16, 10000.0, 4.0, 256, 448)
    static, _ = ntk_frequencies(16, 10000.0, 4.0)
    torch.testing.assert_close(at_target, static, rtol=1e-6, atol=0)


@pytest.mark.parametrize("head_dim,base,length", SHAPES)
def test_ntk_raises_the_base_by_s_to_the_d_over_d_minus_2(head_dim, base, length):
    factor = 4.0
    inv, scale = ntk_frequencies(head_dim, base, factor)
    new_base = base * factor ** (head_dim / (head_dim - 2))
    expected = torch.tensor(
        [new_base ** (-2 * i / head_dim) for i in range(head_dim // 2)], dtype=torch.float64
    )
    torch.testing.assert_close(inv.double(), expected, rtol=1e-6, atol=0)
    plain = default_inv_freq(head_dim, base)
    assert inv[0] == plain[0], "the highest frequency must be unchanged"
    torch.testing.assert_close(inv[-1], plain[-1] / factor, rtol=1e-5, atol=0)
    assert scale == 1.0


@pytest.mark.parametrize("factor", [1.0, 2.0, 4.0, 16.0])
@pytest.mark.parametrize("head_dim,base,length", SHAPES)
def test_yarn_equals_transformers_yarn(head_dim, base, length, factor):
    config = hf_config(
        head_dim,
        base,
        length,
        rope_type="yarn",
        factor=factor,
        original_max_position_embeddings=length,
    )
    ours, scale = yarn_frequencies(head_dim, base, factor, length)
    theirs, their_scale = hf_frequencies(config)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    assert scale == pytest.approx(their_scale, abs=1e-12)


def test_yarn_with_other_alpha_beta_equals_transformers_beta_slow_fast():
    config = hf_config(
        64,
        10000.0,
        2048,
        rope_type="yarn",
        factor=8.0,
        original_max_position_embeddings=1024,
        beta_slow=2.0,
        beta_fast=16.0,
    )
    ours, _ = yarn_frequencies(64, 10000.0, 8.0, 1024, alpha=2.0, beta=16.0)
    theirs, _ = hf_frequencies(config)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_yarn_attention_factor_is_point_one_log_s_plus_one():
    assert yarn_attention_factor(1.0) == 1.0
    assert yarn_attention_factor(4.0) == pytest.approx(0.1 * math.log(4.0) + 1.0)
    _, scale = yarn_frequencies(16, 10000.0, 4.0, 256, attention_factor=1.5)
    assert scale == 1.5


def test_yarn_ratio_ramp_is_the_papers_equation():
    # YaRN section 3.2: r_i = L/λ_i, γ = clamp((r − α)/(β − α), 0, 1), θ' = (1 − γ)θ/s + γθ.
    head_dim, base, length, factor, alpha, beta = 16, 10000.0, 256, 4.0, 1.0, 32.0
    inv, _ = yarn_frequencies(head_dim, base, factor, length, alpha, beta, ramp="ratio")
    for i in range(head_dim // 2):
        theta = base ** (-2 * i / head_dim)
        r = length / (2 * math.pi / theta)
        gamma = min(max((r - alpha) / (beta - alpha), 0.0), 1.0)
        expected = (1 - gamma) * theta / factor + gamma * theta
        assert inv[i].item() == pytest.approx(expected, rel=1e-6), f"dimension {i}"
    # Dimension 0 turns 40.7 times in 256 tokens (> β): kept. Dimension 4 turns 0.41 times (< α): θ/s.
    assert inv[0].item() == pytest.approx(1.0)
    assert inv[4].item() == pytest.approx(0.01 / 4, rel=1e-6)


def test_yarn_and_pi_and_ntk_at_factor_one_are_plain_rope():
    plain = default_inv_freq(16, 10000.0)
    assert torch.equal(pi_frequencies(16, 10000.0, 1.0)[0], plain)
    assert torch.equal(ntk_frequencies(16, 10000.0, 1.0)[0], plain)
    assert torch.equal(yarn_frequencies(16, 10000.0, 1.0, 256)[0], plain)
    assert yarn_frequencies(16, 10000.0, 1.0, 256)[1] == 1.0


def test_truncated_basis_keeps_fast_flattens_middle_zeroes_slow():
    # θ = 10000^(-2i/16) = 1, .316, .1, .0316, .01, .00316, .001, .000316; cutoff T = 256 tokens:
    # b = 2π/256 = .0245, a = b/8 = .00307, ρ = b/16 = .00153.
    inv, scale = truncated_frequencies(16, 10000.0, 1.0, 256)
    b = 2 * math.pi / 256
    rho = b / 16
    plain = default_inv_freq(16, 10000.0)
    expected = torch.cat([plain[:4], torch.tensor([rho, rho, 0.0, 0.0])])
    torch.testing.assert_close(inv, expected, rtol=1e-6, atol=0)
    assert scale == 1.0


def test_truncated_basis_applies_the_linear_scale_before_truncating():
    inv, _ = truncated_frequencies(16, 10000.0, 4.0, 256)
    plain = default_inv_freq(16, 10000.0) / 4.0
    b = 2 * math.pi / 256
    # After /4: .25, .079, .025 are >= b = .0245 and kept; .0079 lies in (a, b): ρ; .0025 <= a: 0.
    torch.testing.assert_close(inv[:3], plain[:3], rtol=1e-6, atol=0)
    assert inv[3].item() == pytest.approx(b / 16, rel=1e-6)
    assert torch.equal(inv[4:], torch.zeros(4))


def test_truncated_basis_with_cutoff_beyond_every_wavelength_is_plain_rope():
    longest = 2 * math.pi * 10000.0 ** (14 / 16)
    inv, _ = truncated_frequencies(16, 10000.0, 1.0, longest * 1.01)
    assert torch.equal(inv, default_inv_freq(16, 10000.0))
