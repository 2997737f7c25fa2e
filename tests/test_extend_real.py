"""extend() on the real SmolLM2-135M (fp32): reversible, degenerate settings exact, short inputs untouched."""

import pytest
import torch

import longreach as lr

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def smollm2():
    model, tok = lr.load("smollm2-135m", dtype="fp32", device="cpu")
    text = "The capital of France is Paris. " * 24
    return model, tok(text, return_tensors="pt").input_ids[:, :96]


@torch.no_grad()
def test_each_rope_method_changes_the_logits_and_removal_restores_them_bit_for_bit(smollm2):
    model, x = smollm2
    before = model(x).logits
    for spec in ("pi", "ntk", "yarn", "truncated"):
        with lr.extend(model, spec):
            inside = model(x).logits
        assert (inside - before).abs().max() > 1e-3, f"{spec} changed nothing"
        assert torch.equal(model(x).logits, before), f"{spec}: logits changed after removal"


@torch.no_grad()
def test_degenerate_settings_and_short_dynamic_inputs_equal_the_unmodified_model(smollm2):
    model, x = smollm2
    before = model(x).logits
    for spec in ("pi:factor=1", "yarn:factor=1", "ntk:factor=1"):
        with lr.extend(model, spec):
            torch.testing.assert_close(model(x).logits, before, atol=1e-4, rtol=0)
    with lr.extend(model, "dynamic-ntk", factor=4):  # 96 tokens << 8192: plain RoPE, exactly
        assert torch.equal(model(x).logits, before)
