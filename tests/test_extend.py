"""extend() on tiny models: reversibility, degenerate settings, transformers parity, generate, errors."""

import warnings

import pytest
import torch
from tiny import FAMILIES, tiny_model

import longreach as lr
from longreach import LongreachError
from longreach.methods import active_extensions

ROPE_METHODS = ("pi", "ntk", "dynamic-ntk", "yarn", "truncated")
TRAINED = 256  # tiny models' max_position_embeddings
# Methods that transformers also ships: ours -> transformers' rope_parameters.
TRANSFORMERS_TWINS = {
    "pi": {"rope_type": "linear", "factor": 4.0},
    "dynamic-ntk": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": TRAINED},
}


def ids(length, batch=1, seed=0):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, input_ids, **kwargs):
    return model(input_ids, **kwargs).logits


def twin(model, family, rope):
    """The same weights under transformers' own RoPE scaling."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = tiny_model(family, rope_parameters={**rope, "rope_theta": 10000.0})
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("method", ROPE_METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_bit_identical_logits(family, method):
    model = tiny_model(family)
    x = ids(300)
    before = logits(model, x)
    with lr.extend(model, method) as handle:
        assert handle.active and active_extensions(model) == [handle]
        inside = logits(model, x)
    assert not handle.active and active_extensions(model) == []
    after = logits(model, x)
    assert torch.equal(after, before), f"{method} on {family}: logits changed after removal"
    assert (inside - before).abs().max() > 1e-5, (
        f"{method} on {family} changed nothing at 300 tokens"
    )


@pytest.mark.parametrize(
    "spec",
    # dynamic-ntk still scales at factor 1 (by n/L); its degenerate setting is n <= original_max.
    [
        "pi:factor=1",
        "ntk:factor=1",
        "dynamic-ntk:original_max=300",
        "yarn:factor=1",
        "truncated:cutoff=1e9",
    ],
)
@pytest.mark.parametrize("family", FAMILIES)
def test_degenerate_settings_reproduce_the_unmodified_model(family, spec):
    model = tiny_model(family)
    x = ids(300)
    before = logits(model, x)
    with lr.extend(model, spec):
        inside = logits(model, x)
    torch.testing.assert_close(inside, before, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", sorted(TRANSFORMERS_TWINS))
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_transformers_own_rope_type(family, method):
    model = tiny_model(family)
    reference = twin(model, family, TRANSFORMERS_TWINS[method])
    x = ids(500, batch=2)
    expected = logits(reference, x)
    with lr.extend(model, method, factor=4):
        got = logits(model, x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (expected - logits(model, x)).abs().max() > 1e-5, "the twin should differ from vanilla"


def test_yarn_with_its_own_parameters_matches_transformers():
    model = tiny_model("llama")
    reference = twin(
        model,
        "llama",
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 128,
            "beta_slow": 2.0,
            "beta_fast": 16.0,
        },
    )
    x = ids(500)
    with lr.extend(model, "yarn:factor=8,original_max=128,alpha=2,beta=16"):
        got = logits(model, x)
    torch.testing.assert_close(got, logits(reference, x), atol=1e-5, rtol=0)


def test_dynamic_ntk_returns_to_the_original_frequencies_for_a_shorter_input():
    model = tiny_model("llama")
    long_x, short_x = ids(600), ids(200, seed=1)
    vanilla_short = logits(model, short_x)
    with lr.extend(model, "dynamic-ntk", factor=4):
        first_long = logits(model, long_x)
        short = logits(model, short_x)
        again_long = logits(model, long_x)
    assert torch.equal(short, vanilla_short), "a short input after a long one must see plain RoPE"
    assert torch.equal(again_long, first_long), (
        "the frequencies must depend on the current length only"
    )


def test_dynamic_ntk_frequencies_follow_the_current_length_not_the_longest_seen():
    model = tiny_model("llama")
    x700, x400 = ids(700), ids(400, seed=2)
    fresh_400 = twin(model, "llama", TRANSFORMERS_TWINS["dynamic-ntk"])
    with lr.extend(model, "dynamic-ntk", factor=4):
        logits(model, x700)
        after_long = logits(model, x400)
    torch.testing.assert_close(after_long, logits(fresh_400, x400), atol=1e-5, rtol=0)


def padded_batch(lengths, pad_id=0):
    """Left-padded input ids and attention mask for rows of the given lengths."""
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_id)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        input_ids[row, width - n :] = ids(n, seed=10 + row)[0]
        mask[row, width - n :] = 1
    return input_ids, mask


def generate(model, input_ids, mask, steps=4):
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    return out.sequences[:, input_ids.shape[1] :], torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("method", ["pi", "yarn"])
def test_generate_with_left_padding_matches_each_row_alone(method):
    model = tiny_model("qwen2")
    lengths = [300, 270]
    input_ids, mask = padded_batch(lengths)
    with lr.extend(model, method):
        tokens, step_logits = generate(model, input_ids, mask)
        for row, n in enumerate(lengths):
            alone_ids, alone_mask = padded_batch([n])
            alone_ids[0] = input_ids[row, -n:]
            alone_tokens, alone_logits = generate(model, alone_ids, alone_mask)
            assert torch.equal(tokens[row], alone_tokens[0]), (
                f"row {row}: padded batch generated other tokens"
            )
            torch.testing.assert_close(step_logits[row], alone_logits[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_dynamic_ntk_decoding_matches_transformers_dynamic(family):
    # Prefill past L, then token by token through the cache, a padded batch of two.
    model = tiny_model(family)
    reference = twin(model, family, TRANSFORMERS_TWINS["dynamic-ntk"])
    input_ids, mask = padded_batch([300, 280])
    expected_tokens, expected_logits = generate(reference, input_ids, mask, steps=6)
    with lr.extend(model, "dynamic-ntk", factor=4):
        tokens, step_logits = generate(model, input_ids, mask, steps=6)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(step_logits, expected_logits, atol=1e-5, rtol=0)


def test_handle_is_reusable_as_remove_and_spec_and_instance_forms():
    model = tiny_model("mistral")
    x = ids(300)
    before = logits(model, x)
    handle = lr.extend(model, "yarn:factor=2", original_max=200)
    assert handle.method.to_spec() == "yarn:factor=2,original_max=200"
    assert (
        repr(handle) == "<Extension yarn:factor=2,original_max=200 on MistralForCausalLM (active)>"
    )
    handle.remove()
    handle.remove()  # a second remove does nothing
    assert repr(handle).endswith("(removed)>")
    method = lr.methods.build_method("ntk", factor=2)
    with lr.extend(model, method) as h:
        assert h.method is method
    assert torch.equal(logits(model, x), before)


def test_two_position_methods_at_once_is_an_error_until_the_first_is_removed():
    model = tiny_model("llama")
    x = ids(300)
    before = logits(model, x)
    first = lr.extend(model, "yarn")
    with pytest.raises(LongreachError) as info:
        lr.extend(model, "ntk")
    assert str(info.value) == (
        "ntk cannot be applied while yarn is active on this model: both change RoPE frequencies; "
        "remove the yarn extension first."
    )
    assert active_extensions(model) == [first], "the failed extend must leave nothing behind"
    first.remove()
    with lr.extend(model, "ntk"), lr.extend(model, "vanilla"):
        assert [h.method.name for h in active_extensions(model)] == ["ntk", "vanilla"]
    assert torch.equal(logits(model, x), before)


def test_vanilla_changes_nothing():
    model = tiny_model("gemma")
    x = ids(300)
    before = logits(model, x)
    with lr.extend(model, "vanilla"):
        assert torch.equal(logits(model, x), before)


def test_a_model_without_rope_is_refused_with_the_reason():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)
    )
    with pytest.raises(LongreachError) as info:
        lr.extend(model, "yarn", factor=4)
    assert str(info.value) == (
        "yarn: GPT2LMHeadModel has no rotary position embedding (RoPE) module, and this method "
        "changes RoPE frequencies."
    )
    assert active_extensions(model) == []
    with lr.extend(model, "vanilla"):
        pass


def test_a_model_whose_rope_is_already_scaled_is_refused_with_the_reason():
    model = tiny_model(
        "llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    )
    with pytest.raises(LongreachError) as info:
        lr.extend(model, "pi")
    assert str(info.value) == (
        "pi: LlamaForCausalLM already scales RoPE with rope_type 'linear'; position methods start "
        "from plain RoPE, so load the model without rope scaling."
    )


def test_partial_rotary_uses_the_rotary_dimension():
    # Phi-3 with partial_rotary_factor 0.5 rotates 8 of each head's 16 dimensions.
    from transformers import AutoModelForCausalLM, Phi3Config

    from longreach.methods.pi import pi_frequencies

    config = Phi3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TRAINED,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
        },
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation="sdpa", dtype=torch.float32
    ).eval()
    rotary = model.model.rotary_emb
    assert rotary.inv_freq.numel() == 4
    x = ids(300)
    before = logits(model, x)
    with lr.extend(model, "pi", factor=4):
        torch.testing.assert_close(
            rotary.inv_freq, pi_frequencies(8, 10000.0, 4.0)[0], rtol=0, atol=0
        )
        assert (logits(model, x) - before).abs().max() > 1e-5
    assert torch.equal(logits(model, x), before)


def test_original_max_defaults_to_the_trained_length_and_can_be_overridden():
    model = tiny_model("llama")
    rotary = model.model.rotary_emb
    from longreach.methods.yarn import yarn_frequencies

    with lr.extend(model, "yarn", factor=4):
        torch.testing.assert_close(rotary.inv_freq, yarn_frequencies(16, 10000.0, 4.0, TRAINED)[0])
    with lr.extend(model, "yarn", factor=4, original_max=64):
        torch.testing.assert_close(rotary.inv_freq, yarn_frequencies(16, 10000.0, 4.0, 64)[0])
